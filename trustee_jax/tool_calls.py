"""Tool calls in policy output: the Hermes/Qwen wire format (`<tool_call>` JSON between tags,
`<think>` reasoning) parsed into calls, malformed ones reported, and calls checked against the
offered tools' JSON schemas. Text in, dataclasses out; chat.py renders the other way."""
import dataclasses
import json
import re
from typing import Any, Collection, Sequence

import jsonschema

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One well-formed tool call parsed from model output."""
  name: str
  arguments: dict[str, Any]
  id: str = ""


@dataclasses.dataclass(frozen=True)
class ToolCallError:
  """A malformed tool call: the raw text between (or around) the tags and why it was rejected."""
  raw: str
  reason: str


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
  """One assistant turn split into visible content, reasoning, tool calls and malformed calls.

  `untagged` counts call-shaped JSON objects written without the <tool_call> tags: accepted as
  calls (and counted in `tool_calls` too) when the parser was told to, near misses otherwise.
  """
  content: str
  reasoning: str | None
  tool_calls: list[ToolCall]
  errors: list[ToolCallError]
  untagged: int = 0

  def to_message(self) -> dict[str, Any]:
    """The turn as an OpenAI assistant message (arguments as JSON strings)."""
    message: dict[str, Any] = {"role": "assistant", "content": self.content}
    if self.tool_calls:
      message["tool_calls"] = [call_dict(c) for c in self.tool_calls]
    if self.reasoning is not None:
      message["reasoning_content"] = self.reasoning
    return message


def parse_output(text: str, first_call_index: int = 0, *,
                 untagged_tools: Collection[str] | None = None) -> ParsedTurn:
  """Split decoded policy output into content, reasoning and tool calls; malformed calls are reported.

  Calls get ids "call_{first_call_index}", "call_{first_call_index + 1}", ... in order. A call with
  no "arguments" (or Llama-style "parameters") has arguments {}. Tool calls inside an unclosed
  think block are not parsed. A turn with no tagged call may still hold bare or fenced
  `{"name": ..., "arguments": {...}}` objects: with `untagged_tools` (the offered tool names) those
  naming an offered tool become calls; either way they are counted in `untagged`.
  """
  reasoning, rest = _split_reasoning(text)
  content, calls, errors = [], [], []
  pos = 0
  while pos < len(rest):
    start, stray = rest.find(_CALL_OPEN, pos), rest.find(_CALL_CLOSE, pos)
    if stray != -1 and (start == -1 or stray < start):
      errors.append(ToolCallError(rest[pos:stray + len(_CALL_CLOSE)].strip(),
                                  f"{_CALL_CLOSE} without an opening {_CALL_OPEN}"))
      pos = stray + len(_CALL_CLOSE)
      continue
    if start == -1:
      content.append(rest[pos:])
      break
    content.append(rest[pos:start])
    end, reopen = rest.find(_CALL_CLOSE, start), rest.find(_CALL_OPEN, start + len(_CALL_OPEN))
    if end == -1 or (reopen != -1 and reopen < end):
      pos = len(rest) if reopen == -1 else reopen
      errors.append(ToolCallError(rest[start:pos].strip(), f"unclosed {_CALL_OPEN} tag"))
      continue
    pos = end + len(_CALL_CLOSE)
    call = _parse_call(rest[start + len(_CALL_OPEN):end], f"call_{first_call_index + len(calls)}")
    if isinstance(call, str):
      errors.append(ToolCallError(rest[start:pos], call))
    else:
      calls.append(call)
  text_content = "".join(content).strip()
  if calls or errors:
    return ParsedTurn(text_content, reasoning, calls, errors)
  offered = untagged_tools if untagged_tools is not None else ()
  accepted, found, remainder = _untagged_calls(text_content, first_call_index, offered)
  return ParsedTurn(remainder, reasoning, accepted, [], untagged=found)


_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?|```")


def untagged_calls(text: str) -> list[ToolCall]:
  """Every call-shaped JSON object in `text` written without tags, whatever tool it names: for
  evaluators whose own checker judges the names (BFCL's runner)."""
  return _untagged_calls(text, 0, None)[0]


def _untagged_calls(text: str, first_call_index: int, offered: Collection[str] | None
                    ) -> tuple[list[ToolCall], int, str]:
  """Call-shaped JSON objects written without tags (bare or in a code fence): those naming an
  offered tool (any tool, with `offered` None) as calls, how many were found in all, and the
  text without the accepted ones (and without code fences, when any was accepted)."""
  decoder = json.JSONDecoder()
  calls, kept, found, pos = [], [], 0, 0
  while (start := text.find("{", pos)) != -1:
    try:
      obj, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError:
      kept.append(text[pos:start + 1])
      pos = start + 1
      continue
    call = None
    if isinstance(obj, dict) and set(obj) <= {"name", "arguments", "parameters"}:
      call = _parse_call(json.dumps(obj), f"call_{first_call_index + len(calls)}")
    found += isinstance(call, ToolCall)
    take = isinstance(call, ToolCall) and (offered is None or call.name in offered)
    kept.append(text[pos:start] if take else text[pos:end])
    if take:
      calls.append(call)
    pos = end
  kept.append(text[pos:])
  return calls, found, (_FENCE.sub("", "".join(kept)).strip() if calls else text)


def normalize_tools(tools: Sequence[dict] | None) -> list[dict]:
  """OpenAI tools ({"type": "function", "function": {...}}); bare function schemas are wrapped."""
  return [t if "function" in t else {"type": "function", "function": t} for t in tools or ()]


def validate_call(call: ToolCall, tools: Sequence[dict], strict: bool = False) -> str | None:
  """Why `call` does not fit the OpenAI function schemas in `tools`, or None when it does.

  Checks that the tool exists, that required arguments are present and that the arguments match
  the `parameters` JSON schema; with `strict`, arguments the schema does not name are errors too.
  The tools' own schemas are not re-checked here (that costs milliseconds; see `check_tools`),
  but a schema that breaks validation raises ValueError naming the tool.
  """
  functions = {f["function"].get("name"): f["function"] for f in normalize_tools(tools)}
  function = functions.get(call.name)
  if function is None:
    names = sorted(n for n in functions if isinstance(n, str))
    return f"unknown tool {call.name!r}; available tools: {', '.join(names) or 'none'}"
  schema = _parameters(function)
  required = schema.get("required", [])
  missing = [n for n in required if n not in call.arguments] if isinstance(required, list) else []
  if missing:
    return f"{call.name}: missing required argument(s): {', '.join(map(str, missing))}"
  if strict:
    unknown = sorted(set(call.arguments) - set(schema.get("properties") or {}))
    if unknown:
      return f"{call.name}: unknown argument(s): {', '.join(unknown)}"
  validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
  try:
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(call.arguments))
  except Exception as e:  # an invalid schema surfaces here: unknown types, malformed keywords
    raise ValueError(f"tool {call.name!r} has an invalid parameters schema: "
                     f"{_schema_problem(schema) or e}") from e
  if error is None:
    return None
  where = "/".join(str(p) for p in error.absolute_path)
  return f"{call.name}: argument {where}: {error.message}" if where else f"{call.name}: {error.message}"


def check_tools(tools: Sequence[dict]) -> None:
  """Raise ValueError naming the first tool without a name or with an invalid `parameters` schema.

  Run once when a task's tools are chosen, so that `validate_call` can skip the check.
  """
  for tool in normalize_tools(tools):
    name = tool["function"].get("name")
    if not isinstance(name, str) or not name:
      raise ValueError(f"tool without a name: {json.dumps(tool)[:200]}")
    problem = _schema_problem(_parameters(tool["function"]))
    if problem:
      raise ValueError(f"tool {name!r} has an invalid parameters schema: {problem}")


def _parameters(function: dict) -> dict:
  """A function's parameters schema; a missing one means "no arguments required"."""
  return function.get("parameters") or {"type": "object", "properties": {}}


def _schema_problem(schema: Any) -> str | None:
  """What makes `schema` an invalid JSON schema (checked against its metaschema), or None."""
  if not isinstance(schema, dict):
    return f"not a JSON object: {schema!r}"
  validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
  try:
    validator_cls.check_schema(schema)
  except jsonschema.SchemaError as e:
    where = "/".join(str(p) for p in e.absolute_path)
    return f"{where}: {e.message}" if where else e.message
  return None


def _split_reasoning(text: str) -> tuple[str | None, str]:
  """(reasoning, the rest); a lone </think> means the prompt opened the block."""
  open_at, close_at = text.find(THINK_OPEN), text.find(THINK_CLOSE)
  if close_at == -1:
    if open_at == -1:
      return None, text
    return text[open_at + len(THINK_OPEN):].strip(), text[:open_at]
  if open_at != -1 and open_at < close_at:
    reasoning = text[open_at + len(THINK_OPEN):close_at].strip()
    return reasoning, text[:open_at] + text[close_at + len(THINK_CLOSE):]
  return text[:close_at].strip(), text[close_at + len(THINK_CLOSE):]


def _parse_call(body: str, call_id: str) -> ToolCall | str:
  """A ToolCall from the JSON between the tags, or the reason it is malformed."""
  try:
    obj = json.loads(body)
  except json.JSONDecodeError as e:
    return f"invalid JSON: {e}"
  if not isinstance(obj, dict):
    return "the tool call is not a JSON object"
  name = obj.get("name")
  if not isinstance(name, str) or not name.strip():
    return 'missing or empty "name"'
  arguments = obj.get("arguments", obj.get("parameters", {}))
  if not isinstance(arguments, dict):
    return f'"arguments" is not a JSON object (got {type(arguments).__name__})'
  return ToolCall(name=name, arguments=arguments, id=call_id)


def call_dict(call: Any, index: int | None = None) -> dict[str, Any]:
  """An OpenAI tool-call dict from a ToolCall, a full dict or a bare {"name", "arguments"} dict."""
  if isinstance(call, ToolCall):
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
  function = call.get("function", call)
  if not isinstance(function.get("name"), str):
    raise ValueError(f"message {index}: tool call without a name: {call!r}")
  arguments = function.get("arguments", {})
  if not isinstance(arguments, (str, dict)):
    raise ValueError(f"message {index}: tool call arguments must be a JSON string or a dict")
  return {"id": call.get("id", ""), "type": "function",
          "function": {"name": function["name"], "arguments": arguments}}
