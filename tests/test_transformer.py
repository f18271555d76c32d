"""The decoder against transformers' PyTorch Llama, Qwen2 and Qwen3 (f32), and its KV cache.

Tiny random HF models with large weights (initializer_range 0.2, random norm scales) are
saved with save_pretrained and loaded with weights.load_hf; each parity check is shown able
to fail by a mutated model (RoPE theta, KV head mapping, q/k norm, q/k/v bias) whose diff is
large.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from trustee_jax.models import weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import (KVCache, RopeScaling, create_model,
                                            left_padded_positions, rope_inv_freq)

TOL = 1e-4  # max |diff| / max |logit|
VOCAB = 256
SEQ = 80  # longer than the llama3 scaling's original_max_position_embeddings (64)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               initializer_range=0.2, rms_norm_eps=1e-5)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                "rope_theta": 10000.0}


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _save_hf(model, path):
  """Randomise the norm scales and biases (HF inits them to ones and zeros, which would hide
  mix-ups)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(path)
  return model.eval()


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
  """(torch model, jax model) for a tiny random Qwen3 with tied embeddings."""
  path = tmp_path_factory.mktemp("qwen3")
  torch.manual_seed(0)
  cfg = Qwen3Config(**_COMMON, rope_theta=1_000_000.0, tie_word_embeddings=True)
  hf = _save_hf(Qwen3ForCausalLM(cfg), path)
  return hf, weights.load_hf(path, param_dtype="float32")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """(torch model, jax model) for a tiny random Llama with llama3 RoPE scaling."""
  path = tmp_path_factory.mktemp("llama")
  torch.manual_seed(0)
  cfg = LlamaConfig(**_COMMON, rope_parameters=dict(_LLAMA3_ROPE), tie_word_embeddings=False)
  hf = _save_hf(LlamaForCausalLM(cfg), path)
  return hf, weights.load_hf(path, param_dtype="float32")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_qwen2(request, tmp_path_factory):
  """(torch model, jax model) for a tiny random Qwen2 (q/k/v biases), tied and untied head."""
  path = tmp_path_factory.mktemp("qwen2")
  torch.manual_seed(0)
  cfg = Qwen2Config(**_COMMON, rope_theta=1_000_000.0, tie_word_embeddings=request.param)
  hf = _save_hf(Qwen2ForCausalLM(cfg), path)
  return hf, weights.load_hf(path, param_dtype="float32")


def _tokens(batch=2, length=SEQ, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def torch_logits(hf, tokens) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.as_tensor(tokens)).logits.numpy()


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions)[0]


def jax_logits(model, tokens) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions)))


def _mutated(model, **cfg_changes):
  """A copy of `model` with config fields changed (the weights untouched)."""
  copy = nnx.clone(model)
  copy.cfg = model.cfg.replace(**cfg_changes)
  return copy


def _swap_kv_heads(model):
  """A copy whose KV heads 0 and 1 are swapped: query groups read the wrong KV head."""
  copy = nnx.clone(model)
  for name in ("wk", "wv"):
    w = getattr(copy, name)[...]
    getattr(copy, name)[...] = w[:, :, ::-1]
  return copy


def test_config_from_transformers(hf_qwen3, hf_llama):
  qwen, llama = hf_qwen3[1].cfg, hf_llama[1].cfg
  assert qwen.qk_norm and qwen.tie_embeddings and qwen.rope_theta == 1e6
  assert qwen.rope_scaling is None and (qwen.num_heads, qwen.num_kv_heads) == (4, 2)
  assert not llama.qk_norm and not llama.tie_embeddings
  assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
  assert qwen.architecture == "qwen3" and llama.architecture == "llama"
  assert not qwen.qkv_bias and not llama.qkv_bias


def test_qwen2_config_and_param_count(hf_qwen2):
  hf, model = hf_qwen2
  cfg = model.cfg
  assert cfg.architecture == "qwen2" and cfg.qkv_bias and not cfg.qk_norm
  assert cfg.tie_embeddings == hf.config.tie_word_embeddings and cfg.rope_theta == 1e6
  assert model.bq[...].shape == (2, 4, 16) and model.bk[...].shape == (2, 2, 16)
  assert cfg.num_params() == sum(p.numel() for p in hf.parameters())


def test_llama3_rope_frequencies_match_transformers(hf_llama):
  hf, model = hf_llama
  expected = hf.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(np.asarray(rope_inv_freq(model.cfg)), expected, rtol=1e-6)
  # All three regimes are exercised: unchanged, smoothed and divided by the factor.
  base = np.asarray(rope_inv_freq(model.cfg.replace(rope_scaling=None)))
  ratio = base / expected
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
  assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_qwen3_parity_with_transformers(hf_qwen3):
  hf, model = hf_qwen3
  tokens = _tokens()
  ref = torch_logits(hf, tokens)
  assert rel_diff(jax_logits(model, tokens), ref) <= TOL
  # The same check fails on a model with a classic bug.
  assert rel_diff(jax_logits(_mutated(model, qk_norm=False), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_mutated(model, rope_theta=2e6), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_swap_kv_heads(model), tokens), ref) > 0.1


def test_qwen2_parity_with_transformers(hf_qwen2):
  hf, model = hf_qwen2
  tokens = _tokens()
  ref = torch_logits(hf, tokens)
  assert rel_diff(jax_logits(model, tokens), ref) <= TOL
  assert rel_diff(jax_logits(_mutated(model, qkv_bias=False), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_mutated(model, rope_theta=1e4), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_swap_kv_heads(model), tokens), ref) > 0.1


def test_qwen2_prefill_and_decode_match_transformers_scanned_and_unstacked(hf_qwen2):
  """Prefill 8 tokens into the cache, then decode one at a time: transformers' logits, for
  the scanned stack and for unstacked_layers' fused q/k/v (with the fused bias)."""
  hf, model = hf_qwen2
  tokens = _tokens(2, 14, seed=7)
  ref = torch_logits(hf, tokens)
  layers = jax.jit(lambda m: m.unstacked_layers())(model)
  assert "bqkv" in layers[0] and layers[0]["bqkv"].shape == (4 + 2 * 2, 16)
  assert "bq" not in layers[0]
  for kw in ({}, {"layers": layers}):
    cache = KVCache.zeros(model.cfg, batch=2, length=16)
    pre, cache = model(jnp.asarray(tokens[:, :8]), jnp.broadcast_to(jnp.arange(8), (2, 8)),
                       cache, **kw)
    steps = [np.asarray(pre)]
    for t in range(8, tokens.shape[1]):
      out, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), cache, **kw)
      steps.append(np.asarray(out))
    assert rel_diff(np.concatenate(steps, axis=1), ref) <= TOL, kw.keys()


def test_llama3_scaled_rope_parity_with_transformers(hf_llama):
  hf, model = hf_llama
  tokens = _tokens()
  ref = torch_logits(hf, tokens)
  assert rel_diff(jax_logits(model, tokens), ref) <= TOL
  assert rel_diff(jax_logits(_mutated(model, rope_scaling=None), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_mutated(model, rope_theta=20000.0), tokens), ref) > 0.1
  assert rel_diff(jax_logits(_swap_kv_heads(model), tokens), ref) > 0.1


def test_left_padded_batch_matches_transformers_attention_mask(hf_qwen3):
  hf, model = hf_qwen3
  lengths = np.array([SEQ // 2, SEQ // 4])
  width = SEQ // 2
  tokens = _tokens(2, width, seed=3)
  positions = np.asarray(left_padded_positions(lengths, width))
  tokens = np.where(positions >= 0, tokens, 0)
  with torch.no_grad():
    ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(positions >= 0),
             position_ids=torch.as_tensor(np.maximum(positions, 0))).logits.numpy()
  out = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions)))
  valid = positions >= 0
  assert rel_diff(out[valid], ref[valid]) <= TOL


# ------------------------------------------------------------------ KV cache


@nnx.jit
def _step(model, tokens, positions, cache):
  return model(tokens, positions, cache)


@pytest.fixture(scope="module")
def tiny_llama():
  cfg = get_model_config("tiny-llama", vocab_size=VOCAB, initializer_range=0.2)
  return create_model(cfg, seed=3)


def test_token_by_token_decode_equals_full_forward(tiny_llama):
  model = tiny_llama
  tokens = _tokens(2, 12, seed=5)
  full = jax_logits(model, tokens)
  cache = KVCache.zeros(model.cfg, batch=2, length=16)
  steps = []
  for t in range(tokens.shape[1]):
    pos = jnp.full((2, 1), t)
    logits, cache = _step(model, jnp.asarray(tokens[:, t:t + 1]), pos, cache)
    steps.append(np.asarray(logits[:, 0]))
  assert rel_diff(np.stack(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen2"])
def test_unstacked_fused_layers_decode_like_the_scanned_stack(name):
  model = create_model(get_model_config(name, vocab_size=VOCAB, initializer_range=0.2), seed=4)
  for b in ("bq", "bk", "bv"):  # zeros at init: make them count
    if hasattr(model, b):
      p = getattr(model, b)
      p[...] = jax.random.normal(jax.random.key(len(b) + ord(b[1])), p[...].shape)
  tokens = jnp.asarray(_tokens(2, 12, seed=6))
  layers = jax.jit(lambda m: m.unstacked_layers())(model)
  assert "wqkv" in layers[0] and len(layers) == model.cfg.num_layers
  outs = []
  for kw in ({}, {"layers": layers}):
    cache = KVCache.zeros(model.cfg, batch=2, length=16)
    _, cache = model(tokens[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), cache, **kw)
    logits, _ = model(tokens[:, 8:9], jnp.full((2, 1), 8), cache, **kw)
    outs.append(np.asarray(logits))
  assert rel_diff(outs[1], outs[0]) <= 1e-5


def test_left_padded_prefill_then_decode_equals_full_forward(tiny_llama):
  """Rows of different lengths, left-padded prefill, then per-row decode positions."""
  model = tiny_llama
  lengths, width, new = np.array([9, 4, 1]), 9, 5
  seqs = [_tokens(1, n + new, seed=10 + i)[0] for i, n in enumerate(lengths)]
  positions = np.asarray(left_padded_positions(lengths, width))
  prompt = np.zeros((3, width), np.int64)
  for i, n in enumerate(lengths):
    prompt[i, width - n:] = seqs[i][:n]
  cache = KVCache.zeros(model.cfg, batch=3, length=width + new)
  logits, cache = _step(model, jnp.asarray(prompt), jnp.asarray(positions), cache)
  logits = np.asarray(logits)
  for i, n in enumerate(lengths):
    ref = jax_logits(model, seqs[i][None])[0]
    assert rel_diff(logits[i, width - n:], ref[:n]) <= 1e-5
    assert np.isfinite(logits[i]).all()
  decoded = [[] for _ in lengths]
  for j in range(new):
    step_tokens = np.array([[s[n + j]] for s, n in zip(seqs, lengths)])
    pos = jnp.asarray((lengths + j)[:, None])
    out, cache = _step(model, jnp.asarray(step_tokens), pos, cache)
    for i in range(3):
      decoded[i].append(np.asarray(out[i, 0]))
  for i, n in enumerate(lengths):
    ref = jax_logits(model, seqs[i][None])[0]
    assert rel_diff(np.stack(decoded[i]), ref[n:]) <= 1e-5


def test_padding_is_never_written_to_the_cache(tiny_llama):
  model = tiny_llama
  positions = jnp.asarray(left_padded_positions(np.array([2, 5]), 5))
  cache = KVCache.zeros(model.cfg, batch=2, length=8)
  _, cache = _step(model, jnp.asarray(_tokens(2, 5, seed=1)), positions, cache)
  k = np.asarray(cache.k)
  assert np.all(k[:, 0, 2:] == 0) and np.all(k[:, 0, :2] != 0)
  assert np.all(k[:, 1, 5:] == 0) and np.all(k[:, 1, :5] != 0)


def test_xla_attention_matches_transformers_on_a_left_padded_batch(hf_qwen3):
  """models/attention.py's jax.nn.dot_product_attention path against PyTorch, with padding."""
  hf, model = hf_qwen3
  lengths, width = np.array([SEQ // 2, SEQ // 4]), SEQ // 2
  positions = np.asarray(left_padded_positions(lengths, width))
  tokens = np.where(positions >= 0, _tokens(2, width, seed=4), 0)
  with torch.no_grad():
    ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(positions >= 0),
             position_ids=torch.as_tensor(np.maximum(positions, 0))).logits.numpy()
  xla = _mutated(model, attention_impl="xla")
  out = np.asarray(_forward(xla, jnp.asarray(tokens), jnp.asarray(positions)))
  valid = positions >= 0
  assert rel_diff(out[valid], ref[valid]) <= TOL
