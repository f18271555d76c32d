"""Negative controls of the learning benchmark: the same run with its reward signal broken."""
import dataclasses

import numpy as np

from trustee_jax import rollout

CONTROLS = ("", "negate_advantages", "permute_rewards")


def negative_control(control: str, episodes: list[rollout.Episode], seed: int
                     ) -> list[rollout.Episode]:
  """The episodes the update trains on under a negative control of the learning benchmark:
  "permute_rewards" shuffles the rewards across the step's episodes (seeded), so they no longer
  say which episode did well; "negate_advantages" negates them, which flips every group-relative
  advantage's sign (the group std is unchanged); "" (a real run) leaves them be. Logged rewards
  and the curriculum always see the true rewards."""
  if control not in CONTROLS:
    raise ValueError(f"train.control must be one of {CONTROLS}, got {control!r}")
  if not control:
    return episodes
  rewards = [-e.reward for e in episodes] if control == "negate_advantages" else \
      np.random.default_rng(seed).permutation([e.reward for e in episodes])
  return [dataclasses.replace(e, reward=float(r)) for e, r in zip(episodes, rewards)]
