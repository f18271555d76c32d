"""Decode slots: what one holds, and which free dense slot a request takes.

A dense slot keeps its KV cache after its request finishes, so the next request whose prompt
starts with those tokens (the next turn of that conversation) reuses them and prefills only its
new tokens. The paged layout (paged_slots.py) shares blocks instead and decides admission itself.
"""
import dataclasses

import numpy as np

from trustee_jax.sampling.requests import Request


@dataclasses.dataclass
class Slot:
  """One decode slot of the engine, with the tokens its KV cache holds."""
  cached_ids: list[int] = dataclasses.field(default_factory=list)  # tokens in the KV cache
  request: Request | None = None
  position: int = -1  # where the last sampled token will be written
  last_used: int = 0
  stale: bool = False  # the weights changed mid-request: its cache is not reused afterwards


def common_prefix(a: list[int], b: list[int]) -> int:
  """How many leading tokens two sequences share."""
  n = min(len(a), len(b))
  if n == 0:
    return 0
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


def pick_dense_slot(slots: list[Slot], free: list[int], prompt: list[int]) -> tuple[int, int]:
  """The free slot whose cache shares the longest prefix with `prompt` (ties: the least recently
  used), else the least recently used one; and how many prompt tokens it reuses, never the
  last (it must be fed to sample the first new token)."""
  best, slot_id = max(((common_prefix(slots[i].cached_ids, prompt), i) for i in free),
                      key=lambda m: (m[0], -slots[m[1]].last_used))
  if best == 0:
    slot_id = min(free, key=lambda i: slots[i].last_used)
  return slot_id, min(best, len(prompt) - 1)
