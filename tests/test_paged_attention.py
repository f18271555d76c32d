"""The paged KV cache against the dense one: the same tokens through a tiny random GQA model
give the same logits, on staggered lengths, padding rows, shared prefix blocks and a
copied-on-write fork, for chunked prefill and decode (scanned and unrolled layers)."""
import jax.numpy as jnp
import numpy as np
import pytest

from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.paged_cache import PagedKVCache, copy_blocks
from trustee_jax.models.transformer import KVCache, create_model
from trustee_jax.sampling.kv_blocks import BlockAllocator

VOCAB, BS, NUM_BLOCKS, MAX_BLOCKS = 97, 4, 24, 6
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
  cfg = get_model_config("tiny-qwen3", vocab_size=VOCAB, initializer_range=0.2)
  assert cfg.num_heads > cfg.num_kv_heads  # grouped-query attention
  return create_model(cfg, seed=1)


def _tables(pool: BlockAllocator, seqs: list[int | None]) -> jnp.ndarray:
  """Block tables of the rows' sequences (None: a row holding no blocks)."""
  out = np.full((len(seqs), MAX_BLOCKS), NUM_BLOCKS, np.int32)
  for r, s in enumerate(seqs):
    if s is not None:
      t = pool.table(s)
      out[r, :len(t)] = t
  return jnp.asarray(out)


def _batch(rows: list[tuple[list[int], int] | None], width: int):
  """Right-padded tokens and positions [n, width] of (new tokens, first position) rows."""
  tokens = np.zeros((len(rows), width), np.int32)
  positions = np.full((len(rows), width), -1, np.int32)
  for i, row in enumerate(rows):
    if row is not None:
      new, start = row
      tokens[i, :len(new)] = new
      positions[i, :len(new)] = np.arange(start, start + len(new))
  return jnp.asarray(tokens), jnp.asarray(positions)


def _close(paged, dense, positions) -> None:
  valid = np.asarray(positions) >= 0
  got, want = np.asarray(paged)[valid], np.asarray(dense)[valid]
  assert np.max(np.abs(got - want)) <= TOL * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("unrolled", [False, True])
def test_paged_logits_equal_dense_logits(model, unrolled):
  rng = np.random.default_rng(0)
  p0 = rng.integers(0, VOCAB, 10).tolist()
  p1 = p0[:8] + rng.integers(0, VOCAB, 3).tolist()  # shares p0's first two blocks
  p2 = rng.integers(0, VOCAB, 3).tolist()
  layers = model.unstacked_layers() if unrolled else None
  pool = BlockAllocator(NUM_BLOCKS, BS)
  dense = KVCache.zeros(model.cfg, batch=4, length=MAX_BLOCKS * BS)
  paged = PagedKVCache.zeros(model.cfg, NUM_BLOCKS, BS, rows=4, max_blocks=MAX_BLOCKS)

  def both(tokens, positions, cache_rows, attend_len):
    nonlocal dense
    kw = {"cache_rows": jnp.asarray(cache_rows), "attend_len": attend_len, "layers": layers}
    want, dense = model(tokens, positions, dense, **kw)
    got, new_paged = model(tokens, positions, paged, **kw)
    _close(got, want, positions)
    return got, new_paged

  # Prefill of two staggered prompts and a padding row (its slot holds no blocks).
  assert pool.allocate(0, p0, 13) == 0 and pool.allocate(2, p2, 6) == 0
  paged = paged.replace(block_table=_tables(pool, [0, None, 2, None]))
  tokens, positions = _batch([(p0, 0), None, (p2, 0)], 12)
  _, paged = both(tokens, positions, [0, 1, 2], 14)  # 14: not a whole number of blocks
  pool.commit(0, p0)
  pool.commit(2, p2)

  # A prompt sharing p0's two full blocks prefills only its third; the dense row needs all.
  assert pool.allocate(1, p1, 14) == 8
  assert pool.table(1)[:2] == pool.table(0)[:2] and pool.usage().shared == 2
  paged = paged.replace(block_table=_tables(pool, [0, 1, 2, None]))
  kw = {"cache_rows": jnp.asarray([1]), "attend_len": 16, "layers": layers}
  want, dense = model(*_batch([(p1, 0)], 11), dense, **kw)
  tokens, positions = _batch([(p1[8:], 8)], 4)
  got, paged = model(tokens, positions, paged, **kw)
  _close(got[:, :3], want[:, 8:], positions[:, :3])
  pool.commit(1, p1[8:])

  # A fork of sequence 0 into row 3 shares its partly filled last block; writing copies it.
  pool.fork(0, 3)
  dense = dense.replace(k=dense.k.at[:, 3].set(dense.k[:, 0]),
                        v=dense.v.at[:, 3].set(dense.v[:, 0]))
  copies = pool.reserve(3, 13)
  assert len(copies) == 1 and pool.reserve(0, 13) == []
  src, dst = (jnp.asarray(c) for c in zip(*copies))
  paged = copy_blocks(paged, src, dst)

  # Decode, rows at staggered positions, the fork diverging from its parent, plus a padding row.
  seqs = {0: 10, 1: 11, 2: 3, 3: 10}
  paged = paged.replace(block_table=_tables(pool, [0, 1, 2, 3]))
  for step in range(3):
    toks = rng.integers(0, VOCAB, 5).tolist()
    rows = [([toks[s]], seqs[s]) for s in range(4)] + [None]
    tokens, positions = _batch(rows, 1)
    _, paged = both(tokens, positions, [0, 1, 2, 3, 0], 16)
    for s in range(4):
      pool.commit(s, [toks[s]])
      seqs[s] += 1
  assert pool.table(3)[:2] == pool.table(0)[:2] and pool.table(3)[2] != pool.table(0)[2]
  for s in range(4):
    pool.free(s)
  assert pool.usage().used == 0
