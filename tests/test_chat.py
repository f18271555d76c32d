"""Tests for trustee_jax.chat: rendering, rollout fragments, output parsing and call validation."""
import json
import re

import pytest

from trustee_jax.chat import (HERMES_TEMPLATE, ChatFormat, ToolCall, ToolCallError, check_tools,
                              normalize_messages, parse_output, validate_call)
from trustee_jax.models.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"]}}}
BOOK = {"name": "book_table", "description": "Book a restaurant table.",  # a bare function schema
        "parameters": {"type": "object", "properties": {
            "restaurant": {"type": "string"}, "people": {"type": "integer", "minimum": 1},
            "options": {"type": "object", "properties": {"terrace": {"type": "boolean"}}}},
            "required": ["restaurant", "people"]}}
TOOLS = [WEATHER, {"type": "function", "function": BOOK}]

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
USER = {"role": "user", "content": "What's the weather in Paris and Oslo? Then book for 2 at Chez Nous."}
CALLS = {"role": "assistant", "content": "Checking both cities.", "tool_calls": [
    {"id": "call_0", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}]}
RESULTS = [{"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21, "sky": "sunny"}'},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 4, "sky": "snow"}'}]
BOOKING = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_2", "type": "function",
     "function": {"name": "book_table", "arguments": '{"restaurant": "Chez Nous", "people": 2}'}}]}
BOOKED = {"role": "tool", "tool_call_id": "call_2", "content": "Booked for 19:00."}
ANSWER = {"role": "assistant", "content": "Paris is sunny (21 C), Oslo snowy (4 C); table booked at 19:00."}
THANKS = {"role": "user", "content": "Thanks! Which was warmer?"}
FINAL = {"role": "assistant", "content": "Paris."}

# Steps of one episode: (messages added by the environment, the policy's turn).
EPISODE = [([SYSTEM, USER], CALLS), (RESULTS, BOOKING), ([BOOKED], ANSWER), ([THANKS], FINAL)]


@pytest.fixture(scope="session")
def qwen3():
  return ChatFormat(load_tokenizer("qwen3"))


@pytest.fixture(scope="session")
def smollm2():
  return ChatFormat(load_tokenizer("smollm2"))


def _conversation(steps):
  return [m for env, turn in steps for m in (*env, turn)]


def _rollout_ids(fmt, steps, tools, enable_thinking=False):
  """Ids built as a rollout builds them: prompt, then turn / continuation pairs, then the closing."""
  history = list(steps[0][0])
  ids = fmt.prompt_ids(history, tools, enable_thinking)
  for k, (_, turn) in enumerate(steps):
    ids += fmt.assistant_ids(turn, tools, enable_thinking)
    history.append(turn)
    new = steps[k + 1][0] if k + 1 < len(steps) else []
    ids += fmt.continuation_ids(history, new, tools, enable_thinking, add_generation_prompt=bool(new))
    history += new
  return ids


def _reference(fmt, messages, tools, template, **kwargs):
  out = fmt.tokenizer.hf.apply_chat_template(
      normalize_messages(messages), tools=tools, chat_template=template, tokenize=True, **kwargs)
  return out["input_ids"]


@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_qwen3_render_equals_apply_chat_template(qwen3, tools, enable_thinking):
  for messages, gen in [([SYSTEM, USER], True), ([USER, ANSWER, THANKS], True),
                        (_conversation(EPISODE), False)]:
    kwargs = dict(add_generation_prompt=gen, enable_thinking=enable_thinking)
    assert qwen3.render(messages, tools, **kwargs) == _reference(qwen3, messages, tools, None, **kwargs)


def test_smollm2_render_equals_apply_chat_template(smollm2):
  plain = [SYSTEM, USER, ANSWER, THANKS]
  assert smollm2.render(plain) == _reference(smollm2, plain, None, None, add_generation_prompt=True)
  assert smollm2.render([USER]) == _reference(smollm2, [USER], None, None, add_generation_prompt=True)
  assert "named SmolLM" in smollm2.render_text([USER])  # its own template, default system prompt
  full = _conversation(EPISODE)
  assert smollm2.tool_template == HERMES_TEMPLATE
  assert smollm2.render(full, TOOLS, add_generation_prompt=False) == _reference(
      smollm2, full, TOOLS, HERMES_TEMPLATE, add_generation_prompt=False)
  assert smollm2.render([SYSTEM, USER], TOOLS) == _reference(
      smollm2, [SYSTEM, USER], TOOLS, HERMES_TEMPLATE, add_generation_prompt=True)


def test_hermes_is_qwens_wire_format(qwen3, smollm2):
  # Where Qwen3's template has no thinking-specific output, the two render the same text.
  messages = [SYSTEM, USER, CALLS] + RESULTS
  hermes = smollm2.render_text(messages, TOOLS, enable_thinking=True)
  assert hermes == qwen3.render_text(messages, TOOLS, enable_thinking=True)
  assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>' in hermes
  assert "<|im_start|>user\n<tool_response>\n" in hermes and "</tool_response>\n<tool_response>\n" in hermes


def test_hermes_fragments_concatenate_to_render(smollm2):
  full = _conversation(EPISODE)
  assert _rollout_ids(smollm2, EPISODE, TOOLS) == smollm2.render(full, TOOLS, add_generation_prompt=False)


def test_qwen3_single_turn_fragments_equal_render(qwen3):
  steps = [([SYSTEM, USER], CALLS)]
  full = _conversation(steps)
  assert _rollout_ids(qwen3, steps, TOOLS) == qwen3.render(full, TOOLS, add_generation_prompt=False)


def test_qwen3_multi_step_fragments_keep_the_empty_think_blocks(qwen3):
  # Qwen3's template drops the empty think block of earlier assistant turns; the rollout keeps
  # what the policy saw, so every assistant turn carries the block. Nothing else differs.
  full = _conversation(EPISODE)
  text = qwen3.render_text(full, TOOLS, add_generation_prompt=False)
  expected = re.sub(r"<\|im_start\|>assistant\n(?!<think>)",
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n", text)
  assert expected.count("<think>") == 4
  assert _rollout_ids(qwen3, EPISODE, TOOLS) == qwen3.tokenizer.encode(expected)


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_fragment_boundaries(name, request):
  fmt = request.getfixturevalue(name)
  tok = fmt.tokenizer
  assert fmt.end_of_turn_id == tok.token_id("<|im_end|>") == fmt.stop_ids[0]
  generation = fmt.generation_prompt_ids(tools=TOOLS)
  expected = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if name == "qwen3" else "")
  assert tok.decode(generation) == expected
  prompt = fmt.prompt_ids([SYSTEM, USER], TOOLS)
  assert prompt[-len(generation):] == generation
  turn = fmt.assistant_ids(CALLS, TOOLS)
  assert turn[-1] == fmt.end_of_turn_id and fmt.end_of_turn_id not in turn[:-1]
  assert tok.decode(turn).startswith("Checking both cities.\n<tool_call>\n")
  continuation = fmt.continuation_ids([SYSTEM, USER, CALLS], RESULTS, TOOLS)
  assert tok.decode(continuation).startswith("\n<|im_start|>user\n<tool_response>\n")
  assert continuation[-len(generation):] == generation
  assert tok.decode(fmt.continuation_ids([USER, FINAL], [], TOOLS, add_generation_prompt=False)) == "\n"


def test_qwen3_thinking_on_fragments(qwen3):
  tok = qwen3.tokenizer
  assert tok.decode(qwen3.generation_prompt_ids(True, TOOLS)) == "<|im_start|>assistant\n"
  thought = dict(ANSWER, reasoning_content="Compare the temperatures.")
  assert tok.decode(qwen3.assistant_ids(thought, TOOLS, enable_thinking=True)).startswith(
      "<think>\nCompare the temperatures.\n</think>\n\nParis is sunny")
  with pytest.raises(ValueError, match="reasoning_content while thinking is off"):
    qwen3.assistant_ids(thought, TOOLS, enable_thinking=False)


def test_continuation_rejects_bad_inputs(qwen3):
  with pytest.raises(ValueError, match="must end with an assistant turn"):
    qwen3.continuation_ids([SYSTEM, USER], RESULTS, TOOLS)
  with pytest.raises(ValueError, match="must not contain assistant"):
    qwen3.continuation_ids([USER, CALLS], [ANSWER], TOOLS)


def test_template_without_special_end_of_turn_is_rejected(smollm2):
  with pytest.raises(ValueError, match="special token"):
    ChatFormat(smollm2.tokenizer, template="{% for m in messages %}{{ m.content }}\n{% endfor %}")


def test_normalize_messages():
  out = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": None,
                             "tool_calls": [ToolCall("f", {"x": 1}, "call_9")]}])
  assert out[0]["content"] == "ab"
  assert out[1]["content"] == ""
  assert out[1]["tool_calls"] == [{"id": "call_9", "type": "function",
                                   "function": {"name": "f", "arguments": '{"x": 1}'}}]
  with pytest.raises(ValueError, match="unknown role"):
    normalize_messages([{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="message 0: content"):
    normalize_messages([{"role": "user", "content": 3}])


def test_parse_text_only():
  turn = parse_output("  Hello there.\n")
  assert (turn.content, turn.reasoning, turn.tool_calls, turn.errors) == ("Hello there.", None, [], [])
  assert turn.to_message() == {"role": "assistant", "content": "Hello there."}


def test_parse_one_and_several_calls():
  one = parse_output('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
  assert one.tool_calls == [ToolCall("get_weather", {"city": "Paris"}, "call_0")] and one.content == ""
  several = parse_output(
      'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
      '<tool_call>{"name": "b", "arguments": {"n": [1, 2]}}</tool_call> done', first_call_index=3)
  assert several.tool_calls == [ToolCall("a", {}, "call_3"), ToolCall("b", {"n": [1, 2]}, "call_4")]
  assert several.content == "Let me check.\n\n done" and several.errors == []
  message = several.to_message()
  assert message["tool_calls"][1] == {"id": "call_4", "type": "function",
                                      "function": {"name": "b", "arguments": '{"n": [1, 2]}'}}
  assert parse_output('<tool_call>{"name": "ping"}</tool_call>').tool_calls == [ToolCall("ping", {}, "call_0")]


def test_parse_reasoning():
  turn = parse_output('<think>\nNeed the weather.\n</think>\n\n<tool_call>{"name": "w", "arguments": {}}'
                      "</tool_call>")
  assert turn.reasoning == "Need the weather." and turn.content == "" and len(turn.tool_calls) == 1
  assert parse_output("<think>\n\n</think>\n\nHi").reasoning == ""
  opened_by_prompt = parse_output("Thinking...\n</think>\n\nAnswer")
  assert (opened_by_prompt.reasoning, opened_by_prompt.content) == ("Thinking...", "Answer")
  cut = parse_output('<think>still going <tool_call>{"name": "w", "arguments": {}}</tool_call>')
  assert cut.reasoning.startswith("still going") and cut.tool_calls == [] and cut.content == ""


@pytest.mark.parametrize("body, reason", [
    ('{"name": "w", "arguments": {"city": }', "invalid JSON"),
    ('{"name": "w"} trailing', "invalid JSON"),
    ('["w", {}]', "not a JSON object"),
    ('{"arguments": {}}', "name"),
    ('{"name": "", "arguments": {}}', "name"),
    ('{"name": "w", "arguments": "{\\"city\\": \\"Paris\\"}"}', "not a JSON object"),
    ('{"name": "w", "arguments": [1]}', "not a JSON object"),
])
def test_parse_malformed_call(body, reason):
  turn = parse_output(f'Sure. <tool_call>{body}</tool_call><tool_call>{{"name": "ok", "arguments": {{}}}}</tool_call>')
  assert turn.tool_calls == [ToolCall("ok", {}, "call_0")]  # the good call is kept and numbered first
  assert len(turn.errors) == 1 and reason in turn.errors[0].reason
  assert turn.errors[0].raw == f"<tool_call>{body}</tool_call>" and turn.content == "Sure."


def test_parse_unclosed_and_stray_tags():
  unclosed = parse_output('Hi <tool_call>{"name": "a", "arguments": {}}')
  assert unclosed.tool_calls == [] and unclosed.content == "Hi"
  assert unclosed.errors == [ToolCallError('<tool_call>{"name": "a", "arguments": {}}', "unclosed <tool_call> tag")]
  reopened = parse_output('<tool_call>{"name": "a"<tool_call>{"name": "b", "arguments": {}}</tool_call>')
  assert [c.name for c in reopened.tool_calls] == ["b"] and "unclosed" in reopened.errors[0].reason
  stray = parse_output('{"name": "a", "arguments": {}}</tool_call> ok')
  assert stray.content == "ok" and "without an opening" in stray.errors[0].reason


@pytest.mark.parametrize("name", ["qwen3", "smollm2"])
def test_parse_round_trips_rendered_turns(name, request):
  fmt = request.getfixturevalue(name)
  text = fmt.tokenizer.decode(fmt.assistant_ids(CALLS, TOOLS))
  assert text.endswith("<|im_end|>")
  turn = fmt.parse_output(text)
  assert turn.content == "Checking both cities." and turn.errors == []
  assert turn.tool_calls == [ToolCall("get_weather", {"city": "Paris"}, "call_0"),
                             ToolCall("get_weather", {"city": "Oslo", "unit": "C"}, "call_1")]
  assert fmt.parse_output("Bye.<|endoftext|>").content == "Bye."


def test_validate_call():
  assert validate_call(ToolCall("get_weather", {"city": "Paris"}), TOOLS) is None
  assert validate_call(ToolCall("book_table", {"restaurant": "X", "people": 2}), [BOOK]) is None
  assert "unknown tool 'fly'" in validate_call(ToolCall("fly", {}), TOOLS)
  assert "book_table, get_weather" in validate_call(ToolCall("fly", {}), TOOLS)
  assert "missing required argument(s): restaurant, people" in validate_call(ToolCall("book_table", {}), TOOLS)
  wrong_type = validate_call(ToolCall("book_table", {"restaurant": "X", "people": "two"}), TOOLS)
  assert "argument people" in wrong_type and "integer" in wrong_type
  assert "argument unit" in validate_call(ToolCall("get_weather", {"city": "P", "unit": "K"}), TOOLS)
  nested = validate_call(ToolCall("book_table", {"restaurant": "X", "people": 1,
                                                 "options": {"terrace": "yes"}}), TOOLS)
  assert "argument options/terrace" in nested and "boolean" in nested
  assert "minimum" in validate_call(ToolCall("book_table", {"restaurant": "X", "people": 0}), TOOLS)
  extra = ToolCall("get_weather", {"city": "P", "country": "FR"})
  assert validate_call(extra, TOOLS) is None
  assert "unknown argument(s): country" in validate_call(extra, TOOLS, strict=True)
  assert validate_call(ToolCall("noop", {}), [{"name": "noop"}]) is None


def test_invalid_tool_schemas_are_loud():
  bad = {"name": "bad", "parameters": {"type": "object", "properties": {"x": {"type": "str"}}}}
  with pytest.raises(ValueError, match="tool 'bad' has an invalid parameters schema: properties/x/type"):
    check_tools(TOOLS + [bad])
  with pytest.raises(ValueError, match="tool 'bad' has an invalid parameters schema"):
    validate_call(ToolCall("bad", {"x": "1"}), [bad])  # surfaces while validating, too
  with pytest.raises(ValueError, match="without a name"):
    check_tools([{"type": "function", "function": {"description": "nameless"}}])
  check_tools(TOOLS + [{"name": "noop"}])


def test_tool_results_render_verbatim(smollm2):
  # Tool results and JSON-string arguments are inserted as they are, never re-serialised.
  text = smollm2.render_text([USER, CALLS] + RESULTS, TOOLS)
  assert '"arguments": {"city": "Paris"}' in text and RESULTS[0]["content"] in text
  assert json.loads(text.split("<tools>\n")[1].split("\n")[1]) == TOOLS[1]


UNTAGGED = ('Sure.\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```\n'
            'And {"name": "not_offered", "arguments": {}} too.')


def test_untagged_calls_are_near_misses_by_default():
  out = parse_output(UNTAGGED)
  assert out.tool_calls == [] and out.errors == [] and out.untagged == 2
  assert out.content == UNTAGGED.strip()  # the text is left as written


def test_untagged_calls_naming_offered_tools_are_accepted_when_asked():
  out = parse_output(UNTAGGED, first_call_index=3, untagged_tools={"get_weather", "book_table"})
  assert out.tool_calls == [ToolCall("get_weather", {"city": "Oslo"}, "call_3")]
  assert out.untagged == 2  # both were call-shaped; one named an offered tool
  assert out.content == 'Sure.\n\nAnd {"name": "not_offered", "arguments": {}} too.'


@pytest.mark.parametrize("text", [
    '{"city": "Oslo"}',  # not call-shaped
    '{"name": "get_weather", "arguments": {"city": "Oslo"}, "extra": 1}',  # other keys
    '{"name": "get_weather", "arguments": "city=Oslo"}',  # arguments not an object
    'no json {here',
])
def test_untagged_parser_ignores_what_is_not_a_call(text):
  out = parse_output(text, untagged_tools={"get_weather"})
  assert out.tool_calls == [] and out.untagged == 0 and out.content == text


def test_tagged_calls_win_over_untagged_ones():
  text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
          '{"name": "book_table", "arguments": {"restaurant": "X", "people": 2}}')
  out = parse_output(text, untagged_tools={"get_weather", "book_table"})
  assert [c.name for c in out.tool_calls] == ["get_weather"] and out.untagged == 0
