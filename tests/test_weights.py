"""Weights in and out: SmolLM2 and Qwen2.5-Coder GGUF parity with transformers, HF export that
transformers reloads to the same logits, exact round trips, and a clear error for each bad
checkpoint."""
import json
import pathlib

import gguf
import numpy as np
import jax.numpy as jnp
import pytest
import safetensors.numpy as stn
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from trustee_jax.models import gguf_weights, packaged, weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import KVCache, create_model
from trustee_jax.models.weights import WeightsError

TOL = 1e-4  # max |diff| / max |logit|
VOCAB = 256
_NORMS = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm")
_BIASES = ("bq", "bk", "bv")
_PARAMS = ("embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", *_NORMS,
           *_BIASES)
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions)[0]


def jax_logits(model, tokens) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions)))


def torch_logits(hf, tokens) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.as_tensor(tokens)).logits.float().numpy()


def params(model) -> dict[str, np.ndarray]:
  return {n: np.asarray(getattr(model, n)[...]) for n in _PARAMS if hasattr(model, n)}


def random_model(name: str, seed: int = 0, **overrides):
  """A tiny model with large weights, random norm scales and biases (so mix-ups show)."""
  cfg = get_model_config(name, vocab_size=VOCAB, initializer_range=0.2, **overrides)
  model = create_model(cfg, seed=seed)
  rng = np.random.default_rng(seed)
  for n in _NORMS:
    if hasattr(model, n):
      p = getattr(model, n)
      p[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(p[...].shape), jnp.float32)
  for n in _BIASES:
    if hasattr(model, n):
      p = getattr(model, n)
      p[...] = jnp.asarray(0.5 * rng.standard_normal(p[...].shape), jnp.float32)
  return model


@pytest.fixture(scope="module")
def qwen3():
  return random_model("tiny-qwen3", tie_embeddings=True)


@pytest.fixture(scope="module")
def qwen2():
  return random_model("tiny-qwen2", seed=2, tie_embeddings=False)


@pytest.fixture(scope="module")
def qwen2_tied():
  return random_model("tiny-qwen2", seed=3)


@pytest.fixture(scope="module")
def llama():
  from trustee_jax.models.transformer import RopeScaling
  return random_model("tiny-llama", seed=1, tie_embeddings=False,
                      rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))


@pytest.fixture(scope="module")
def saved_llama(llama, tmp_path_factory):
  return weights.save_hf(llama, tmp_path_factory.mktemp("saved_llama"))


def _tokens(batch=2, length=24, seed=0, vocab=VOCAB):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


# ------------------------------------------------------------------ GGUF


@pytest.fixture(scope="session")
def smollm2():
  """The packaged SmolLM2-135M-Instruct, dequantised to f32 (loaded once per session)."""
  return weights.load_gguf()


def _llamacpp_permute(w, n_head):
  """llama.cpp's q/k row permutation (convert_hf_to_gguf LlamaModel.permute)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_smollm2_gguf_config(smollm2):
  cfg = smollm2.cfg
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert (cfg.head_dim, cfg.vocab_size, cfg.intermediate_size) == (64, 49152, 1536)
  assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and not hasattr(smollm2, "lm_head")
  assert not cfg.qk_norm and abs(cfg.rms_norm_eps - 1e-5) < 1e-9


def test_smollm2_gguf_parity_with_transformers(smollm2, tmp_path):
  path = packaged.smollm2_gguf_path()
  (tmp_path / path.name).symlink_to(path)
  hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                            dtype=torch.float32).eval()
  tokens = _tokens(1, 12, vocab=49152)
  ref = torch_logits(hf, tokens)
  assert rel_diff(jax_logits(smollm2, tokens), ref) <= TOL
  # Forgetting to undo llama.cpp's q/k permutation would be caught.
  bad = nnx.clone(smollm2)
  for name, heads in (("wq", 9), ("wk", 3)):
    w = np.asarray(getattr(bad, name)[...])  # [L, d, heads, hd]
    rows = _llamacpp_permute(np.arange(heads * 64), heads).reshape(heads, 64)
    getattr(bad, name)[...] = jnp.asarray(w.reshape(*w.shape[:2], -1)[..., rows])
  assert rel_diff(jax_logits(bad, tokens), ref) > 0.1


_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gguf(model, path: pathlib.Path, tmp: pathlib.Path, arch=None, edit=None):
  """Write `model` as an f32 GGUF the way llama.cpp's converter does (q/k permuted)."""
  cfg = model.cfg
  arch = arch or cfg.architecture
  tensors = stn.load_file(weights.save_hf(model, tmp) / "model.safetensors")
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  for name, x in tensors.items():
    *parts, kind = name.split(".")  # kind: weight or bias
    if parts[:2] == ["model", "layers"]:
      gname = f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:])]}.{kind}"
    else:
      gname = f"{_HF_TO_GGUF['.'.join(parts)]}.{kind}"
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.num_heads if "attn_q" in gname else cfg.num_kv_heads
      x = _llamacpp_permute(x, heads)
    x = edit(gname, x) if edit else x
    w.add_tensor(gname, np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("fixture", ["llama", "qwen2", "qwen3"])
def test_gguf_round_trip_is_exact(fixture, request, tmp_path):
  model = request.getfixturevalue(fixture)
  loaded = weights.load_gguf(write_gguf(model, tmp_path / "m.gguf", tmp_path / "hf"))
  assert loaded.cfg.tie_embeddings == model.cfg.tie_embeddings
  assert loaded.cfg.architecture == model.cfg.architecture
  got, want = params(loaded), params(model)
  assert got.keys() == want.keys()
  for n in want:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_truncated_gguf_is_a_clear_error(tmp_path):
  data = packaged.smollm2_gguf_path().read_bytes()
  for cut in (4000, 2_000_000):  # inside the header; inside the tensor data
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(WeightsError, match=f"{bad}: unreadable GGUF"):
      weights.load_gguf(bad)


def test_gguf_unknown_architecture_and_int_tensor(qwen3, tmp_path):
  with pytest.raises(WeightsError, match=r"a\.gguf: unsupported GGUF architecture 'gpt2'"):
    weights.load_gguf(write_gguf(qwen3, tmp_path / "a.gguf", tmp_path / "hf1", arch="gpt2"))
  to_int = lambda n, x: x.astype(np.int32) if n == "blk.1.ffn_up.weight" else x
  path = write_gguf(qwen3, tmp_path / "b.gguf", tmp_path / "hf2", edit=to_int)
  with pytest.raises(WeightsError, match=r"b\.gguf: tensor 'blk.1.ffn_up.weight' has type I32"):
    weights.load_gguf(path)


@pytest.mark.parametrize("loader", ["gguf", "hf"])
def test_loaders_honour_param_dtype(qwen2, loader, tmp_path):
  if loader == "gguf":
    load = lambda **kw: weights.load_gguf(  # noqa: E731
        write_gguf(qwen2, tmp_path / "m.gguf", tmp_path / "hf"), **kw)
  else:
    load = lambda **kw: weights.load_hf(weights.save_hf(qwen2, tmp_path / "hf"), **kw)  # noqa: E731
  loaded = load(param_dtype="bfloat16")
  assert (loaded.cfg.param_dtype, loaded.cfg.dtype) == ("bfloat16", "bfloat16")
  for n, w in params(qwen2).items():
    got = getattr(loaded, n)[...]
    assert got.dtype == jnp.bfloat16, n
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(w, jnp.bfloat16)), n)
  mixed = load(param_dtype="float32", dtype="bfloat16")
  assert mixed.bq[...].dtype == jnp.float32 and mixed.cfg.dtype == "bfloat16"


# ------------------------------------------------------------------ Qwen2.5-Coder GGUF files


def qwen25_coder_gguf(size: str = "0.5b") -> pathlib.Path:
  """The packaged Qwen2.5-Coder-Instruct Q4_K_M file, or skip saying why it is not there."""
  try:
    return packaged.qwen25_coder_gguf_path(size)
  except (AttributeError, FileNotFoundError) as e:  # not installed (requirements-models.txt)
    pytest.skip(f"Qwen2.5-Coder-{size} GGUF unavailable: {e}")


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_qwen25_coder_gguf_metadata_matches_named_shape(size):
  path = qwen25_coder_gguf(size)
  cfg, tensors = gguf_weights.open_gguf(path)
  named = get_model_config(f"qwen2.5-coder-{size}")
  assert cfg.architecture == "qwen2" and abs(cfg.rms_norm_eps - named.rms_norm_eps) < 1e-12
  # Qwen's files store a separate (differently quantised) output head; HF ties it.
  assert not cfg.tie_embeddings and "lm_head.weight" in tensors.shapes
  assert cfg.replace(name=named.name, rms_norm_eps=named.rms_norm_eps,
                     tie_embeddings=True) == named
  assert tensors.shapes["model.layers.0.self_attn.k_proj.bias"] == (named.num_kv_heads
                                                                     * named.head_dim,)


def test_qwen25_gguf_dequantisation_equals_gguf_reference(monkeypatch):
  """For each tensor type in the 0.5B file: our chunked dequantisation (chunks forced small,
  so row blocks are stitched) equals gguf's whole-tensor one, bit for bit."""
  path = qwen25_coder_gguf("0.5b")
  reader = gguf.GGUFReader(path)
  first = {}
  for t in reader.tensors:
    if t.name.startswith("blk.") and t.tensor_type.name not in first:
      first[t.tensor_type.name] = t
  assert set(first) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
  monkeypatch.setattr(gguf_weights, "_CHUNK_ELEMENTS", 100_000)
  for kind, t in first.items():
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
    got = gguf_weights.dequantize(t)
    assert got.dtype == np.float32 and got.shape == tuple(int(s) for s in reversed(t.shape))
    np.testing.assert_array_equal(got, want, err_msg=f"{t.name} ({kind})")
    assert np.abs(got).max() > 0, t.name


@pytest.mark.heavy
@pytest.mark.slow
def test_qwen25_coder_05b_greedy_decode_matches_transformers_gguf(tmp_path):
  """The real 0.5B file: the same prompt logits and the same 8 greedy tokens as transformers'
  own GGUF loader, fed the same ids. Ours is run and freed before transformers loads."""
  from trustee_jax.models.tokenizer import load_tokenizer
  path = qwen25_coder_gguf("0.5b")
  ids = load_tokenizer("qwen3").encode(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "Write a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n")
  model, n = weights.load_gguf(path), 8
  assert model.cfg.qkv_bias and not model.cfg.tie_embeddings
  step = nnx.jit(lambda m, tok, pos, cache: m(tok, pos, cache))
  cache = KVCache.zeros(model.cfg, 1, len(ids) + n)
  logits, cache = step(model, jnp.asarray([ids]), jnp.arange(len(ids))[None], cache)
  prompt_logits = np.asarray(logits[0])
  ours = [int(np.argmax(prompt_logits[-1]))]
  for i in range(n - 1):
    logits, cache = step(model, jnp.asarray([[ours[-1]]]), jnp.asarray([[len(ids) + i]]), cache)
    ours.append(int(jnp.argmax(logits[0, -1])))
  del model, cache, logits
  (tmp_path / path.name).symlink_to(path)
  hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                            dtype=torch.float32).eval()
  assert rel_diff(prompt_logits, torch_logits(hf, np.asarray([ids]))[0]) <= TOL
  with torch.no_grad():
    theirs = hf.generate(torch.as_tensor([ids]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  assert ours == theirs[0, len(ids):].tolist()


# ------------------------------------------------------------------ HF out and back


@pytest.mark.parametrize("fixture", ["llama", "qwen2", "qwen2_tied", "qwen3"])
def test_export_reloads_in_transformers_with_same_logits(fixture, request, tmp_path):
  model = request.getfixturevalue(fixture)
  out = weights.save_hf(model, tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [_ARCH_CLASS[model.cfg.architecture]]
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
  tokens = _tokens(2, 24)  # longer than the llama's original_max_position_embeddings (16)
  assert rel_diff(jax_logits(model, tokens), torch_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("fixture", ["llama", "qwen2", "qwen3"])
def test_export_then_load_hf_gives_identical_params(fixture, request, tmp_path):
  model = request.getfixturevalue(fixture)
  loaded = weights.load_hf(weights.save_hf(model, tmp_path / "hf"))
  assert loaded.cfg.replace(name="x") == model.cfg.replace(name="x")
  got, want = params(loaded), params(model)
  assert got.keys() == want.keys()
  for n in want:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_sharded_export_with_index(llama, tmp_path):
  out = weights.save_hf(llama, tmp_path / "hf", max_shard_bytes=60_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (out / "model.safetensors").exists()
  assert all((out / f).is_file() for f in files)
  assert len(index["weight_map"]) == 2 + 9 * llama.cfg.num_layers + 1
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(1, 8)
  assert rel_diff(jax_logits(llama, tokens), torch_logits(hf, tokens)) <= TOL
  got = params(weights.load_hf(out))
  for n, w in params(llama).items():
    np.testing.assert_array_equal(got[n], w, err_msg=n)


def test_bf16_export(qwen3, tmp_path):
  out = weights.save_hf(qwen3, tmp_path / "hf", dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert stn.load_file(out / "model.safetensors")["model.norm.weight"].dtype == jnp.bfloat16
  hf = AutoModelForCausalLM.from_pretrained(out)
  assert hf.dtype == torch.bfloat16
  loaded = weights.load_hf(out)  # the checkpoint's dtype by default
  assert loaded.cfg.param_dtype == "bfloat16" and loaded.wq[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(loaded.wq[...]),
                                np.asarray(qwen3.wq[...].astype(jnp.bfloat16)))


def test_export_with_tokenizer_and_chat_template(qwen3, tmp_path):
  tok_dir = packaged.qwen3_tokenizer_dir()
  copied = weights.save_hf(qwen3, tmp_path / "copied", tokenizer=tok_dir)
  tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  saved = weights.save_hf(qwen3, tmp_path / "saved", tokenizer=tokenizer)
  gen = json.loads((saved / "generation_config.json").read_text())
  assert gen["eos_token_id"] == tokenizer.eos_token_id
  messages = [{"role": "user", "content": "hi"}]
  want = tokenizer.apply_chat_template(messages, tokenize=False)
  for out in (copied, saved):
    again = AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(messages, tokenize=False) == want
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
  with pytest.raises(TypeError, match="tokenizer"):
    weights.save_hf(qwen3, tmp_path / "bad", tokenizer=tmp_path)


# ------------------------------------------------------------------ bad checkpoints


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copy an HF directory, passing its tensors (or config) through `edit`."""
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = stn.load_file(src / "model.safetensors")
  tensors = edit(tensors) if edit else tensors
  stn.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def _edit(name, fn):
  return lambda t: {**t, name: fn(t[name])}


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"},
     r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (_edit("model.layers.0.self_attn.k_proj.weight", lambda x: x[:-1]),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
     r"\(31, 64\), expected \(32, 64\)"),
    (_edit("model.norm.weight", lambda x: x.astype(np.int32)),
     r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32, expected floats"),
    (lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
     r"model\.safetensors: unexpected tensor\(s\) \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"),
], ids=["missing", "shape", "int-dtype", "unexpected"])
def test_bad_tensors_are_clear_errors(saved_llama, tmp_path, edit, message):
  bad = _rewrite(saved_llama, tmp_path / "bad", edit)
  with pytest.raises(WeightsError, match=str(bad) + "/" + message):
    weights.load_hf(bad)


def test_truncated_safetensors_is_a_clear_error(saved_llama, tmp_path):
  bad = _rewrite(saved_llama, tmp_path / "bad", None)
  data = (bad / "model.safetensors").read_bytes()
  for cut in (len(data) - 100, 6):
    (bad / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(WeightsError, match=f"{bad}/model.safetensors: unreadable safetensors"):
      weights.load_hf(bad)


def test_unknown_architecture_and_missing_files(llama, saved_llama, tmp_path):
  bad = _rewrite(saved_llama, tmp_path / "bad", None)
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(WeightsError, match=f"{bad}/config.json: unsupported architecture"):
    weights.load_hf(bad)
  (bad / "config.json").unlink()
  with pytest.raises(WeightsError, match=f"{bad}/config.json: cannot read"):
    weights.load_hf(bad)
  sharded = weights.save_hf(llama, tmp_path / "sharded", max_shard_bytes=60_000)
  victim = sorted(sharded.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(WeightsError, match=f"{victim}: unreadable safetensors"):
    weights.load_hf(sharded)
