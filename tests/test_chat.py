"""Tests for trustee_jax.chat: rendering, rollout fragments, and parsing rendered turns back."""
import json
import re

import pytest

from trustee_jax.chat import HERMES_TEMPLATE, ChatFormat, normalize_messages
from trustee_jax.models.tokenizer import load_tokenizer
from trustee_jax.tool_calls import ToolCall

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


def test_tool_results_render_verbatim(smollm2):
  # Tool results and JSON-string arguments are inserted as they are, never re-serialised.
  text = smollm2.render_text([USER, CALLS] + RESULTS, TOOLS)
  assert '"arguments": {"city": "Paris"}' in text and RESULTS[0]["content"] in text
  assert json.loads(text.split("<tools>\n")[1].split("\n")[1]) == TOOLS[1]


