"""Tests for trustee_jax.curriculum: level moves, reference knob values, soft draws, variants."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from trustee_jax import curriculum as cur

update = jax.jit(cur.update, static_argnums=0)
knobs = jax.jit(cur.knobs, static_argnums=(0, 3))


def _state(cfg, level):
  return cur.init_state(cfg).replace(level=jnp.asarray(level, jnp.int32))


def _hard(**kw):
  """The reference config without the soft curriculum, so knobs are the level's own values."""
  return cur.CurriculumConfig(epsilon=0.0, **kw)


@pytest.mark.parametrize("rewards,expected", [
    ([1.0, 0.0], 13),      # mean 0.5 >= 0.5: up by 3
    ([1.0, -0.5], 10),     # mean 0.25: stays
    ([0.0, 0.0], 7),       # mean 0.0 <= 0.0: down by 3
    ([-1.0, 0.5], 7),      # mean -0.25: down
])
def test_update_moves_up_down_or_stays(rewards, expected):
  cfg = cur.CurriculumConfig()
  state = update(cfg, _state(cfg, 10), jnp.array(rewards))
  assert int(state.level) == expected


def test_update_clips_at_both_ends():
  cfg = cur.CurriculumConfig()
  assert int(update(cfg, _state(cfg, 99), jnp.ones(4)).level) == 100
  assert int(update(cfg, _state(cfg, 100), jnp.ones(4)).level) == 100
  assert int(update(cfg, _state(cfg, 2), -jnp.ones(4)).level) == 1
  assert int(update(cfg, _state(cfg, 1), -jnp.ones(4)).level) == 1


def test_update_ignores_invalid_and_empty_batches():
  cfg = cur.CurriculumConfig()
  # The invalid -1s would pull the mean to 0 (down); masked out the mean is 1 (up).
  state = update(cfg, _state(cfg, 10), jnp.array([1.0, -1.0]), jnp.array([True, False]))
  assert int(state.level) == 13
  state = update(cfg, _state(cfg, 10), jnp.array([-1.0, -1.0]), jnp.array([False, False]))
  assert int(state.level) == 10


def test_update_every_n_steps():
  cfg = cur.CurriculumConfig(update_every=2)
  state = _state(cfg, 10)
  state = update(cfg, state, jnp.ones(2))
  assert int(state.level) == 10 and int(state.steps_since_update) == 1
  state = update(cfg, state, jnp.ones(2))
  assert int(state.level) == 13 and int(state.steps_since_update) == 0


def test_reference_trajectory_reaches_levels_49_52_100():
  cfg = cur.CurriculumConfig()
  state = cur.init_state(cfg)
  seen = [int(state.level)]
  for _ in range(40):
    state = update(cfg, state, jnp.ones(8))
    seen.append(int(state.level))
  assert 49 in seen and 52 in seen and seen[-1] == 100


# Hand-computed from the reference multipliers (config.yaml) and `_get_difficulty_params`:
# tools max(1, floor(.10 D)); calls max(1, floor(.03 D)); persona/ambiguity/turns floor(.02 D) in 0..2;
# system prompt floor(.03 D) in 0..3; criteria 1 + floor(.04 D) in 1..5; user/tool turns
# max(1, floor(.03 D)); assistant turns max(2, floor(.06 D)).
REFERENCE_KNOBS = {
    1: dict(num_tools=1, num_expected_calls=1, persona_level=0, ambiguity_level=0, expected_turns=0,
            system_prompt_level=0, num_criteria=1, max_user_turns=1, max_assistant_turns=2,
            max_tool_turns=1),
    49: dict(num_tools=4, num_expected_calls=1, persona_level=0, ambiguity_level=0, expected_turns=0,
             system_prompt_level=1, num_criteria=2, max_user_turns=1, max_assistant_turns=2,
             max_tool_turns=1),
    52: dict(num_tools=5, num_expected_calls=1, persona_level=1, ambiguity_level=1, expected_turns=1,
             system_prompt_level=1, num_criteria=3, max_user_turns=1, max_assistant_turns=3,
             max_tool_turns=1),
    100: dict(num_tools=10, num_expected_calls=3, persona_level=2, ambiguity_level=2,
              expected_turns=2, system_prompt_level=3, num_criteria=5, max_user_turns=3,
              max_assistant_turns=6, max_tool_turns=3),
}


@pytest.mark.parametrize("level", sorted(REFERENCE_KNOBS))
def test_reference_values_at_levels(level):
  cfg = _hard()
  k = knobs(cfg, _state(cfg, level), jax.random.key(0), 3)
  for i in range(3):
    task = k.task(i)
    assert {a: task[a] for a in cur.ASPECTS} == REFERENCE_KNOBS[level]
    assert task["level"] == level and task["soft"] == 0


def test_knobs_monotone_in_level():
  cfg = _hard()
  rows = [cur.base_knobs(cfg, _state(cfg, lv)) for lv in range(1, 101)]
  for a in cur.ASPECTS:
    values = np.array([int(r[a]) for r in rows])
    assert np.all(np.diff(values) >= 0), a
    lo, hi = cur.soft_range(cfg, a)
    assert values.min() == lo and values.max() == hi, a


def test_soft_sampling_covers_full_ranges_and_keeps_hard_aspects():
  cfg = cur.CurriculumConfig(epsilon=1.0)
  k = knobs(cfg, _state(cfg, 1), jax.random.key(1), 2000)
  assert np.all(np.asarray(k.soft) == 1)
  expected = {"num_tools": (1, 10), "num_expected_calls": (1, 3), "persona_level": (0, 2),
              "ambiguity_level": (0, 2), "expected_turns": (0, 2)}
  for a, (lo, hi) in expected.items():
    assert set(np.asarray(getattr(k, a)).tolist()) == set(range(lo, hi + 1)), a
  for a in set(cur.ASPECTS) - set(expected):  # not soft: the level-1 values
    assert set(np.asarray(getattr(k, a)).tolist()) == {REFERENCE_KNOBS[1][a]}, a


def test_soft_coin_is_per_task_with_probability_epsilon():
  cfg = cur.CurriculumConfig(epsilon=0.5)
  k = knobs(cfg, _state(cfg, 1), jax.random.key(2), 4000)
  soft = np.asarray(k.soft).astype(bool)
  assert 0.45 < soft.mean() < 0.55
  # Hard tasks are exactly the level's values; a soft task differs only in soft aspects.
  assert np.all(np.asarray(k.num_tools)[~soft] == 1)
  assert np.all(np.asarray(k.num_criteria) == 1)
  assert np.asarray(k.num_tools)[soft].max() == 10


def test_pinned_aspects_stay_at_maximum():
  cfg = cur.CurriculumConfig(epsilon=1.0, pinned=("num_tools", "num_criteria", "max_user_turns"))
  k = knobs(cfg, _state(cfg, 1), jax.random.key(3), 500)
  assert set(np.asarray(k.num_tools).tolist()) == {10}  # soft draws skip pinned aspects
  assert set(np.asarray(k.num_criteria).tolist()) == {5}
  assert set(np.asarray(k.max_user_turns).tolist()) == {3}
  assert set(np.asarray(k.max_tool_turns).tolist()) == {1}


def test_deterministic_given_rng_and_varies_with_it():
  cfg = cur.CurriculumConfig()
  state = _state(cfg, 40)
  a = knobs(cfg, state, jax.random.key(7), 64)
  b = knobs(cfg, state, jax.random.key(7), 64)
  c = knobs(cfg, state, jax.random.key(8), 64)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_jit_and_unjitted_agree_and_shapes():
  cfg = cur.CurriculumConfig()
  state = _state(cfg, 25)
  a = knobs(cfg, state, jax.random.key(4), 16)
  b = cur.knobs(cfg, state, jax.random.key(4), 16)
  for f in cur.ASPECTS + ("level", "soft"):
    x, y = getattr(a, f), getattr(b, f)
    assert x.shape == (16,) and x.dtype == jnp.int32 and np.array_equal(x, y), f
  assert len(a.unbatch()) == 16 and isinstance(a.unbatch()[3].num_tools, int)


def test_caps_bound_an_aspect():
  cfg = _hard(caps=(("num_criteria", 2),))
  assert int(cur.base_knobs(cfg, _state(cfg, 100))["num_criteria"]) == 2
  assert cur.soft_range(cfg, "num_criteria") == (1, 2)


def test_from_dict_accepts_configdict_and_reference_names():
  d = ml_collections.ConfigDict(dict(
      step=5, epsilon=0.25, multipliers={"expected_tool_calls": 0.05, "user_persona": 0.04},
      pinned=["query_ambiguity"], caps={"num_criteria": 2}))
  cfg = cur.CurriculumConfig.from_dict(d)
  assert cfg.step == 5 and cfg.epsilon == 0.25
  assert cfg.multiplier("num_expected_calls") == 0.05 and cfg.multiplier("persona_level") == 0.04
  assert cfg.multiplier("num_tools") == 0.10 and cfg.pinned == ("ambiguity_level",)
  hash(cfg)
  with pytest.raises(ValueError, match="unknown curriculum config keys"):
    cur.CurriculumConfig.from_dict({"stepp": 3})
  with pytest.raises(ValueError, match="unknown curriculum aspect"):
    cur.CurriculumConfig.from_dict({"pinned": ["nope"]})
  with pytest.raises(ValueError, match="mode"):
    cur.CurriculumConfig(mode="fast")
  with pytest.raises(ValueError, match=">= 0"):
    cur.CurriculumConfig.from_dict({"multipliers": {"num_tools": -0.1}})


def test_target_success_variant():
  cfg = cur.CurriculumConfig(mode="target_success", target_success=0.5, target_tolerance=0.1,
                             success_threshold=0.5, ema_decay=0.5)
  state = _state(cfg, 10)
  # 3 of 4 succeed: ema = .5 * .5 + .5 * .75 = .625 >= .6 -> up.
  state = update(cfg, state, jnp.array([1.0, 1.0, 1.0, -1.0]))
  assert int(state.level) == 13 and float(state.success_ema) == pytest.approx(0.625)
  # 2 of 4: ema = .5 * .625 + .5 * .5 = .5625, inside the band -> stays.
  state = update(cfg, state, jnp.array([1.0, 1.0, 0.0, -1.0]))
  assert int(state.level) == 13 and float(state.success_ema) == pytest.approx(0.5625)
  # none: ema = .28125 <= .4 -> down.
  state = update(cfg, state, -jnp.ones(4))
  assert int(state.level) == 10 and float(state.success_ema) == pytest.approx(0.28125)


def test_per_aspect_variant_raises_lowest_and_undoes_last():
  cfg = _hard(mode="per_aspect", pinned=("max_tool_turns",))
  state = cur.init_state(cfg)
  assert state.level.shape == (len(cur.ASPECTS),)
  state = update(cfg, state, jnp.ones(2))  # success: first free aspect (num_tools) 1 -> 4
  state = update(cfg, state, jnp.ones(2))  # success: next lowest (num_expected_calls) 1 -> 4
  lv = np.asarray(state.level)
  assert lv[0] == 4 and lv[1] == 4 and np.all(lv[2:] == 1)
  state = update(cfg, state, -jnp.ones(2))  # failure: the last raised of the highest falls back
  lv = np.asarray(state.level)
  assert lv[0] == 4 and lv[1] == 1
  for _ in range(400):
    state = update(cfg, state, jnp.ones(2))
  lv = np.asarray(state.level)
  pinned = cur.ASPECTS.index("max_tool_turns")
  assert np.all(np.delete(lv, pinned) == 100) and lv[pinned] == 1
  k = knobs(cfg, state, jax.random.key(0), 2)
  assert k.task(0)["max_tool_turns"] == 3 and k.task(0)["num_tools"] == 10
  # Each aspect reads its own level.
  state = state.replace(level=jnp.full((len(cur.ASPECTS),), 1, jnp.int32).at[0].set(52))
  task = knobs(cfg, state, jax.random.key(0), 1).task(0)
  assert task["num_tools"] == 5 and task["num_criteria"] == 1


def test_state_is_a_pytree_that_round_trips():
  cfg = cur.CurriculumConfig()
  state = update(cfg, cur.init_state(cfg), jnp.ones(2))
  leaves, tree = jax.tree.flatten(state)
  again = jax.tree.unflatten(tree, [np.asarray(x) for x in leaves])
  assert int(again.level) == 4
  m = jax.jit(functools.partial(cur.metrics, cfg))(state)
  assert int(m["curriculum/level"]) == 4 and int(m["curriculum/num_tools"]) == 1
