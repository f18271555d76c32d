"""Host-side seeds derived from other seeds: the two schemes this project uses, in one place
(the lowest layer: anything may import it). They differ and are not interchangeable; each is
kept bit for bit, because seeded runs and their resumes depend on the values.

  derive_seed(*parts)  a 31-bit seed from (seed, step, task, episode, turn, ...): blake2b of the
                       parts (rollout and train).
  retry_seed(seed, k)  the seed of the k-th retry of `seed`; k = 0 is `seed` itself
                       (numpy's SeedSequence; the simulator roles and task generation).
"""
import hashlib

import numpy as np


def derive_seed(*parts: int) -> int:
  """A 31-bit seed from (seed, step, task, episode, turn, ...): resumable host randomness."""
  digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def retry_seed(seed: int, k: int) -> int:
  """Seed of the k-th retry of `seed` (k = 0 is the seed itself); fits a signed int32."""
  if k == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, k]).generate_state(1)[0] & 0x7FFFFFFF)
