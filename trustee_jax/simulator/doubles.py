"""Rule-based stand-ins for the simulated world, behind the same async interfaces, with no LM.

A smart-home task family: the user asks for one or more settings with specific values ("set the
thermostat to 21" -> set_temperature(value=21)); the user double replies by rule and ends once
the right calls were made; the tool double is a key-value store replayed from the ledger; the
judge double checks the calls. Also `ScriptedClient`, a recording stand-in for SimulatorClient.
Used by fast tests, the trainer's tests, and as the oracle of the fidelity report.
"""
import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import jsonschema
import numpy as np

from trustee_jax.chat import ToolCall
from trustee_jax.simulator import tasks as tasks_lib
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.judge import Judgement, has_tool_call
from trustee_jax.simulator.tools import ToolLedger, ToolResult, check_call
from trustee_jax.simulator.user import UserReply

CATEGORY = "Home Assistant"
ROOMS, DOORS, GENRES = ["kitchen", "bedroom", "living_room"], ["front", "back", "garage"], [
    "jazz", "rock", "classical", "pop"]


@dataclasses.dataclass(frozen=True)
class _Spec:
  toolset: str
  description: str
  properties: dict[str, Any]
  key: Callable[[dict], str]  # the store key a call writes
  value: Callable[[dict], Any]  # the value it writes
  sample: Callable[[np.random.Generator], dict]
  ask: Callable[[dict], str]  # the request, stated clearly
  vague: str  # the request with its values left out
  detail: Callable[[dict], str]  # the values, as the user says them when asked


_INT = lambda lo, hi, d: {"type": "integer", "minimum": lo, "maximum": hi, "description": d}
_ENUM = lambda values, d: {"type": "string", "enum": values, "description": d}
SPECS: dict[str, _Spec] = {
    "set_temperature": _Spec(
        "Climate", "Set the thermostat's target temperature in degrees celsius.",
        {"value": _INT(16, 28, "Target temperature.")}, lambda a: "temperature",
        lambda a: a["value"], lambda r: {"value": int(r.integers(16, 29))},
        lambda a: f"set the thermostat to {a['value']} degrees", "change the thermostat",
        lambda a: f"I'd like {a['value']} degrees."),
    "set_volume": _Spec(
        "Media", "Set the speaker volume in percent.", {"level": _INT(0, 100, "Volume.")},
        lambda a: "volume", lambda a: a["level"], lambda r: {"level": int(r.integers(1, 21)) * 5},
        lambda a: f"set the speaker volume to {a['level']} percent", "adjust the speaker volume",
        lambda a: f"Make the volume {a['level']} percent."),
    "play_music": _Spec(
        "Media", "Play a music genre on the speakers.", {"genre": _ENUM(GENRES, "Genre.")},
        lambda a: "music", lambda a: a["genre"], lambda r: {"genre": str(r.choice(GENRES))},
        lambda a: f"play some {a['genre']} music", "put some music on",
        lambda a: f"I'm in the mood for {a['genre']}."),
    "set_light": _Spec(
        "Lights and Locks", "Set a room's light brightness in percent (0 is off).",
        {"room": _ENUM(ROOMS, "Room."), "brightness": _INT(0, 100, "Brightness.")},
        lambda a: f"light.{a['room']}", lambda a: a["brightness"],
        lambda r: {"room": str(r.choice(ROOMS)), "brightness": int(r.integers(1, 11)) * 10},
        lambda a: f"set the {a['room'].replace('_', ' ')} light to {a['brightness']} percent",
        "change one of the lights",
        lambda a: f"The {a['room'].replace('_', ' ')} one, at {a['brightness']} percent."),
    "lock_door": _Spec(
        "Lights and Locks", "Lock a door.", {"door": _ENUM(DOORS, "Door.")},
        lambda a: f"door.{a['door']}", lambda a: "locked", lambda r: {"door": str(r.choice(DOORS))},
        lambda a: f"lock the {a['door']} door", "lock up a door",
        lambda a: f"The {a['door']} door."),
}
GET_STATE = {"name": "get_state", "description": "Read a value of the home, e.g. 'temperature', "
             "'volume', 'music', 'light.kitchen' or 'door.front'.",
             "parameters": {"type": "object", "properties": {"key": {
                 "type": "string", "description": "Which value to read."}}, "required": ["key"]}}


def _function(name: str) -> dict[str, Any]:
  if name == "get_state":
    return GET_STATE
  spec = SPECS[name]
  return {"name": name, "description": spec.description,
          "parameters": {"type": "object", "properties": spec.properties,
                         "required": list(spec.properties)}}


def double_pool() -> tools_pool.Pool:
  """The double's tools as a pool in the shipped layout (one category), for `sample_tools`."""
  pool: tools_pool.Pool = {CATEGORY: {}}
  for name in [*SPECS, "get_state"]:
    toolset = SPECS[name].toolset if name in SPECS else "Climate"
    pool[CATEGORY].setdefault(toolset, []).append(
        {"type": "function", "function": _function(name), "toolset_name": toolset,
         "toolset_description": f"{toolset} devices.", "category": CATEGORY})
  return pool


def made_calls(messages: list[dict[str, Any]]) -> list[ToolCall]:
  """Every tool call the assistant made, arguments decoded (undecodable ones as {})."""
  out = []
  for m in messages:
    for c in (m.get("tool_calls") or []) if m.get("role") == "assistant" else []:
      fn, args = c.get("function", {}), c.get("function", {}).get("arguments", {})
      try:
        args = json.loads(args) if isinstance(args, str) else args
      except json.JSONDecodeError:
        args = {}
      out.append(ToolCall(str(fn.get("name", "")), args if isinstance(args, dict) else {},
                          str(c.get("id", ""))))
  return out


def _expected(task: tasks_lib.Task) -> list[tuple[str, dict]]:
  return [(c["name"], c["arguments"]) for c in task.oracle["calls"]]


def _done(task: tasks_lib.Task, calls: list[ToolCall]) -> bool:
  return all(any(c.name == n and c.arguments == a for c in calls) for n, a in _expected(task))


class TaskGeneratorDouble:
  """Writes smart-home tasks by rule; `tools` must come from `double_pool()`."""

  def __init__(self, cfg: Any = None):
    self.cfg = tasks_lib.config_from(tasks_lib.TaskGenConfig, cfg)

  async def generate(self, knobs: Any, tools: list[dict[str, Any]], category: str,
                     seed: int) -> tasks_lib.Task:
    kn = tasks_lib.knobs_dict(knobs)
    names = [tools_pool.tool_name(t) for t in tools]
    unknown = [n for n in names if n not in SPECS and n != "get_state"]
    if unknown:
      raise ValueError(f"the task double only knows double_pool() tools, not {unknown}")
    targets = [n for n in names if n in SPECS]
    if not targets:
      raise tasks_lib.TaskGenerationError(f"no settable tool among {names}")
    rng = np.random.default_rng(seed)
    chosen = [str(n) for n in rng.choice(targets, min(kn["num_expected_calls"], len(targets)),
                                         replace=False)]
    args = [SPECS[n].sample(rng) for n in chosen]
    asks = " and ".join(SPECS[n].ask(a) for n, a in zip(chosen, args))
    vague = kn["ambiguity_level"] > 0
    query = ("Could you " + " and ".join(SPECS[n].vague for n in chosen) + "?") if vague else (
        f"Please {asks}.")
    state = [f"{SPECS[n].key(a)}={json.dumps(_other_value(n, a, rng))}"
             for n, a in zip(chosen, args)]
    raw = {"user_intent": asks[0].upper() + asks[1:] + ".",
           "user_persona": ["An expert", "A beginner", "A novice"][min(2, kn["persona_level"])]
           + " smart-home user.",
           "hidden_facts": [SPECS[n].detail(a) for n, a in zip(chosen, args)] if vague else [],
           "initial_state": state, "expected_tool_calls": chosen, "first_user_query": query}
    oracle = {"calls": [{"name": n, "arguments": a} for n, a in zip(chosen, args)]}
    return tasks_lib.make_task(raw, category=category, tools=tools, knobs=kn, seed=seed,
                               oracle=oracle)

  async def generate_batch(self, requests, *, avoid_queries=()) -> tasks_lib.TaskBatch:
    return await tasks_lib.generate_batch(self, requests, rounds=self.cfg.batch_rounds,
                                          avoid_queries=avoid_queries)


def _other_value(name: str, args: dict, rng: np.random.Generator) -> Any:
  """A stored value before the task that differs from the one the user wants."""
  if name == "lock_door":
    return "unlocked"
  for _ in range(100):
    other = SPECS[name].value(SPECS[name].sample(rng))
    if other != SPECS[name].value(args):
      return other
  raise RuntimeError(f"could not draw a different value for {name}")


class UserDouble:
  """Ends (reward 1) once every expected call was made; answers questions with the values;
  otherwise restates the request (reward -1)."""

  async def respond(self, task: tasks_lib.Task, messages: list[dict[str, Any]],
                    seed: int) -> UserReply:
    if not messages or messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
      raise ValueError("the user double answers an assistant text message")
    if _done(task, made_calls(messages)):
      return UserReply("", 1, True)
    if "?" in str(messages[-1].get("content") or ""):
      return UserReply(" ".join(task.hidden_facts) or task.user_intent, 0, False)
    return UserReply(f"That's not done yet. {task.user_intent}", -1, False)


class ToolDouble:
  """A key-value store: setters write, `get_state` reads; the state is replayed from the task's
  initial state and the ledger, so results are consistent by construction."""

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
      if err is None and call.name == "get_state" and call.arguments["key"] not in self.state(ledger):
        err = f"Error: unknown key {call.arguments['key']!r}."
      if err is not None:
        results.append(ToolResult(err, -1, False, err))
      elif call.name == "get_state":
        value = self.state(ledger)[call.arguments["key"]]
        results.append(ToolResult(json.dumps({"key": call.arguments["key"], "value": value}), 0, True))
      else:
        spec = SPECS[call.name]
        content = json.dumps({"ok": True, "key": spec.key(call.arguments),
                              "value": spec.value(call.arguments)})
        right = (call.name, call.arguments) in _expected(task)
        results.append(ToolResult(content, 1 if right else -1, True))
      ledger.record(call, results[-1].content, results[-1].valid)
    return results


class JudgeDouble:
  """1: every expected call made with the right arguments; 0: every expected tool called but
  some arguments wrong; -1: otherwise, or no tool call at all."""

  async def score(self, task: tasks_lib.Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement:
    if not has_tool_call(messages):
      return Judgement(-1, "no tool call in the episode", ())
    calls = made_calls(messages)
    if _done(task, calls):
      return Judgement(1, "every expected call made with the right arguments", (1,))
    if all(any(c.name == n for c in calls) for n, _ in _expected(task)):
      return Judgement(0, "the expected tools were called, some with wrong arguments", (0,))
    return Judgement(-1, "an expected tool was never called", (-1,))


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
                      max_tokens=None, seed=None, frequency_penalty=None,
                      chat_template_kwargs=None) -> dict:
    jsonschema.Draft202012Validator.check_schema(schema)
    request = ChatRequest(messages, schema, role, dict(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        frequency_penalty=frequency_penalty, chat_template_kwargs=chat_template_kwargs))
    self.requests.append(request)
    try:
      reply = self._reply(request) if self._by_request else self._reply()
    except StopIteration:
      raise RuntimeError(f"scripted client ran out of replies at request {len(self.requests)}")
    jsonschema.validate(reply, schema, cls=jsonschema.Draft202012Validator)
    return reply

  def stats(self) -> dict[str, int]:
    return {"requests": len(self.requests)}
