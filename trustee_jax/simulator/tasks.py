"""Task generation: the frozen LM writes one task per sampled tool set, under a per-task JSON schema.

A task holds the ground truth that the user simulator, the tool simulator and the judge share;
the policy only sees the system prompt, the tools and the first user query. Hidden facts and an
initial world state are this project's extensions (switches; off = the reference), and so are
expected calls with arguments (`expected_arguments`), which the rule check (`rule_check.py`) can
verify: the schema then asks for `expected_calls` instead of bare names, each item's arguments
constrained to its tool's parameter schema, and `expected_tool_calls` holds their names.
"""
import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trustee_jax.config_dataclass import from_config
from trustee_jax.seeding import retry_seed
from trustee_jax.simulator import system_prompts, task_checks
from trustee_jax.simulator.client import SimulatorError
from trustee_jax.simulator import tools_pool

KNOB_FIELDS = ("num_tools", "num_expected_calls", "persona_level", "ambiguity_level",
               "expected_turns", "system_prompt_level", "num_criteria", "max_user_turns",
               "max_assistant_turns", "max_tool_turns")


class TaskGenerationError(RuntimeError):
  """The LM did not produce a valid task within the allowed attempts; lists every attempt."""


@dataclasses.dataclass
class Task:
  """One generated task (JSON-serialisable; validation sets are saved to disk)."""
  task_id: str
  category: str
  tools: list[dict[str, Any]]
  expected_tool_calls: list[str]
  user_intent: str
  user_persona: str
  first_user_query: str
  hidden_facts: list[str]
  initial_state: list[str]
  knobs: dict[str, int]
  system_prompt: str
  oracle: dict[str, Any] = dataclasses.field(default_factory=dict)  # rule-based doubles only
  expected_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # name, arguments
  # One episode's conversation (rollout sets it on the roles' view): its simulator calls go to
  # one server, whose prefix cache then keeps the conversation from turn to turn.
  conversation_id: str = ""

  @property
  def affinity(self) -> str:
    """The key that pins this conversation's simulator calls to one URL."""
    return self.conversation_id or self.task_id

  @property
  def tool_names(self) -> list[str]:
    return [tools_pool.tool_name(t) for t in self.tools]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "Task":
    fields = dataclasses.fields(cls)
    unknown = set(data) - {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
      raise ValueError(f"bad Task dict: unknown fields {sorted(unknown)}, missing {missing}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class TaskGenConfig:
  """Task generator settings; string limits are scaled down to fit `max_tokens`."""
  hidden_facts: bool = True
  initial_state: bool = True
  max_attempts: int = 3
  batch_rounds: int = 3
  calls_slack: int = 0  # expected_tool_calls may have num_expected_calls +- slack items
  expected_arguments: bool = True  # expected_calls with arguments (off = the reference's names)
  chars_per_call: int = 80  # token budget reserved per expected call's arguments
  # An expected value that nobody states: "reject" the task, or add it to the hidden facts the
  # user gives when asked ("facts": small generators pick sensible values but forget to say them).
  unsaid_values: str = "reject"
  thinking_prompt: bool = False  # the policy's system prompt asks for <think> (a thinking policy)
  max_tokens: int | None = 1024
  chars_per_token: float = 3.0
  max_intent_chars: int = 600
  max_persona_chars: int = 200
  max_query_chars: int = 400
  max_fact_chars: int = 160
  max_facts: int = 4
  max_state_chars: int = 160
  max_state_entries: int = 5
  temperature: float | None = 1.0
  top_p: float | None = None
  frequency_penalty: float | None = None
  top_k: int | None = None  # SGLang's and vLLM's extension; None: the server's default
  chat_template_kwargs: dict[str, Any] | None = None

  def __post_init__(self):
    if self.unsaid_values not in ("reject", "facts"):
      raise ValueError(f"world.task.unsaid_values must be 'reject' or 'facts', "
                       f"got {self.unsaid_values!r}")


def sampling_kwargs(cfg: Any) -> dict[str, Any]:
  """The chat_json sampling arguments a role config carries."""
  return {k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k", "max_tokens",
                                       "frequency_penalty", "chat_template_kwargs")}


def knobs_dict(knobs: Any) -> dict[str, int]:
  """The curriculum's TaskKnobs (or any object/mapping with its fields) as a dict of ints."""
  get = (lambda k: knobs[k]) if isinstance(knobs, Mapping) else (lambda k: getattr(knobs, k))
  out = {}
  for name in KNOB_FIELDS:
    try:
      out[name] = int(get(name))
    except (KeyError, AttributeError) as e:
      raise ValueError(f"task knobs lack {name!r}: {knobs!r}") from e
  return out


def _scaled_limits(num_calls_max: int, names: Sequence[str], cfg: TaskGenConfig) -> dict[str, int]:
  limits = {"intent": cfg.max_intent_chars, "persona": cfg.max_persona_chars,
            "query": cfg.max_query_chars, "fact": cfg.max_fact_chars, "state": cfg.max_state_chars}
  counts = {"intent": 1, "persona": 1, "query": 1,
            "fact": cfg.max_facts if cfg.hidden_facts else 0,
            "state": cfg.max_state_entries if cfg.initial_state else 0}
  if cfg.max_tokens is None:
    return limits
  per_call = max(map(len, names), default=8) + 4 + cfg.chars_per_call * cfg.expected_arguments
  fixed = 120 + num_calls_max * per_call  # keys, punctuation, calls
  budget = cfg.max_tokens * cfg.chars_per_token - fixed
  wanted = sum(limits[k] * counts[k] for k in limits)
  if budget < 100:
    raise ValueError(f"max_tokens={cfg.max_tokens} leaves no room for a task")
  scale = min(1.0, budget / wanted)
  return {k: max(20, int(v * scale)) for k, v in limits.items()}


def _call_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One expected call: a sampled tool's name (a const) with arguments fitting that tool."""
  fns = {tools_pool.tool_name(t): tools_pool.function_of(t) for t in tools}
  return {"anyOf": [{"type": "object",
                     "properties": {"name": {"const": n},
                                    "arguments": task_checks.arguments_schema(fns[n])},
                     "required": ["name", "arguments"], "additionalProperties": False}
                    for n in sorted(fns)]}


def task_schema(tool_names: Sequence[str], num_expected_calls: int,
                cfg: TaskGenConfig = TaskGenConfig(),
                tools: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
  """The JSON schema of one task, built per task: expected calls are an enum of the sampled
  names (with `expected_arguments`: calls of the sampled `tools`) with a bounded count; string
  lengths fit the token budget; goal before decisions."""
  if not tool_names:
    raise ValueError("a task needs at least one tool")
  if cfg.expected_arguments and sorted(map(tools_pool.tool_name, tools)) != sorted(set(tool_names)):
    raise ValueError("expected_arguments needs the sampled tools themselves")
  lo = max(1, num_expected_calls - cfg.calls_slack)
  hi = max(lo, num_expected_calls + cfg.calls_slack)
  lim = _scaled_limits(hi, tool_names, cfg)
  text = lambda n: {"type": "string", "minLength": 1, "maxLength": n}
  props: dict[str, Any] = {"user_intent": text(lim["intent"]), "user_persona": text(lim["persona"])}
  if cfg.hidden_facts:
    props["hidden_facts"] = {"type": "array", "items": text(lim["fact"]), "minItems": 1,
                             "maxItems": cfg.max_facts}
  if cfg.initial_state:
    props["initial_state"] = {"type": "array", "items": text(lim["state"]), "minItems": 1,
                              "maxItems": cfg.max_state_entries}
  if cfg.expected_arguments:
    props["expected_calls"] = {"type": "array", "minItems": lo, "maxItems": hi,
                               "items": _call_schema(tools)}
  else:
    props["expected_tool_calls"] = {"type": "array", "minItems": lo, "maxItems": hi,
                                    "items": {"type": "string", "enum": sorted(set(tool_names))}}
  props["first_user_query"] = text(lim["query"])
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


@dataclasses.dataclass(frozen=True)
class TaskRequest:
  """What one task is generated from: the curriculum's knobs, sampled tools, a seed."""
  knobs: Any
  category: str
  tools: list[dict[str, Any]]
  seed: int


@dataclasses.dataclass
class TaskBatch:
  """Generated tasks in request order, and why each missing one is missing (never padded)."""
  tasks: list[Task]
  failures: list[tuple[int, str]]

  @property
  def complete(self) -> bool:
    return not self.failures


def sample_requests(pool: tools_pool.Pool, knobs_list: Sequence[Any], rng: np.random.Generator
                    ) -> list[TaskRequest]:
  """One request per knobs: tools sampled from the pool (DESIGN §1), a fresh seed each.
  `knobs_list` is a sequence of knobs or a curriculum TaskKnobs batch (with `.task(i)`)."""
  if hasattr(knobs_list, "task") and hasattr(knobs_list, "batch_size"):
    knobs_list = [knobs_list.task(i) for i in range(knobs_list.batch_size)]
  out = []
  for knobs in knobs_list:
    category, tools = tools_pool.sample_tools(pool, knobs_dict(knobs)["num_tools"], rng)
    out.append(TaskRequest(knobs, category, tools, int(rng.integers(2**31 - 1))))
  return out


def make_task(raw: Mapping[str, Any], *, category: str, tools: list[dict[str, Any]],
              knobs: dict[str, int], seed: int, oracle: dict[str, Any] | None = None,
              thinking: bool = False) -> Task:
  """A Task from validated generator output (with `expected_tool_calls`, `expected_calls` or
  both; names come from the calls when absent); the id is stable in the seed and the content."""
  digest = hashlib.sha1(json.dumps([category, raw], sort_keys=True).encode()).hexdigest()[:10]
  calls = [{"name": c["name"], "arguments": dict(c["arguments"])}
           for c in raw.get("expected_calls", [])]
  names = raw["expected_tool_calls"] if "expected_tool_calls" in raw else [c["name"] for c in calls]
  return Task(
      task_id=f"t{seed}-{digest}", category=category, tools=tools,
      expected_tool_calls=list(names), user_intent=raw["user_intent"].strip(),
      user_persona=raw["user_persona"].strip(), first_user_query=raw["first_user_query"].strip(),
      hidden_facts=list(raw.get("hidden_facts", [])), initial_state=list(raw.get("initial_state", [])),
      knobs=dict(knobs), system_prompt=system_prompts.system_prompt(
          knobs["system_prompt_level"], tools, thinking=thinking),
      oracle=dict(oracle or {}), expected_calls=calls)


async def generate_batch(generator: Any, requests: Sequence[TaskRequest], *, rounds: int = 3,
                         avoid_queries: Sequence[str] = ()) -> TaskBatch:
  """Generates tasks concurrently with any object that has `async generate(knobs, tools,
  category, seed)`. A task whose first query repeats an earlier one (or `avoid_queries`) is
  regenerated with a new seed, up to `rounds` rounds. TaskGenerationError becomes a reported
  failure; any other error (e.g. the simulator unreachable) propagates."""
  seen = {task_checks.normalise_query(q) for q in avoid_queries}
  done: dict[int, Task] = {}
  reasons: dict[int, str] = {}
  pending = list(range(len(requests)))
  for r in range(rounds):
    outs = await asyncio.gather(
        *(generator.generate(requests[i].knobs, requests[i].tools, requests[i].category,
                             retry_seed(requests[i].seed, 1000 * r)) for i in pending),
        return_exceptions=True)
    for out in outs:
      if isinstance(out, BaseException) and not isinstance(out, TaskGenerationError):
        raise out
    retry = []
    for i, out in zip(pending, outs):
      if isinstance(out, TaskGenerationError):
        reasons[i] = str(out)
      elif (query := task_checks.normalise_query(out.first_user_query)) in seen:
        reasons[i] = f"duplicate first query after {r + 1} round(s): {out.first_user_query[:80]!r}"
        retry.append(i)
      else:
        seen.add(query)
        done[i] = out
        reasons.pop(i, None)
    pending = retry
    if not pending:
      break
  return TaskBatch(tasks=[done[i] for i in sorted(done)],
                   failures=sorted((i, reasons[i]) for i in reasons))


class TaskGenerator:
  """Asks the frozen LM for tasks through `client.chat_json`, validating beyond the schema."""

  def __init__(self, client: Any, cfg: Any = None):
    self.client = client
    self.cfg: TaskGenConfig = from_config(TaskGenConfig, cfg, block="world.task")
    self._template = system_prompts.load_template("task_generation.jinja")

  def prompt(self, knobs: dict[str, int], tools: list[dict[str, Any]], category: str) -> str:
    cfg, n = self.cfg, knobs["num_expected_calls"]
    clamp = lambda v: min(2, max(0, v))
    return self._template.render(
        category=category, tools_json=tools_pool.tools_text(tools),
        min_calls=max(1, n - cfg.calls_slack), max_calls=max(1, n + cfg.calls_slack),
        persona_level=clamp(knobs["persona_level"]), ambiguity_level=clamp(knobs["ambiguity_level"]),
        turns_level=clamp(knobs["expected_turns"]), hidden_facts=cfg.hidden_facts,
        initial_state=cfg.initial_state, max_facts=cfg.max_facts, max_state=cfg.max_state_entries,
        expected_arguments=cfg.expected_arguments)

  async def generate(self, knobs: Any, tools: list[dict[str, Any]], category: str,
                     seed: int) -> Task:
    """One validated task; regenerated with new seeds up to `max_attempts` times, then
    TaskGenerationError listing every attempt's problems."""
    kn = knobs_dict(knobs)
    names = [tools_pool.tool_name(t) for t in tools]
    schema = task_schema(names, kn["num_expected_calls"], self.cfg, tools)
    messages = [{"role": "user", "content": self.prompt(kn, tools, category)}]
    failures = []
    for attempt in range(self.cfg.max_attempts):
      s = retry_seed(seed, attempt)
      try:
        raw = await self.client.chat_json(messages, schema, role="task", seed=s,
                                          **sampling_kwargs(self.cfg))
      except SimulatorError as e:  # no valid JSON after the re-asks: this attempt failed;
        if e.cause != "invalid_output":  # an unreachable simulator is not the task's fault
          raise
        failures.append(f"attempt {attempt + 1} (seed {s}): {e.message[:300]}")
        continue
      problems = task_checks.task_problems(raw, schema, names, tools)
      if problems and self.cfg.unsaid_values == "facts" and all(
          "values nobody gives" in p for p in problems):
        raw, problems = task_checks.with_unsaid_values_as_facts(raw, tools), []
      if not problems:
        return make_task(raw, category=category, tools=tools, knobs=kn, seed=seed,
                         thinking=self.cfg.thinking_prompt)
      failures.append(f"attempt {attempt + 1} (seed {s}): {'; '.join(problems)}")
    raise TaskGenerationError(f"no valid task for seed {seed} in category {category!r} after "
                              f"{self.cfg.max_attempts} attempts:\n  " + "\n  ".join(failures))

  async def generate_batch(self, requests: Sequence[TaskRequest], *,
                           avoid_queries: Sequence[str] = ()) -> TaskBatch:
    return await generate_batch(self, requests, rounds=self.cfg.batch_rounds,
                                avoid_queries=avoid_queries)
