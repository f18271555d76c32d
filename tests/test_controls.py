"""Negative controls: negated or permuted rewards, and what negation does to advantages."""
import jax.numpy as jnp
import numpy as np
import pytest

from trustee_jax import controls, grpo
from trustee_jax.rollout import Episode


def _episode(task: int, reward: float):
  return Episode(task, 0, *(np.zeros(1),) * 4, reward=reward)


def test_negative_controls_negate_or_shuffle_rewards_or_leave_them():
  episodes = [_episode(t, r) for t, r in ((0, 1.0), (0, -1.0), (1, 0.0), (1, 1.0), (2, -1.0))]
  assert controls.negative_control("", episodes, 7) is episodes
  negated = controls.negative_control("negate_advantages", episodes, 7)
  assert [e.reward for e in negated] == [-1.0, 1.0, 0.0, -1.0, 1.0]
  shuffled = controls.negative_control("permute_rewards", episodes, 7)
  assert sorted(e.reward for e in shuffled) == sorted(e.reward for e in episodes)
  assert [e.reward for e in shuffled] != [e.reward for e in episodes]  # this seed moves them
  assert [e.reward for e in episodes] == [1.0, -1.0, 0.0, 1.0, -1.0]  # the originals untouched
  assert [e.reward for e in controls.negative_control("permute_rewards", episodes, 7)] == \
      [e.reward for e in shuffled]  # seeded
  with pytest.raises(ValueError, match="train.control"):
    controls.negative_control("flip", episodes, 7)


def test_negated_rewards_flip_every_group_advantage():
  cfg = grpo.GRPOConfig()
  rewards, groups = jnp.asarray([1.0, -1.0, 0.0, 1.0, 0.0, 0.0]), jnp.asarray([0, 0, 0, 1, 1, 1])
  valid = jnp.ones(6, bool)
  a = grpo.group_advantages(rewards, groups, valid, cfg, num_groups=2)
  b = grpo.group_advantages(-rewards, groups, valid, cfg, num_groups=2)
  np.testing.assert_allclose(b, -a, atol=1e-6)
  assert float(jnp.abs(a).sum()) > 0
