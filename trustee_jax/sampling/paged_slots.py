"""The engine's slots over one paged KV block pool (Engine(kv_layout="paged")): admission by
free blocks, the slots' block tables on host and device, and prefix sharing between requests.

Each slot is a row of block tables; a request admitted to a slot gets blocks for its prompt
and its max_new_tokens at once (so a running request never runs out), sharing the full prompt
blocks another sequence already computed. A request whose next uncomputed prefix block is being
computed by a request admitted in the same step waits one step, then shares it: the G episodes
of a task, submitted together, prefill their common prefix once.
"""
import jax.numpy as jnp
import numpy as np

from trustee_jax.models.paged_cache import PagedKVCache
from trustee_jax.sampling.kv_blocks import BlockAllocator, BlockUsage


class PagedSlots:
  """Block tables of `num_slots` slots of up to `cache_len` positions over `num_blocks` blocks."""

  def __init__(self, cfg, *, num_slots: int, cache_len: int, block_size: int, num_blocks: int):
    if cache_len % block_size:
      raise ValueError(f"cache_len {cache_len} must be a multiple of block_size {block_size}")
    self.cfg, self.num_slots = cfg, num_slots
    self.block_size, self.num_blocks = block_size, num_blocks
    self.max_blocks = cache_len // block_size
    self.reset()

  def reset(self) -> None:
    """An empty pool (at start, and after a failed step left the device cache undefined)."""
    self.pool = BlockAllocator(self.num_blocks, self.block_size)
    self._tables = np.full((self.num_slots, self.max_blocks), self.num_blocks, np.int32)
    self._dirty = True
    self._drop_prefixes = False
    self._usage = self.pool.usage()

  def new_cache(self) -> PagedKVCache:
    """A zero block pool with every slot's table empty."""
    return PagedKVCache.zeros(self.cfg, self.num_blocks, self.block_size, self.num_slots,
                              self.max_blocks)

  def blocks_for(self, num_tokens: int) -> int:
    return self.pool.blocks_for(num_tokens)

  def usage(self) -> BlockUsage:
    """Occupancy as of the last admission or release: a snapshot, so other threads may read
    it while the engine thread changes the pool."""
    return self._usage

  def drop_prefixes_later(self) -> None:
    """Asks the engine thread to forget the cached prefixes before its next admission (the
    weights changed); only that thread touches the pool."""
    self._drop_prefixes = True

  def admit(self, slot_id: int, prompt: list[int], num_tokens: int,
            computing: set[bytes]) -> int | None:
    """Gives slot `slot_id` blocks for `num_tokens` positions; returns the prompt tokens found
    computed, or None (nothing changed) when the pool is short or the request should wait for
    a prefix block in `computing` (blocks the step's earlier admissions compute, which this
    call extends)."""
    if self._drop_prefixes:
      self.pool.drop_prefix_cache()
      self._drop_prefixes = False
    keys = self.pool.prefix_keys(prompt)
    hits = len(self.pool.cached_prefix(prompt))
    if (hits < len(keys) and keys[hits] in computing) or not self.pool.fits(prompt, num_tokens):
      return None
    cached = self.pool.allocate(slot_id, prompt, num_tokens)
    computing.update(keys[hits:])
    table = self.pool.table(slot_id)
    self._tables[slot_id, :len(table)] = table
    self._dirty = True
    self._usage = self.pool.usage()
    return cached

  def commit(self, slot_id: int, token_ids: list[int]) -> None:
    """Records tokens whose K/V the step wrote (their full blocks become shareable)."""
    self.pool.commit(slot_id, token_ids)

  def release(self, slot_id: int) -> None:
    """Frees a finished, cancelled or failed slot's blocks (a slot holding none is left)."""
    if self._tables[slot_id, 0] == self.num_blocks:
      return
    self.pool.free(slot_id)
    self._tables[slot_id] = self.num_blocks
    self._dirty = True
    self._usage = self.pool.usage()

  def with_tables(self, cache: PagedKVCache) -> PagedKVCache:
    """The cache with the slots' current block tables on the device."""
    if not self._dirty:
      return cache
    self._dirty = False
    return cache.replace(block_table=jnp.asarray(self._tables))

