"""Rule-based doubles: whole episodes by rule, key-value consistency, judge outcomes, the LM stand-in."""
import asyncio
import dataclasses
import json

import jsonschema
import numpy as np
import pytest

from trustee_jax.chat import ToolCall
from trustee_jax.simulator import doubles as dbl
from trustee_jax.simulator import tasks as tl
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.tools import ToolLedger


@dataclasses.dataclass
class Knobs:
  num_tools: int = 6
  num_expected_calls: int = 1
  persona_level: int = 0
  ambiguity_level: int = 0
  expected_turns: int = 0
  system_prompt_level: int = 3
  num_criteria: int = 1
  max_user_turns: int = 3
  max_assistant_turns: int = 4
  max_tool_turns: int = 2


ALL_TOOLS = [tools_pool.tool_spec(e) for ts in dbl.double_pool()[dbl.CATEGORY].values() for e in ts]


def gen(knobs=Knobs(), seed=0, tools=ALL_TOOLS):
  return asyncio.run(dbl.TaskGeneratorDouble().generate(knobs, tools, dbl.CATEGORY, seed))


def assistant_calls(calls):
  return {"role": "assistant", "content": "", "tool_calls": [
      {"id": f"c{i}", "type": "function",
       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
      for i, c in enumerate(calls)]}


def play(task, calls, final="Done."):
  """One episode: first query, the agent's calls, the tool double's results, a final text."""
  messages = [{"role": "system", "content": task.system_prompt},
              {"role": "user", "content": task.first_user_query}]
  ledger = ToolLedger.for_task(task)
  if calls:
    messages.append(assistant_calls(calls))
    tcs = [ToolCall(c["name"], c["arguments"], f"c{i}") for i, c in enumerate(calls)]
    results = asyncio.run(dbl.ToolDouble().execute(task, ledger, tcs, seed=0))
    messages += [{"role": "tool", "tool_call_id": f"c{i}", "content": r.content}
                 for i, r in enumerate(results)]
  messages.append({"role": "assistant", "content": final})
  return messages, ledger


def test_pool_and_tasks():
  pool = dbl.double_pool()
  assert tools_pool.pool_problems(pool, strict=True) == []
  category, tools = tools_pool.sample_tools(pool, 3, np.random.default_rng(0))
  task = asyncio.run(dbl.TaskGeneratorDouble().generate(Knobs(num_expected_calls=2), tools,
                                                        category, seed=1))
  assert len(task.expected_tool_calls) == 2 and set(task.expected_tool_calls) <= set(task.tool_names)
  assert [c["name"] for c in task.oracle["calls"]] == task.expected_tool_calls
  assert task.hidden_facts == [] and task.first_user_query.startswith("Please ")
  assert tl.Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
  assert gen(seed=3) == gen(seed=3)


def test_clear_request_names_the_value():
  task = gen(seed=0)
  (call,) = task.oracle["calls"]
  value = dbl.SPECS[call["name"]].value(call["arguments"])
  if isinstance(value, int):
    assert str(value) in task.first_user_query
  ledger = ToolLedger.for_task(task)
  key = dbl.SPECS[call["name"]].key(call["arguments"])
  assert dbl.ToolDouble.state(ledger)[key] != value  # the world starts elsewhere


def test_perfect_agent_wrong_args_wrong_tool_and_no_tool():
  task = gen(Knobs(num_expected_calls=2), seed=5)
  right = task.oracle["calls"]
  draws = (dbl.SPECS[right[0]["name"]].sample(np.random.default_rng(s)) for s in range(100))
  wrong_args = [dict(right[0], arguments=next(a for a in draws if a != right[0]["arguments"])),
                right[1]]
  other = next(n for n in dbl.SPECS if n not in task.expected_tool_calls)
  wrong_tool = [{"name": other, "arguments": dbl.SPECS[other].sample(np.random.default_rng(0))}]
  user, judge = dbl.UserDouble(), dbl.JudgeDouble()
  outcomes = {}
  for name, calls in {"right": right, "wrong_args": wrong_args, "wrong_tool": wrong_tool,
                      "none": []}.items():
    messages, _ = play(task, calls)
    reply = asyncio.run(user.respond(task, messages, seed=0))
    verdict = asyncio.run(judge.score(task, messages, num_criteria=1, seed=0))
    outcomes[name] = (reply.ended, reply.reward, verdict.score)
  assert outcomes == {"right": (True, 1, 1), "wrong_args": (False, -1, 0),
                      "wrong_tool": (False, -1, -1), "none": (False, -1, -1)}


def test_vague_request_is_answered_when_asked():
  task = gen(Knobs(ambiguity_level=1), seed=2)
  assert task.hidden_facts and task.first_user_query.startswith("Could you")
  messages, _ = play(task, [], final="Happy to help. Which value would you like?")
  reply = asyncio.run(dbl.UserDouble().respond(task, messages, seed=0))
  assert reply == dbl.UserReply(" ".join(task.hidden_facts), 0, False)
  with pytest.raises(ValueError):
    asyncio.run(dbl.UserDouble().respond(task, messages[:-1], seed=0))


def test_tool_double_is_a_consistent_key_value_store():
  task = gen(Knobs(num_tools=2), seed=0, tools=[t for t in ALL_TOOLS if t["function"]["name"] in (
      "set_temperature", "get_state")])
  ledger = ToolLedger.for_task(task)
  tool = dbl.ToolDouble(max_parallel_calls=3)
  before = asyncio.run(tool.execute(task, ledger, [ToolCall("get_state", {"key": "temperature"})], 0))
  start = json.loads(before[0].content)["value"]
  target = task.oracle["calls"][0]["arguments"]["value"]
  calls = [ToolCall("set_temperature", {"value": target}), ToolCall("get_state", {"key": "temperature"}),
           ToolCall("set_temperature", {"value": "warm"}), ToolCall("get_state", {"key": "volume"})]
  results = asyncio.run(tool.execute(task, ledger, calls, 0))
  assert json.loads(results[1].content) == {"key": "temperature", "value": target} != start
  assert [r.reward for r in results] == [1, 0, -1, -1]
  assert not results[2].valid and "not of type 'integer'" in results[2].content
  assert "too many tool calls" in results[3].content
  later = asyncio.run(tool.execute(task, ledger, [ToolCall("get_state", {"key": "temperature"})], 0))
  assert json.loads(later[0].content)["value"] == target
  missing = asyncio.run(tool.execute(task, ledger, [ToolCall("get_state", {"key": "oven"})], 0))
  assert "unknown key 'oven'" in missing[0].content


def test_batch_and_tool_checks():
  reqs = [tl.TaskRequest(Knobs(), dbl.CATEGORY, ALL_TOOLS, seed=7) for _ in range(2)]
  batch = asyncio.run(dbl.TaskGeneratorDouble().generate_batch(reqs))
  assert batch.complete and len({t.first_user_query for t in batch.tasks}) == 2
  foreign = [tools_pool.tool_spec(tools_pool.load_shipped_pool()["Travel"]["Hotels"][0])]
  with pytest.raises(ValueError, match="only knows"):
    gen(tools=foreign)
  only_reader = [t for t in ALL_TOOLS if t["function"]["name"] == "get_state"]
  with pytest.raises(tl.TaskGenerationError):
    gen(tools=only_reader)


def test_scripted_client_validates_and_records():
  schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
  client = dbl.ScriptedClient([{"a": 1}, {"a": "x"}])
  got = asyncio.run(client.chat_json([{"role": "user", "content": "q"}], schema, role="r", seed=3))
  assert got == {"a": 1} and client.requests[0].kwargs["seed"] == 3
  assert client.requests[0].prompt == "q" and client.stats() == {"requests": 1}
  with pytest.raises(jsonschema.ValidationError):
    asyncio.run(client.chat_json([], schema, role="r"))
  with pytest.raises(RuntimeError, match="ran out"):
    asyncio.run(client.chat_json([], schema, role="r"))
  with pytest.raises(jsonschema.SchemaError):
    asyncio.run(client.chat_json([], {"type": "nope"}, role="r"))
