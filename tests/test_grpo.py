"""Tests for trustee_jax.grpo: hand-computed advantages, turn modes, clipping, KL, aggregation,
micro-batch invariance, chunked log-probs, and parity with verl's formulas transcribed in NumPy."""
import collections
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from trustee_jax import config_files, grpo

ADV = jax.jit(grpo.group_advantages, static_argnums=(3, 4))
LOSS = jax.jit(grpo.policy_loss, static_argnums=4)


def _adv(rewards, groups, valid=None, **kw):
  r = jnp.asarray(rewards, jnp.float32)
  valid = jnp.ones(r.shape, bool) if valid is None else jnp.asarray(valid, bool)
  return np.asarray(ADV(r, jnp.asarray(groups), valid, grpo.GRPOConfig(**kw), None))


# ---- group advantages --------------------------------------------------------------------------

def test_group_advantages_hand_computed():
  # Group [1, 0, 1]: mean 2/3, Bessel std sqrt(1/3): A = (1/3)/sqrt(1/3), -(2/3)/sqrt(1/3).
  s = math.sqrt(1 / 3) + 1e-6
  np.testing.assert_allclose(_adv([1, 0, 1], [0, 0, 0]), [1 / 3 / s, -2 / 3 / s, 1 / 3 / s],
                             rtol=1e-6)
  # Population std sqrt(2/9).
  p = math.sqrt(2 / 9) + 1e-6
  np.testing.assert_allclose(_adv([1, 0, 1], [0, 0, 0], bessel=False),
                             [1 / 3 / p, -2 / 3 / p, 1 / 3 / p], rtol=1e-6)
  # No std division (Dr.GRPO): r - mean.
  np.testing.assert_allclose(_adv([1, 0, 1, -1, 1], [0, 0, 0, 1, 1], adv_std_normalize=False),
                             [1 / 3, -2 / 3, 1 / 3, -1, 1], rtol=1e-6)


def test_groups_are_independent_and_invalid_members_are_ignored():
  a = _adv([1, -1, 5, 1, -1, 100], [0, 0, 0, 1, 1, 1], valid=[1, 1, 0, 1, 1, 0])
  e = 1 / (math.sqrt(2) + 1e-6)
  np.testing.assert_allclose(a, [e, -e, 0, e, -e, 0], rtol=1e-6)


def test_all_equal_rewards_give_exactly_zero():
  a = _adv([0.1, 0.1, 0.1, 0.7, 0.7], [0, 0, 0, 1, 1])
  assert np.all(a == 0.0)


@pytest.mark.parametrize("mode,expected", [("zero", [0.0, 0.0]),
                                           ("reward", [0.5 / (1 + 1e-6), -1 / (1 + 1e-6)])])
def test_single_survivor(mode, expected):
  a = _adv([0.5, 9, -1, 9], [0, 0, 1, 1], valid=[1, 0, 1, 0], single_survivor=mode)
  np.testing.assert_allclose(a[[0, 2]], expected, rtol=1e-7)
  assert a[1] == 0 and a[3] == 0


def test_group_ids_out_of_range_are_loud():
  with pytest.raises(ValueError, match="group_ids"):
    grpo.group_advantages(jnp.ones(2), jnp.array([0, 2]), jnp.ones(2, bool), grpo.GRPOConfig(), 2)


def test_group_metrics():
  cfg = grpo.GRPOConfig()
  m = grpo.group_metrics(jnp.array([1., 1, 0, 1, 0, 1]), jnp.array([0, 0, 1, 1, 2, 3]),
                         jnp.array([1, 1, 1, 1, 1, 0], bool), cfg)
  assert float(m["reward/groups"]) == 3 and float(m["reward/single_survivor_groups"]) == 1
  assert float(m["reward/zero_variance_frac"]) == pytest.approx(0.5)  # group 0 flat, group 1 not
  assert float(m["reward/group_std"]) == pytest.approx(math.sqrt(0.5) / 2)
  assert float(m["reward/mean"]) == pytest.approx(0.6)


# ---- turn-level modes --------------------------------------------------------------------------

T_VALUES = [-1.0, 0.0, 0.5, 1.0]
TURN_EXPECTED = {  # rows: A = 2, A = -2, A = 0; columns: t in T_VALUES
    "uniform": [[2, 2, 2, 2], [-2, -2, -2, -2], [0, 0, 0, 0]],
    "sign": [[0, 0, 2, 2], [-2, 0, 0, 0], [0, 0, 0, 0]],
    "relu": [[0, 0, 1, 2], [2, 0, 0, 0], [0, 0, 0, 0]],
    "linear": [[-2, 0, 1, 2], [2, 0, -1, -2], [0, 0, 0, 0]],
    "sign-linear": [[0, 1, 1.5, 2], [-2, -1, -0.5, 0], [0, 0, 0, 0]],
    "abs-linear": [[2, 0, 1, 2], [-2, 0, -1, -2], [0, 0, 0, 0]],
    "relu-abs": [[0, 0, 1, 2], [-2, 0, 0, 0], [0, 0, 0, 0]],
}


@pytest.mark.parametrize("mode", grpo.TURN_MODES)
def test_turn_modes_hand_computed(mode):
  adv = jnp.array([2.0, -2.0, 0.0])
  t = jnp.tile(jnp.array(T_VALUES), (3, 1))
  out = jax.jit(grpo.token_advantages, static_argnums=3)(adv, t, jnp.ones((3, 4)), mode)
  np.testing.assert_allclose(out, TURN_EXPECTED[mode])
  masked = grpo.token_advantages(adv, t, jnp.zeros((3, 4)), mode)
  assert np.all(np.asarray(masked) == 0)


def test_safe_modes_never_flip_the_sign_and_unsafe_ones_do():
  a = jnp.repeat(jnp.linspace(-2, 2, 9), 1)
  t = jnp.tile(jnp.linspace(-1, 1, 11), (9, 1))
  for mode in grpo.TURN_MODES:
    out = np.asarray(grpo.token_advantages(a, t, jnp.ones_like(t), mode))
    flipped = np.any(out * np.asarray(a)[:, None] < 0)
    assert flipped == (mode not in grpo.SIGN_SAFE_TURN_MODES), mode


# ---- policy loss: clipping, KL, aggregation ----------------------------------------------------

def _one_token_loss(a, ratio, **kw):
  cfg = grpo.GRPOConfig(kl_beta=0.0, **kw)
  new = jnp.array([[math.log(ratio)]])
  fn = lambda n: LOSS(n, jnp.zeros((1, 1)), jnp.array([[a]]), jnp.ones((1, 1)), cfg)
  (loss, m), g = jax.value_and_grad(fn, has_aux=True)(new)
  return float(loss), grpo.finalize_metrics(m), float(g[0, 0])


def test_clip_high_side():
  loss, m, g = _one_token_loss(1.0, 1.5)
  assert loss == pytest.approx(-1.2) and g == 0.0
  assert float(m["clip_frac_high"]) == 1 and float(m["clip_frac_low"]) == 0
  loss, _, _ = _one_token_loss(1.0, 1.5, clip_high=0.28)  # asymmetric (DAPO-style)
  assert loss == pytest.approx(-1.28)
  loss, m, g = _one_token_loss(1.0, 0.5)  # below 1 - eps with A > 0: not clipped
  assert loss == pytest.approx(-0.5) and g == pytest.approx(-0.5)
  assert float(m["clip_frac"]) == 0


def test_clip_low_side():
  loss, m, g = _one_token_loss(-1.0, 0.5)
  assert loss == pytest.approx(0.8) and g == 0.0
  assert float(m["clip_frac_low"]) == 1 and float(m["dual_clip_frac"]) == 0
  loss, _, g = _one_token_loss(-1.0, 1.5)  # above 1 + eps with A < 0: not clipped, 1.5 < c
  assert loss == pytest.approx(1.5) and g == pytest.approx(1.5)


def test_dual_clip():
  loss, m, g = _one_token_loss(-1.0, 5.0)
  assert loss == pytest.approx(3.0) and g == 0.0 and float(m["dual_clip_frac"]) == 1
  loss, m, _ = _one_token_loss(-1.0, 5.0, dual_clip_c=None)
  assert loss == pytest.approx(5.0) and float(m["dual_clip_frac"]) == 0
  loss, _, _ = _one_token_loss(1.0, 5.0)  # A > 0 is never dual-clipped
  assert loss == pytest.approx(-1.2)


def test_log_ratio_clip_before_exp():
  loss, _, _ = _one_token_loss(-1.0, math.exp(25.0), dual_clip_c=None)
  assert loss == pytest.approx(math.exp(20.0), rel=1e-5)


def test_kl_k3_hand_computed_and_clipped():
  new, ref = jnp.array([0.0, 0.0, 0.0]), jnp.array([math.log(2.0), -1.0, 30.0])
  kl = np.asarray(grpo.kl_penalty(new, ref, "k3"))
  np.testing.assert_allclose(kl[:2], [2 - math.log(2) - 1, math.exp(-1) + 1 - 1], rtol=1e-6)
  assert kl[2] == 10.0
  np.testing.assert_allclose(grpo.kl_penalty(new, ref, "k1"), -np.asarray(ref))
  np.testing.assert_allclose(grpo.kl_penalty(new, ref, "k2"), 0.5 * np.asarray(ref) ** 2, rtol=1e-6)
  # In the loss: beta * KL on top of pg; skipped without a reference.
  cfg = grpo.GRPOConfig(kl_beta=0.5)
  ones = jnp.ones((1, 2))
  lp_ref = jnp.array([[math.log(2.0), -1.0]])
  loss, m = LOSS(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), ones, cfg, lp_ref)
  assert float(loss) == pytest.approx(0.5 * np.mean(kl[:2]), rel=1e-6)
  assert float(m["kl_loss"]) == pytest.approx(np.mean(kl[:2]), rel=1e-6)
  loss, m = LOSS(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), ones, cfg)
  assert float(loss) == 0.0 and "kl_loss" not in m


# pg = -A when ratio == 1: sequence 1 has token losses 1, 2, 3; sequence 2 has 4 then padding.
AGG_ADV = -jnp.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
AGG_MASK = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("agg,expected", [("token-mean", 10 / 4), ("seq-mean-token-mean", 3.0),
                                          ("drgrpo", 10 / (2 * 10))])
def test_aggregation_modes(agg, expected):
  cfg = grpo.GRPOConfig(agg=agg, drgrpo_max_tokens=10, kl_beta=0.0)
  z = jnp.zeros((2, 3))
  loss, _ = LOSS(z, z, AGG_ADV, AGG_MASK, cfg)
  assert float(loss) == pytest.approx(expected)


def test_seq_mean_token_mean_is_the_references_one_sequence_micro_batches():
  """The reference run: verl's token-mean over micro-batches of one sequence (a GPU), each
  scaled by 1/(micro-batches), summed; long episodes weigh no more than short ones."""
  cfg = grpo.GRPOConfig(agg="seq-mean-token-mean", kl_beta=0.0)
  lengths = (3, 1, 2)
  mask = jnp.array([[1.0] * n + [0.0] * (3 - n) for n in lengths])
  adv = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 7.0, 0.0]])
  pg = -adv  # at ratio 1
  verl = sum(float((pg[i] * mask[i]).sum() / mask[i].sum()) / 3 for i in range(3))
  z = jnp.zeros((3, 3))
  loss, _ = LOSS(z, z, adv, mask, cfg)
  assert float(loss) == pytest.approx(verl) == -(6 / 3 + 4 + 12 / 2) / 3
  token_mean, _ = LOSS(z, z, adv, mask, grpo.GRPOConfig(agg="token-mean", kl_beta=0.0))
  assert float(token_mean) == pytest.approx(-22 / 6)  # the old paper setting: not the same
  paper = config_files.get_config(str(pathlib.Path(__file__).parents[1] / "configs" /
                                      "trustee_paper.py"))
  assert paper.grpo.agg == "seq-mean-token-mean"


def test_entropy_bonus_and_garbage_in_masked_positions():
  cfg = grpo.GRPOConfig(entropy_coef=0.1, kl_beta=0.0)
  ent = jnp.array([[1.0, 2.0, 3.0], [4.0, jnp.nan, jnp.inf]])
  junk = jnp.array([[0.0, 0.0, 0.0], [0.0, jnp.inf, -jnp.inf]])
  fn = lambda n: LOSS(n, jnp.zeros((2, 3)), AGG_ADV, AGG_MASK, cfg, None, ent)
  (loss, m), g = jax.value_and_grad(fn, has_aux=True)(junk)
  assert float(loss) == pytest.approx(2.5 - 0.1 * 2.5)
  assert float(grpo.finalize_metrics(m)["entropy_mean"]) == pytest.approx(2.5)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1, 1:] == 0)


def test_config_from_dict_and_validation():
  cfg = grpo.GRPOConfig.from_dict(ml_collections.ConfigDict(
      dict(clip_high=0.28, turn_mode="sign-linear", dual_clip_c=None)))
  assert cfg.clip_high == 0.28 and cfg.dual_clip_c is None
  hash(cfg)
  for bad in ({"turn_mode": "x"}, {"agg": "drgrpo"}, {"dual_clip_c": 0.5}, {"single_survivor": "r"}):
    with pytest.raises(ValueError):
      grpo.GRPOConfig(**bad)
  with pytest.raises(ValueError, match="unknown GRPO config keys"):
    grpo.GRPOConfig.from_dict({"clip": 0.2})


# ---- micro-batch invariance --------------------------------------------------------------------

def _random_unit(seed, n=8, t=6):
  k = jax.random.split(jax.random.key(seed), 6)
  old = -jax.random.uniform(k[0], (n, t), minval=0.1, maxval=3.0)
  new = old + 0.4 * jax.random.normal(k[1], (n, t))
  ref = old + 0.3 * jax.random.normal(k[2], (n, t))
  adv = jax.random.normal(k[3], (n, t))
  mask = (jax.random.uniform(k[4], (n, t)) < 0.7).astype(jnp.float32).at[2].set(0.0)
  ent = jax.random.uniform(k[5], (n, t), maxval=4.0)
  return new, old, ref, adv, mask, ent


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_micro_batch_invariance(agg):
  cfg = grpo.GRPOConfig(agg=agg, drgrpo_max_tokens=16, entropy_coef=0.01, kl_beta=0.1)
  new, old, ref, adv, mask, ent = _random_unit(0)
  norm = grpo.loss_normaliser(mask, cfg)

  def unit_loss(lp, rows):
    sl = slice(*rows)
    return grpo.policy_loss(lp, old[sl], adv[sl], mask[sl], cfg, ref[sl], ent[sl], norm)

  grad = jax.jit(jax.value_and_grad(unit_loss, has_aux=True), static_argnums=1)
  (whole, m_whole), g_whole = grad(new, (0, 8))
  parts = [grad(new[i:i + 2], (i, i + 2)) for i in range(0, 8, 2)]
  assert sum(float(p[0][0]) for p in parts) == pytest.approx(float(whole), abs=1e-6)
  np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), g_whole, atol=1e-6)
  summed = jax.tree.map(lambda *x: sum(x), *[p[0][1] for p in parts])
  for k, v in grpo.finalize_metrics(m_whole).items():
    assert float(grpo.finalize_metrics(summed)[k]) == pytest.approx(float(v), abs=1e-5), k


# ---- chunked log-probs -------------------------------------------------------------------------

def _dense(h, w, tg, temp):
  logp = jax.nn.log_softmax(jnp.einsum("ntd,dv->ntv", h, w) / temp)
  return (jnp.take_along_axis(logp, tg[..., None], -1)[..., 0],
          -jnp.sum(jnp.exp(logp) * logp, -1))


@pytest.mark.parametrize("vocab,chunk", [(37, 8), (37, 37), (37, 64), (32, 8), (5, 1)])
def test_chunked_logprobs_match_dense_with_gradients(vocab, chunk):
  k = jax.random.split(jax.random.key(vocab + chunk), 5)
  h = jax.random.normal(k[0], (2, 3, 4))
  w = 2.0 * jax.random.normal(k[1], (4, vocab))
  tg = jax.random.randint(k[2], (2, 3), 0, vocab)
  g_lp, g_ent = jax.random.normal(k[3], (2, 3)), jax.random.normal(k[4], (2, 3))
  chunked = lambda h, w: grpo.chunked_token_logprobs(h, w, tg, 0.7, chunk)
  dense = lambda h, w: _dense(h, w, tg, 0.7)

  def with_grads(f):
    def scalar(h, w):
      lp, ent = f(h, w)
      return jnp.sum(lp * g_lp + ent * g_ent), (lp, ent)
    return jax.jit(jax.value_and_grad(scalar, (0, 1), has_aux=True))(h, w)

  (_, got), got_g = with_grads(chunked)
  (_, want), want_g = with_grads(dense)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _max_intermediate(closed):
  """Largest array size produced anywhere in a jaxpr, sub-jaxprs (scan bodies) included."""
  best = 0
  stack = [closed.jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            stack.append(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            stack.append(sub)
  return best


def test_chunked_logprobs_never_build_tokens_by_vocab():
  n, t, d, vocab = 4, 8, 2, 301  # tokens x vocab = 9632; unembed d x V = 602
  h, w = jnp.ones((n, t, d)), jnp.ones((d, vocab))
  tg = jnp.zeros((n, t), jnp.int32)
  f = lambda h, w: jnp.sum(grpo.chunked_token_logprobs(h, w, tg, 1.0, 16)[0])
  biggest = _max_intermediate(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w))
  assert biggest < n * t * vocab // 4, biggest
  dense = lambda h, w: jnp.sum(_dense(h, w, tg, 1.0)[0])  # the check can fail
  assert _max_intermediate(jax.make_jaxpr(jax.grad(dense, (0, 1)))(h, w)) >= n * t * vocab


def test_chunked_logprobs_bf16_inputs():
  k = jax.random.split(jax.random.key(3), 3)
  h = jax.random.normal(k[0], (2, 3, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(k[1], (16, 50)).astype(jnp.bfloat16)
  tg = jax.random.randint(k[2], (2, 3), 0, 50)
  lp, ent = jax.jit(grpo.chunked_token_logprobs, static_argnums=(3, 4))(h, w, tg, 1.0, 16)
  want = _dense(h.astype(jnp.float32), w.astype(jnp.float32), tg, 1.0)
  assert lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent, want[1], rtol=1e-4, atol=1e-4)
  g = jax.jit(jax.grad(lambda h: jnp.sum(grpo.chunked_token_logprobs(h, w, tg, 1.0, 16)[0])))(h)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# ---- parity with the reference formulas (verl core_algos + TRUSTEE tgrpo), in NumPy -------------

def _ref_tgrpo(outcome, token_rewards, mask, index, mode, eps=1e-6):
  """recipe/trustee/utils/advantage/tgrpo.py::compute_tgrpo_advantage, transcribed."""
  scores = outcome.astype(np.float64).copy()
  by_id = collections.defaultdict(list)
  for i in range(len(scores)):
    if mask[i].sum() > 0:
      by_id[index[i]].append(scores[i])
  stats = {k: (0.0, 1.0) if len(v) == 1 else (np.mean(v), np.std(v, ddof=1))
           for k, v in by_id.items()}
  for i in range(len(scores)):
    scores[i] = 0.0 if mask[i].sum() == 0 else (scores[i] - stats[index[i]][0]) / (
        stats[index[i]][1] + eps)
  s = scores[:, None]
  if mode == "sign":
    return s * mask * ((token_rewards * s) > 0)
  if mode == "sign-linear":
    return (s * mask * (s > 0) * (token_rewards + 1) * 0.5
            + s * mask * (s < 0) * (1 - token_rewards) * 0.5)
  if mode == "relu":
    return s * mask * ((token_rewards * s) > 0) * token_rewards
  if mode == "linear":
    return s * mask * token_rewards
  return s * mask  # uniform


def _ref_agg(loss_mat, mask, mode, scale=None):
  """verl agg_loss with no global batch info (the unit is the arrays given)."""
  if mode == "token-mean":
    return (loss_mat * mask).sum() / mask.sum()
  if mode == "seq-mean-token-mean":
    seq = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    keep = mask.sum(-1) > 0
    return seq[keep].sum() / keep.sum()
  return (loss_mat * mask).sum() / scale  # seq-mean-token-sum-norm


def _ref_loss(old, new, adv, mask, ref, ent, mode, lo, hi, c, beta, ent_coef, scale=None):
  """verl compute_policy_loss_vanilla + kl_penalty(low_var_kl) + dp_actor's loss assembly."""
  neg_kl = np.clip(new - old, -20, 20)
  ratio = np.exp(neg_kl)
  pg1 = -adv * ratio
  pg2 = -adv * np.clip(ratio, 1 - lo, 1 + hi)
  clip1 = np.maximum(pg1, pg2)
  pg3 = -adv * c
  pg = np.where(adv < 0, np.minimum(pg3, clip1), clip1)
  kl = np.clip(ref - new, -20, 20)
  kld = np.clip(np.exp(kl) - kl - 1, -10, 10)
  masked_mean = lambda x: (x * mask).sum() / mask.sum()
  metrics = {"clip_frac": masked_mean(pg2 > pg1),
             "dual_clip_frac": masked_mean((clip1 > pg3) * (adv < 0)),
             "ppo_kl": masked_mean(-neg_kl)}
  loss = (_ref_agg(pg, mask, mode, scale) - ent_coef * _ref_agg(ent, mask, mode, scale)
          + beta * _ref_agg(kld, mask, mode, scale))
  return loss, metrics


@pytest.mark.parametrize("mode", ["uniform", "sign", "relu", "linear", "sign-linear"])
def test_advantage_parity_with_reference(mode):
  rng = np.random.default_rng(0)
  n, t = 12, 7
  index = np.repeat(np.arange(4), 3)
  outcome = rng.choice([-1.0, 0.0, 1.0], n)
  token_rewards = rng.choice([-1.0, 0.0, 1.0, 0.5], (n, t))
  mask = (rng.random((n, t)) < 0.8).astype(np.float64)
  mask[[1, 2, 5]] = 0.0  # group 0 keeps one survivor; group 1 keeps two
  want = _ref_tgrpo(outcome, token_rewards, mask, index, mode)
  cfg = grpo.GRPOConfig(single_survivor="reward")
  adv = grpo.group_advantages(jnp.asarray(outcome), jnp.asarray(index),
                              jnp.asarray(mask.sum(-1) > 0), cfg, 4)
  got = grpo.token_advantages(adv, jnp.asarray(token_rewards), jnp.asarray(mask), mode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg,ref_mode", [("token-mean", "token-mean"),
                                          ("seq-mean-token-mean", "seq-mean-token-mean"),
                                          ("drgrpo", "seq-mean-token-sum-norm")])
def test_loss_parity_with_reference(agg, ref_mode):
  new, old, ref, adv, mask, ent = (np.asarray(x, np.float64) for x in _random_unit(5))
  new[0, 0] = old[0, 0] + 30.0  # exercise the log-ratio clamp and the dual clip
  adv[0, 0], mask[0, 0] = -1.0, 1.0
  cfg = grpo.GRPOConfig(agg=agg, drgrpo_max_tokens=6, clip_low=0.2, clip_high=0.28,
                        kl_beta=0.001, entropy_coef=0.01)
  scale = 6.0
  want, want_m = _ref_loss(old, new, adv, mask, ref, ent, ref_mode, 0.2, 0.28, 3.0, 0.001, 0.01,
                           scale)
  j = lambda x: jnp.asarray(x, jnp.float32)
  norm = scale if agg == "drgrpo" else None  # verl's constant normaliser has no sequence count
  loss, m = grpo.policy_loss(j(new), j(old), j(adv), j(mask), cfg, j(ref), j(ent), norm)
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
  got_m = grpo.finalize_metrics(m)
  for k, v in want_m.items():
    assert float(got_m[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
