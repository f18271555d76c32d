"""Rule-based stand-ins for the simulated world, behind the same async interfaces, with no LM.

The task family is `home_world`'s smart home. The user double gives a goal's values only when a
question asks about its device (a question about nothing in particular gets the next value not
yet given), ends the episode with reward 1 once the home is in the wanted state (and any value to
report was reported), with -1 when the agent gives up, and otherwise restates what is still
wanted (-1). The tool double is a key-value store replayed from the ledger; the judge double
scores by `rule_check.check_calls` on the setter calls and the final state. `heldout_tasks` is a
fixed validation set that no training task overlaps. Also `ScriptedClient`, a recording stand-in
for SimulatorClient. Used by fast tests, the trainer's tests, the learning benchmark, and as the
oracle of the fidelity report.
"""
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jsonschema
import numpy as np

from trustee_jax.config_dataclass import from_config
from trustee_jax.simulator import task_checks
from trustee_jax.simulator import tasks as tasks_lib
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.home_world import (CATEGORY, GENRES, SPECS, double_pool,  # noqa: F401
                                              draw_task, is_heldout, restate, reveal)
from trustee_jax.simulator.judge import Judgement, has_tool_call
from trustee_jax.simulator.rule_check import (CallCheck, arguments_match, check_calls,
                                              made_calls, made_turns)
from trustee_jax.simulator.tools import ToolLedger, ToolResult, check_call
from trustee_jax.simulator.user import UserReply
from trustee_jax.tool_calls import ToolCall

MAX_DRAWS = 200  # draws of a task before the generator gives up on a tool set
GIVE_UP = re.compile(r"\b(can ?not|can'?t|can’t|unable|not able|impossible|not possible|"
                     r"beyond my|don'?t have (access|the ability))\b", re.I)


class TaskGeneratorDouble:
  """Writes smart-home tasks by rule; `tools` must come from `double_pool()`. With `heldout`,
  only tasks of the held-out split (`home_world.is_heldout`), else only the others."""

  def __init__(self, cfg: Any = None, *, heldout: bool = False):
    self.cfg = from_config(tasks_lib.TaskGenConfig, cfg, block="world.task")
    self.heldout = heldout

  def draw(self, knobs: Any, tools: list[dict[str, Any]], category: str, seed: int
           ) -> tasks_lib.Task:
    """One task, deterministic in the seed; TaskGenerationError when the split has none."""
    kn = tasks_lib.knobs_dict(knobs)
    names = [tools_pool.tool_name(t) for t in tools]
    unknown = [n for n in names if n not in SPECS and n != "get_state"]
    if unknown or not names:
      raise ValueError(f"the task double only knows double_pool() tools, not {unknown or names}")
    for k in range(MAX_DRAWS):  # a fresh stream per draw: the same worlds at any wording knobs
      raw, oracle = draw_task(kn, names, np.random.default_rng([seed, k]))
      if is_heldout(raw) == self.heldout:
        return tasks_lib.make_task(raw, category=category, tools=tools, knobs=kn, seed=seed,
                                   oracle=oracle)
    raise tasks_lib.TaskGenerationError(
        f"no {'held-out' if self.heldout else 'training'} task for tools {names} in {MAX_DRAWS} draws")

  async def generate(self, knobs: Any, tools: list[dict[str, Any]], category: str,
                     seed: int) -> tasks_lib.Task:
    """`draw`, behind the task generator's async interface."""
    return self.draw(knobs, tools, category, seed)

  async def generate_batch(self, requests, *, avoid_queries=()) -> tasks_lib.TaskBatch:
    return await tasks_lib.generate_batch(self, requests, rounds=self.cfg.batch_rounds,
                                          avoid_queries=avoid_queries)


def heldout_tasks(n: int, seed: int, knobs: Any) -> list[tasks_lib.Task]:
  """A fixed validation set: n tasks (distinct first queries) of the held-out split, which no
  training task shares; `knobs` is one knob setting or a list of them, used in turn."""
  knobs_list = list(knobs) if isinstance(knobs, (list, tuple)) else [knobs]
  gen, pool = TaskGeneratorDouble(heldout=True), double_pool()
  rng = np.random.default_rng(seed)
  out: list[tasks_lib.Task] = []
  seen: set[str] = set()
  for _ in range(MAX_DRAWS * max(1, n)):
    if len(out) == n:
      return out
    (req,) = tasks_lib.sample_requests(pool, [knobs_list[len(out) % len(knobs_list)]], rng)
    try:
      task = gen.draw(req.knobs, req.tools, req.category, req.seed)
    except tasks_lib.TaskGenerationError:
      continue
    query = task_checks.normalise_query(task.first_user_query)
    if query not in seen:
      seen.add(query)
      out.append(task)
  raise RuntimeError(f"could not draw {n} distinct held-out tasks at knobs {knobs!r}")


def episode_ledger(task: tasks_lib.Task, messages: Sequence[Mapping[str, Any]]) -> ToolLedger:
  """The ledger an episode's messages imply: each tool call with the result that answered it
  (by id); a call no result answered, or answered with an error, counts as not executed."""
  results = {m.get("tool_call_id"): str(m.get("content", "")) for m in messages
             if m.get("role") == "tool" and m.get("tool_call_id")}
  ledger = ToolLedger.for_task(task)
  for call in made_calls(messages):
    if call.id in results:
      ok = not results[call.id].startswith("Error") and check_call(call, task.tools) is None
      ledger.record(call, results[call.id], ok)
  return ledger


def _text(message: Mapping[str, Any]) -> str:
  return str(message.get("content") or "")


def _reported(value: Any, text: str) -> bool:
  return re.search(rf"(?<!\w){re.escape(str(value))}(?!\w)", text, re.I) is not None


def episode_check(task: tasks_lib.Task, messages: Sequence[Mapping[str, Any]]
                  ) -> tuple[CallCheck, bool, dict[str, Any]]:
  """The rule check of the episode (the oracle's calls, reads allowed as extras, the replayed
  final state against the expected one), whether every value to report is in the last
  assistant message, and the final state."""
  final = ToolDouble.state(episode_ledger(task, messages))
  check = check_calls(task.oracle["calls"], made_turns(messages), allowed_extra=("get_state",),
                      final_state=final, expected_state=task.oracle["expected_state"])
  last = next((_text(m) for m in reversed(messages) if m.get("role") == "assistant"), "")
  return check, all(_reported(v, last) for v in task.oracle["report"]), final


class UserDouble:
  """Plays the task's person by the rules of the module docstring, deterministic in the seed."""

  async def respond(self, task: tasks_lib.Task, messages: list[dict[str, Any]],
                    seed: int) -> UserReply:
    if not messages or messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
      raise ValueError("the user double answers an assistant text message")
    rng, persona = np.random.default_rng(seed), task.knobs["persona_level"]
    check, reported, final = episode_check(task, messages)
    if check.passed and reported:
      return UserReply("", 1, True)
    unmet = [g for g in task.oracle["goals"]
             if g["name"] == "get_state" or final.get(g["key"]) != g["target"]]
    text = _text(messages[-1])
    asked = [g["fact"] for g in unmet if "?" in text and re.search(
        r"\b(" + "|".join(map(re.escape, g["topics"])) + ")", text, re.I)]
    if asked:
      return UserReply(reveal(asked, persona, rng), 0, False)
    if GIVE_UP.search(text):
      return UserReply("", -1, True)
    told = " ".join(_text(m) for m in messages if m.get("role") == "user")
    untold = [f for f in task.hidden_facts if f not in told]
    if "?" in text and untold:
      return UserReply(reveal(untold[:1], persona, rng), 0, False)
    wanted = [g["said"] for g in unmet] or ["put back what I did not ask you to change"]
    return UserReply(restate(wanted, persona, rng), -1, False)


class ToolDouble:
  """A key-value store: setters write, `get_state` reads; the state is replayed from the task's
  initial state and the ledger, so results are consistent by construction. Rewards: 1 for an
  expected call, 0 for another read, -1 for another write or an invalid call."""

  def __init__(self, max_parallel_calls: int = 3):
    self.max_parallel_calls = max_parallel_calls

  @staticmethod
  def state(ledger: ToolLedger) -> dict[str, Any]:
    store = {k: json.loads(v) for k, v in (s.split("=", 1) for s in ledger.initial_state)}
    for e in ledger.entries:
      if e.valid and e.call.name in SPECS:
        store[SPECS[e.call.name].key(e.call.arguments)] = SPECS[e.call.name].value(e.call.arguments)
    return store

  async def execute(self, task: tasks_lib.Task, ledger: ToolLedger, calls: list[ToolCall],
                    seed: int, messages: list[dict[str, Any]] | None = None) -> list[ToolResult]:
    results = []
    for i, call in enumerate(calls):
      err = (check_call(call, task.tools) if i < self.max_parallel_calls
             else "Error: not executed; too many tool calls in one turn.")
      store = self.state(ledger)
      if err is None and call.name == "get_state" and call.arguments["key"] not in store:
        err = f"Error: unknown key {call.arguments['key']!r}. Known keys: {', '.join(store)}."
      right = any(c["name"] == call.name and arguments_match(c["arguments"], call.arguments)
                  for c in task.expected_calls)
      if err is not None:
        results.append(ToolResult(err, -1, False, err))
      elif call.name == "get_state":
        value = store[call.arguments["key"]]
        results.append(ToolResult(json.dumps({"key": call.arguments["key"], "value": value}),
                                  int(right), True))
      else:
        spec = SPECS[call.name]
        content = json.dumps({"ok": True, "key": spec.key(call.arguments),
                              "value": spec.value(call.arguments)})
        results.append(ToolResult(content, 1 if right else -1, True))
      ledger.record(call, results[-1].content, results[-1].valid)
    return results


class JudgeDouble:
  """1: the final state is the wanted one, every expected setter call made right (reads allowed
  as extras) and any value to report reported; 0: part of the way (every expected tool called
  but the state, an argument or the report wrong; or some expected call made exactly right);
  -1: nothing expected done right, or no tool call at all. The middle grade is DESIGN's "most
  criteria hold" and gives a group whose episodes all fall short a signal to learn from."""

  async def score(self, task: tasks_lib.Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement:
    if not has_tool_call(messages):
      return Judgement(-1, "no tool call in the episode", ())
    check, reported, _ = episode_check(task, messages)
    parts = check.parts()
    if check.passed and reported:
      return Judgement(1, "the home is as wanted, every expected call made right", (1,), parts)
    if not check.missing:
      why = "the value was not reported" if check.passed else "the final state or an argument is wrong"
      return Judgement(0, f"every expected tool was called, but {why}", (0,), parts)
    if check.matched:
      return Judgement(0, f"{check.matched} of {check.expected} expected calls made right; never "
                       f"called: {', '.join(check.missing)}", (0,), parts)
    return Judgement(-1, f"expected tools never called: {', '.join(check.missing)}", (-1,), parts)


class CoinJudge:
  """-1 or 1 from a hash of what the policy wrote (and of the task): rewards with variance and
  no meaning, for tests of the loop's mechanics (resume, several processes, LoRA) with a tiny
  random policy, which never earns a real reward, so that their updates have non-zero
  advantages. Deterministic in the episode, so a resumed run that sampled anything else shows."""

  async def score(self, task: tasks_lib.Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement:
    said = json.dumps([task.task_id] + [m.get("content") for m in messages
                                            if m.get("role") == "assistant"])
    digest = hashlib.blake2b(said.encode(), digest_size=2).digest()
    score = 1 if digest[0] % 2 else -1
    return Judgement(score, "coin: a hash of the policy's words (a mechanics test, not a grade)",
                     (score,))


JUDGES = {"rule": JudgeDouble, "coin": CoinJudge}  # simulator.doubles_judge


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  messages: list[dict[str, Any]]
  schema: dict[str, Any]
  role: str
  kwargs: dict[str, Any]

  @property
  def prompt(self) -> str:
    return "\n".join(str(m.get("content", "")) for m in self.messages)


class ScriptedClient:
  """A SimulatorClient stand-in: replies come from a list (in order) or a function of the
  request; each reply is validated against the request's schema, as the real client does."""

  def __init__(self, replies: Iterable[dict] | Callable[[ChatRequest], dict]):
    self._reply = replies if callable(replies) else iter(list(replies)).__next__
    self._by_request = callable(replies)
    self.requests: list[ChatRequest] = []

  async def chat_json(self, messages, schema, *, role, temperature=None, top_p=None,
                      top_k=None, max_tokens=None, seed=None, frequency_penalty=None,
                      chat_template_kwargs=None, affinity=None) -> dict:
    jsonschema.Draft202012Validator.check_schema(schema)
    request = ChatRequest(messages, schema, role, dict(
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
        frequency_penalty=frequency_penalty, chat_template_kwargs=chat_template_kwargs,
        affinity=affinity))
    self.requests.append(request)
    try:
      reply = self._reply(request) if self._by_request else self._reply()
    except StopIteration:
      raise RuntimeError(f"scripted client ran out of replies at request {len(self.requests)}")
    jsonschema.validate(reply, schema, cls=jsonschema.Draft202012Validator)
    return reply

  def stats(self) -> dict[str, int]:
    return {"requests": len(self.requests)}
