"""Host-side allocator of fixed-size KV-cache blocks: a free list, refcounts, per-sequence block
tables, prefix sharing by chained block hashes (vLLM's prefix caching) and copy-on-write.

A sequence's token at position p lives in block `table[p // block_size]` at offset
`p % block_size`. A block whose every slot holds committed K/V is full; its key is a hash of all
the token ids up to and including it, so a later sequence whose prompt starts with the same
tokens shares it instead of recomputing it. A freed block keeps its key until it is handed out
again (blocks freed longest ago first), so a conversation's next turn finds its last turn's
blocks. A block is shared (refcount > 1) only by prefix matches, which are full blocks no one
writes again, or by `fork`; writing into a shared block first copies it (`reserve` returns the
copies for the device to make).
"""
import collections
import dataclasses
import hashlib
from collections.abc import Hashable, Sequence

import numpy as np


class NoFreeBlocks(RuntimeError):
  """The pool has too few free blocks for the request; nothing was changed."""


@dataclasses.dataclass(frozen=True)
class BlockUsage:
  """Occupancy of the pool: used (held by a live sequence), free (of which `cached` still hold
  a reusable prefix) and shared (held by more than one live sequence)."""
  total: int
  used: int
  free: int
  cached: int
  shared: int


@dataclasses.dataclass
class _Sequence:
  table: list[int]
  tokens: list[int]  # token ids whose K/V are written, position by position
  keys: list[bytes]  # chain keys of the full blocks, table order
  keyable: bool = True  # False once the prefix cache was dropped while the sequence lived


def block_key(parent: bytes, block_tokens: Sequence[int]) -> bytes:
  """The key of a full block: sha256 of its parent's key and its token ids."""
  return hashlib.sha256(parent + np.asarray(block_tokens, np.int64).tobytes()).digest()


class BlockAllocator:
  """Hands out `num_blocks` blocks of `block_size` tokens to sequences named by any hashable id."""

  def __init__(self, num_blocks: int, block_size: int):
    if num_blocks < 1 or block_size < 1:
      raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
    self.num_blocks, self.block_size = num_blocks, block_size
    self._ref = np.zeros(num_blocks, np.int32)
    # Free blocks in hand-out order: unkeyed ones first, then keyed ones freed longest ago.
    self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
        range(num_blocks))
    self._key_of: dict[int, bytes] = {}
    self._block_of: dict[bytes, int] = {}
    self._seqs: dict[Hashable, _Sequence] = {}

  # ---- queries ------------------------------------------------------------------------

  def blocks_for(self, num_tokens: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // self.block_size)

  def table(self, seq_id: Hashable) -> list[int]:
    """The sequence's block ids, in position order."""
    return list(self._seq(seq_id).table)

  def num_committed(self, seq_id: Hashable) -> int:
    """Positions of the sequence whose K/V are written."""
    return len(self._seq(seq_id).tokens)

  def refcount(self, block: int) -> int:
    return int(self._ref[block])

  def usage(self) -> BlockUsage:
    free = len(self._free)
    keyed = np.fromiter(self._key_of, np.int64, len(self._key_of))
    return BlockUsage(total=self.num_blocks, used=self.num_blocks - free, free=free,
                      cached=int(np.sum(self._ref[keyed] == 0)),
                      shared=int(np.sum(self._ref > 1)))

  def prefix_keys(self, prompt: Sequence[int]) -> list[bytes]:
    """The keys of the full blocks of `prompt[:-1]`: the blocks a sequence could share (its
    last prompt token is always left to compute, since sampling needs its logits)."""
    keys, parent = [], b""
    for start in range(0, len(prompt) - self.block_size, self.block_size):
      parent = block_key(parent, prompt[start:start + self.block_size])
      keys.append(parent)
    return keys

  def cached_prefix(self, prompt: Sequence[int]) -> list[int]:
    """The blocks of the longest run of `prefix_keys(prompt)` already in the pool."""
    blocks = []
    for key in self.prefix_keys(prompt):
      block = self._block_of.get(key)
      if block is None:
        break
      blocks.append(block)
    return blocks

  def fits(self, prompt: Sequence[int], num_tokens: int) -> bool:
    """Whether `allocate(_, prompt, num_tokens)` would find room now."""
    return self._new_blocks_needed(self.cached_prefix(prompt), num_tokens) <= len(self._free)

  # ---- changes ------------------------------------------------------------------------

  def allocate(self, seq_id: Hashable, prompt: Sequence[int], num_tokens: int) -> int:
    """Starts a sequence with room for `num_tokens` positions, sharing the cached full blocks
    its prompt starts with; returns how many prompt tokens those hold (already computed).
    Raises NoFreeBlocks, changing nothing, when the pool is short."""
    if seq_id in self._seqs:
      raise ValueError(f"sequence {seq_id!r} already holds blocks")
    shared = self.cached_prefix(prompt)
    if num_tokens < len(shared) * self.block_size:
      raise ValueError(f"num_tokens {num_tokens} is below the cached prefix it would share")
    self._check_room(self._new_blocks_needed(shared, num_tokens), seq_id)
    for block in shared:
      self._take(block)
    n_cached = len(shared) * self.block_size
    self._seqs[seq_id] = _Sequence(table=list(shared), tokens=list(prompt[:n_cached]),
                                   keys=[self._key_of[b] for b in shared])
    self.reserve(seq_id, num_tokens)
    return n_cached

  def reserve(self, seq_id: Hashable, num_tokens: int) -> list[tuple[int, int]]:
    """Grows the sequence's table to hold `num_tokens` positions and gives it its own copy of
    every shared block it will write into; returns those copies as (source, destination)
    blocks, which the caller must copy on the device before writing. Raises NoFreeBlocks,
    changing nothing, when the pool is short."""
    seq = self._seq(seq_id)
    first_written = len(seq.tokens) // self.block_size
    to_copy = [i for i in range(first_written, len(seq.table)) if self._ref[seq.table[i]] > 1]
    grow = max(0, self.blocks_for(num_tokens) - len(seq.table))
    self._check_room(grow + len(to_copy), seq_id)
    copies = []
    for i in to_copy:
      source, seq.table[i] = seq.table[i], self._pop_free()
      self._release(source)
      copies.append((source, seq.table[i]))
    seq.table.extend(self._pop_free() for _ in range(grow))
    return copies

  def commit(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
    """Records that the K/V of `token_ids` (the sequence's next positions) are written; each
    block this fills becomes reusable under its key."""
    seq = self._seq(seq_id)
    end = len(seq.tokens) + len(token_ids)
    if end > len(seq.table) * self.block_size:
      raise ValueError(f"sequence {seq_id!r}: committing up to position {end} past its "
                       f"{len(seq.table)} reserved blocks")
    seq.tokens.extend(int(t) for t in token_ids)
    while seq.keyable and len(seq.keys) < end // self.block_size:
      i = len(seq.keys)
      key = block_key(seq.keys[-1] if seq.keys else b"",
                      seq.tokens[i * self.block_size:(i + 1) * self.block_size])
      seq.keys.append(key)
      block = seq.table[i]
      if key not in self._block_of and block not in self._key_of:  # first to compute it
        self._block_of[key], self._key_of[block] = block, key

  def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
    """Starts `child_id` as a copy of `parent_id` that shares the blocks holding its committed
    tokens, the partly filled last one included (copied when either writes into it); the
    child reserves its own room beyond them."""
    if child_id in self._seqs:
      raise ValueError(f"sequence {child_id!r} already holds blocks")
    parent = self._seq(parent_id)
    table = parent.table[:self.blocks_for(len(parent.tokens))]
    for block in table:
      self._take(block)
    self._seqs[child_id] = _Sequence(table=list(table), tokens=list(parent.tokens),
                                     keys=list(parent.keys), keyable=parent.keyable)

  def free(self, seq_id: Hashable) -> None:
    """Ends a sequence; its blocks no one else holds go back to the pool, keyed ones still
    reusable until handed out again (its last blocks first)."""
    for block in reversed(self._seq(seq_id).table):
      self._release(block)
    del self._seqs[seq_id]

  def drop_prefix_cache(self) -> None:
    """Forgets every block key (after a weight update the cached K/V are stale); live
    sequences stop registering their blocks."""
    self._key_of.clear()
    self._block_of.clear()
    for seq in self._seqs.values():
      seq.keyable = False

  # ---- internals ----------------------------------------------------------------------

  def _seq(self, seq_id: Hashable) -> _Sequence:
    try:
      return self._seqs[seq_id]
    except KeyError:
      raise KeyError(f"no sequence {seq_id!r} holds blocks") from None

  def _new_blocks_needed(self, shared: list[int], num_tokens: int) -> int:
    """Free blocks a sequence sharing `shared` takes: its new ones plus shared ones now free."""
    revived = sum(block in self._free for block in shared)
    return max(0, self.blocks_for(num_tokens) - len(shared)) + revived

  def _check_room(self, needed: int, seq_id: Hashable) -> None:
    if needed > len(self._free):
      raise NoFreeBlocks(f"sequence {seq_id!r} needs {needed} free KV blocks, the pool has "
                         f"{len(self._free)} of {self.num_blocks} (block size "
                         f"{self.block_size})")

  def _take(self, block: int) -> None:
    """Adds a holder to a block (reviving it from the free list if it was free)."""
    self._free.pop(block, None)
    self._ref[block] += 1

  def _pop_free(self) -> int:
    """A free block for new content: its old key, if any, is forgotten."""
    block, _ = self._free.popitem(last=False)
    key = self._key_of.pop(block, None)
    if key is not None:
      del self._block_of[key]
    self._ref[block] = 1
    return block

  def _release(self, block: int) -> None:
    if self._ref[block] <= 0:
      raise AssertionError(f"block {block} released with refcount {self._ref[block]}")
    self._ref[block] -= 1
    if self._ref[block] == 0:
      self._free[block] = None
      if block not in self._key_of:  # nothing to reuse: hand it out first
        self._free.move_to_end(block, last=False)
