"""Tests for the rule check of tool calls against expected calls."""
import json

import pytest

from trustee_jax.simulator.rule_check import (CallCheck, arguments_match, check_calls, made_calls,
                                              made_turns, values_match)
from trustee_jax.tool_calls import ToolCall

SET = {"name": "set_temperature", "arguments": {"room": "kitchen", "celsius": 21}}
LIGHT = {"name": "set_light", "arguments": {"room": "hall", "on": True}}


def call(spec: dict, **changes) -> ToolCall:
  return ToolCall(spec["name"], {**spec["arguments"], **changes})


def test_values_match_normalises_strings_and_numbers():
  assert values_match(" Kitchen ", "kitchen")
  assert values_match(1, 1.0)
  assert not values_match("21", 21)
  assert not values_match(True, 1) and not values_match(1, True)
  assert values_match({"a": [1, {"b": "X"}]}, {"a": [1.0, {"b": "x"}]})
  assert not values_match([1, 2], [2, 1])
  assert not values_match(None, "")


def test_arguments_match_needs_the_same_keys():
  assert arguments_match({"a": 1}, {"a": 1})
  assert not arguments_match({"a": 1}, {"a": 1, "b": 2})
  assert not arguments_match({"a": 1, "b": 2}, {"a": 1})


def test_exact_match_passes():
  c = check_calls([SET, LIGHT], [call(LIGHT), call(SET, room="KITCHEN ")])
  assert c == CallCheck(2, 2, 2, 0, (), 0, True, None)
  assert c.passed and c.score == 1.0


def test_wrong_value_is_name_only():
  c = check_calls([SET], [call(SET, celsius=22)])
  assert (c.matched, c.name_only, c.missing, c.extra) == (0, 1, (), 0)
  assert not c.passed and c.score == 0.0


def test_wrong_name_is_missing_and_extra():
  c = check_calls([SET], [ToolCall("set_light", SET["arguments"])])
  assert (c.matched, c.name_only, c.missing, c.extra) == (0, 0, ("set_temperature",), 1)


def test_missing_second_call_of_the_same_tool():
  second = {"name": "set_temperature", "arguments": {"room": "hall", "celsius": 19}}
  c = check_calls([SET, second], [call(SET)])
  assert (c.matched, c.name_only, c.missing) == (1, 0, ("set_temperature",))
  assert not c.passed and c.score == 0.5


def test_duplicate_call_passes_with_a_penalty():
  c = check_calls([SET], [call(SET), call(SET)])
  assert c.passed and (c.matched, c.extra) == (1, 1)
  assert c.score == pytest.approx(0.9)


def test_wrong_then_right_attempt_counts_the_wrong_one_as_extra():
  c = check_calls([SET], [call(SET, celsius=30), call(SET)])
  assert c.passed and (c.matched, c.name_only, c.extra) == (1, 0, 1)


def test_order_checked_only_when_asked():
  made = [call(LIGHT), call(SET)]
  assert check_calls([SET, LIGHT], made).passed
  c = check_calls([SET, LIGHT], made, ordered=True)
  assert not c.order_ok and not c.passed and c.score == 0.5
  assert check_calls([SET, LIGHT], [call(SET), call(LIGHT)], ordered=True).passed


def test_parallel_calls_of_one_turn_are_a_set():
  c = check_calls([SET, LIGHT], [[call(LIGHT), call(SET)]], ordered=True)
  assert c.order_ok and c.passed


def test_allowed_extra_reads_are_not_extra():
  read = ToolCall("get_state", {"key": "kitchen"})
  assert check_calls([SET], [read, call(SET)]).extra == 1
  c = check_calls([SET], [read, call(SET)], allowed_extra=("get_state",))
  assert c.extra == 0 and c.made == 2 and c.score == 1.0


def test_state_mismatch_fails():
  made = [call(SET)]
  assert check_calls([SET], made).state_ok is None
  ok = check_calls([SET], made, final_state={"kitchen": 21, "hall": 1},
                   expected_state={"kitchen": 21.0})
  assert ok.state_ok and ok.passed and "state_ok" in ok.parts()
  bad = check_calls([SET], made, final_state={"kitchen": 20}, expected_state={"kitchen": 21})
  assert bad.state_ok is False and not bad.passed and bad.score == 0.5
  assert check_calls([SET], made, final_state={}, expected_state={"kitchen": 21}).state_ok is False


def test_nothing_expected():
  assert check_calls([], []).passed
  assert check_calls([], [call(SET)]).score == pytest.approx(0.9)


def test_parts_are_flat_numbers():
  parts = check_calls([SET, LIGHT], [call(SET, celsius=1)]).parts()
  assert parts == {"expected": 2.0, "made": 1.0, "matched": 0.0, "name_only": 1.0, "missing": 1.0,
                   "extra": 0.0, "order_ok": 1.0, "passed": 0.0, "score": 0.0}


def _assistant(*calls, content=""):
  return {"role": "assistant", "content": content, "tool_calls": [
      {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
      for i, (n, a) in enumerate(calls)]}


def test_made_calls_and_turns_from_messages():
  messages = [{"role": "user", "content": "hi"},
              _assistant(("a", json.dumps({"x": 1})), ("b", {"y": 2})),
              {"role": "tool", "tool_call_id": "c0", "content": "ok"},
              {"role": "assistant", "content": "thinking"},
              _assistant(("c", "{not json"), ("d", "[1]"))]
  turns = made_turns(messages)
  assert [[c.name for c in t] for t in turns] == [["a", "b"], ["c", "d"]]
  assert made_calls(messages) == [ToolCall("a", {"x": 1}, "c0"), ToolCall("b", {"y": 2}, "c1"),
                                  ToolCall("c", {}, "c0"), ToolCall("d", {}, "c1")]


def test_calls_the_backend_refused_do_not_count_as_made():
  messages = [
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "c0", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
          {"id": "c1", "type": "function", "function": {"name": "b", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c0", "content": "Error: the service is down."},
      {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'}]
  assert [c.name for t in made_turns(messages) for c in t] == ["a", "b"]
  assert [[c.name for c in t] for t in made_turns(messages, succeeded_only=True)] == [["b"]]
