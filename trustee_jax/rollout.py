"""Multi-turn agent episodes against the simulated world, as exact token sequences.

Tokens are the truth: the policy's sampled ids enter the sequence as sampled (loss mask
1, with their sampling logprobs); system, user and tool messages enter as chat-template
fragments tokenized once when appended (mask 0). Text is decoded only to parse tool
calls and to show the simulators the conversation; it is never re-encoded.
"""
import asyncio
import collections
import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trustee_jax import tool_calls
from trustee_jax.config_dataclass import from_config
from trustee_jax.sampling.engine import EngineError, SamplingParams
from trustee_jax.seeding import derive_seed
from trustee_jax.simulator.client import SimulatorError
from trustee_jax.simulator.judge import Judgement
from trustee_jax.simulator.tasks import Task
from trustee_jax.simulator.tools import ToolLedger, ToolResult
from trustee_jax.simulator.user import UserReply


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling and budgets of policy turns (per-episode turn budgets come from the knobs)."""
  group_size: int = 8
  max_turn_tokens: int = 512
  max_episode_tokens: int = 4096
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  enable_thinking: bool = False  # the policy reasons in <think> (Qwen3); turns without counted
  # Whether the user, tool and judge simulators see the policy's reasoning (the reference's
  # strip_thinking=false shows it); the episode log keeps it either way.
  show_reasoning: bool = False
  # "project": a turn is not generated past its budget (max_assistant_turns generations, at most
  # max_user_turns user replies, tool turns checked after their results). "reference": every
  # budget is checked after each generation, which is then trained but never shown to the judge
  # (so the user can reply max_user_turns + 1 times), as the reference's agent loop.
  turn_limits: str = "project"
  max_parallel_calls: int = 3
  invalid_call_penalty: float = 0.0  # format term per malformed or invalid tool call
  # Accept a bare or fenced {"name", "arguments"} object naming an offered tool as a call (small
  # models that skip the <tool_call> tags); counted apart either way. Off in the paper config.
  accept_untagged_calls: bool = False
  # The reference's environment ablations: task fields hidden from the simulator roles that would
  # see them (ABLATIONS); the task generator still writes them and the policy never sees them.
  ablate: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = sorted(set(self.ablate) - set(ABLATIONS))
    if unknown:
      raise ValueError(f"rollout.ablate: unknown {unknown}; known: {sorted(ABLATIONS)}")
    if self.turn_limits not in ("project", "reference"):
      raise ValueError(f"rollout.turn_limits must be 'project' or 'reference', got "
                       f"{self.turn_limits!r}")

  @classmethod
  def from_dict(cls, d: Any) -> "RolloutConfig":
    """From the `rollout` block; an unknown key is a ValueError naming it."""
    return from_config(cls, d, block="rollout")


# ablation -> (the Task fields it blanks, the roles that otherwise see them), as the reference:
# the user sees intent and persona, the tools the intent, the judge all three.
ABLATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "user_intent": (("user_intent",), ("user", "tools", "judge")),
    "user_persona": (("user_persona",), ("user", "judge")),
    "expected_tool_calls": (("expected_tool_calls", "expected_calls"), ("judge",)),
}


def role_task(task: Task, role: str, ablate: Sequence[str]) -> Task:
  """The task as `role` ("user" | "tools" | "judge") sees it under the ablations: each ablated
  field blank (the prompts then leave its section out), everything else as generated."""
  blank = {f: type(getattr(task, f))() for a in ablate for f in ABLATIONS[a][0]
           if role in ABLATIONS[a][1]}
  return dataclasses.replace(task, **blank) if blank else task


class PromptTooLongError(ValueError):
  """A task whose first prompt (system prompt, tools, first query) leaves no room for a turn."""


class UserRole(Protocol):
  """The simulated user: the next user message (or the end) after an assistant text turn."""

  async def respond(self, task: Task, messages: list[dict[str, Any]], seed: int) -> UserReply: ...


class ToolRole(Protocol):
  """The simulated tools: one result per call, in order; `messages` is the conversation so far,
  ending with the turn that made the calls."""

  async def execute(self, task: Task, ledger: ToolLedger, calls: list[tool_calls.ToolCall],
                    seed: int, messages: list[dict[str, Any]] | None = None
                    ) -> list[ToolResult]: ...


class JudgeRole(Protocol):
  """The judge: an episode's final score."""

  async def score(self, task: Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement: ...


@runtime_checkable
class Roles(Protocol):
  """What an episode plays against: the world's three roles (LM-backed or the rule doubles)."""

  @property
  def user(self) -> UserRole: ...

  @property
  def tools(self) -> ToolRole: ...

  @property
  def judge(self) -> JudgeRole: ...

  # Optional: `oracle`, a JudgeRole that scores every episode beside the judge (world.oracle,
  # the rule check of tasks that carry one); logged under oracle/, never trained on.


@runtime_checkable
class World(Roles, Protocol):
  """The whole simulated world, as the Trainer uses it (world.SimWorld is the implementation):
  the roles, task generation, counters, and shutdown."""

  async def make_tasks(self, knobs_list: Sequence[Any], seed: int,
                       easier: Any = None) -> list[Task]:
    """One task per knobs (curriculum.TaskKnobs, or a TaskKnobs batch); a short batch is
    refilled from `easier(n)` knobs where given; failures are counted, never padded, so fewer
    tasks may come back."""
    ...

  async def make_validation_tasks(self, knobs_list: Sequence[Any], seed: int) -> list[Task]:
    """The fixed validation set: tasks no training step draws."""
    ...

  def stats(self) -> dict[str, float]:
    """Counters to log (names prefixed `world/` and `simulator/`)."""
    ...

  async def aclose(self) -> None:
    """Closes the client and stops any servers the world started."""
    ...


@dataclasses.dataclass
class Episode:
  """One finished episode: the token sequence, its masks and rewards, and what happened."""
  task_index: int
  episode_index: int
  tokens: np.ndarray  # int32 [T]
  loss_mask: np.ndarray  # int32 [T], 1 on policy-sampled tokens only
  logprobs: np.ndarray  # f32 [T], sampling logprobs on masked tokens, 0 elsewhere
  turn_rewards: np.ndarray  # f32 [T], the simulator reward of each policy token's turn
  reward: float = 0.0
  judge_score: int = 0
  judge_reason: str = ""
  judge_check: dict[str, float] | None = None  # the rule check's parts, where the task has one
  oracle_score: int | None = None  # the world's oracle's score beside the judge's, if it has one
  messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  num_turns: int = 0
  num_tool_calls: int = 0
  num_invalid_calls: int = 0
  num_valid_calls: int = 0  # calls that fit an offered tool's schema
  num_untagged_calls: int = 0  # calls accepted without <tool_call> tags (accept_untagged_calls)
  num_near_misses: int = 0  # call-shaped JSON without tags that was not taken as a call
  num_turns_without_thinking: int = 0  # with enable_thinking: turns with no closed <think> block
  termination: str = ""  # user_ended | budget_turns | budget_tokens | error
  error: str | None = None


@dataclasses.dataclass
class RolloutResult:
  episodes: list[Episode]  # surviving episodes of surviving groups
  dropped_episodes: collections.Counter  # by cause
  dropped_groups: int
  sim_stats: dict[str, int] = dataclasses.field(default_factory=dict)


def hide_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The conversation without the policy's reasoning, as the simulators see it by default."""
  return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def _assistant_message(parsed, raw_text: str) -> dict[str, Any]:
  msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
  if parsed.tool_calls:
    msg["tool_calls"] = [{"id": c.id, "type": "function",
                          "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                         for c in parsed.tool_calls]
  if parsed.errors:
    msg["malformed_tool_calls"] = [e.raw for e in parsed.errors]
  if parsed.reasoning:
    msg["reasoning_content"] = parsed.reasoning
  return msg


class _Builder:
  """Accumulates one episode's token sequence with its masks."""

  def __init__(self):
    self.tokens: list[int] = []
    self.mask: list[int] = []
    self.logprobs: list[float] = []
    self.turn_rewards: list[float] = []

  def add(self, ids, mask: int = 0, logprobs=None) -> tuple[int, int]:
    start = len(self.tokens)
    self.tokens += list(ids)
    self.mask += [mask] * len(ids)
    self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
    self.turn_rewards += [0.0] * len(ids)
    return start, len(self.tokens)

  def set_turn_reward(self, span: tuple[int, int], reward: float) -> None:
    for i in range(*span):
      self.turn_rewards[i] = reward


async def run_episode(task, task_index: int, episode_index: int, *, engine, chat, tokenizer,
                      world: Roles, cfg: RolloutConfig, seed: int) -> Episode:
  """Plays one episode to its end; raises SimulatorError/EngineError on infrastructure failure."""
  knobs = task.knobs
  tools = task.tools
  eot = chat.end_of_turn_id
  messages: list[dict[str, Any]] = [{"role": "system", "content": task.system_prompt},
                                    {"role": "user", "content": task.first_user_query}]
  seq = _Builder()
  seq.add(chat.prompt_ids(messages, tools=tools, enable_thinking=cfg.enable_thinking))
  if len(seq.tokens) >= cfg.max_episode_tokens - 1:
    raise PromptTooLongError(
        f"task {task_index}: its prompt ({len(seq.tokens)} tokens, {len(tools)} tools) leaves no "
        f"room for a turn within rollout.max_episode_tokens={cfg.max_episode_tokens}")
  conversation = dataclasses.replace(task, conversation_id=f"{task.task_id}/{episode_index}")
  user_task, tool_task, judge_task = (role_task(conversation, r, cfg.ablate)
                                       for r in ("user", "tools", "judge"))
  seen = (lambda ms: list(ms)) if cfg.show_reasoning else hide_reasoning  # noqa: E731
  ledger = ToolLedger.for_task(task)
  offered = {tool_calls.normalize_tools([t])[0]["function"].get("name") for t in tools}
  ep = Episode(task_index, episode_index, *(np.zeros(0),) * 4)
  user_turns = assistant_turns = tool_turns = 0
  turn = 0
  reference_limits = cfg.turn_limits == "reference"
  while True:
    if not reference_limits and assistant_turns >= knobs["max_assistant_turns"]:
      ep.termination = "budget_turns"
      break
    budget = min(cfg.max_turn_tokens, cfg.max_episode_tokens - len(seq.tokens) - 1)
    if budget <= 0:
      ep.termination = "budget_tokens"
      break
    turn += 1
    comp = await engine.agenerate(seq.tokens, SamplingParams(
        max_new_tokens=budget, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        seed=derive_seed(seed, turn), stop_token_ids=chat.stop_ids))
    span = seq.add(comp.tokens, mask=1, logprobs=comp.logprobs)
    if comp.tokens[-1] != eot:  # cut by the budget: close the turn, not trained on
      seq.add([eot])
    assistant_turns += 1
    if reference_limits and (assistant_turns > knobs["max_assistant_turns"]
                             or user_turns > knobs["max_user_turns"]
                             or tool_turns > knobs["max_tool_turns"]):
      ep.termination = "budget_turns"  # this generation is trained, never judged
      break
    text = tokenizer.decode([t for t in comp.tokens if t not in chat.stop_ids])
    parsed = tool_calls.parse_output(
        text, first_call_index=ep.num_tool_calls + ep.num_invalid_calls,
        untagged_tools=offered if cfg.accept_untagged_calls else None)
    if cfg.enable_thinking and tool_calls.THINK_CLOSE not in text:
      ep.num_turns_without_thinking += 1
    accepted_untagged = len(parsed.tool_calls) if parsed.untagged else 0
    ep.num_untagged_calls += accepted_untagged
    ep.num_near_misses += parsed.untagged - accepted_untagged
    messages.append(_assistant_message(parsed, text))
    if parsed.tool_calls or parsed.errors:
      tool_turns += 1
      new_msgs, rewards = [], []
      calls = parsed.tool_calls[:cfg.max_parallel_calls]
      for err in parsed.errors:
        ep.num_invalid_calls += 1
        new_msgs.append({"role": "tool", "content": f"Error: malformed tool call ({err.reason})"})
        rewards.append(-1.0)
      valid = sum(tool_calls.validate_call(c, tools) is None for c in calls)
      ep.num_invalid_calls += len(calls) - valid
      ep.num_valid_calls += valid
      ep.num_tool_calls += len(calls)
      if calls:
        results = await world.tools.execute(tool_task, ledger, calls, derive_seed(seed, turn, 1),
                                            seen(messages))
        for call, res in zip(calls, results):
          new_msgs.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                           "content": res.content})
          rewards.append(float(res.reward))
      seq.set_turn_reward(span, float(np.mean(rewards)))
      history = list(messages)
      messages += new_msgs
      if not reference_limits and tool_turns > knobs["max_tool_turns"]:
        ep.termination = "budget_turns"
        break
    else:
      if not reference_limits and user_turns >= knobs["max_user_turns"]:
        ep.termination = "budget_turns"
        break
      reply = await world.user.respond(user_task, seen(messages), derive_seed(seed, turn, 2))
      seq.set_turn_reward(span, float(reply.reward))
      user_turns += 1
      if reply.ended:
        ep.termination = "user_ended"
        break
      history = list(messages)
      new_msgs = [{"role": "user", "content": reply.response}]
      messages += new_msgs
    cont = chat.continuation_ids(history, new_msgs, tools=tools,
                                 enable_thinking=cfg.enable_thinking)
    if len(seq.tokens) + len(cont) >= cfg.max_episode_tokens:
      ep.termination = "budget_tokens"
      break
    seq.add(cont)
  judgement = await world.judge.score(judge_task, seen(messages), knobs["num_criteria"],
                                      derive_seed(seed, 0, 3))
  ep.tokens = np.asarray(seq.tokens, np.int32)
  ep.loss_mask = np.asarray(seq.mask, np.int32)
  ep.logprobs = np.asarray(seq.logprobs, np.float32)
  ep.turn_rewards = np.asarray(seq.turn_rewards, np.float32)
  ep.judge_score, ep.judge_reason = int(judgement.score), judgement.reason
  ep.judge_check = judgement.check
  if (oracle := getattr(world, "oracle", None)) is not None:  # the whole task, all messages
    ep.oracle_score = int((await oracle.score(conversation, messages, knobs["num_criteria"],
                                              derive_seed(seed, 0, 4))).score)
  ep.reward = episode_reward(judgement, ep, cfg)
  ep.messages, ep.num_turns = messages, assistant_turns
  return ep


async def run_rollouts(tasks, *, engine, chat, tokenizer, world: Roles, cfg: RolloutConfig,
                       seed: int, step: int, max_concurrent: int = 0,
                       min_group: int = 2) -> RolloutResult:
  """Runs len(tasks) x group_size episodes concurrently; drops failed episodes, and groups left
  with fewer than `min_group` episodes (GRPO needs 2; validation keeps single episodes).

  max_concurrent bounds the episodes in flight (0: all at once; 1: one after another, which
  also makes the engine's batch shapes, and so its float results, independent of timing).
  """
  limit = asyncio.Semaphore(max_concurrent or len(tasks) * cfg.group_size or 1)

  async def guarded(t, g):
    try:
      async with limit:
        return await run_episode(tasks[t], t, g, engine=engine, chat=chat, tokenizer=tokenizer,
                                 world=world, cfg=cfg, seed=derive_seed(seed, step, t, g))
    except SimulatorError as e:
      return ("simulator_" + getattr(e, "cause", "error"), str(e))
    except EngineError as e:
      return ("engine", str(e))
    except PromptTooLongError as e:  # counted (episodes/dropped_prompt_too_long), never trained on
      return ("prompt_too_long", str(e))

  coros = [guarded(t, g) for t in range(len(tasks)) for g in range(cfg.group_size)]
  results = await asyncio.gather(*coros)
  dropped: collections.Counter = collections.Counter()
  by_task: dict[int, list[Episode]] = collections.defaultdict(list)
  for r in results:
    if isinstance(r, Episode):
      by_task[r.task_index].append(r)
    else:
      dropped[r[0]] += 1
  episodes, dropped_groups = [], 0
  for t in range(len(tasks)):
    group = by_task.get(t, [])
    if len(group) < max(min_group, 1):
      dropped_groups += 1
      dropped["group_too_small"] += len(group)
      continue
    episodes += group
  return RolloutResult(episodes, dropped, dropped_groups)


def episode_reward(judgement: Judgement, episode: Episode, cfg: RolloutConfig) -> float:
  """The scalar GRPO trains on: the judge's score less the format term per malformed or invalid
  call (the per-turn simulator rewards ride apart, in Episode.turn_rewards)."""
  return float(judgement.score) - cfg.invalid_call_penalty * episode.num_invalid_calls


def pad_to_bucket(length: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")
