"""Rule-based doubles: whole episodes by rule, key-value consistency, judge outcomes, the LM stand-in."""
import asyncio
import dataclasses
import json

import jsonschema
import numpy as np
import pytest

from trustee_jax.simulator import doubles as dbl
from trustee_jax.simulator import tasks as tl
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.tools import ToolLedger
from trustee_jax.tool_calls import ToolCall


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
  assert task.hidden_facts == [] and task.expected_calls == task.oracle["calls"]
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
  assert task.hidden_facts and not any(f in task.first_user_query for f in task.hidden_facts)
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
  read = gen(tools=only_reader)  # nothing to set: a value to read out
  assert read.expected_tool_calls == ["get_state"] and read.oracle["report"]


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


class Chat:
  """A hand-built episode against the doubles: agent tool turns and texts, the user's replies."""

  def __init__(self, task):
    self.task, self.ledger, self.n = task, ToolLedger.for_task(task), 0
    self.messages = [{"role": "system", "content": task.system_prompt},
                     {"role": "user", "content": task.first_user_query}]

  def call(self, *calls):
    tcs = [ToolCall(name, args, f"c{self.n + i}") for i, (name, args) in enumerate(calls)]
    self.n += len(tcs)
    self.messages.append({"role": "assistant", "content": "", "tool_calls": [
        {"id": c.id, "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in tcs]})
    results = asyncio.run(dbl.ToolDouble().execute(self.task, self.ledger, tcs, seed=0))
    self.messages += [{"role": "tool", "tool_call_id": c.id, "content": r.content}
                      for c, r in zip(tcs, results)]
    return results

  def say(self, text, seed=0):
    self.messages.append({"role": "assistant", "content": text})
    reply = asyncio.run(dbl.UserDouble().respond(self.task, self.messages, seed))
    if not reply.ended:
      self.messages.append({"role": "user", "content": reply.response})
    return reply

  def judge(self):
    return asyncio.run(dbl.JudgeDouble().score(self.task, self.messages, 1, seed=0))


def named(*names):
  return [t for t in ALL_TOOLS if t["function"]["name"] in names]


def calls_of(task):
  return [(c["name"], c["arguments"]) for c in task.oracle["calls"]]


def test_user_gives_values_only_when_asked_and_ends_by_the_rules():
  task = gen(Knobs(num_expected_calls=2, ambiguity_level=2), seed=4,
             tools=named("set_temperature", "set_light"))
  facts = {g["name"]: g["fact"] for g in task.oracle["goals"]}
  chat = Chat(task)
  told = chat.say("I will take care of that for you.")
  assert (told.reward, told.ended) == (-1, False) and not any(f in told.response for f in facts.values())
  told = chat.say("What temperature would you like?")
  assert told == dbl.UserReply(facts["set_temperature"], 0, False)  # one value: the one asked
  told = chat.say("Anything else I should know?")
  assert told == dbl.UserReply(facts["set_light"], 0, False)  # the next value not yet given
  chat.call(calls_of(task)[0])
  short = chat.say("All done.")
  assert (short.reward, short.ended) == (-1, False)
  assert task.oracle["goals"][1]["said"] in short.response  # restates what is still wanted
  assert task.oracle["goals"][0]["said"] not in short.response
  chat.call(calls_of(task)[1])
  assert chat.say("All done.") == dbl.UserReply("", 1, True)
  assert Chat(task).say("Sorry, I can't do that.") == dbl.UserReply("", -1, True)


def test_user_replies_in_the_persona_and_by_the_seed():
  replies = []
  for persona in range(3):
    task = gen(Knobs(ambiguity_level=2, persona_level=persona), seed=2, tools=named("set_volume"))
    chat = Chat(task)
    replies.append(chat.say("Which volume would you like?", seed=5))
    assert replies[-1] == Chat(task).say("Which volume would you like?", seed=5)
    assert task.hidden_facts[0] in replies[-1].response and replies[-1].reward == 0
  expert, beginner, novice = (r.response for r in replies)
  assert len(expert) < len(beginner) < len(novice) and "let me think" in novice


def test_judge_on_hand_built_episodes():
  rel = gen(Knobs(expected_turns=1), seed=6, tools=named("set_volume", "get_state"))
  (_, read), (name, write) = [(c["name"], c["arguments"]) for c in rel.expected_calls]
  chat = Chat(rel)
  (result,) = chat.call(("get_state", read))
  current = json.loads(result.content)["value"]
  assert result.reward == 1 and current != write["level"]
  chat.call((name, write))
  assert chat.say("Done.") == dbl.UserReply("", 1, True)
  right = chat.judge()
  assert right.score == 1 and right.check["passed"] == 1.0 and right.check["extra"] == 0
  guessed = Chat(rel)  # the right value without the read: reads are allowed, not required
  guessed.call((name, write))
  assert guessed.judge().score == 1
  wrong = Chat(rel)
  wrong.call(("get_state", read), (name, {"level": current}))
  assert wrong.judge().score == 0 and wrong.judge().check["name_only"] == 1
  assert Chat(rel).judge().score == -1  # no tool call

  two = gen(Knobs(num_expected_calls=2), seed=1, tools=named("set_temperature", "lock_door", "play_music"))
  missing = Chat(two)
  missing.call(calls_of(two)[0])
  assert missing.judge().score == 0 and missing.judge().check["missing"] == 1  # partway
  nothing = Chat(two)
  nothing.call((calls_of(two)[0][0], {}))
  assert nothing.judge().score == -1  # an expected tool, but no expected call made right
  both = Chat(two)
  both.call(*calls_of(two), ("get_state", {"key": "temperature"}))
  assert both.judge().score == 1
  other = next(n for n in two.tool_names if n not in two.expected_tool_calls)
  start = {k: json.loads(v) for k, v in (s.split("=", 1) for s in two.initial_state)}
  changed = next(g for g in (dbl.SPECS[other].sample(np.random.default_rng(s)) for s in range(50))
                 if dbl.SPECS[other].value(g) != start[dbl.SPECS[other].key(g)])
  both.call((other, changed))  # a distractor setter: the state is no longer the wanted one
  assert both.judge().score == 0
  assert (reply := both.say("Done.")).reward == -1 and "put back" in reply.response


def test_read_task_ends_when_the_value_is_reported():
  task = gen(Knobs(), seed=3, tools=named("get_state"))
  (call,) = task.expected_calls
  (value,) = task.oracle["report"]
  silent = Chat(task)
  silent.call((call["name"], call["arguments"]))
  assert silent.say("I checked it.").reward == -1 and silent.judge().score == 0
  chat = Chat(task)
  chat.call((call["name"], call["arguments"]))
  assert chat.say(f"It is {value} right now.") == dbl.UserReply("", 1, True)
  assert chat.judge().score == 1


@pytest.mark.parametrize("level", [0, 1, 2])
def test_an_agent_that_asks_reads_and_sets_solves_every_task(level):
  knobs = Knobs(num_tools=1 + 4 * level, num_expected_calls=1 + level, persona_level=level,
                ambiguity_level=level, expected_turns=level)
  rng = np.random.default_rng(level)
  for req in tl.sample_requests(dbl.double_pool(), [knobs] * 20, rng):
    task = asyncio.run(dbl.TaskGeneratorDouble().generate(knobs, req.tools, req.category, req.seed))
    chat = Chat(task)
    for fact in task.hidden_facts:
      assert chat.say("Could you tell me more?").reward == 0 and fact in chat.messages[-1]["content"]
    for c in task.expected_calls:
      chat.call((c["name"], c["arguments"]))
    report = " ".join(map(str, task.oracle["report"]))
    assert chat.say(f"Done. {report}") == dbl.UserReply("", 1, True)
    assert chat.judge().score == 1


def test_coin_judge_is_a_deterministic_coin_over_what_the_policy_wrote():
  task = gen(seed=3)
  coin = dbl.CoinJudge()

  def score(text: str) -> int:
    messages = [{"role": "user", "content": task.first_user_query},
                {"role": "assistant", "content": text}]
    return asyncio.run(coin.score(task, messages, 1, seed=0)).score
  scores = [score(f"reply {i}") for i in range(32)]
  assert set(scores) == {-1, 1}  # variance: GRPO groups get non-zero advantages
  assert scores == [score(f"reply {i}") for i in range(32)]  # the same words, the same score
