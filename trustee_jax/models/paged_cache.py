"""A paged KV cache: fixed-size blocks shared by all sequences, found through per-row block
tables; the gather-based XLA path (any backend, what the tests check against the dense cache).

Keys and values are [layers, num_blocks, block_size, kv_heads, head_dim]. Row r's token at
position p lives in block `block_table[r, p // block_size]` at offset `p % block_size`; gathering
a row's blocks in table order therefore lays its keys out by position, exactly as the dense
cache does, so the dense cache's position mask applies unchanged. A table entry equal to
`num_blocks` (NO_BLOCK's stand-in) is unallocated: writes through it are dropped and reads of it
are zeros, which the mask never lets a query see (the positions lie past the row's length).
"""
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class PagedKVCache:
  """Block pool k/v [layers, num_blocks, block_size, kv_heads, head_dim] and the block tables
  [rows, max_blocks] (int32, `num_blocks` where unallocated) of the rows that use it."""
  k: Array
  v: Array
  block_table: Array

  @classmethod
  def zeros(cls, cfg, num_blocks: int, block_size: int, rows: int, max_blocks: int,
            dtype=None) -> "PagedKVCache":
    """A zero pool with every table entry unallocated; `cfg` is the model's ModelConfig."""
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    make = jax.jit(lambda: jnp.zeros(shape, dtype))
    return cls(k=make(), v=make(),
               block_table=jnp.full((rows, max_blocks), num_blocks, jnp.int32))

  @property
  def num_blocks(self) -> int:
    return self.k.shape[1]

  @property
  def block_size(self) -> int:
    return self.k.shape[2]

  @property
  def length(self) -> int:
    """The most positions a row's table reaches."""
    return self.block_table.shape[1] * self.block_size


def write_and_gather(ck: Array, cv: Array, layer, tables: Array, positions: Array, k: Array,
                     v: Array, attend_len: int) -> tuple[Array, Array, Array, Array]:
  """Writes new keys/values k, v [B, T, KV, D] of one layer at `positions` [B, T] (-1: padding,
  dropped) through `tables` [B, max_blocks], then gathers each row's first `attend_len`
  positions. Returns the pools and the row keys/values [B, attend_len, KV, D]."""
  num_blocks, block_size = ck.shape[1], ck.shape[2]
  block_index = jnp.where(positions >= 0, positions // block_size, tables.shape[1])
  blocks = jnp.take_along_axis(tables, block_index, axis=1, mode="fill",
                               fill_value=num_blocks)  # [B, T]; num_blocks: dropped
  offsets = jnp.where(positions >= 0, positions % block_size, 0)
  ck = ck.at[layer, blocks, offsets].set(k.astype(ck.dtype), mode="drop")
  cv = cv.at[layer, blocks, offsets].set(v.astype(cv.dtype), mode="drop")
  n = -(-attend_len // block_size)
  read = tables[:, :n]
  gather = lambda pool: jnp.take(pool[layer], read, axis=0, mode="fill", fill_value=0).reshape(
      read.shape[0], n * block_size, *pool.shape[3:])[:, :attend_len]  # noqa: E731
  return ck, cv, gather(ck), gather(cv)


def copy_blocks(cache: PagedKVCache, sources: Array, destinations: Array) -> PagedKVCache:
  """Copies whole blocks (every layer) `sources` [n] to `destinations` [n]: the device half of
  copy-on-write."""
  return cache.replace(k=cache.k.at[:, destinations].set(cache.k[:, sources]),
                       v=cache.v.at[:, destinations].set(cache.v[:, sources]))
