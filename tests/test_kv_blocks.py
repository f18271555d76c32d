"""The KV block allocator by hand-checked cases: growth, prefix sharing and its divergence,
reuse of freed blocks, copy-on-write, exhaustion, and refcounts under random operations."""
import numpy as np
import pytest

from trustee_jax.sampling.kv_blocks import BlockAllocator, BlockUsage, NoFreeBlocks

BS = 4


def _run(pool: BlockAllocator, seq_id, prompt, capacity) -> int:
  """Allocates a sequence and commits its uncached prompt tokens, as the engine's prefill does."""
  cached = pool.allocate(seq_id, prompt, capacity)
  pool.commit(seq_id, prompt[cached:])
  return cached


def test_a_sequence_grows_block_by_block_and_frees_everything():
  pool = BlockAllocator(8, BS)
  assert pool.allocate("a", [1, 2, 3], 3) == 0
  assert pool.table("a") == [0] and pool.usage() == BlockUsage(8, 1, 7, 0, 0)
  pool.commit("a", [1, 2, 3])
  assert pool.reserve("a", 4) == [] and pool.table("a") == [0]  # fits the first block
  pool.commit("a", [4])
  assert pool.reserve("a", 9) == [] and pool.table("a") == [0, 1, 2]
  pool.commit("a", [5, 6, 7, 8, 9])
  assert pool.num_committed("a") == 9
  with pytest.raises(ValueError, match="past its 3 reserved blocks"):
    pool.commit("a", [1, 2, 3, 4])
  pool.free("a")
  usage = pool.usage()
  assert (usage.used, usage.free, usage.cached) == (0, 8, 2)  # two full blocks stay cached
  assert all(pool.refcount(b) == 0 for b in range(8))
  with pytest.raises(KeyError, match="no sequence 'a'"):
    pool.table("a")


def test_prompts_share_full_blocks_up_to_the_first_difference():
  pool = BlockAllocator(16, BS)
  base = list(range(10, 22))  # three full blocks
  assert _run(pool, "a", base + [1, 2], 14) == 0
  # Same first two blocks, a different token in the third: two blocks shared.
  other = base[:8] + [99] + base[9:] + [5]
  assert _run(pool, "b", other, 13) == 8
  ta, tb = pool.table("a"), pool.table("b")
  assert tb[:2] == ta[:2] and tb[2] != ta[2]
  assert [pool.refcount(b) for b in ta] == [2, 2, 1, 1]
  assert pool.usage().shared == 2
  # Differing in the very first token: nothing shared.
  assert _run(pool, "c", [0] + base[1:], 12) == 0
  assert not set(pool.table("c")) & set(ta)
  for s in "abc":
    pool.free(s)
  assert pool.usage().used == 0 and pool.usage().shared == 0


def test_the_last_prompt_token_is_never_taken_from_the_cache():
  pool = BlockAllocator(8, BS)
  _run(pool, "a", list(range(8)), 8)
  # The whole prompt is two cached blocks, but its last token must be computed: one shared.
  assert pool.allocate("b", list(range(8)), 9) == BS
  assert pool.table("b")[0] == pool.table("a")[0] and pool.table("b")[1] != pool.table("a")[1]


def test_a_freed_sequence_leaves_its_prefix_for_the_next_turn():
  pool = BlockAllocator(4, BS)
  turn = list(range(9))
  _run(pool, "t1", turn, 10)
  pool.commit("t1", [100])  # a generated token's K/V
  first = pool.table("t1")
  pool.free("t1")
  assert pool.usage().cached == 2
  assert _run(pool, "t2", turn + [100, 7, 8], 12) == 8
  assert pool.table("t2")[:2] == first[:2]
  # An unrelated sequence takes the unkeyed block first, then evicts the oldest cached ones.
  pool.free("t2")
  assert _run(pool, "x", [50 + i for i in range(12)], 16) == 0
  assert pool.usage().cached == 0 and pool.usage().free == 0
  pool.free("x")
  assert pool.allocate("t3", turn + [100, 7, 8], 12) == 0  # the prefix was evicted


def test_identical_blocks_computed_twice_keep_one_key():
  pool = BlockAllocator(8, BS)
  pool.allocate("a", [1, 2, 3, 4, 5], 5)
  pool.allocate("b", [1, 2, 3, 4, 5], 5)  # admitted together: nothing cached yet
  pool.commit("a", [1, 2, 3, 4, 5])
  pool.commit("b", [1, 2, 3, 4, 5])
  assert pool.cached_prefix([1, 2, 3, 4, 9]) == [pool.table("a")[0]]
  pool.free("a")
  pool.free("b")
  assert pool.usage().cached == 1


def test_writing_into_a_shared_block_copies_it_first():
  pool = BlockAllocator(8, BS)
  _run(pool, "p", [1, 2, 3, 4, 5, 6], 6)
  pool.fork("p", "c")
  assert pool.table("c") == pool.table("p") and pool.usage().shared == 2
  # The child writes position 6, in the shared, partly filled second block: it gets a copy.
  copies = pool.reserve("c", 7)
  src, dst = pool.table("p")[1], pool.table("c")[1]
  assert copies == [(src, dst)] and src != dst
  assert pool.table("c")[0] == pool.table("p")[0]  # the full first block stays shared
  assert pool.refcount(src) == 1 and pool.refcount(dst) == 1
  # The parent now holds its block alone: no copy.
  assert pool.reserve("p", 7) == []
  pool.commit("c", [7])
  pool.commit("p", [8])
  pool.free("p")
  pool.free("c")
  assert pool.usage().used == 0


def test_exhaustion_raises_and_changes_nothing():
  pool = BlockAllocator(3, BS)
  _run(pool, "a", [1, 2, 3, 4, 5], 8)
  before = (pool.usage(), pool.table("a"))
  assert not pool.fits([9, 9], 8)
  with pytest.raises(NoFreeBlocks, match="needs 2 free KV blocks, the pool has 1 of 3"):
    pool.allocate("b", [9, 9], 8)
  with pytest.raises(NoFreeBlocks):
    pool.reserve("a", 20)
  assert (pool.usage(), pool.table("a")) == before
  with pytest.raises(KeyError):
    pool.table("b")
  assert pool.fits([1, 2, 3, 4, 5, 6], 8)  # shares the first block: one new one
  pool.free("a")
  assert pool.fits([9, 9], 12)


def test_a_cached_free_block_counts_against_the_pool_when_revived():
  pool = BlockAllocator(2, BS)
  _run(pool, "a", [1, 2, 3, 4, 5], 8)
  pool.free("a")
  assert pool.usage().free == 2
  assert pool.allocate("b", [1, 2, 3, 4, 5], 8) == BS  # revives the cached block, takes one
  assert pool.usage().free == 0


def test_weight_update_drops_the_prefix_cache():
  pool = BlockAllocator(8, BS)
  _run(pool, "a", list(range(6)), 12)
  pool.drop_prefix_cache()
  pool.commit("a", [6, 7])  # fills block two, but with K/V from old weights: not keyed
  pool.free("a")
  assert pool.usage().cached == 0 and pool.allocate("b", list(range(9)), 9) == 0


def test_refcounts_stay_consistent_under_random_operations():
  rng = np.random.default_rng(0)
  pool = BlockAllocator(24, BS)
  live: dict[int, int] = {}  # id -> capacity
  stems = rng.integers(0, 3, size=(3, 12)).tolist()  # shared prompt beginnings
  for step in range(600):
    op = rng.integers(4)
    if op == 0 or not live:
      stem = stems[rng.integers(3)][:rng.integers(0, 13)]
      prompt = stem + rng.integers(0, 3, size=rng.integers(1, 5)).tolist()
      cap = len(prompt) + int(rng.integers(0, 6))
      if pool.fits(prompt, cap):
        _run(pool, step, prompt, cap)
        live[step] = cap
      else:
        with pytest.raises(NoFreeBlocks):
          pool.allocate(step, prompt, cap)
    elif op == 1:
      sid = int(rng.choice(list(live)))
      pool.free(sid)
      del live[sid]
    elif op == 2:
      sid = int(rng.choice(list(live)))
      try:
        pool.reserve(sid, live[sid] + 1)
        live[sid] += 1
      except NoFreeBlocks:
        pass
      room = live[sid] - pool.num_committed(sid)
      pool.commit(sid, [int(t) for t in rng.integers(0, 3, size=rng.integers(0, room + 1))])
    else:
      sid = int(rng.choice(list(live)))
      pool.fork(sid, step)
      live[step] = pool.num_committed(sid)  # a fork holds only the parent's filled blocks
    holders = np.zeros(24, np.int32)
    for sid in live:
      np.add.at(holders, pool.table(sid), 1)
    assert [pool.refcount(b) for b in range(24)] == holders.tolist()
    usage = pool.usage()
    assert usage.used == int(np.sum(holders > 0)) and usage.shared == int(np.sum(holders > 1))
  for sid in list(live):
    pool.free(sid)
  assert pool.usage().used == 0 and all(pool.refcount(b) == 0 for b in range(24))
