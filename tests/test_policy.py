"""The policy: f32 master weights over a bf16 checkpoint, and one update for full and LoRA."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from trustee_jax import grpo, update
from trustee_jax import policy as policy_lib
from trustee_jax.models import packaged, weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import create_model

N, T = 4, 12


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
  """A tiny Qwen3 saved in bf16 with realistically small weights (std 0.02), as Qwen3-8B ships."""
  cfg = get_model_config("tiny-qwen3", vocab_size=256, initializer_range=0.02)
  return weights.save_hf(create_model(cfg, seed=0), tmp_path_factory.mktemp("bf16"),
                         tokenizer=packaged.qwen3_tokenizer_dir(), dtype="bfloat16")


def run_cfg(path, **model):
  return ml_collections.ConfigDict({"seed": 0, "model": dict(name=str(path), **model)})


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (N, T)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "positions": jnp.tile(jnp.arange(T), (N, 1)),
          "loss_mask": jnp.ones((N, T - 1)), "old_logprobs": jnp.zeros((N, T - 1)),
          "turn_rewards": jnp.zeros((N, T - 1)),
          "advantages": jnp.asarray([1.0, -1.0, 0.5, -0.5])}


def train_steps(cfg, steps: int, lr: float = 1e-6):
  """(initial params as loaded, params after `steps` AdamW updates at `lr`)."""
  model, _ = policy_lib.load_policy(cfg)
  pol, trainable = policy_lib.build(cfg, model, temperature=1.0, chunk_size=256,
                                    with_reference=False)
  start = jax.tree_util.tree_map(np.asarray, trainable)
  opt = optax.adamw(lr, weight_decay=0.0)
  fn = update.make_update_fn(pol.graphdef, opt, grpo.GRPOConfig(kl_beta=0.0), micro_batch=N,
                             chunk_size=256)
  opt_state, b = opt.init(trainable), batch()
  for _ in range(steps):
    b = dict(b, old_logprobs=pol.logprobs(trainable, b["tokens"], b["positions"]))
    trainable, opt_state, m = fn(trainable, pol.frozen, opt_state, b)
    assert float(m["skipped"]) == 0.0
  return start, jax.tree_util.tree_map(np.asarray, trainable)


def changed_fraction(a, b, view=None) -> float:
  cast = (lambda x: x) if view is None else (lambda x: np.asarray(jnp.asarray(x).astype(view)))
  pairs = [(cast(x), cast(y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b)) if x.ndim >= 2]
  return sum(int(np.sum(x != y)) for x, y in pairs) / sum(x.size for x, _ in pairs)


def test_a_bf16_checkpoint_trains_f32_masters_that_move_at_lr_1e6(bf16_checkpoint):
  cfg = run_cfg(bf16_checkpoint, param_dtype="float32", dtype="bfloat16")
  start, one = train_steps(cfg, 1)
  assert {x.dtype for x in jax.tree_util.tree_leaves(start)} == {np.dtype("float32")}
  assert changed_fraction(start, one) > 0.5  # one 1e-6 step moves most master weights
  _, many = train_steps(cfg, 40)
  # 40 steps of ~1e-6 reach bf16's resolution for many weights: the bf16 view moves too.
  f32_view_moved = changed_fraction(start, many, view=jnp.bfloat16)
  in_place = run_cfg(bf16_checkpoint, param_dtype="bfloat16", allow_low_precision_masters=True)
  bf16_start, bf16_many = train_steps(in_place, 40)
  in_place_moved = changed_fraction(bf16_start, bf16_many)
  assert f32_view_moved > 0.2 and f32_view_moved > 5 * in_place_moved, (
      f32_view_moved, in_place_moved)


def test_full_fine_tuning_bf16_weights_in_place_is_refused_by_name(bf16_checkpoint):
  model, _ = policy_lib.load_policy(run_cfg(bf16_checkpoint))  # the checkpoint's dtype: bf16
  with pytest.raises(policy_lib.LowPrecisionMastersError, match="param_dtype='float32'"):
    policy_lib.build(run_cfg(bf16_checkpoint), model, temperature=1.0, chunk_size=256,
                     with_reference=False)


def test_lora_over_a_bf16_base_trains_f32_adapters(bf16_checkpoint):
  cfg = run_cfg(bf16_checkpoint)
  cfg.lora = {"enabled": True, "rank": 2, "alpha": 4.0, "targets": ("wq", "w_up")}
  model, _ = policy_lib.load_policy(cfg)
  pol, adapters = policy_lib.build(cfg, model, temperature=1.0, chunk_size=256,
                                   with_reference=True)
  assert set(adapters) == {"lora"}
  assert {x.dtype for x in jax.tree_util.tree_leaves(adapters)} == {np.dtype("float32")}
  b = batch()
  # B starts at zero: the adapted policy is the base, so its log-probs equal the reference's.
  np.testing.assert_allclose(pol.logprobs(adapters, b["tokens"], b["positions"]),
                             pol.reference_logprobs(b["tokens"], b["positions"]), atol=1e-5)


def test_full_fine_tune_reference_outlives_the_donated_params(bf16_checkpoint):
  cfg = run_cfg(bf16_checkpoint, param_dtype="float32", dtype="bfloat16")
  model, _ = policy_lib.load_policy(cfg)
  pol, trainable = policy_lib.build(cfg, model, temperature=1.0, chunk_size=256,
                                    with_reference=True)
  b = batch()
  before = np.asarray(pol.logprobs(trainable, b["tokens"], b["positions"]))
  opt = optax.adamw(1e-2)
  fn = update.make_update_fn(pol.graphdef, opt, grpo.GRPOConfig(kl_beta=0.0), micro_batch=N,
                             chunk_size=256)
  trainable, _, _ = fn(trainable, pol.frozen, opt.init(trainable), dict(b, old_logprobs=before))
  after = np.asarray(pol.logprobs(trainable, b["tokens"], b["positions"]))
  ref = np.asarray(pol.reference_logprobs(b["tokens"], b["positions"]))  # still alive
  assert np.abs(after - before).max() > 1e-3  # the policy moved
  np.testing.assert_allclose(ref, before, atol=5e-2)  # the reference did not (bf16 copy)
