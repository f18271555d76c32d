"""The JSON answer in a simulator LM's reply: found after any <think> block and inside any fence,
repaired when the reply was cut off, and asked for in the prompt when a server cannot constrain
its output to a schema. Text in, JSON values out.
"""
import json
import re
from typing import Any

_SNIPPET = 500  # characters of a reply quoted in an error
_THINK_END = "</think>"
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def snippet(text: str) -> str:
  """`text` as quoted in an error message: its first 500 characters, "..." when cut."""
  return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def after_thinking(text: str) -> str:
  """The text after a closed <think> block (all of it when there is none)."""
  return text.rsplit(_THINK_END, 1)[1] if _THINK_END in text else text


def extract_json(content: str, reasoning_content: str | None = None) -> Any:
  """The JSON answer in a reply: after any <think> block, inside any ```json fence.

  Falls back to reasoning_content only when content is empty (a server that left the
  whole answer in the reasoning). Raises ValueError when there is no JSON to be found.
  """
  text = content if content.strip() else (reasoning_content or "")
  if _THINK_END not in text and text.lstrip().startswith("<think>"):
    raise ValueError("the reply is an unfinished <think> block")
  text = after_thinking(text)
  fence = _FENCE.search(text)
  if fence:
    text = fence.group(1)
  text = text.strip()
  try:
    return json.loads(text)
  except ValueError:
    pass
  decoder = json.JSONDecoder()
  for start in [m.start() for m in re.finditer(r"\{", text)][:64]:
    try:
      value, _ = decoder.raw_decode(text, start)
    except ValueError:
      continue
    if isinstance(value, dict):
      return value
  raise ValueError(f"no JSON object in the reply: {snippet(text)!r}")


def repair_json(text: str) -> Any:
  """A JSON object cut off mid-way (the reply hit max_tokens, or the model stopped early):
  the text from its first "{" with any open string and open brackets closed, as the reference's
  simulator repairs; None when that does not parse either."""
  start = text.find("{")
  if start < 0:
    return None
  body = text[start:].rstrip()
  closers, in_string, escaped = [], False, False
  for ch in body:
    if in_string:
      escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
    elif ch == '"':
      in_string = True
    elif ch in "{[":
      closers.append("}" if ch == "{" else "]")
    elif ch in "}]" and closers:
      closers.pop()
  if not in_string:
    body = body.rstrip(",")
  try:
    return json.loads(body + ('"' if in_string else "") + "".join(reversed(closers)))
  except ValueError:
    return None


def schema_instruction(schema: dict[str, Any]) -> str:
  """What a prompted-JSON request adds to its prompt: the reply's form, as a JSON Schema."""
  shown = {k: v for k, v in schema.items() if k != "x-guidance"}
  return ("\n\nAnswer with one JSON object and nothing else, matching this JSON Schema:\n"
          + json.dumps(shown, ensure_ascii=False))
