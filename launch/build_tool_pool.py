"""Invents a tool pool with the frozen simulator LM (data-free), in TRUSTEE's pool layout.

  python launch/build_tool_pool.py --url http://127.0.0.1:8000 --out runs/pool.json
      [--num_categories 8 --toolsets_per_category 3 --tools_per_toolset 4 --seed 0]

The LM writes categories, then toolsets per category, then tools per toolset, each under a JSON
schema (parameters as a flat list, turned into OpenAI function schemas here). Every tool is then
checked with the pool's strict validator; invalid or duplicate names are dropped and reported,
and the written pool passes `tools_pool.load_pool` as it is.
"""
import asyncio
import json
import logging
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from trustee_jax.seeding import retry_seed  # noqa: E402
from trustee_jax.simulator import tools_pool  # noqa: E402
from trustee_jax.simulator.client import SimulatorError  # noqa: E402

_URL = flags.DEFINE_multi_string("url", None, "Simulator base URL(s).", required=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the pool JSON.", required=True)
_API_KEY = flags.DEFINE_string("api_key", None, "Bearer key of the simulator, if it needs one.")
_MODEL = flags.DEFINE_string("model", "default", "Model name sent to the server.")
_NUM_CATEGORIES = flags.DEFINE_integer("num_categories", 6, "Categories to invent.")
_TOOLSETS = flags.DEFINE_integer("toolsets_per_category", 3, "Toolsets per category.")
_TOOLS = flags.DEFINE_integer("tools_per_toolset", 4, "Tools per toolset.")
_SEED = flags.DEFINE_integer("seed", 0, "Base sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 2048, "Token budget of one reply.")
_THINKING = flags.DEFINE_bool("enable_thinking", False, "chat_template_kwargs.enable_thinking.")

NAME = {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,47}$"}
TITLE = {"type": "string", "minLength": 3, "maxLength": 60}
DESC = {"type": "string", "minLength": 10, "maxLength": 240}
PARAM_TYPES = ["string", "integer", "number", "boolean"]


def _closed(props: dict[str, Any]) -> dict[str, Any]:
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False}


def _listing(key: str, item: dict[str, Any], n: int) -> dict[str, Any]:
  schema = _closed({key: {"type": "array", "items": item, "minItems": n, "maxItems": n}})
  return schema | {"x-guidance": {"whitespace_flexible": False}}


def category_schema(n: int) -> dict[str, Any]:
  return _listing("categories", _closed({"description": DESC, "name": TITLE}), n)


def toolset_schema(n: int) -> dict[str, Any]:
  return _listing("toolsets", _closed({"description": DESC, "name": TITLE}), n)


def tools_schema(n: int) -> dict[str, Any]:
  param = _closed({"name": NAME, "type": {"type": "string", "enum": PARAM_TYPES},
                   "description": DESC, "required": {"type": "boolean"},
                   "enum": {"type": "array", "items": {"type": "string", "maxLength": 40},
                            "maxItems": 8}})
  tool = _closed({"description": DESC, "name": NAME,
                  "parameters": {"type": "array", "items": param, "maxItems": 6}})
  return _listing("tools", tool, n)


def to_function(raw: dict[str, Any]) -> dict[str, Any]:
  """An OpenAI function dict from the LM's flat form (enums kept for string parameters)."""
  props, required = {}, []
  for p in raw["parameters"]:
    spec = {"type": p["type"], "description": p["description"]}
    if p["type"] == "string" and p["enum"]:
      spec["enum"] = list(dict.fromkeys(p["enum"]))
    props.setdefault(p["name"], spec)
    if p["required"] and p["name"] not in required:
      required.append(p["name"])
  return {"name": raw["name"], "description": raw["description"],
          "parameters": {"type": "object", "properties": props, "required": required}}


def _ask(text: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": text}]


async def build_pool(client: Any, *, num_categories: int, toolsets_per_category: int,
                     tools_per_toolset: int, seed: int, **sampling: Any
                     ) -> tuple[tools_pool.Pool, list[str]]:
  """The pool and a report of everything dropped (invalid, duplicate or failed requests)."""
  report: list[str] = []
  raw = await client.chat_json(_ask(
      f"Invent {num_categories} distinct everyday domains in which a person might ask an AI "
      "assistant with software tools for help (for example travel, banking, cooking). For each, "
      "a one-sentence description and a short title."), category_schema(num_categories),
      role="pool", seed=seed, **sampling)
  categories = _unique([(c["name"].strip(), c["description"]) for c in raw["categories"]],
                       report, "category")

  async def toolsets_of(i: int, category: str, about: str):
    try:
      out = await client.chat_json(_ask(
          f"Domain: {category} ({about}). Invent {toolsets_per_category} distinct software "
          "services (APIs) a company in this domain would offer. For each, a one-sentence "
          "description and a short title."), toolset_schema(toolsets_per_category), role="pool",
          seed=retry_seed(seed, 1 + i), **sampling)
    except SimulatorError as e:
      report.append(f"dropped category {category!r}: {e}")
      return []
    return _unique([(t["name"].strip(), t["description"]) for t in out["toolsets"]], report,
                   f"toolset in {category}")

  async def tools_of(k: int, category: str, toolset: str, about: str):
    try:
      out = await client.chat_json(_ask(
          f"Service: {toolset} ({about}), in the domain {category}. Write {tools_per_toolset} "
          "distinct API functions it offers. Each has a snake_case name, a one-sentence "
          "description, and up to 6 parameters with a snake_case name, a JSON type, a "
          "description, whether it is required, and for string parameters with a fixed set of "
          "values the allowed values (otherwise an empty list)."),
          tools_schema(tools_per_toolset), role="pool", seed=retry_seed(seed, 1000 + k),
          **sampling)
    except SimulatorError as e:
      report.append(f"dropped toolset {category}/{toolset}: {e}")
      return []
    return [to_function(t) for t in out["tools"]]

  per_category = await asyncio.gather(*(toolsets_of(i, c, d) for i, (c, d) in
                                        enumerate(categories)))
  jobs = [(c, t, d) for (c, _), sets in zip(categories, per_category) for t, d in sets]
  tool_lists = await asyncio.gather(*(tools_of(k, *job) for k, job in enumerate(jobs)))
  pool: tools_pool.Pool = {}
  for (category, toolset, about), fns in zip(jobs, tool_lists):
    seen = {tools_pool.tool_name(e) for ts in pool.get(category, {}).values() for e in ts}
    kept = []
    for fn in fns:
      entry = {"type": "function", "function": fn, "toolset_name": toolset,
               "toolset_description": about, "category": category}
      problems = tools_pool.tool_problems(entry, strict=True)
      if fn["name"] in seen:
        problems.append("duplicate tool name in category")
      if problems:
        report.append(f"dropped {category}/{toolset}/{fn['name']}: {'; '.join(problems)}")
        continue
      seen.add(fn["name"])
      kept.append(entry)
    if kept:
      pool.setdefault(category, {})[toolset] = kept
    elif fns:
      report.append(f"dropped toolset {category}/{toolset}: no valid tools")
  if not pool:
    raise tools_pool.ToolPoolError("the LM produced no valid tools:\n  " + "\n  ".join(report))
  tools_pool.validate_pool(pool, strict=True)
  return pool, report


def _unique(items: list[tuple[str, str]], report: list[str], what: str) -> list[tuple[str, str]]:
  out, seen = [], set()
  for name, about in items:
    if name.lower() in seen:
      report.append(f"dropped duplicate {what} {name!r}")
      continue
    seen.add(name.lower())
    out.append((name, about))
  return out


async def _run() -> None:
  from trustee_jax.simulator.client import ClientConfig, SimulatorClient
  config = ClientConfig(urls=tuple(_URL.value), api_key=_API_KEY.value, model=_MODEL.value)
  async with SimulatorClient(config) as client:
    pool, report = await build_pool(
        client, num_categories=_NUM_CATEGORIES.value, toolsets_per_category=_TOOLSETS.value,
        tools_per_toolset=_TOOLS.value, seed=_SEED.value, temperature=_TEMPERATURE.value,
        max_tokens=_MAX_TOKENS.value,
        chat_template_kwargs={"enable_thinking": _THINKING.value})
    stats = client.stats()
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(pool, indent=1, ensure_ascii=False) + "\n")
  tools_pool.load_pool(out)  # what was written loads strictly, as it is
  n = sum(len(es) for ts in pool.values() for es in ts.values())
  for line in report:
    logging.warning("%s", line)
  print(f"wrote {out}: {len(pool)} categories, {sum(map(len, pool.values()))} toolsets, "
        f"{n} tools; {len(report)} item(s) dropped; client {stats}")


def main(argv: list[str]) -> None:
  del argv
  asyncio.run(_run())


if __name__ == "__main__":
  app.run(main)
