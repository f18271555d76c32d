"""Finding the JSON answer in a simulator reply, and repairing one that was cut off."""
import pytest

from trustee_jax.simulator import json_replies


def test_repair_json_closes_what_was_cut():
  repair = json_replies.repair_json
  assert repair('{"response": "ok", "reward": 1') == {"response": "ok", "reward": 1}
  assert repair('x {"a": [1, {"b": "tr') == {"a": [1, {"b": "tr"}]}
  assert repair('{"a": "q\\"uote') == {"a": 'q"uote'} and repair('{"a": 1,') == {"a": 1}
  assert repair('{"a": ') is None and repair("no json") is None


@pytest.mark.parametrize("content,reasoning,expected", [
    ('{"a": 1}', None, {"a": 1}),
    ('<think>{"draft": 0}</think>\n{"a": 1}', None, {"a": 1}),
    ('plan {x}</think>{"a": 1}', None, {"a": 1}),  # template put <think> in the prompt
    ('Sure:\n```json\n{"a": [1, 2]}\n```\nDone.', None, {"a": [1, 2]}),
    ('The answer is {"a": "}"} as asked.', None, {"a": "}"}),
    ('', '{"a": 1}', {"a": 1}),
    ('{"a": 2}', 'thinking about {"a": 1}', {"a": 2}),
])
def test_extract_json(content, reasoning, expected):
  assert json_replies.extract_json(content, reasoning) == expected


@pytest.mark.parametrize("content", ["", "no json", "<think>still thinking {\"a\": 1}",
                                     '{"a": 1'])
def test_extract_json_fails_loudly(content):
  with pytest.raises(ValueError):
    json_replies.extract_json(content)
