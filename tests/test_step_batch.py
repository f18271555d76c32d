"""A step's rows: advantages once over all episodes, arrays aligned to targets, whole groups."""
import jax.numpy as jnp
import numpy as np
import pytest

from trustee_jax import grpo, step_batch
from trustee_jax.rollout import Episode

CFG = grpo.GRPOConfig()


def episode(task: int, k: int, length: int, reward: float) -> Episode:
  tokens = np.arange(length, dtype=np.int32) + 10 * task + k
  mask = (np.arange(length) >= 2).astype(np.int32)  # a 2-token prompt, then sampled tokens
  return Episode(task, k, tokens, mask, -0.1 * mask.astype(np.float32) * (k + 1),
                 0.5 * mask.astype(np.float32), reward=reward)


EPISODES = [episode(0, 0, 5, 1.0), episode(0, 1, 3, -1.0), episode(1, 0, 4, 1.0),
            episode(1, 1, 6, 1.0), episode(2, 0, 4, 0.0), episode(2, 1, 4, 1.0)]


def test_advantages_are_computed_once_over_every_group_of_the_step():
  b = step_batch.build(EPISODES, CFG, num_groups=3, width=8)
  want = grpo.group_advantages(jnp.asarray([1.0, -1.0, 1.0, 1.0, 0.0, 1.0]),
                               jnp.asarray([0, 0, 1, 1, 2, 2]), jnp.ones(6, bool), CFG,
                               num_groups=3)
  np.testing.assert_array_equal(b.advantages, np.asarray(want))
  assert b.advantages[2] == b.advantages[3] == 0.0  # a flat group: no signal
  # Bessel's std over two rewards 1 and -1 is sqrt(2): A = +-1/sqrt(2)
  np.testing.assert_allclose(b.advantages[:2], [1 / np.sqrt(2), -1 / np.sqrt(2)], rtol=1e-5)


def test_arrays_are_aligned_to_the_targets_once():
  b = step_batch.build(EPISODES, CFG, num_groups=3, width=8)
  e = EPISODES[0]
  assert b.tokens.shape == (6, 8) and b.loss_mask.shape == (6, 7)
  np.testing.assert_array_equal(b.tokens[0, :5], e.tokens)
  np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, -1, -1, -1])
  # target j is tokens[j + 1]: its mask, sampling log-prob and turn reward are the token's
  np.testing.assert_array_equal(b.loss_mask[0], [0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(b.old_logprobs[0, :4], e.logprobs[1:])
  np.testing.assert_array_equal(b.turn_rewards[0, :4], e.turn_rewards[1:])
  with pytest.raises(ValueError, match="more than the batch width"):
    step_batch.build(EPISODES, CFG, num_groups=3, width=4)


def test_mini_batches_keep_groups_whole():
  ids = np.asarray([0, 0, 1, 1, 2, 2])
  parts = step_batch.minibatch_rows(ids, 2)
  assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5]]
  assert [p.tolist() for p in step_batch.minibatch_rows(ids, 5)] == [[0, 1], [2, 3], [4, 5]]
  assert step_batch.minibatch_rows(np.zeros((0,), np.int32), 4) == []


def test_take_trims_to_a_width_and_pads_rows_that_train_nothing():
  b = step_batch.build(EPISODES, CFG, num_groups=3, width=8)
  arrays = step_batch.take(b, np.asarray([4, 5]), width=4, num_rows=4)
  assert arrays["tokens"].shape == (4, 4) and arrays["loss_mask"].shape == (4, 3)
  np.testing.assert_array_equal(arrays["positions"][2:], -1)
  np.testing.assert_array_equal(arrays["loss_mask"][2:], 0)
  np.testing.assert_array_equal(arrays["advantages"], [*b.advantages[4:], 0.0, 0.0])
  empty = step_batch.take(b, np.zeros((0,), np.int64), width=4, num_rows=2)  # another process's
  assert empty["tokens"].shape == (2, 4) and not empty["loss_mask"].any()
  wider = step_batch.take(b, np.asarray([0]), width=12, num_rows=1)  # another process's width
  assert wider["tokens"].shape == (1, 12) and wider["loss_mask"].shape == (1, 11)
  np.testing.assert_array_equal(wider["positions"][0, 5:], -1)
  np.testing.assert_array_equal(wider["tokens"][0, :8], b.tokens[0])
  with pytest.raises(ValueError, match="do not fit"):
    step_batch.take(b, np.asarray([3]), width=4, num_rows=1)  # a 6-token row in 4
