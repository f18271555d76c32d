"""Tests for trustee_jax.tool_calls: parsing policy output into calls and validating them."""
import pytest

from test_chat import BOOK, TOOLS
from trustee_jax.tool_calls import ToolCall, ToolCallError, check_tools, parse_output, validate_call


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
