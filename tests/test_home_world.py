"""The smart-home task family: each knob changes what it should, determinism, the held-out split."""
import json
import re

import numpy as np
import pytest

from trustee_jax.simulator import doubles as dbl
from trustee_jax.simulator import home_world as hw
from trustee_jax.simulator import task_checks
from trustee_jax.simulator import tasks as tl
from trustee_jax.simulator import tools_pool

BASE = dict(num_tools=10, num_expected_calls=1, persona_level=0, ambiguity_level=0,
            expected_turns=0, system_prompt_level=3, num_criteria=1, max_user_turns=3,
            max_assistant_turns=4, max_tool_turns=2)
ALL_TOOLS = [tools_pool.tool_spec(e) for ts in hw.double_pool()[hw.CATEGORY].values() for e in ts]
RELATIVE = [n for n, s in hw.SPECS.items() if s.steps]


def tools_named(*names):
  return [t for t in ALL_TOOLS if t["function"]["name"] in names]


def draw(seed=0, tools=ALL_TOOLS, heldout=False, **knobs):
  return dbl.TaskGeneratorDouble(heldout=heldout).draw({**BASE, **knobs}, tools, hw.CATEGORY, seed)


def said(value, text):
  return re.search(rf"(?<!\w){re.escape(str(value).replace('_', ' '))}(?!\w)", text) is not None


def test_pool_has_ten_distinct_simple_tools():
  pool = hw.double_pool()
  assert tools_pool.pool_problems(pool, strict=True) == []
  names = [t["function"]["name"] for t in ALL_TOOLS]
  assert len(names) == len(set(names)) == 10 and "get_state" in names


@pytest.mark.parametrize("num_tools", [1, 2, 4, 7, 10])
def test_num_tools_is_the_tools_offered(num_tools):
  rng = np.random.default_rng(num_tools)
  for req in tl.sample_requests(hw.double_pool(), [{**BASE, "num_tools": num_tools}] * 5, rng):
    task = dbl.TaskGeneratorDouble().draw(req.knobs, req.tools, req.category, req.seed)
    assert len(task.tools) == num_tools
    assert set(task.expected_tool_calls) <= set(task.tool_names)


def test_num_expected_calls_is_the_setter_calls():
  for n in (1, 2, 3):
    for seed in range(5):
      task = draw(seed, num_expected_calls=n)
      assert len(task.oracle["calls"]) == n and task.expected_calls == task.oracle["calls"]
      assert len({c["name"] for c in task.expected_calls}) == n
  assert len(draw(0, tools_named("set_volume", "lock_door"), num_expected_calls=3).expected_calls) == 2


def test_ambiguity_goes_from_complete_to_vague():
  for seed in range(20):
    complete, partial, vague = (draw(seed, num_expected_calls=2, ambiguity_level=a) for a in range(3))
    assert complete.expected_calls == partial.expected_calls == vague.expected_calls
    values = [[v for v in c["arguments"].values()] for c in complete.expected_calls]
    assert complete.hidden_facts == [] and all(said(v, complete.first_user_query)
                                               for vs in values for v in vs)
    assert len(partial.hidden_facts) == 1 and len(vague.hidden_facts) == 2
    assert sum(all(said(v, partial.first_user_query) for v in vs) for vs in values) == 1
    assert not any(said(v, vague.first_user_query) for vs in values for v in vs)
    assert all(any(said(v, f) for v in vs) for vs, f in zip(values, vague.hidden_facts))
    assert len({complete.first_user_query, partial.first_user_query, vague.first_user_query}) == 3


def test_persona_changes_the_wording_not_the_goal():
  for seed in range(10):
    expert, beginner, novice = (draw(seed, persona_level=p) for p in range(3))
    assert expert.expected_calls == beginner.expected_calls == novice.expected_calls
    phrase = expert.oracle["goals"][0]["said"]
    assert all(phrase in t.first_user_query for t in (beginner, novice))
    assert "please" in beginner.first_user_query and novice.first_user_query.startswith("Hello!")
    assert "Hello" not in expert.first_user_query
    assert len(expert.first_user_query) < len(beginner.first_user_query) < len(novice.first_user_query)
    assert len({expert.user_persona, beginner.user_persona, novice.user_persona}) == 3


def test_expected_turns_adds_get_state_reads():
  for seed in range(10):
    assert "get_state" not in draw(seed, num_expected_calls=3).expected_tool_calls
    one = draw(seed, num_expected_calls=3, expected_turns=1)
    every = draw(seed, num_expected_calls=3, expected_turns=2)
    no_reader = draw(seed, [t for t in ALL_TOOLS if t["function"]["name"] != "get_state"],
                     num_expected_calls=3, expected_turns=2)
    assert "get_state" not in no_reader.expected_tool_calls
    chosen = [c["name"] for c in every.oracle["calls"]]
    assert one.expected_tool_calls.count("get_state") == min(1, sum(n in RELATIVE for n in chosen))
    assert every.expected_tool_calls.count("get_state") == sum(n in RELATIVE for n in chosen)
    start = {k: json.loads(v) for k, v in (s.split("=", 1) for s in every.initial_state)}
    calls = every.expected_calls
    for read, setter in zip(calls, calls[1:]):
      if read["name"] == "get_state":
        spec = hw.SPECS[setter["name"]]
        key, target = spec.key(setter["arguments"]), spec.value(setter["arguments"])
        assert read["arguments"]["key"] == key and abs(target - start[key]) in spec.steps
        assert f"from {start[key]} to {target}" in every.user_intent


def test_relative_request_needs_the_current_value():
  task = draw(3, tools_named("set_volume", "get_state"), expected_turns=1)
  (read, write) = task.expected_calls
  assert read == {"name": "get_state", "arguments": {"key": "volume"}}
  assert str(write["arguments"]["level"]) not in task.first_user_query
  assert re.search(r"volume \d+ percent (louder|quieter)", task.first_user_query)


def test_only_get_state_offered_gives_read_tasks():
  task = draw(1, tools_named("get_state"), num_expected_calls=2)
  assert task.expected_tool_calls == ["get_state", "get_state"]
  assert task.oracle["report"] == [task.oracle["expected_state"][c["arguments"]["key"]]
                                   for c in task.expected_calls]


def test_world_is_deterministic_per_seed_and_varied_across_seeds():
  for knobs in ({}, {"num_expected_calls": 3, "ambiguity_level": 2, "expected_turns": 2}):
    assert draw(4, **knobs) == draw(4, **knobs)
    queries = {draw(s, **knobs).first_user_query for s in range(30)}
    assert len(queries) >= 20
  for seed in range(30):
    task = draw(seed, num_expected_calls=3, persona_level=2)
    assert not [n for n in task.tool_names if task_checks.mentions_tool(task.first_user_query, n)]


def _identity(task):
  start = dict(s.split("=", 1) for s in task.initial_state)
  return json.dumps([task.expected_calls, sorted(start[g["key"]] for g in task.oracle["goals"])])


def test_heldout_tasks_never_overlap_training_tasks():
  knobs = [{**BASE, "num_tools": k, "num_expected_calls": c, "ambiguity_level": a, "expected_turns": t}
           for k, c, a, t in [(1, 1, 0, 0), (4, 2, 1, 1), (10, 3, 2, 2)]]
  heldout = dbl.heldout_tasks(24, seed=0, knobs=knobs)
  assert heldout == dbl.heldout_tasks(24, seed=0, knobs=knobs)
  assert len({t.first_user_query for t in heldout}) == 24
  assert all(hw.is_heldout({"initial_state": t.initial_state, "expected_calls": t.expected_calls})
             for t in heldout)
  assert [t.knobs["num_tools"] for t in heldout[:3]] == [1, 4, 10]
  rng = np.random.default_rng(1)
  training = [dbl.TaskGeneratorDouble().draw(r.knobs, r.tools, r.category, r.seed)
              for r in tl.sample_requests(hw.double_pool(), knobs * 100, rng)]
  assert not {_identity(t) for t in training} & {_identity(t) for t in heldout}
  for name in hw.SPECS:  # every tool alone still has training tasks
    assert draw(0, tools_named(name)).expected_tool_calls == [name]
