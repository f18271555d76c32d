"""A training step's rows, built once from its episodes before the first update (Tunix's
"train example" in spirit): advantages over the whole step, arrays aligned to the targets.

The stages of a step are pure functions of their inputs: `build` (episodes -> StepBatch),
`minibatch_rows` (group ids -> whole groups per optimizer update) and `take` (a mini-batch's
rows, trimmed to a width and padded to a row count that every process agreed on). The Trainer adds the
old and reference log-probs of every mini-batch before the first update, so that each update's
importance ratio is against the policy that sampled the step.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from trustee_jax import grpo

TARGET_ALIGNED = ("loss_mask", "old_logprobs", "turn_rewards")  # [N, T-1]: one per target token


@dataclasses.dataclass(frozen=True)
class StepBatch:
  """This process's training rows of one step (host arrays, never changed once built)."""
  tokens: np.ndarray  # int32 [N, T]
  positions: np.ndarray  # int32 [N, T], -1 on padding
  loss_mask: np.ndarray  # f32 [N, T-1], 1 where the target tokens[:, 1:] was policy-sampled
  old_logprobs: np.ndarray  # f32 [N, T-1], the sampler's log-prob of each target (0 elsewhere)
  turn_rewards: np.ndarray  # f32 [N, T-1], the simulator reward of each target's turn
  advantages: np.ndarray  # f32 [N], group-relative, over all the step's episodes at once
  group_ids: np.ndarray  # int32 [N], the episode's task (its GRPO group)
  lengths: np.ndarray  # int32 [N], real tokens per row

  def __len__(self) -> int:
    return len(self.tokens)


def build(episodes, cfg: grpo.GRPOConfig, *, num_groups: int, width: int) -> StepBatch:
  """The step's rows, right-padded to `width` tokens, with advantages computed once over all
  the episodes (groups whole by construction, whatever the mini-batching later)."""
  n = len(episodes)
  tokens = np.zeros((n, width), np.int32)
  positions = np.full((n, width), -1, np.int32)
  aligned = {k: np.zeros((n, width - 1), np.float32) for k in TARGET_ALIGNED}
  for i, e in enumerate(episodes):
    t = len(e.tokens)
    if t > width:
      raise ValueError(f"episode {i} has {t} tokens, more than the batch width {width}")
    tokens[i, :t], positions[i, :t] = e.tokens, np.arange(t)
    aligned["loss_mask"][i, :t - 1] = e.loss_mask[1:]
    aligned["old_logprobs"][i, :t - 1] = e.logprobs[1:]
    aligned["turn_rewards"][i, :t - 1] = e.turn_rewards[1:]
  rewards = np.asarray([e.reward for e in episodes], np.float32)
  group_ids = np.asarray([e.task_index for e in episodes], np.int32)
  advantages = np.asarray(grpo.group_advantages(
      jnp.asarray(rewards), jnp.asarray(group_ids), jnp.ones(n, bool), cfg,
      num_groups=num_groups)) if n else np.zeros((0,), np.float32)
  return StepBatch(tokens, positions, advantages=advantages.astype(np.float32),
                   group_ids=group_ids, lengths=np.asarray([len(e.tokens) for e in episodes],
                                                            np.int32), **aligned)


def minibatch_rows(group_ids: np.ndarray, parts: int) -> list[np.ndarray]:
  """Row indices of each optimizer update: the groups split into at most `parts` runs of whole
  groups (a group's advantages were computed together; its rows update together)."""
  groups = np.unique(group_ids)
  if not len(groups):
    return []
  return [np.flatnonzero(np.isin(group_ids, p))
          for p in np.array_split(groups, min(parts, len(groups)))]


def take(batch: StepBatch, rows: np.ndarray, *, width: int, num_rows: int) -> dict[str, np.ndarray]:
  """The update's arrays of `rows`: `width` tokens (targets width - 1; trimmed, or padded where
  another process's longer episodes set the width), padded with all-masked rows (positions -1,
  advantage 0) to `num_rows`: the shape every process agreed on."""
  if len(rows) > num_rows or (len(rows) and batch.lengths[rows].max() > width):
    raise ValueError(f"{len(rows)} rows of up to {batch.lengths[rows].max()} tokens do not fit "
                     f"{num_rows} x {width}")
  extra = num_rows - len(rows)

  def pad(x: np.ndarray, cols: int | None, fill) -> np.ndarray:
    x = x[rows] if cols is None else x[rows, :cols]
    if cols is not None and x.shape[1] < cols:  # another process's episodes were longer
      x = np.concatenate([x, np.full((len(x), cols - x.shape[1]), fill, x.dtype)], axis=1)
    return np.concatenate([x, np.full((extra,) + x.shape[1:], fill, x.dtype)])

  out = {"tokens": pad(batch.tokens, width, 0), "positions": pad(batch.positions, width, -1),
         "advantages": pad(batch.advantages, None, 0.0)}
  out.update({k: pad(getattr(batch, k), width - 1, 0.0) for k in TARGET_ALIGNED})
  return out
