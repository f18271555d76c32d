"""Sampler tests on plain arrays and a tiny random model: sampling rules, logprobs, masks,
seeds, and prefill/decode into cache rows against the full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trustee_jax.models import model_configs
from trustee_jax.models.transformer import KVCache, create_model
from trustee_jax.sampling import sampler

VOCAB = 64


def _rows(batch, temperature=1.0, top_p=1.0, top_k=0, penalty=0.0, seed=0, gen_index=0):
  full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (batch,))  # noqa: E731
  return sampler.RowSampling(temperature=full(temperature, jnp.float32),
                             top_p=full(top_p, jnp.float32), top_k=full(top_k, jnp.int32),
                             frequency_penalty=full(penalty, jnp.float32),
                             seed=full(seed, jnp.uint32), gen_index=full(gen_index, jnp.int32))


def _logits(batch, seed=0, scale=3.0):
  return jax.random.normal(jax.random.key(seed), (batch, VOCAB)) * scale


def _sample(logits, rows, counts=None, bitmask=None, use_filter=False, n_top=0):
  return jax.jit(sampler.sample_rows, static_argnames=("use_filter", "n_top"))(
      logits, rows, counts, bitmask, use_filter=use_filter, n_top=n_top)


def _pack(allowed: np.ndarray) -> np.ndarray:
  """bool [B, V] -> llguidance's int32 words: token i is bit i % 32 of word i // 32."""
  words = -(-allowed.shape[1] // 32)
  padded = np.zeros((allowed.shape[0], words * 32), bool)
  padded[:, :allowed.shape[1]] = allowed
  return np.packbits(padded, axis=1, bitorder="little").view("<i4")


def test_unpack_bitmask_matches_llguidance_layout():
  rng = np.random.default_rng(0)
  allowed = rng.random((3, 70)) < 0.4
  allowed[0, 31] = allowed[1, 63] = True  # sign bits of a word
  out = sampler.unpack_bitmask(jnp.asarray(_pack(allowed)), 70)
  np.testing.assert_array_equal(np.asarray(out), allowed)


def test_greedy_is_argmax_with_temperature_one_logprob():
  logits = _logits(5)
  toks, lps, _, _ = _sample(logits, _rows(5, temperature=0.0))
  np.testing.assert_array_equal(toks, np.argmax(logits, -1))
  np.testing.assert_allclose(lps, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprob_is_of_the_tempered_distribution_before_truncation(temperature):
  logits = _logits(8)
  rows = _rows(8, temperature=temperature, top_k=3, top_p=0.5, seed=jnp.arange(8))
  toks, lps, top_ids, top_lps = _sample(logits, rows, use_filter=True, n_top=4)
  want = jax.nn.log_softmax(logits / temperature)
  np.testing.assert_allclose(lps, want[jnp.arange(8), toks], atol=1e-6)
  ref_lp, ref_ids = jax.lax.top_k(want, 4)
  np.testing.assert_array_equal(top_ids, ref_ids)
  np.testing.assert_allclose(top_lps, ref_lp, atol=1e-6)


def _draws(logits_row, n, **kw):
  """n samples from one row, one seed each."""
  logits = jnp.broadcast_to(logits_row, (n, VOCAB))
  return np.asarray(_sample(logits, _rows(n, seed=jnp.arange(n), **kw),
                            use_filter=bool(kw.get("top_k") or kw.get("top_p", 1) < 1))[0])


def test_samples_follow_the_softmax():
  logits = _logits(1, seed=3, scale=1.0)[0]
  draws = _draws(logits, 20000, temperature=0.8)
  freq = np.bincount(draws, minlength=VOCAB) / len(draws)
  np.testing.assert_allclose(freq, jax.nn.softmax(logits / 0.8), atol=0.012)


def test_top_k_and_top_p_restrict_the_support():
  logits = _logits(1, seed=4, scale=1.0)[0]
  order = np.argsort(-np.asarray(logits))
  assert set(_draws(logits, 3000, top_k=5)) == set(order[:5])
  assert set(_draws(logits, 500, top_k=1)) == {order[0]}
  probs = np.asarray(jax.nn.softmax(logits))[order]
  p = float(probs[:3].sum()) - 1e-4  # the nucleus holds exactly the top three
  assert set(_draws(logits, 3000, top_p=p)) == set(order[:3])
  assert set(_draws(logits, 500, top_p=1e-6)) == {order[0]}
  both = _draws(logits, 3000, top_k=2, top_p=p)  # the tighter of the two wins
  assert set(both) == set(order[:2])


def test_frequency_penalty_lowers_counted_tokens():
  logits = _logits(2)
  best = np.argmax(logits, -1)
  counts = jnp.zeros((2, VOCAB), jnp.int32).at[jnp.arange(2), best].set(jnp.array([100, 0]))
  toks, lps, _, _ = _sample(logits, _rows(2, temperature=0.0, penalty=1.0), counts=counts)
  second = np.argsort(-np.asarray(logits[0]))[1]
  assert toks[0] == second and toks[1] == best[1]
  penalised = logits[0] - 100.0 * (jnp.arange(VOCAB) == best[0])
  np.testing.assert_allclose(lps[0], jax.nn.log_softmax(penalised)[second], atol=1e-5)


def test_bitmask_is_obeyed_and_renormalised():
  logits = _logits(4)
  rng = np.random.default_rng(1)
  allowed = rng.random((4, VOCAB)) < 0.2
  allowed[:, 0] = True
  mask = jnp.asarray(_pack(allowed))
  greedy, lp, _, _ = _sample(logits, _rows(4, temperature=0.0), bitmask=mask)
  masked = np.where(allowed, np.asarray(logits), -np.inf)
  np.testing.assert_array_equal(greedy, masked.argmax(-1))
  np.testing.assert_allclose(lp, jax.nn.log_softmax(jnp.asarray(masked))[jnp.arange(4), greedy],
                             atol=1e-6)
  for seed in range(20):
    toks, _, _, _ = _sample(logits, _rows(4, seed=seed), bitmask=mask)
    assert allowed[np.arange(4), np.asarray(toks)].all()


def test_seed_and_index_fix_the_draw_whatever_the_row():
  logits = jnp.broadcast_to(_logits(1, scale=0.5), (6, VOCAB))
  seeds = jnp.array([7, 7, 8, 7, 9, 7], jnp.uint32)
  index = jnp.array([0, 0, 0, 1, 0, 0], jnp.int32)
  rows = _rows(6).replace(seed=seeds, gen_index=index)
  toks = np.asarray(_sample(logits, rows)[0])
  assert toks[0] == toks[1] == toks[5]
  alone = _sample(logits[:1], _rows(1, seed=7))[0]
  assert toks[0] == int(alone[0])
  draws = {int(_sample(logits[:1], _rows(1, seed=7, gen_index=i))[0][0]) for i in range(30)}
  assert len(draws) > 5  # the index moves the key


@pytest.fixture(scope="module")
def tiny():
  cfg = model_configs.get_model_config("tiny-llama", vocab_size=VOCAB * 4,
                                       initializer_range=0.2)
  return create_model(cfg, seed=0)


def _reference_greedy(model, prompt, steps):
  """Greedy continuation by full forwards without a cache."""
  ids = list(prompt)
  for _ in range(steps):
    pos = jnp.arange(len(ids))[None]
    logits, _ = model(jnp.asarray([ids]), pos)
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids[len(prompt):]


@pytest.mark.parametrize("unstacked", [False, True])
def test_prefill_into_rows_then_decode_matches_full_forward(tiny, unstacked):
  cfg = tiny.cfg
  graphdef, state = nnx.split(tiny)
  slots, cache_len, width, steps = 4, 64, 16, 6
  cache = KVCache.zeros(cfg, slots, cache_len)
  counts = jnp.zeros((slots, cfg.vocab_size), jnp.int32).at[:, 3].set(5)
  prompts = [[5, 9, 2, 7, 1], [11, 4, 8, 3, 6, 10, 2, 12, 13]]
  rows_idx = [2, 0]  # out of order; slots 1 and 3 stay empty
  tokens = np.zeros((4, width), np.int32)  # padded to a group of 4 with row -1
  positions = np.full((4, width), -1, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    positions[i, :len(p)] = np.arange(len(p))
  rows = jnp.array(rows_idx + [-1, -1], jnp.int32)
  last = jnp.array([len(p) - 1 for p in prompts] + [0, 0], jnp.int32)
  greedy = _rows(4, temperature=0.0)
  cache, counts, out = sampler.prefill(
      graphdef, state, cache, counts, jnp.asarray(tokens), jnp.asarray(positions), rows, last,
      greedy, None, attend_len=cache_len, use_filter=False, n_top=0)
  first = np.asarray(out[0])[:2]
  np.testing.assert_array_equal(np.asarray(cache.k)[:, [1, 3]], 0)  # untouched slots
  c = np.asarray(counts)
  assert c[[1, 3], 3].tolist() == [5, 5]  # padded rows reset nothing
  assert c[2].sum() == 1 and c[2, first[0]] == 1  # a prefilled row restarts its counts

  # Decode only the two busy rows (out of slot order) plus one padding row (position -1).
  layers = sampler.unstack_layers(graphdef, state) if unstacked else None
  last_tok = jnp.array([int(t) for t in first] + [0], jnp.int32)
  pos = jnp.array([len(p) for p in prompts] + [-1], jnp.int32)
  cache, counts, outs = sampler.decode(
      graphdef, state, layers, cache, counts, jnp.array(rows_idx + [0], jnp.int32), last_tok,
      pos, _rows(3, temperature=0.0, gen_index=1), None, steps=steps, attend_len=32,
      use_filter=False, n_top=0, draw=False, use_penalty=True)
  toks = np.asarray(outs[0])
  for j, (p, t) in enumerate(zip(prompts, first)):
    assert [int(t)] + toks[j].tolist() == _reference_greedy(tiny, p, steps + 1)
  np.testing.assert_array_equal(np.asarray(cache.k)[:, [1, 3]], 0)
  assert np.asarray(counts)[2].sum() == steps + 1


def test_prefill_resets_counts_of_a_real_slot_zero_beside_padding(tiny):
  cfg = tiny.cfg
  graphdef, state = nnx.split(tiny)
  cache = KVCache.zeros(cfg, 4, 32)
  counts = jnp.full((4, cfg.vocab_size), 7, jnp.int32)
  tokens = jnp.ones((4, 16), jnp.int32)
  positions = jnp.where(jnp.arange(16) < 3, jnp.arange(16), -1)[None].repeat(4, 0)
  rows = jnp.array([2, 0, -1, -1], jnp.int32)
  _, counts, _ = sampler.prefill(
      graphdef, state, cache, counts, tokens, positions, rows, jnp.full((4,), 2, jnp.int32),
      _rows(4, temperature=0.0), None, attend_len=32, use_filter=False, n_top=0)
  c = np.asarray(counts)
  assert c[0].sum() == 1 and c[2].sum() == 1  # reset, then the sampled token counted
  assert (c[[1, 3]] == 7).all()
