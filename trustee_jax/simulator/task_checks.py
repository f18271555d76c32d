"""Checks of a generated task before it is used: its schema, then what a schema cannot say (a
query that names a tool, template placeholders, expected-call values that nobody gives).

Text and JSON in, problem strings out: the generator regenerates a task with problems; with
`unsaid_values="facts"` it turns the values nobody gives into hidden facts instead.
"""
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from trustee_jax.simulator import tools_pool

# Template slots left unfilled, e.g. "[location]", "{name}", "<date>", "XXX".
PLACEHOLDER = re.compile(r"\[[A-Za-z_ ]{2,30}\]|\{[A-Za-z_ ]{2,30}\}|<[A-Za-z_ ]{2,30}>|\bX{3,}\b")


def arguments_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
  """A tool's parameter schema with no arguments beyond its properties (as `check_call` wants)."""
  params = dict(fn.get("parameters") or {"type": "object"})
  return {**params, "additionalProperties": False} if "properties" in params else params


def mentions_tool(text: str, name: str) -> bool:
  """Whether `text` names the tool. Only identifier-like names (with _ - . / or camelCase) are
  checked: plain words or phrases ("search", "Send SMS") are ordinary language."""
  if " " in name.strip() or not re.search(r"[_\-./]|[a-z][A-Z]", name):
    return False
  pattern = r"(?<![A-Za-z0-9_])" + re.escape(name.lower()) + r"(?![A-Za-z0-9_])"
  return re.search(pattern, text.lower()) is not None


def _leaf_values(value: Any, schema: Any) -> list[Any]:
  """The string and number leaves of an argument value that its schema does not fix (no enum
  or const): values the user has to give."""
  schema = schema if isinstance(schema, Mapping) else {}
  if "enum" in schema or "const" in schema or isinstance(value, bool) or value is None:
    return []
  if isinstance(value, Mapping):
    props = schema.get("properties") or {}
    return [x for k, v in value.items() for x in _leaf_values(v, props.get(k))]
  if isinstance(value, list):
    return [x for v in value for x in _leaf_values(v, schema.get("items"))]
  return [value]


def call_problems(calls: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                  texts: Sequence[str]) -> list[str]:
  """Why expected calls cannot be expected: a tool not sampled, arguments its parameter schema
  rejects, or a value (string or number, compared as lower-case words) that `texts` never give."""
  fns = {tools_pool.tool_name(t): tools_pool.function_of(t) for t in tools}
  said = f" {'  '.join(normalise_query(t) for t in texts)} "  # no value spans two texts
  problems = []
  for i, call in enumerate(calls):
    name, args = call.get("name"), call.get("arguments")
    if name not in fns:
      problems.append(f"expected_calls[{i}] calls {name!r}, not a sampled tool")
      continue
    schema = arguments_schema(fns[name])
    errors = [e.message[:160] for e in jsonschema.Draft202012Validator(schema).iter_errors(args)]
    if errors:
      problems.append(f"expected_calls[{i}] {name}: arguments {'; '.join(errors[:2])}")
      continue
    leaves = [int(v) if isinstance(v, float) and v.is_integer() else v
              for v in _leaf_values(args, schema)]
    unsaid = [v for v in leaves if f" {normalise_query(str(v))} " not in said]
    if unsaid:
      problems.append(f"expected_calls[{i}] {name}: values nobody gives {unsaid[:3]}")
  return problems


def with_unsaid_values_as_facts(raw: Mapping[str, Any], tools: Sequence[Mapping[str, Any]]
                                ) -> dict[str, Any]:
  """`raw` with one more hidden fact per expected call whose argument values nobody states
  ("For set_alarm: time is 07:30."), so the user simulator knows what the judge expects."""
  texts = [str(raw.get(k, "")) for k in ("user_intent", "first_user_query")]
  texts += [str(f) for f in raw.get("hidden_facts") or []]
  said = f" {'  '.join(normalise_query(t) for t in texts)} "
  fns = {tools_pool.tool_name(t): tools_pool.function_of(t) for t in tools}
  facts = list(raw.get("hidden_facts") or [])
  for call in raw.get("expected_calls") or []:
    props = (arguments_schema(fns[call["name"]]).get("properties") or {})
    parts = [f"{k.replace('_', ' ')} is {json.dumps(v) if isinstance(v, (dict, list)) else v}"
             for k, v in call["arguments"].items()
             if any(f" {normalise_query(str(x))} " not in said
                    for x in _leaf_values(v, props.get(k)))]
    if parts:
      facts.append(f"For {call['name']}: {', '.join(parts)}.")
  return {**raw, "hidden_facts": facts}


def task_problems(raw: Any, schema: dict[str, Any], tool_names: Sequence[str],
                  tools: Sequence[Mapping[str, Any]] = ()) -> list[str]:
  """Why a generated task is unusable (empty when it is fine): schema, then content checks;
  `expected_calls` are checked against `tools` (with precise messages, by `call_problems`)."""
  errors = list(jsonschema.Draft202012Validator(schema).iter_errors(raw))
  calls = raw.get("expected_calls") if isinstance(raw, Mapping) else None
  found = []
  if tools and isinstance(calls, list) and all(isinstance(c, Mapping) for c in calls):
    texts = [str(raw.get("user_intent", "")), str(raw.get("first_user_query", "")),
             *map(str, raw.get("hidden_facts") or [])]
    found = call_problems(calls, tools, texts)
  in_call = lambda e: list(e.absolute_path)[:1] == ["expected_calls"] and len(e.absolute_path) > 1
  messages = [f"schema: {e.message[:200]}" for e in errors if not (found and in_call(e))]
  if messages or found:
    return messages + found
  problems = []
  for key in ("user_intent", "user_persona", "first_user_query"):
    if not raw[key].strip():
      problems.append(f"{key} is blank")
  named = [n for n in tool_names if mentions_tool(raw["first_user_query"], n)]
  if named:
    problems.append(f"first_user_query names tools {named}")
  for key in ("hidden_facts", "initial_state"):
    if any(not s.strip() for s in raw.get(key, [])):
      problems.append(f"{key} has a blank entry")
  texts = [raw["user_intent"], raw["first_user_query"], *raw.get("hidden_facts", []),
           *raw.get("initial_state", [])]
  found = sorted({m.group(0) for t in texts for m in PLACEHOLDER.finditer(t)})
  if found:
    problems.append(f"placeholders instead of values: {found[:5]}")
  return problems


def normalise_query(query: str) -> str:
  """The form used for duplicate checks: lower case, letters and digits only."""
  return " ".join(re.findall(r"[a-z0-9]+", query.lower()))
