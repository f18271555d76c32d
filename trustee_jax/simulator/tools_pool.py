"""Tool pools: category -> toolset -> [OpenAI function schemas], loaded, validated and sampled.

The layout is TRUSTEE's `toolbench_tools.json` (entries `{"type": "function", "function": {...}}`
plus `toolset_name`/`toolset_description`/`category`), so that file loads as it is with
`lenient=True`; bare function dicts are accepted too. Pools this project writes are checked
strictly: any bad entry fails the load with one error naming every problem.
"""
import copy
import importlib.resources
import json
import logging
import pathlib
import re
from typing import Any

import jsonschema
import numpy as np

Pool = dict[str, dict[str, list[dict[str, Any]]]]

JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
# Non-standard parameter types seen in ToolBench-derived pools, mapped to JSON Schema types.
TYPE_REPAIRS = {"int": "integer", "float": "number", "double": "number", "bool": "boolean",
                "list": "array", "dict": "object", "json": "object"}
STRICT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
METADATA_KEYS = ("toolset_name", "toolset_description", "category")
_META = jsonschema.Draft202012Validator(jsonschema.Draft202012Validator.META_SCHEMA)


class ToolPoolError(ValueError):
  """A pool that cannot be used: every bad entry is listed by category/toolset/name."""


def function_of(entry: dict[str, Any]) -> dict[str, Any]:
  """The function dict of a pool entry, wrapped (`{"type": "function", ...}`) or bare."""
  return entry["function"] if "function" in entry else entry


def tool_name(entry: dict[str, Any]) -> str:
  return function_of(entry)["name"]


def tool_spec(entry: dict[str, Any]) -> dict[str, Any]:
  """The OpenAI tool given to the policy: `{"type": "function", "function": {...}}`, no metadata."""
  fn = function_of(entry)
  return {"type": "function", "function": {k: copy.deepcopy(v) for k, v in fn.items()
                                           if k not in METADATA_KEYS}}


def tools_text(tools: list[dict[str, Any]]) -> str:
  """Tools for a prompt: one compact JSON function per line (fewer tokens than indented JSON)."""
  return "\n".join(json.dumps(function_of(t), ensure_ascii=False) for t in tools)


def tool_problems(entry: Any, *, strict: bool) -> list[str]:
  """What is wrong with one entry (empty when valid). Strict adds name style and `required` checks."""
  if not isinstance(entry, dict):
    return [f"entry is a {type(entry).__name__}, not an object"]
  if "function" in entry and entry.get("type") != "function":
    return [f"wrapped entry has type {entry.get('type')!r}, expected 'function'"]
  fn = function_of(entry)
  if not isinstance(fn, dict):
    return ["'function' is not an object"]
  problems = []
  name = fn.get("name")
  if not isinstance(name, str) or not name.strip() or not name.isprintable():
    problems.append(f"name {name!r} is not a non-empty printable string")
  elif strict and not STRICT_NAME.match(name):
    problems.append(f"name {name!r} does not match {STRICT_NAME.pattern}")
  desc = fn.get("description", "")
  if not isinstance(desc, str) or (strict and not desc.strip()):
    problems.append("description is missing or not a string")
  params = fn.get("parameters")
  if not isinstance(params, dict):
    return problems + ["parameters is not an object"]
  if params.get("type") != "object":
    problems.append(f"parameters.type is {params.get('type')!r}, expected 'object'")
  for err in _META.iter_errors(params):
    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
    problems.append(f"parameters invalid at {where}: {err.message[:160]}")
  props = params.get("properties", {})
  required = params.get("required", [])
  if strict and isinstance(props, dict) and isinstance(required, list):
    missing = [r for r in required if r not in props]
    if missing:
      problems.append(f"required names {missing} are not in properties")
  return problems


def pool_problems(pool: Any, *, strict: bool) -> list[str]:
  """Every problem in a pool, each prefixed with category/toolset/name."""
  if not isinstance(pool, dict) or not pool:
    return ["pool is not a non-empty object of categories"]
  problems = []
  for category, toolsets in pool.items():
    if not isinstance(toolsets, dict) or not toolsets:
      problems.append(f"{category}: not a non-empty object of toolsets")
      continue
    seen_in_category: set[str] = set()
    for toolset, entries in toolsets.items():
      if not isinstance(entries, list) or not entries:
        problems.append(f"{category}/{toolset}: not a non-empty list of tools")
        continue
      seen_in_toolset: set[str] = set()
      for i, entry in enumerate(entries):
        own = tool_problems(entry, strict=strict)
        name = _safe_name(entry, i)
        problems += [f"{category}/{toolset}/{name}: {p}" for p in own]
        if name in seen_in_toolset or (strict and name in seen_in_category):
          problems.append(f"{category}/{toolset}/{name}: duplicate tool name")
        seen_in_toolset.add(name)
        seen_in_category.add(name)
  return problems


def validate_pool(pool: Any, *, strict: bool = True) -> None:
  """Raises ToolPoolError listing every bad entry."""
  problems = pool_problems(pool, strict=strict)
  if problems:
    shown = "\n  ".join(problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise ToolPoolError(f"{len(problems)} problem(s) in tool pool:\n  {shown}{more}")


def repair_types(schema: Any) -> int:
  """Maps non-standard `type` values (e.g. 'credentials', 'select', 'int') to JSON Schema types
  in place, recursively; returns how many were changed. Unknown names become 'string'."""
  if not isinstance(schema, dict):
    return 0
  fixed = 0
  kind = schema.get("type")
  if isinstance(kind, str) and kind not in JSON_TYPES:
    schema["type"] = TYPE_REPAIRS.get(kind.lower(), kind.lower() if kind.lower() in JSON_TYPES
                                      else "string")
    fixed += 1
  for key in ("properties", "$defs", "definitions"):
    for sub in (schema.get(key) or {}).values() if isinstance(schema.get(key), dict) else ():
      fixed += repair_types(sub)
  if isinstance(schema.get("items"), dict):
    fixed += repair_types(schema["items"])
  return fixed


def lenient_pool(pool: Any) -> Pool:
  """A third-party pool made usable: types repaired, entries still invalid (or duplicated in
  their toolset) dropped; logs what was done and fails only if nothing is left."""
  if not isinstance(pool, dict):
    raise ToolPoolError("pool is not an object of categories")
  out: Pool = {}
  repaired = dropped = 0
  for category, toolsets in pool.items():
    for toolset, entries in (toolsets.items() if isinstance(toolsets, dict) else ()):
      kept, names = [], set()
      for entry in entries if isinstance(entries, list) else ():
        entry = copy.deepcopy(entry)
        if isinstance(entry, dict) and isinstance(function_of(entry), dict):
          repaired += repair_types(function_of(entry).get("parameters"))
        if tool_problems(entry, strict=False) or tool_name(entry) in names:
          dropped += 1
          continue
        names.add(tool_name(entry))
        kept.append(entry)
      if kept:
        out.setdefault(category, {})[toolset] = kept
  logging.info("lenient tool pool: %d parameter types repaired, %d tools dropped", repaired, dropped)
  if not out:
    raise ToolPoolError(f"no valid tools left in pool ({dropped} dropped)")
  return out


def load_pool(path: str | pathlib.Path, *, lenient: bool = False) -> Pool:
  """Loads a pool file. Strict (default): any problem raises ToolPoolError. Lenient: for
  third-party pools such as TRUSTEE's, repairs types and drops bad entries (logged)."""
  path = pathlib.Path(path)
  try:
    pool = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ToolPoolError(f"cannot read tool pool {path}: {e}") from e
  if lenient:
    return lenient_pool(pool)
  validate_pool(pool, strict=True)
  return pool


def shipped_pool_path() -> pathlib.Path:
  return pathlib.Path(str(importlib.resources.files("trustee_jax.simulator") / "data"
                          / "tool_pool.json"))


def load_shipped_pool() -> Pool:
  """The small pool this project writes for tests and the demo (strictly validated)."""
  return load_pool(shipped_pool_path())


def sample_tools(pool: Pool, num_tools: int, rng: np.random.Generator) -> tuple[str, list[dict]]:
  """One category, then shuffled toolsets until there are enough tools, then `num_tools` of them
  (fewer if the category has fewer). Names are de-duplicated (first toolset wins)."""
  if num_tools < 1:
    raise ValueError(f"num_tools must be >= 1, got {num_tools}")
  categories = sorted(pool)
  category = categories[int(rng.integers(len(categories)))]
  toolsets = sorted(pool[category])
  candidates: dict[str, dict] = {}
  for index in rng.permutation(len(toolsets)):
    for entry in pool[category][toolsets[index]]:
      candidates.setdefault(tool_name(entry), entry)
    if len(candidates) >= num_tools:
      break
  entries = list(candidates.values())
  take = min(num_tools, len(entries))
  picked = rng.choice(len(entries), size=take, replace=False)
  return category, [tool_spec(entries[int(i)]) for i in picked]


def _safe_name(entry: Any, index: int) -> str:
  try:
    name = function_of(entry).get("name")
  except (AttributeError, KeyError, TypeError):
    name = None
  return name if isinstance(name, str) and name else f"#{index}"
