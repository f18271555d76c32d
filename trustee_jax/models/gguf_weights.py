"""llama.cpp GGUF in: Llama (SmolLM2), Qwen2/Qwen2.5 and Qwen3 files, any float or quantised type.

The file is mapped onto HF names in HF layout (llama's q/k rows un-permuted, as
transformers' GGUF loader does; qwen2 and qwen3 files are stored unpermuted) and handed to
weights' one filler. Tensors are dequantised one at a time, in row chunks, straight into
one f32 buffer, so a 1.5B model never holds two f32 copies.
"""
import pathlib
import re

import numpy as np

from trustee_jax import sharding as shd
from trustee_jax.models import packaged
from trustee_jax.models.transformer import ModelConfig, Transformer
from trustee_jax.models.weights import WeightsError, _build, _Tensors

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_INT_TYPES = {"I8", "I16", "I32", "I64"}
_CHUNK_ELEMENTS = 1 << 22  # dequantise ~4M values at a time (bounded temporaries)


def gguf_to_hf_name(name: str) -> str:
  """'blk.3.attn_q.bias' -> 'model.layers.3.self_attn.q_proj.bias' (others unchanged)."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if m and m.group(2) in _LAYER:
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
  return _TOP.get(name, name)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (transformers' _reverse_permute_weights)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
  """A GGUF tensor (any float or quantised type) as f32 in HF shape, dequantised by
  `gguf.quants.dequantize` in chunks of rows into one output buffer."""
  import gguf  # only needed here
  shape = tuple(int(s) for s in reversed(tensor.shape))
  data, qtype = tensor.data, tensor.tensor_type
  if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
               gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F64) or data.ndim < 2:
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False).reshape(shape)
  rows = data.reshape(-1, data.shape[-1])  # quantised: [rows, bytes per row]
  out = np.empty((rows.shape[0], int(tensor.n_elements) // rows.shape[0]), np.float32)
  step = max(1, _CHUNK_ELEMENTS // out.shape[1])
  for i in range(0, rows.shape[0], step):
    out[i:i + step] = gguf.quants.dequantize(rows[i:i + step], qtype)
  return out.reshape(shape)


def _config(fields: dict, source: str, tied: bool) -> ModelConfig:
  arch = fields.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise WeightsError(f"{source}: unsupported GGUF architecture {arch!r} "
                       f"({', '.join(ARCHITECTURES)})")

  def get(key, default=None):
    value = fields.get(f"{arch}.{key}", default)
    if value is None:
      raise WeightsError(f"{source}: missing GGUF metadata {arch}.{key}")
    return value

  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  vocab = fields.get(f"{arch}.vocab_size") or fields.get("tokenizer.vocab_size")
  if not vocab:
    raise WeightsError(f"{source}: no vocabulary size in the GGUF metadata")
  return ModelConfig(
      name=pathlib.Path(source).stem, vocab_size=int(vocab),
      hidden_size=d, intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("attention.key_length", d // heads)),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), tie_embeddings=tied,
      qk_norm=arch == "qwen3", qkv_bias=arch == "qwen2",
      max_position_embeddings=int(get("context_length", 8192)))


def open_gguf(path: pathlib.Path) -> tuple[ModelConfig, _Tensors]:
  """Config from GGUF metadata and its tensors, dequantised to f32 in HF layout on read."""
  import gguf  # only needed here
  try:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.")}  # skip the big vocabulary arrays
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    fields["tokenizer.vocab_size"] = len(tokens.data) if tokens is not None else None
  except Exception as e:  # the reader raises many types on a bad file
    raise WeightsError(f"{path}: unreadable GGUF file (truncated or corrupt?): {e}") from e
  by_name = {gguf_to_hf_name(t.name): t for t in reader.tensors}
  if "rope_freqs.weight" in by_name:
    raise WeightsError(f"{path}: tensor 'rope_freqs.weight' (baked RoPE scaling) is not supported")
  cfg = _config(fields, str(path), tied="lm_head.weight" not in by_name)
  permute = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}

  def read(name: str) -> np.ndarray:
    t = by_name[name]
    if t.tensor_type.name in _INT_TYPES:
      raise WeightsError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                         "expected floats or a float quantisation")
    try:
      w = dequantize(t)
    except Exception as e:
      raise WeightsError(f"{path}: cannot dequantise tensor {t.name!r}: {e}") from e
    qk = re.fullmatch(r"model\.layers\.\d+\.(self_attn\.[qk]_proj)\.weight", name)
    return _unpermute(w, permute[qk.group(1)]) if qk and cfg.architecture == "llama" else w

  shapes = {n: tuple(int(s) for s in reversed(t.shape)) for n, t in by_name.items()}
  return cfg, _Tensors(shapes, {n: str(path) for n in by_name}, read)


def load_gguf(path=None, *, mesh=None, param_dtype: str = "float32", dtype: str | None = None,
              rules=shd.LOGICAL_RULES) -> Transformer:
  """A Transformer from a llama.cpp GGUF file (default: the packaged SmolLM2-135M)."""
  path = pathlib.Path(path) if path is not None else packaged.smollm2_gguf_path()
  cfg, tensors = open_gguf(path)
  cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
  return _build(cfg, tensors, mesh, rules)
