"""Chat format: conversations with tools to token ids, and policy output back to tool calls.

Messages are OpenAI-shaped dicts: roles system/user/assistant/tool; assistant `tool_calls` as
[{"id", "type": "function", "function": {"name", "arguments"}}] (arguments a JSON string, inserted
verbatim, or a dict, rendered with `tojson`); optional assistant `reasoning_content`.

Templates. `ChatFormat` renders with the model's own jinja template. When that template has no
tool support (it never mentions `tools`, as SmolLM2's) and the conversation involves tools, it
renders with `HERMES_TEMPLATE` instead: ChatML with the Hermes/Qwen tool format (tools as JSON
lines in `<tools></tools>` in the system turn, calls as `<tool_call>\\n{"name": ..., "arguments":
...}\\n</tool_call>`, results as `<tool_response>\\n...\\n</tool_response>` in a user turn), the same
wire format as Qwen's, so the same parsers read both. Pass the same `tools` to every call of one
conversation so that the template never switches midway.

Boundaries of a rollout, built without re-tokenizing anything (Qwen3, thinking off; `|` marks one):

  prompt_ids:        <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\nQ<|im_end|>\\n
                     <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n|
  policy turn:       <tool_call>\\n{...}\\n</tool_call><|im_end|>|          (sampled; ends with end_of_turn_id)
  continuation_ids:  \\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n
                     <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n|
  policy turn:       Final answer.<|im_end|>|
  (continuation_ids with add_generation_prompt=False gives the template's closing "\\n".)

The generation prompt, including Qwen3's empty think block when thinking is off, is on the prompt
side; every boundary sits next to a special token, so the fragments encode exactly as their
concatenation does. One difference from re-rendering the whole conversation is deliberate: Qwen3's
template drops the (empty) think block of every assistant turn but the last after the last user
query, while the rollout keeps what the policy actually saw. With the Hermes template, and for
Qwen3 whenever only the final assistant turn follows the generation prompt, the fragments
concatenate to exactly `render(conversation, add_generation_prompt=False)`.
"""
import dataclasses
import json
import re
from typing import Any, Collection, Sequence

import jsonschema

from trustee_jax.models.tokenizer import Tokenizer


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
      message["tool_calls"] = [_call_dict(c) for c in self.tool_calls]
    if self.reasoning is not None:
      message["reasoning_content"] = self.reasoning
    return message


HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (call.function.name | tojson) + ', \"arguments\": ' }}"
    "{%- if call.function.arguments is string %}{{- call.function.arguments }}"
    "{%- else %}{{- call.function.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

_ROLES = ("system", "user", "assistant", "tool")
# Stands in for the last assistant turn when locating where the template's text after it begins.
_SENTINEL = "\u27e6trustee-turn-boundary\u27e7"
_PROBE = [{"role": "user", "content": "ping"}]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"


def supports_tools(template: str) -> bool:
  """Whether a jinja chat template reads the `tools` variable."""
  return re.search(r"\btools\b", template) is not None


class ChatFormat:
  """Renders conversations to ids with the model's template (Hermes for tools when it has none)."""

  def __init__(self, tokenizer: Tokenizer, template: str | None = None,
               tool_template: str | None = None):
    self.tokenizer = tokenizer
    self.template = template or tokenizer.chat_template
    if not self.template:
      raise ValueError("the tokenizer has no chat template; pass template=")
    if tool_template is None:
      tool_template = self.template if supports_tools(self.template) else HERMES_TEMPLATE
    self.tool_template = tool_template
    self._eot_text = self._eot_text_of(self.template)
    self.end_of_turn_id = tokenizer.token_id(self._eot_text)
    self._tool_template_error = self._check_tool_template()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a sampled turn: the end of turn, then the tokenizer's EOS ids."""
    return tuple(dict.fromkeys((self.end_of_turn_id,) + self.tokenizer.eos_token_ids))

  def render_text(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                  add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
    """The template's text for a whole conversation."""
    messages = normalize_messages(messages)
    return self._text(self._template_for(messages, tools), messages, tools,
                      add_generation_prompt, enable_thinking)

  def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
             add_generation_prompt: bool = True, enable_thinking: bool = False) -> list[int]:
    """Ids of a whole conversation, equal to the tokenizer's `apply_chat_template(..., tokenize=True)`."""
    return self.tokenizer.encode(
        self.render_text(messages, tools, add_generation_prompt, enable_thinking))

  def prompt_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                 enable_thinking: bool = False) -> list[int]:
    """Ids of the conversation so far up to and including the generation prompt."""
    return self.render(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)

  def generation_prompt_ids(self, enable_thinking: bool = False,
                            tools: Sequence[dict] | None = None) -> list[int]:
    """Ids that open an assistant turn (e.g. "<|im_start|>assistant\\n" + Qwen3's empty think block)."""
    template = self._template_for([], tools)
    before = self._text(template, _PROBE, tools, False, enable_thinking)
    after = self._text(template, _PROBE, tools, True, enable_thinking)
    if not after.startswith(before):
      raise ValueError("the generation prompt does not extend the rendered conversation")
    return self.tokenizer.encode(after[len(before):])

  def continuation_ids(self, history: Sequence[dict], new_messages: Sequence[dict],
                       tools: Sequence[dict] | None = None, enable_thinking: bool = False,
                       add_generation_prompt: bool = True) -> list[int]:
    """Ids after the end-of-turn token of `history`'s last (assistant) turn: `new_messages`, then the
    generation prompt (or, with add_generation_prompt=False, what the template writes after a turn).
    """
    history, new_messages = normalize_messages(history), normalize_messages(new_messages)
    if not history or history[-1]["role"] != "assistant":
      raise ValueError("history must end with an assistant turn")
    if any(m["role"] == "assistant" for m in new_messages):
      raise ValueError("new_messages must not contain assistant turns (those are sampled)")
    template = self._template_for(history + new_messages, tools)
    probe = history[:-1] + [{"role": "assistant", "content": _SENTINEL}] + new_messages
    text = self._text(template, probe, tools, add_generation_prompt, enable_thinking)
    return self.tokenizer.encode(self._after_end_of_turn(text))

  def assistant_ids(self, message: dict, tools: Sequence[dict] | None = None,
                    enable_thinking: bool = False) -> list[int]:
    """Ids of one assistant turn as the template renders it after the generation prompt, up to and
    including the end-of-turn token (what a policy emits for this message)."""
    (message,) = normalize_messages([message])
    if message["role"] != "assistant":
      raise ValueError(f"expected an assistant message, got role {message['role']!r}")
    template = self._template_for([message], tools)
    prompt = self._text(template, _PROBE, tools, True, enable_thinking)
    full = self._text(template, _PROBE + [message], tools, False, enable_thinking)
    closing = self._closing_text(template)
    if not full.startswith(prompt) or not full.endswith(closing):
      raise ValueError("this assistant turn does not follow the generation prompt "
                       "(e.g. reasoning_content while thinking is off)")
    return self.tokenizer.encode(full[len(prompt):len(full) - len(closing)] + self._eot_text)

  def parse_output(self, text: str, first_call_index: int = 0, *,
                   untagged_tools: Collection[str] | None = None) -> ParsedTurn:
    """`parse_output` after dropping a trailing end-of-turn or EOS token from decoded text."""
    stops = {self.tokenizer.decode([i]) for i in self.stop_ids}
    stripped = text.rstrip()
    for stop in stops:
      if stop and stripped.endswith(stop):
        text = stripped[:-len(stop)]
        break
    return parse_output(text, first_call_index, untagged_tools=untagged_tools)

  def _template_for(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> str:
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if not uses_tools:
      return self.template
    if self._tool_template_error:
      raise ValueError(self._tool_template_error)
    return self.tool_template

  def _check_tool_template(self) -> str | None:
    """Why the tool template cannot be used with this tokenizer, or None (checked once, raised on use)."""
    try:
      eot = self._eot_text_of(self.tool_template)
    except ValueError as e:
      return f"the tool template does not fit this tokenizer (pass tool_template=): {e}"
    if eot != self._eot_text:
      return (f"the tool template ends assistant turns with {eot!r}, the chat template with "
              f"{self._eot_text!r}; pass a matching tool_template=")
    return None

  def _text(self, template: str, messages: Sequence[dict], tools: Sequence[dict] | None,
            add_generation_prompt: bool, enable_thinking: bool) -> str:
    return self.tokenizer.hf.apply_chat_template(
        list(messages), tools=normalize_tools(tools) or None, chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)

  def _closing_text(self, template: str) -> str:
    """What the template writes after an assistant turn's content when it ends the conversation."""
    text = self._text(template, _PROBE + [{"role": "assistant", "content": _SENTINEL}], None, False, False)
    if text.count(_SENTINEL) != 1:
      raise ValueError("the chat template does not render assistant content verbatim")
    return text[text.index(_SENTINEL) + len(_SENTINEL):]

  def _eot_text_of(self, template: str) -> str:
    """The special token that closes an assistant turn (the first token after its content)."""
    closing = self._closing_text(template)
    ids = self.tokenizer.encode(closing)
    if not ids or ids[0] not in self.tokenizer.hf.added_tokens_decoder:
      raise ValueError(f"the chat template does not close assistant turns with a special token "
                       f"(text after the content: {closing!r})")
    return self.tokenizer.decode(ids[:1])

  def _after_end_of_turn(self, text: str) -> str:
    if text.count(_SENTINEL) != 1:
      raise ValueError("cannot locate the last assistant turn in the rendered conversation")
    tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
    if not tail.startswith(self._eot_text):
      raise ValueError(f"the template does not end the assistant turn with {self._eot_text!r}")
    return tail[len(self._eot_text):]


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
  """Copies of OpenAI messages in the shape templates expect (string content, full tool-call dicts)."""
  out = []
  for i, message in enumerate(messages):
    role = message.get("role")
    if role not in _ROLES:
      raise ValueError(f"message {i}: unknown role {role!r} (expected one of {_ROLES})")
    m = {k: v for k, v in message.items() if v is not None}
    m["content"] = _text_content(message.get("content"), i, allow_none=role == "assistant")
    if role == "assistant" and message.get("tool_calls"):
      m["tool_calls"] = [_call_dict(c, i) for c in message["tool_calls"]]
    out.append(m)
  return out


def normalize_tools(tools: Sequence[dict] | None) -> list[dict]:
  """OpenAI tools ({"type": "function", "function": {...}}); bare function schemas are wrapped."""
  return [t if "function" in t else {"type": "function", "function": t} for t in tools or ()]


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


def _untagged_calls(text: str, first_call_index: int, offered: Collection[str]
                    ) -> tuple[list[ToolCall], int, str]:
  """Call-shaped JSON objects written without tags (bare or in a code fence): those naming an
  offered tool as calls, how many were found in all, and the text without the accepted ones
  (and without code fences, when any was accepted)."""
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
    take = isinstance(call, ToolCall) and call.name in offered
    kept.append(text[pos:start] if take else text[pos:end])
    if take:
      calls.append(call)
    pos = end
  kept.append(text[pos:])
  return calls, found, (_FENCE.sub("", "".join(kept)).strip() if calls else text)


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


def _call_dict(call: Any, index: int | None = None) -> dict[str, Any]:
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


def _text_content(content: Any, index: int, allow_none: bool) -> str:
  """String content; OpenAI text-part lists are joined."""
  if content is None and allow_none:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
    return "".join(p.get("text", "") for p in content)
  raise ValueError(f"message {index}: content must be a string or a list of text parts, got {content!r}")
