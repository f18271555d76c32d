"""Rollouts: exact token sequences, masks, per-turn rewards, budgets and failures."""
import asyncio
import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from trustee_jax import grpo, rollout, step_batch
from trustee_jax.chat import ChatFormat
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.tokenizer import load_tokenizer
from trustee_jax.models.transformer import create_model
from trustee_jax.sampling.engine import Completion, Engine
from trustee_jax.simulator import doubles, tasks as tasks_lib
from trustee_jax.simulator.client import SimulatorError

KNOBS = dict(num_tools=4, num_expected_calls=1, persona_level=0, ambiguity_level=0,
             expected_turns=1, system_prompt_level=3, num_criteria=1, max_user_turns=3,
             max_assistant_turns=4, max_tool_turns=3)


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def chat(tokenizer):
  return ChatFormat(tokenizer)


def make_task(seed=0, **knobs):
  pool = doubles.double_pool()
  kn = {**KNOBS, **knobs}
  (req,) = tasks_lib.sample_requests(pool, [kn], np.random.default_rng(seed))
  return asyncio.run(doubles.TaskGeneratorDouble().generate(kn, req.tools, req.category, seed))


@dataclasses.dataclass
class Roles:
  """The roles an episode plays against (a rollout.Roles): the doubles unless told otherwise."""
  user: Any = dataclasses.field(default_factory=doubles.UserDouble)
  tools: Any = dataclasses.field(default_factory=doubles.ToolDouble)
  judge: Any = dataclasses.field(default_factory=doubles.JudgeDouble)


def world():
  w = Roles()
  assert isinstance(w, rollout.Roles)
  return w


class ScriptedPolicy:
  """Stands in for the engine: replies with scripted text turns, as token ids."""

  def __init__(self, tokenizer, turns, eot):
    self.tok, self.turns, self.eot, self.calls = tokenizer, list(turns), eot, []

  async def agenerate(self, prompt, params):
    self.calls.append((list(prompt), params))
    turn = self.turns.pop(0)
    ids = (self.tok.encode(turn) if isinstance(turn, str) else list(turn))[:params.max_new_tokens]
    if ids[-1] != self.eot and len(ids) < params.max_new_tokens:
      ids = ids + [self.eot]
    return Completion(list(prompt), ids, [-0.5] * len(ids), None,
                      "stop" if ids[-1] == self.eot else "length", None, 0)


def right_call(task):
  call = task.oracle["calls"][0]
  return f'<tool_call>{json.dumps({"name": call["name"], "arguments": call["arguments"]})}</tool_call>'


def run(task, policy, chat, tokenizer, cfg=rollout.RolloutConfig(group_size=1)):
  return asyncio.run(rollout.run_episode(task, 0, 0, engine=policy, chat=chat,
                                         tokenizer=tokenizer, world=world(), cfg=cfg, seed=1))


def test_sequence_and_masks_are_exact(chat, tokenizer):
  task = make_task()
  eot = chat.end_of_turn_id
  call = task.oracle["calls"][0]
  as_rendered = chat.assistant_ids(  # the call exactly as the template writes it
      {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function",
       "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]},
      tools=task.tools)
  policy = ScriptedPolicy(tokenizer, [as_rendered, "Done, the setting is applied."], eot)
  ep = run(task, policy, chat, tokenizer)
  assert ep.termination == "user_ended" and ep.judge_score == 1 and ep.reward == 1.0
  msgs = [{"role": "system", "content": task.system_prompt},
          {"role": "user", "content": task.first_user_query}]
  p0 = chat.prompt_ids(msgs, tools=task.tools)
  turn1 = as_rendered
  (prompt2, _), = [c for c in policy.calls[1:2]]
  cont = prompt2[len(p0) + len(turn1):]
  turn2 = tokenizer.encode("Done, the setting is applied.") + [eot]
  expected = p0 + turn1 + cont + turn2
  assert ep.tokens.tolist() == expected
  mask = [0] * len(p0) + [1] * len(turn1) + [0] * len(cont) + [1] * len(turn2)
  assert ep.loss_mask.tolist() == mask
  assert np.all(ep.logprobs[ep.loss_mask == 1] == -0.5) and np.all(ep.logprobs[ep.loss_mask == 0] == 0)
  # The fragments equal the template's rendering of the whole conversation (Hermes format).
  full = chat.render(ep.messages[:-1] + [{"role": "assistant", "content": "Done, the setting is applied."}],
                     tools=task.tools, add_generation_prompt=False)
  assert expected == full[:len(expected)]
  # Per-turn rewards: the right call's tool reward (1) on turn 1, the user's end reward (1) on turn 2.
  r = ep.turn_rewards
  assert set(r[len(p0):len(p0) + len(turn1)]) == {1.0} and r[:len(p0)].sum() == 0
  assert set(r[len(expected) - len(turn2):]) == {1.0}
  assert r[len(p0) + len(turn1):len(expected) - len(turn2)].sum() == 0


def test_turn_rewards_follow_each_turn(chat, tokenizer):
  task = make_task()
  eot = chat.end_of_turn_id
  wrong = '<tool_call>{"name": "get_state", "arguments": {"key": "nope"}}</tool_call>'
  policy = ScriptedPolicy(tokenizer, [wrong, "I did it.", right_call(task), "All set."], eot)
  ep = run(task, policy, chat, tokenizer)
  spans = np.flatnonzero(np.diff(np.concatenate([[0], ep.loss_mask, [0]])))
  turns = list(zip(spans[::2], spans[1::2]))
  assert len(turns) == 4
  assert [float(ep.turn_rewards[a]) for a, _ in turns] == [-1.0, -1.0, 1.0, 1.0]
  assert ep.num_tool_calls == 2 and ep.judge_score == 1


class FailingJudge:
  """Scores every episode -1: a judge the oracle disagrees with when the agent succeeds."""

  async def score(self, task, messages, num_criteria, seed):
    return doubles.Judgement(-1, "always -1", (-1,))


def test_an_oracle_scores_beside_the_judge_and_the_reward_stays_the_judges(chat, tokenizer):
  task = make_task()
  turns = [right_call(task), "All set."]
  w = dataclasses.replace(world(), judge=FailingJudge())
  w.oracle = doubles.JudgeDouble()
  ep = asyncio.run(rollout.run_episode(
      task, 0, 0, engine=ScriptedPolicy(tokenizer, turns, chat.end_of_turn_id), chat=chat,
      tokenizer=tokenizer, world=w, cfg=rollout.RolloutConfig(group_size=1), seed=1))
  assert (ep.judge_score, ep.oracle_score, ep.reward) == (-1, 1, -1.0)
  plain = run(task, ScriptedPolicy(tokenizer, turns, chat.end_of_turn_id), chat, tokenizer)
  assert plain.oracle_score is None and plain.judge_score == 1  # no oracle: none scored


def test_budget_cut_appends_masked_end_of_turn(chat, tokenizer):
  task = make_task()
  eot = chat.end_of_turn_id
  policy = ScriptedPolicy(tokenizer, ["word " * 50] * 4, eot)
  ep = run(task, policy, chat, tokenizer, rollout.RolloutConfig(group_size=1, max_turn_tokens=8))
  first = int(np.flatnonzero(ep.loss_mask)[0])
  assert ep.loss_mask[first:first + 8].tolist() == [1] * 8
  assert ep.tokens[first + 8] == eot and ep.loss_mask[first + 8] == 0
  assert ep.termination == "budget_turns" and ep.judge_score == -1  # never called a tool


def test_malformed_tool_calls_are_answered_and_counted(chat, tokenizer):
  task = make_task()
  policy = ScriptedPolicy(tokenizer, ['<tool_call>{"name": oops</tool_call>',
                                      '<tool_call>{"name": "set_volume", "arguments": {"level": "loud"}}</tool_call>',
                                      right_call(task), "Done."], chat.end_of_turn_id)
  ep = run(task, policy, chat, tokenizer)
  assert ep.num_invalid_calls == 2
  tool_msgs = [m for m in ep.messages if m["role"] == "tool"]
  assert tool_msgs[0]["content"].startswith("Error: malformed tool call")
  assert "Error" in tool_msgs[1]["content"]
  cfg = rollout.RolloutConfig(group_size=1, invalid_call_penalty=0.25)
  policy.turns = ['<tool_call>{"name": oops</tool_call>', right_call(task), "Done."]
  ep2 = run(task, policy, chat, tokenizer, cfg)
  assert ep2.reward == pytest.approx(1.0 - 0.25)


class BrokenUser:
  async def respond(self, task, messages, seed):
    raise SimulatorError("http://127.0.0.1:1", "timeout", "simulated outage")


@pytest.mark.timeout(60)
def test_simulator_outage_drops_episodes_and_groups(chat, tokenizer):
  tasks = [make_task(seed=s) for s in range(2)]
  policy = ScriptedPolicy(tokenizer, ["Hello?"] * 8, chat.end_of_turn_id)
  w = Roles(user=BrokenUser())
  res = asyncio.run(rollout.run_rollouts(tasks, engine=policy, chat=chat, tokenizer=tokenizer,
                                         world=w, cfg=rollout.RolloutConfig(group_size=2),
                                         seed=0, step=1))
  assert res.episodes == [] and res.dropped_groups == 2
  assert res.dropped_episodes["simulator_timeout"] == 4


class FlakyUser:
  """Fails the first user turn it is asked for (one episode lost), answers the rest."""

  def __init__(self):
    self.inner, self.calls = doubles.UserDouble(), 0

  async def respond(self, task, messages, seed):
    self.calls += 1
    if self.calls == 1:
      raise SimulatorError("http://127.0.0.1:1", "timeout", "simulated outage")
    return await self.inner.respond(task, messages, seed)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("single_survivor,kept", [("zero", 0), ("reward", 1)])
def test_lone_survivors_are_kept_only_where_they_train(chat, tokenizer, single_survivor, kept):
  """grpo.single_survivor="reward" (the reference) trains a group's lone survivor on its
  reward, so the trainer keeps such groups; "zero" would give it advantage 0: dropped."""
  min_group = grpo.GRPOConfig(single_survivor=single_survivor).min_group_size
  policy = ScriptedPolicy(tokenizer, ["Hello?"] * 8, chat.end_of_turn_id)
  res = asyncio.run(rollout.run_rollouts(
      [make_task()], engine=policy, chat=chat, tokenizer=tokenizer, world=Roles(user=FlakyUser()),
      cfg=rollout.RolloutConfig(group_size=2), seed=0, step=1, max_concurrent=1,
      min_group=min_group))
  assert len(res.episodes) == kept and res.dropped_groups == 1 - kept
  assert res.dropped_episodes["simulator_timeout"] == 1


def test_prompt_longer_than_the_episode_budget_is_dropped_and_counted(chat, tokenizer):
  tasks = [make_task(seed=s) for s in range(2)]
  policy = ScriptedPolicy(tokenizer, ["Hello?"] * 8, chat.end_of_turn_id)
  cfg = rollout.RolloutConfig(group_size=2, max_episode_tokens=64)  # below any task's prompt
  res = asyncio.run(rollout.run_rollouts(tasks, engine=policy, chat=chat, tokenizer=tokenizer,
                                         world=world(), cfg=cfg, seed=0, step=1))
  assert res.episodes == [] and res.dropped_groups == 2
  assert res.dropped_episodes["prompt_too_long"] == 4


def test_engine_rollouts_arrays_match_sampled_ids_and_are_reproducible(chat, tokenizer):
  model = create_model(get_model_config("tiny-llama"), seed=3)
  tasks = [make_task(seed=s) for s in range(2)]
  cfg = rollout.RolloutConfig(group_size=3, max_turn_tokens=12, max_episode_tokens=1200)
  with Engine(model, num_slots=6, cache_len=1536, decode_chunk=4) as engine:
    runs = [asyncio.run(rollout.run_rollouts(tasks, engine=engine, chat=chat, tokenizer=tokenizer,
                                             world=world(), cfg=cfg, seed=5, step=2,
                                             max_concurrent=c)) for c in (0, 1)]
  concurrent, sequential = runs
  assert len(concurrent.episodes) == 6
  key = lambda e: (e.task_index, e.episode_index)  # noqa: E731
  for a, b in zip(sorted(concurrent.episodes, key=key), sorted(sequential.episodes, key=key)):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  batch = step_batch.build(concurrent.episodes, grpo.GRPOConfig(), num_groups=2, width=1536)
  for i, e in enumerate(concurrent.episodes):
    n = len(e.tokens)
    assert batch.tokens[i, :n].tolist() == e.tokens.tolist()
    assert batch.loss_mask[i, n - 1:].sum() == 0 and batch.positions[i, n:].max() == -1
    sampled = batch.tokens[i, 1:][batch.loss_mask[i] > 0]  # the mask is aligned with targets
    assert sampled.tolist() == e.tokens[e.loss_mask > 0].tolist()


@pytest.fixture(scope="module")
def qwen3():
  tok = load_tokenizer("qwen3")
  return tok, ChatFormat(tok)


class RecordingUser:
  """The user double, keeping the conversations it was shown."""

  def __init__(self):
    self.inner, self.seen = doubles.UserDouble(), []

  async def respond(self, task, messages, seed):
    self.seen.append(messages)
    return await self.inner.respond(task, messages, seed)


def thinking_episode(qwen3, turns, **cfg):
  tok, chat = qwen3
  task = make_task()
  policy = ScriptedPolicy(tok, [t.format(call=right_call(task)) for t in turns],
                          chat.end_of_turn_id)
  user = RecordingUser()
  ep = asyncio.run(rollout.run_episode(
      task, 0, 0, engine=policy, chat=chat, tokenizer=tok, world=Roles(user=user),
      cfg=rollout.RolloutConfig(group_size=1, enable_thinking=True, **cfg), seed=1))
  return ep, policy, user


THOUGHT = ["<think>\nThe user wants music: call play_music.\n</think>\n\n{call}",
           "<think>\nIt is playing.\n</think>\n\nDone, it is playing.", "Done.", "Done."]


def test_thinking_turns_are_trained_and_kept_exactly_as_sampled(qwen3):
  """Token in, token out: each turn's <think> block enters the sequence as sampled (mask 1) and
  stays in every later turn's context, where re-rendering with Qwen3's template would drop the
  reasoning of turns before the last user message. The prompt opens the turn without Qwen3's
  empty think block."""
  tok, chat = qwen3
  ep, policy, _ = thinking_episode(qwen3, THOUGHT)
  eot = chat.end_of_turn_id
  sampled = [tok.encode(t.format(call=right_call(make_task()))) + [eot]
             for t in THOUGHT[:len(policy.calls)]]
  assert ep.tokens[ep.loss_mask == 1].tolist() == [i for s in sampled for i in s]
  first_prompt = policy.calls[0][0]
  assert tok.decode(first_prompt).endswith("<|im_start|>assistant\n")
  assert policy.calls[1][0][:len(first_prompt) + len(sampled[0])] == first_prompt + sampled[0]
  think = tok.token_id("<think>")
  assert ep.tokens.tolist().count(think) == len(sampled) and ep.num_turns_without_thinking == 0
  assert "play_music" in ep.messages[2]["reasoning_content"]


def test_turns_without_thinking_are_counted(qwen3):
  ep, _, _ = thinking_episode(qwen3, ["{call}", "<think>\nok\n</think>\n\nDone.", "Done.", "Done."])
  assert ep.num_turns_without_thinking == 1


@pytest.mark.parametrize("show", [False, True])
def test_the_simulators_see_the_reasoning_only_when_told(qwen3, show):
  ep, _, user = thinking_episode(qwen3, THOUGHT, show_reasoning=show)
  shown = [m for conv in user.seen for m in conv if m.get("reasoning_content")]
  assert bool(shown) == show
  assert any(m.get("reasoning_content") for m in ep.messages)  # the episode log keeps it


def test_the_tool_simulator_is_shown_the_conversation(chat, tokenizer):
  """The paper config's tool simulator sees the whole conversation (show_conversation), so the
  rollout hands it the messages, ending with the turn that made the call."""
  from trustee_jax.simulator import tools as tools_lib
  client = doubles.ScriptedClient(lambda req: {"notes": "", "result": "playing", "reward": 1})
  task = make_task()
  sim = tools_lib.ToolSimulator(client, {"show_conversation": True})
  policy = ScriptedPolicy(tokenizer, [right_call(task), "Done.", "Done.", "Done."],
                          chat.end_of_turn_id)
  asyncio.run(rollout.run_episode(task, 0, 0, engine=policy, chat=chat, tokenizer=tokenizer,
                                  world=Roles(tools=sim),
                                  cfg=rollout.RolloutConfig(group_size=1), seed=1))
  (request,) = client.requests
  assert task.first_user_query in request.prompt and "play_music" in request.prompt


class CountingUser:
  """Never ends the conversation; counts its replies."""

  def __init__(self):
    self.replies = 0

  async def respond(self, task, messages, seed):
    from trustee_jax.simulator.user import UserReply
    self.replies += 1
    return UserReply(response="Go on.", reward=0, ended=False)


@pytest.mark.parametrize("limits,replies,generations,judged", [
    ("project", 1, 2, 2),     # no turn is generated past its budget
    ("reference", 2, 3, 2)])  # checked after each generation; the last is trained, not judged
def test_turn_limits_are_counted_as_configured(chat, tokenizer, limits, replies, generations,
                                               judged):
  task = make_task(max_user_turns=1, max_assistant_turns=4)
  user, policy = CountingUser(), ScriptedPolicy(tokenizer, ["Hello?"] * 6, chat.end_of_turn_id)
  ep = asyncio.run(rollout.run_episode(
      task, 0, 0, engine=policy, chat=chat, tokenizer=tokenizer, world=Roles(user=user),
      cfg=rollout.RolloutConfig(group_size=1, turn_limits=limits), seed=1))
  assert (user.replies, len(policy.calls)) == (replies, generations)
  assert sum(m["role"] == "assistant" for m in ep.messages) == judged
  turn_ids = len(tokenizer.encode("Hello?")) + 1
  assert int(ep.loss_mask.sum()) == generations * turn_ids  # every generation is trained
  assert ep.termination == "budget_turns"
