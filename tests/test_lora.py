"""LoRA: fresh adapters are the base, the adapted forward is W + s·A@B, a GRPO step moves the
adapters only (with the chain-rule gradient), the base is the KL reference, and
merge-then-export reloads in transformers with the adapted model's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from trustee_jax import grpo, lora, update
from trustee_jax.models import weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import KVCache, Transformer, create_model

CFG = get_model_config("tiny-qwen3", vocab_size=512, initializer_range=0.2)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
GCFG = grpo.GRPOConfig(kl_beta=0.0)


def randomise_b(model: lora.LoraTransformer, seed: int = 1, std: float = 0.3) -> None:
  """Nonzero B everywhere, so the adapters actually change the model."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for name in model.lora_cfg.targets:
    var = getattr(model.lora, f"{name}_b")
    var[...] = std * jax.random.normal(next(keys), var[...].shape, var[...].dtype)


def logits(model, tokens):
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(model(tokens, pos)[0])


def batch(n=4, t=8, seed=0):
  rng = np.random.default_rng(seed)
  b = {"tokens": rng.integers(0, CFG.vocab_size, (n, t)).astype(np.int32),
       "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
       "loss_mask": (rng.random((n, t - 1)) > 0.3).astype(np.float32),  # aligned with targets
       "old_logprobs": -rng.random((n, t - 1)).astype(np.float32) * 3,
       "turn_rewards": np.zeros((n, t - 1), np.float32),
       "advantages": rng.normal(size=n).astype(np.float32)}
  return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def base() -> Transformer:
  return create_model(CFG, seed=0)


@pytest.fixture
def adapted(base) -> lora.LoraTransformer:
  model = lora.add_lora(base, LCFG, seed=3)
  randomise_b(model)
  return model


TOKENS = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)


def test_fresh_adapters_are_the_base_and_share_its_weights(base):
  model = lora.add_lora(base, LCFG)
  np.testing.assert_array_equal(logits(model, TOKENS), logits(base, TOKENS))
  assert model.wq[...] is base.wq[...]  # wrapped, not copied
  _, adapters, frozen = lora.split(model)
  assert lora.lora_param_count(CFG, LCFG) == sum(x.size for x in jax.tree_util.tree_leaves(
      adapters))
  assert {p[-1] for p, _ in nnx.to_flat_state(adapters)} == {
      f"{t}_{s}" for t in lora.ALL_TARGETS for s in "ab"}
  assert set(nnx.to_pure_dict(frozen)) == set(nnx.to_pure_dict(nnx.state(base)))


def test_adapted_forward_is_w_plus_scaled_a_b(base, adapted):
  ad = adapted.lora

  def by_hand(path, w):  # W + s·A@B, per layer, in numpy
    name = path[0].key
    if name not in LCFG.targets:
      return w
    a, b = np.asarray(getattr(ad, f"{name}_a")[...]), np.asarray(getattr(ad, f"{name}_b")[...])
    delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(CFG.num_layers)])
    return jnp.asarray(np.asarray(w) + LCFG.scale * delta)

  dense = nnx.merge(nnx.graphdef(base),
                    jax.tree_util.tree_map_with_path(by_hand, nnx.state(base)))
  want = logits(dense, TOKENS)
  np.testing.assert_allclose(logits(adapted, TOKENS), want, rtol=1e-5, atol=1e-5)
  merged = lora.merge(adapted)
  assert type(merged) is Transformer
  np.testing.assert_allclose(logits(merged, TOKENS), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - logits(base, TOKENS)).max() > 1e-2  # the adapters do something
  # the KV-cache path (prefill then one decode step) agrees with the merged model too
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  outs = []
  for m in (adapted, merged):
    _, cache = m(TOKENS, pos, KVCache.zeros(CFG, 2, 8))
    outs.append(np.asarray(m(TOKENS[:, :1], jnp.full((2, 1), 7), cache)[0]))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_partial_targets_and_bad_configs(base):
  model = lora.add_lora(base, lora.LoraConfig(rank=2, targets=("wq", "w_down")))
  _, adapters, _ = lora.split(model)
  assert sorted(p[-1] for p, _ in nnx.to_flat_state(adapters)) == [
      "w_down_a", "w_down_b", "wq_a", "wq_b"]
  assert adapters["lora"]["w_down_a"][...].shape == (CFG.num_layers, CFG.intermediate_size, 2)
  assert adapters["lora"]["wq_b"][...].shape == (CFG.num_layers, 2, CFG.num_heads, CFG.head_dim)
  with pytest.raises(lora.LoraError, match="rank must be >= 1"):
    lora.LoraConfig(rank=0)
  with pytest.raises(lora.LoraError, match="unknown \\['q_proj'\\]"):
    lora.LoraConfig(targets=("q_proj",))
  with pytest.raises(lora.LoraError, match="unknown lora config field"):
    lora.LoraConfig.from_dict({"rank": 4, "dropout": 0.1})
  with pytest.raises(lora.LoraError, match="already has LoRA"):
    lora.add_lora(model, LCFG)


def test_lora_step_changes_only_adapters_with_the_chain_rule_gradient(base, adapted):
  graphdef, adapters, frozen = update.split(adapted)  # the adapters, the frozen base
  frozen_before = jax.tree_util.tree_map(np.asarray, frozen)
  b = batch()
  # gradient of the same loss w.r.t. the merged dense weights, then the chain rule by hand
  merged_graphdef, merged_params, rest = update.split(lora.merge(adapted))
  normaliser = grpo.loss_normaliser(b["loss_mask"], GCFG)
  dense_grad = jax.grad(lambda p: update.micro_loss(p, rest, merged_graphdef, b, normaliser,
                                                    GCFG, 1.0, 64)[0])(merged_params)
  lora_grad = jax.grad(lambda ad: update.micro_loss(ad, frozen, graphdef, b, normaliser, GCFG,
                                                    1.0, 64)[0])(adapters)
  for name in ("wq", "wo", "w_down"):
    dw = np.asarray(dense_grad[name][...])
    a = np.asarray(adapters["lora"][f"{name}_a"][...])
    bb = np.asarray(adapters["lora"][f"{name}_b"][...])
    n_in = lora.INPUT_DIMS[name]
    for i in range(CFG.num_layers):  # dB = s·Aᵀ dW, dA = s·dW Bᵀ
      want_b = LCFG.scale * np.tensordot(a[i], dw[i], axes=(list(range(n_in)),
                                                             list(range(n_in))))
      out_axes = list(range(n_in, dw[i].ndim))
      want_a = LCFG.scale * np.tensordot(dw[i], bb[i], axes=(out_axes, list(range(1, bb[i].ndim))))
      np.testing.assert_allclose(lora_grad["lora"][f"{name}_b"][...][i], want_b,
                                 rtol=2e-4, atol=1e-6)
      np.testing.assert_allclose(lora_grad["lora"][f"{name}_a"][...][i], want_a,
                                 rtol=2e-4, atol=1e-6)
  # one optimizer step: adapters move, the base is untouched and gets no optimizer state
  opt = optax.adam(1e-2)
  opt_state = opt.init(adapters)
  before = jax.tree_util.tree_map(np.asarray, adapters)  # the update donates `adapters`
  fn = update.make_update_fn(graphdef, opt, GCFG, micro_batch=2, chunk_size=64)
  new_adapters, opt_state, metrics = fn(jax.tree_util.tree_map(jnp.copy, adapters), frozen,
                                        opt_state, b)
  assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  moved = [float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(
      jax.tree_util.tree_leaves(new_adapters), jax.tree_util.tree_leaves(before))]
  assert min(moved) > 1e-4, moved
  for x, y in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(x), y)
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(opt_state))
  assert n_opt == 2 * lora.lora_param_count(CFG, LCFG) + 1  # mu, nu (+ count): adapters only


def test_lora_update_is_invariant_to_micro_batching(adapted):
  graphdef, adapters, frozen = update.split(adapted)
  opt = optax.sgd(1.0)
  b = batch(n=8)
  outs = [update.make_update_fn(graphdef, opt, GCFG, micro_batch=m, chunk_size=64)(
      jax.tree_util.tree_map(jnp.copy, adapters), frozen, opt.init(adapters), b)
      for m in (8, 2)]
  np.testing.assert_allclose(outs[0][2]["loss"], outs[1][2]["loss"], atol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(outs[0][0]), jax.tree_util.tree_leaves(outs[1][0])):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_reference_is_the_base_with_adapters_off(base, adapted):
  graphdef, adapters, frozen = update.split(adapted)
  b = batch()
  empty = nnx.State({})
  ref = update.make_logprob_fn(lora.base_graphdef(adapted), temperature=1.0, chunk_size=64)(
      frozen, empty, b["tokens"], b["positions"])
  want = update.make_logprob_fn(nnx.graphdef(base), temperature=1.0, chunk_size=64)(
      nnx.state(base), empty, b["tokens"], b["positions"])
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
  pol = update.make_logprob_fn(graphdef, temperature=1.0, chunk_size=64)(
      adapters, frozen, b["tokens"], b["positions"])
  assert float(jnp.abs(pol - ref).max()) > 1e-2


def test_bf16_base_merges_in_its_dtype(base):
  bf = create_model(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), seed=0)
  model = lora.add_lora(bf, LCFG)
  randomise_b(model)
  assert model.lora.wq_a[...].dtype == jnp.float32
  merged = lora.merge(model)
  assert merged.wq[...].dtype == jnp.bfloat16 and merged.embed[...].dtype == jnp.bfloat16
  # Both bf16 paths (merged weights; x @ W + s (x @ A) @ B) sit within bf16 rounding of the
  # same model computed in f32, while the adapters themselves move the logits by several units.
  f32 = create_model(CFG, seed=0)
  nnx.update(f32, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), nnx.state(bf)))
  ref_model = lora.add_lora(f32, LCFG)
  nnx.update(ref_model, nnx.state(model, lora.LoraParam))
  ref = np.asarray(logits(ref_model, TOKENS))
  assert np.abs(np.asarray(logits(bf, TOKENS)) - ref).max() > 2.0
  for m in (merged, model):
    np.testing.assert_allclose(logits(m, TOKENS), ref, rtol=0, atol=0.25)


def test_merge_then_export_reloads_in_transformers_with_adapted_logits(adapted, tmp_path):
  out = weights.save_hf(lora.merge(adapted), tmp_path / "hf")
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.as_tensor(np.asarray(TOKENS))).logits.float().numpy()
  ours = logits(adapted, TOKENS)
  rel = np.abs(ours - theirs).max() / np.abs(ours).max()
  assert rel <= 1e-4, rel


def test_adapters_shard_like_their_weights():
  from jax.sharding import AbstractMesh, PartitionSpec as P

  from trustee_jax import sharding as shd
  mesh = AbstractMesh((1, 2, 4), shd.MESH_AXES)
  abstract = lora.abstract_model(get_model_config("qwen3-8b"), lora.LoraConfig(rank=64))
  _, adapters, _ = lora.split(abstract)
  shardings = shd.state_shardings(adapters, mesh)["lora"]  # the one reader, no adapter table
  spec = lambda name: shardings[name].get_value().spec  # noqa: E731
  # A splits its input dims as W does, B its output dims; the rank is never split
  assert adapters["lora"]["wq_a"].shape == (36, 4096, 64)
  assert spec("wq_a") == P(None, "fsdp", None)
  assert spec("wq_b") == P(None, None, "tensor", None)
  assert spec("wo_a") == P(None, "tensor", None, None)
  assert spec("wo_b") == P(None, None, "fsdp")
  assert spec("w_down_a") == P(None, "tensor", None)
  assert spec("w_down_b") == P(None, None, "fsdp")


def test_adapters_carry_their_axes_from_the_base_parameters(adapted):
  from trustee_jax import sharding as shd
  from trustee_jax.models.transformer import PARAM_AXES
  _, adapters, base = lora.split(adapted)
  axes = {k: v.get_metadata()[shd.AXES_KEY] for k, v in adapters["lora"].items()}
  assert len(axes) == 2 * len(lora.ALL_TARGETS)
  for target in lora.ALL_TARGETS:
    n_in, w = lora.INPUT_DIMS[target], PARAM_AXES[target]
    assert axes[f"{target}_a"] == w[:1 + n_in] + ("lora_rank",)
    assert axes[f"{target}_b"] == ("layers", "lora_rank") + w[1 + n_in:]
  assert {k: v.get_metadata()[shd.AXES_KEY] for k, v in base.items()} == {
      k: PARAM_AXES[k] for k in base}


def test_unstacked_layers_of_an_adapted_model_are_its_merged_weights(adapted):
  tokens, pos = jnp.asarray(batch()["tokens"]), None
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  want = np.asarray(adapted(tokens, pos)[0])
  layers = jax.jit(lambda m: m.unstacked_layers())(adapted)
  got = np.asarray(adapted(tokens, pos, KVCache.zeros(CFG, tokens.shape[0], 16), layers=layers)[0])
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
