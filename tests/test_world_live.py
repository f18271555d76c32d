"""The simulated world against the embedded server on 127.0.0.1 with the real SmolLM2.

Every role (task generator, user, tool simulator, judge) goes through the real SimulatorClient
over HTTP and must return schema-valid output for several seeds; a generated task that fails
its validation is regenerated (naturally, and forced by tampering with a real reply); an invalid
tool call reaches no server (the server's own request counter says so, with a positive control).
One server for the module; small max_tokens and concurrent requests keep it to minutes.
"""
import asyncio
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import pytest

from trustee_jax import seeding
from trustee_jax.serving.server import ServerThread, load_simulator
from trustee_jax.simulator import doubles
from trustee_jax.simulator import judge as judge_lib
from trustee_jax.simulator import task_checks
from trustee_jax.simulator import tasks as tasks_lib
from trustee_jax.simulator import tools as tools_lib
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator import user as user_lib
from trustee_jax.simulator.client import ClientConfig, SimulatorClient
from trustee_jax.tool_calls import ToolCall

pytestmark = pytest.mark.slow

SEEDS = (11, 22, 33)
KNOBS = dict(num_tools=3, num_expected_calls=1, persona_level=1, ambiguity_level=1,
             expected_turns=1, system_prompt_level=3, num_criteria=2, max_user_turns=3,
             max_assistant_turns=4, max_tool_turns=3)
TASK_CFG = tasks_lib.TaskGenConfig(max_tokens=200, max_facts=2, max_state_entries=2,
                                   max_attempts=3, expected_arguments=False)
USER_CFG = user_lib.UserConfig(max_tokens=80, max_thought_chars=100, max_response_chars=120)
TOOL_CFG = tools_lib.ToolSimConfig(max_tokens=80, max_notes_chars=60, max_result_chars=120)
JUDGE_CFG = judge_lib.JudgeConfig(max_tokens=96, max_reason_chars=100, max_criteria=2)


class ServerCounter:
  """Counts the chat completions the server itself received (an HTTP middleware)."""

  def __init__(self, app):
    self.chat_requests = 0

    @app.middleware("http")
    async def count(request, call_next):
      if request.url.path == "/v1/chat/completions":
        self.chat_requests += 1
      return await call_next(request)


@pytest.fixture(scope="module")
def server():
  sim = load_simulator("smollm2", served_name="smollm2-135m", num_slots=8, cache_len=1280,
                       max_queue=64)
  app = sim.app()
  counter = ServerCounter(app)
  try:
    with ServerThread(app) as srv:
      yield srv.url, counter
  finally:
    sim.close()


class Recorder:
  """A SimulatorClient proxy that keeps every validated reply (and may tamper with one)."""

  def __init__(self, client: SimulatorClient,
               tamper: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None):
    self.client, self.tamper = client, tamper
    self.replies: list[tuple[str, dict, dict, dict]] = []  # role, schema, reply, sampling

  async def chat_json(self, messages, schema, *, role, **sampling):
    value = await self.client.chat_json(messages, schema, role=role, **sampling)
    if self.tamper is not None:
      value = self.tamper(len(self.replies), value)
    self.replies.append((role, schema, value, sampling))
    return value


def with_client(url: str, body: Callable[[SimulatorClient], Any]) -> Any:
  """Runs `body(client)` on a fresh event loop with a client bound to it."""
  async def main():
    config = ClientConfig(urls=(url,), timeout_s=900.0, max_retries=0, max_concurrency=8,
                          max_reasks=2)
    async with SimulatorClient(config) as client:
      return await body(client)
  return asyncio.run(main())


def double_task(seed: int) -> tasks_lib.Task:
  """A smart-home task from the rule-based generator (known tools, known right call), with
  `get_state` always among its tools."""
  pool = doubles.double_pool()
  (req,) = tasks_lib.sample_requests(pool, [KNOBS], np.random.default_rng(seed))
  tools = list(req.tools)
  if "get_state" not in [tools_pool.tool_name(t) for t in tools]:
    tools = tools[:-1] + [tools_pool.tool_spec(e) for es in pool[doubles.CATEGORY].values()
                          for e in es if tools_pool.tool_name(e) == "get_state"]
  return asyncio.run(doubles.TaskGeneratorDouble().generate(KNOBS, tools, req.category, seed))


def right_call(task: tasks_lib.Task) -> ToolCall:
  call = task.oracle["calls"][0]
  return ToolCall(call["name"], dict(call["arguments"]), "call_0")


def conversation(task: tasks_lib.Task, *, act: bool) -> list[dict[str, Any]]:
  """The opening, then (act) the right tool call and its result, and a last text message."""
  msgs = [{"role": "system", "content": task.system_prompt},
          {"role": "user", "content": task.first_user_query}]
  if act:
    call = right_call(task)
    msgs += [{"role": "assistant", "content": "", "tool_calls": [{
        "id": call.id, "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})},
             {"role": "assistant", "content": "Done: I applied the setting you asked for."}]
  else:
    msgs.append({"role": "assistant", "content": "Sure. Which exact value would you like?"})
  return msgs


def assert_valid(value: dict, schema: dict) -> None:
  jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)


# ---- task generator -------------------------------------------------------------------------


def generation_requests(seeds) -> list[tasks_lib.TaskRequest]:
  pool = tools_pool.load_shipped_pool()
  return [tasks_lib.sample_requests(pool, [KNOBS], np.random.default_rng(s))[0] for s in seeds]


@pytest.mark.heavy
def test_task_generator_output_is_valid_or_regenerated(server):
  """Several seeds through the real client: every reply is schema-valid, and a task is returned
  only once a reply passes validation, each failure asked again with the next seed. For the last
  seed the first real reply is made to name a tool, so that regeneration surely happens."""
  url, _ = server
  requests = generation_requests(SEEDS)
  forced = len(requests) - 1
  names_of = [[tools_pool.tool_name(t) for t in r.tools] for r in requests]

  def name_a_tool(index, raw):
    if index == 0:
      return {**raw, "first_user_query": f"Please run {names_of[forced][0]} for me."}
    return raw

  async def body(client):
    recorders = [Recorder(client, tamper=name_a_tool if i == forced else None)
                 for i in range(len(requests))]
    outs = await asyncio.gather(*(
        tasks_lib.TaskGenerator(rec, TASK_CFG).generate(r.knobs, r.tools, r.category, r.seed)
        for rec, r in zip(recorders, requests)), return_exceptions=True)
    return recorders, outs

  recorders, outs = with_client(url, body)
  made = 0
  for i, (req, rec, out, names) in enumerate(zip(requests, recorders, outs, names_of)):
    schema = tasks_lib.task_schema(names, KNOBS["num_expected_calls"], TASK_CFG)
    raws = [reply for _, _, reply, _ in rec.replies]
    assert [role for role, *_ in rec.replies] == ["task"] * len(raws)
    assert [s["seed"] for *_, s in rec.replies] == [
        seeding.retry_seed(req.seed, k) for k in range(len(raws))]  # a new seed each attempt
    for raw in raws:
      assert_valid(raw, schema)
    problems = [task_checks.task_problems(raw, schema, names) for raw in raws]
    if i == forced:
      assert problems[0] == [f"first_user_query names tools {[names[0]]}"]
      assert len(raws) >= 2
    if isinstance(out, tasks_lib.TaskGenerationError):
      assert len(raws) == TASK_CFG.max_attempts and all(problems), problems
      assert all(f"attempt {k + 1}" in str(out) for k in range(len(raws)))
      continue
    assert not isinstance(out, BaseException), repr(out)
    made += 1
    assert all(problems[:-1]) and not problems[-1]  # regenerated exactly until one passed
    assert out.first_user_query == raws[-1]["first_user_query"].strip()
    assert out.expected_tool_calls == raws[-1]["expected_tool_calls"]
    assert set(out.expected_tool_calls) <= set(names) and out.user_intent
  assert made >= 1, [str(o) for o in outs]


# ---- user, tool simulator, judge ------------------------------------------------------------


def test_user_simulator_replies_are_schema_valid(server):
  url, _ = server
  cases = [(s, double_task(s), act) for s in SEEDS for act in (False, True)][:4]

  async def body(client):
    rec = Recorder(client)
    sim = user_lib.UserSimulator(rec, USER_CFG)
    replies = await asyncio.gather(*(sim.respond(task, conversation(task, act=act), seed)
                                     for seed, task, act in cases))
    return rec, replies

  rec, replies = with_client(url, body)
  assert len(rec.replies) == len(cases)
  for role, schema, raw, sampling in rec.replies:
    assert role == "user" and schema == user_lib.user_schema(USER_CFG)
    assert_valid(raw, schema)
    assert sampling["max_tokens"] == USER_CFG.max_tokens
  assert sorted(s["seed"] for *_, s in rec.replies) == sorted(seed for seed, *_ in cases)
  for reply in replies:
    assert reply.reward in (-1, 0, 1)
    assert reply.ended == (reply.response == "")
    assert len(reply.response) <= USER_CFG.max_response_chars


def test_tool_simulator_answers_are_schema_valid(server):
  url, _ = server
  tasks = [double_task(s) for s in SEEDS]
  calls = [[right_call(tasks[0])], [ToolCall("get_state", {"key": doubles.SPECS[
      right_call(tasks[1]).name].key(right_call(tasks[1]).arguments)}, "call_0")],
           [right_call(tasks[2])]]

  async def body(client):
    rec = Recorder(client)
    sim = tools_lib.ToolSimulator(rec, TOOL_CFG)
    ledgers = [tools_lib.ToolLedger.for_task(t) for t in tasks]
    results = await asyncio.gather(*(sim.execute(t, ledger, c, seed) for t, ledger, c, seed
                                     in zip(tasks, ledgers, calls, SEEDS)))
    return rec, results, ledgers

  rec, results, ledgers = with_client(url, body)
  assert len(rec.replies) == len(tasks)
  for role, schema, raw, sampling in rec.replies:
    assert role == "tool" and schema == tools_lib.tool_schema(TOOL_CFG)
    assert_valid(raw, schema)
    assert sampling["max_tokens"] == TOOL_CFG.max_tokens
  for c, (res,), ledger in zip(calls, results, ledgers):
    assert res.valid and res.error is None and res.content and res.reward in (-1, 0, 1)
    assert len(res.content) <= TOOL_CFG.max_result_chars + len(tools_lib.TRUNCATED)
    assert [(e.call, e.result) for e in ledger.entries] == [(c[0], res.content)]


def test_judge_scores_are_schema_valid(server):
  url, _ = server
  cases = [(s, double_task(s)) for s in SEEDS]

  async def body(client):
    rec = Recorder(client)
    judge = judge_lib.Judge(rec, JUDGE_CFG)
    verdicts = await asyncio.gather(*(judge.score(task, conversation(task, act=True),
                                                  KNOBS["num_criteria"], seed)
                                      for seed, task in cases))
    return rec, verdicts

  rec, verdicts = with_client(url, body)
  assert len(rec.replies) == len(cases)
  for role, schema, raw, _ in rec.replies:
    assert role == "judge" and schema == judge_lib.judge_schema(2, JUDGE_CFG.max_reason_chars)
    assert_valid(raw, schema)
    assert len(raw["criteria_met"]) == 2
  for verdict in verdicts:  # score_rule "criteria": the score follows the verdicts, not the LM
    assert verdict.votes == (verdict.score,)
    assert any(verdict.score == judge_lib.criteria_score(raw["criteria_met"])
               for *_, raw, _ in rec.replies if raw["reason"] == verdict.reason)


# ---- no request for what needs no LM ----------------------------------------------------------


def test_invalid_tool_calls_and_toolless_episodes_make_no_request(server):
  url, counter = server
  task = double_task(SEEDS[0])
  call = right_call(task)
  invalid = [ToolCall(call.name, {}, "c0"),  # a required argument missing
             ToolCall(call.name, {k: [v] for k, v in call.arguments.items()}, "c1"),  # types
             ToolCall("launch_rocket", {"target": "moon"}, "c2"),  # no such tool
             ToolCall(call.name, {**call.arguments, "colour": "red"}, "c3")]  # unknown argument

  async def body(client):
    sim = tools_lib.ToolSimulator(client, TOOL_CFG)
    before = counter.chat_requests, client.stats().get("calls/tool", 0)
    ledger = tools_lib.ToolLedger.for_task(task)
    bad = []
    for turn in (invalid[:2], invalid[2:]):  # within max_parallel_calls
      bad += await sim.execute(task, ledger, turn, seed=5)
    judged = await judge_lib.Judge(client, JUDGE_CFG).score(task, conversation(task, act=False),
                                                            2, seed=5)
    after_bad = counter.chat_requests, client.stats().get("calls/tool", 0)
    good = await sim.execute(task, ledger, [call], seed=6)  # positive control: one request
    after_good = counter.chat_requests, client.stats().get("calls/tool", 0)
    return before, after_bad, after_good, bad, judged, good, ledger

  before, after_bad, after_good, bad, judged, good, ledger = with_client(url, body)
  assert after_bad == before, "an invalid call or a tool-less episode reached the server"
  assert after_good == (before[0] + 1, before[1] + 1)
  for res in bad:
    assert not res.valid and res.reward == -1 and res.content.startswith("Error:")
  assert "does not exist" in bad[2].content and "colour" in bad[3].content
  assert judged.score == -1 and judged.votes == ()
  assert good[0].valid and [e.valid for e in ledger.entries] == [False] * 4 + [True]
