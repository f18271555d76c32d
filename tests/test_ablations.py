"""The paper's ablations: each hides exactly its field from the roles that see it, and each
configs/ablations.py entry changes exactly its keys of the paper config."""
import asyncio
import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest

from trustee_jax import checkpoint, config_files, curriculum, rollout, world
from trustee_jax.chat import ChatFormat
from trustee_jax.models.tokenizer import load_tokenizer
from trustee_jax.simulator import doubles, judge, tools, user
from trustee_jax.simulator.tools import ToolLedger, ToolResult
from trustee_jax.simulator.user import UserReply
from trustee_jax.tool_calls import ToolCall
from test_rollout import KNOBS, ScriptedPolicy, make_task, right_call

FIELDS = ("user_intent", "user_persona", "expected_tool_calls", "expected_calls")


def changed(a, b) -> set[str]:
  return {f for f in FIELDS if getattr(a, f) != getattr(b, f)}


@pytest.mark.parametrize("role", ["user", "tools", "judge"])
@pytest.mark.parametrize("ablation", sorted(rollout.ABLATIONS))
def test_role_task_blanks_exactly_the_ablated_fields(role, ablation):
  task = make_task()
  view = rollout.role_task(task, role, (ablation,))
  fields, roles = rollout.ABLATIONS[ablation]
  assert changed(task, view) == (set(fields) if role in roles else set())
  for f in changed(task, view):
    assert not getattr(view, f)
  rest = [f.name for f in dataclasses.fields(task) if f.name not in FIELDS]
  assert all(getattr(view, f) == getattr(task, f) for f in rest)
  assert rollout.role_task(task, role, ()) is task


def test_unknown_ablation_is_refused():
  with pytest.raises(ValueError, match="unknown.*intent"):
    rollout.RolloutConfig(ablate=("intent",))


def test_prompts_leave_out_the_ablated_sections():
  task = dataclasses.replace(make_task(), user_intent="SECRET-INTENT", user_persona="SECRET-PERSONA")
  messages = [{"role": "user", "content": task.first_user_query},
              {"role": "assistant", "content": "ok"}]
  call = ToolCall(id="c0", name=task.tool_names[0], arguments={})
  every = tuple(rollout.ABLATIONS)
  prompts = {
      "user": lambda t: user.UserSimulator(None).prompt(t, messages),
      "tools": lambda t: tools.ToolSimulator(None).prompt(t, ToolLedger.for_task(t), call,
                                                         messages),
      "judge": lambda t: judge.Judge(None).prompt(t, messages, 2)}
  headers = {"user_intent": ("What you want", "What the user is trying to do", "User intent:"),
             "user_persona": ("Who you are", "User persona:"),
             "expected_tool_calls": ("Tools a good assistant would call",)}
  for role, render in prompts.items():
    full, ablated = render(task), render(rollout.role_task(task, role, every))
    for ablation, (_, roles) in rollout.ABLATIONS.items():
      present = [h for h in headers[ablation] if h in full]
      assert bool(present) == (role in roles), (role, ablation)
      assert not any(h in ablated for h in headers[ablation]), (role, ablation)
    for ablation, field in (("user_intent", task.user_intent),
                            ("user_persona", task.user_persona)):
      assert (field in full) == (role in rollout.ABLATIONS[ablation][1]), (role, ablation)
      assert field not in ablated
    assert task.tool_names[0] in ablated  # the rest is still there


@dataclasses.dataclass
class Recording:
  """Doubles that record the task each role was handed."""
  seen: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.user, self.tools, self.judge = self, self, self
    self._user, self._tools, self._judge = (doubles.UserDouble(), doubles.ToolDouble(),
                                           doubles.JudgeDouble())

  async def respond(self, task, messages, seed) -> UserReply:
    self.seen["user"] = task
    return await self._user.respond(task, messages, seed)

  async def execute(self, task, ledger, calls, seed, messages=None) -> list[ToolResult]:
    self.seen["tools"] = task
    return await self._tools.execute(task, ledger, calls, seed, messages)

  async def score(self, task, messages, num_criteria, seed):
    self.seen["judge"] = task
    return await self._judge.score(task, messages, num_criteria, seed)


def test_episode_hands_each_role_its_ablated_view():
  tok = load_tokenizer("smollm2")
  chat = ChatFormat(tok)
  task = make_task()
  roles = Recording()
  policy = ScriptedPolicy(tok, [right_call(task), "Done.", "Done."], chat.end_of_turn_id)
  cfg = rollout.RolloutConfig(group_size=1, ablate=tuple(rollout.ABLATIONS))
  asyncio.run(rollout.run_episode(task, 0, 0, engine=policy, chat=chat, tokenizer=tok,
                                  world=roles, cfg=cfg, seed=1))
  assert set(roles.seen) == {"user", "tools", "judge"}
  for role, seen in roles.seen.items():
    want = {f for fields, rs in rollout.ABLATIONS.values() if role in rs for f in fields}
    assert changed(task, seen) == want, role
    assert seen.affinity == f"{task.task_id}/0"  # the episode's calls stay on one server
  # The policy's prompt is the task's own, ablation or not.
  assert tok.decode(policy.calls[0][0]).count(task.first_user_query) == 1


PAPER = config_files.get_config("configs/trustee_paper.py")


@pytest.mark.parametrize("name", config_files.load_module("configs/ablations.py").names())
def test_each_ablation_config_changes_only_its_keys(name):
  ablations = config_files.load_module("configs/ablations.py")
  cfg = config_files.get_config(f"configs/ablations.py:{name}")
  diff = checkpoint.config_changes(PAPER.to_dict(), cfg.to_dict(), allowed=())
  want = {f"{block}.{k}" for block, kv in ablations._changes()[name].items() for k in kv}
  assert set(diff) == want
  cur = curriculum.CurriculumConfig.from_dict(cfg.curriculum)
  rollout.RolloutConfig.from_dict(cfg.rollout)
  world.check_ablations(cfg)
  if name.startswith("pin_"):
    dims = dict(ablations.DIMENSIONS)
    assert cur.pinned == dims.get(name[4:], (name[4:],))


def test_unknown_ablation_config_names_the_choices():
  with pytest.raises(ValueError, match="hard_curriculum"):
    config_files.get_config("configs/ablations.py:no_such_thing")


def knobs_at(cfg_name, rewards):
  """Knobs of 64 tasks after a few steps of the given batch rewards."""
  cfg = config_files.get_config(f"configs/ablations.py:{cfg_name}")
  cur = curriculum.CurriculumConfig.from_dict(cfg.curriculum)
  state = curriculum.init_state(cur)
  for r in rewards:
    state = curriculum.update(cur, state, jax.numpy.asarray(r, jax.numpy.float32))
  return state, curriculum.knobs(cur, state, jax.random.key(0), 64)


def test_curriculum_ablations_move_the_level_as_the_references():
  state, _ = knobs_at("hard_curriculum", [[1.0] * 8, [-1.0] * 8])
  assert int(state.level) == 100  # pinned
  state, _ = knobs_at("no_curriculum", [[1.0] * 8, [-1.0] * 8])
  assert int(state.level) == 97  # starts at the top; the update rule is the reference's
  _, kn = knobs_at("soft_off", [])
  assert not np.asarray(kn.soft).any()
  _, paper_kn = knobs_at("soft_off", [])
  _, tool_kn = knobs_at("pin_tool", [])
  assert int(np.asarray(tool_kn.num_tools).min()) > int(np.asarray(paper_kn.num_tools).max())


def test_ablations_refuse_worlds_that_would_ignore_them():
  cfg = ml_collections.ConfigDict(dict(
      rollout=dict(ablate=("user_intent",)), simulator=dict(mode="doubles"),
      world=dict(judge=dict(mode="lm"))))
  with pytest.raises(ValueError, match="LM world"):
    world.check_ablations(cfg)
  cfg.simulator.mode, cfg.rollout.ablate, cfg.world.judge.mode = "url", ("expected_tool_calls",), "blend"
  with pytest.raises(ValueError, match="judge.mode"):
    world.check_ablations(cfg)
