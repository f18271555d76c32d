"""Chat format: conversations with tools to token ids (tool_calls.py parses the policy's output).

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
import re
from typing import Any, Collection, Sequence

from trustee_jax.models.tokenizer import Tokenizer
from trustee_jax.tool_calls import ParsedTurn, call_dict, normalize_tools, parse_output


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
      m["tool_calls"] = [call_dict(c, i) for c in message["tool_calls"]]
    out.append(m)
  return out


def _text_content(content: Any, index: int, allow_none: bool) -> str:
  """String content; OpenAI text-part lists are joined."""
  if content is None and allow_none:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
    return "".join(p.get("text", "") for p in content)
  raise ValueError(f"message {index}: content must be a string or a list of text parts, got {content!r}")
