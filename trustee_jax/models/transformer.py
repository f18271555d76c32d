"""One Flax NNX decoder for the Llama-3 family (SmolLM2, Llama-3.1), Qwen2/Qwen2.5 and Qwen3.

Layers are stacked on a leading axis and run with `jax.lax.scan`, so a 30-layer model
compiles one block per shape. The KV cache is position-indexed: the token at position p
of row b lives at cache[:, b, p], whatever padding the input had. That one rule gives
left-padded prefill, per-row decode positions (continuous batching) and prefix reuse.
"""
import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from trustee_jax import sharding as shd
from trustee_jax.models import attention as attn_lib
from trustee_jax.models import paged_cache as paged_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 RoPE frequency scaling (HF `rope_type: llama3`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder; `qk_norm=True` makes it Qwen3, `qkv_bias=True` Qwen2."""
  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qk_norm: bool = False
  qkv_bias: bool = False  # q/k/v projection biases (Qwen2), none on o
  max_position_embeddings: int = 8192
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  attention_impl: str = "einsum"  # attention.IMPLEMENTATIONS: einsum | xla | cudnn | splash | auto

  def __post_init__(self):
    attn_lib.check_implementation(self.attention_impl)

  @property
  def architecture(self) -> str:
    return "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    per_layer = 2 * d + d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f
    per_layer += 2 * hd if self.qk_norm else 0
    per_layer += hd * (h + 2 * kv) if self.qkv_bias else 0
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + emb + d


CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, [layers, batch, cache_len, kv_heads, head_dim]."""
  k: Array
  v: Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None, mesh=None,
            rules=shd.LOGICAL_RULES) -> "KVCache":
    """A zero cache; with a mesh, laid out by CACHE_AXES (slots over data and fsdp)."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    sharding = None if mesh is None else shd.named_sharding(mesh, rules, CACHE_AXES, shape)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return cls(k=make(), v=make())

  @property
  def length(self) -> int:
    return self.k.shape[2]


# Logical axes of every parameter, the one source the constructor attaches to each as Variable
# metadata (`sharding.param_metadata`); `sharding.state_shardings` reads them from the state.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "q_heads", "head_dim", "embed"),
    "bq": ("layers", "q_heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "norm"),
    "k_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """RMSNorm in f32, returned in x's dtype (HF's LlamaRMSNorm/Qwen3RMSNorm)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def project(spec: str, x: Array, w: Any, dtype) -> Array:
  """`einsum(spec, x, w)` in `dtype`. A weight with its own `project` (lora.LoraWeight: x @ W +
  s * (x @ A) @ B) computes it itself, so no merged W, nor its full-size gradient, is formed."""
  own = getattr(w, "project", None)
  if own is not None:
    return own(spec, x, dtype)
  return jnp.einsum(spec, x, w.astype(dtype))


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse RoPE frequencies, with Llama-3 scaling when configured."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  s = cfg.rope_scaling
  if s is None:
    return inv
  orig = s.original_max_position_embeddings
  low_wavelen = orig / s.low_freq_factor
  high_wavelen = orig / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotate-half RoPE (HF convention) on [B, T, H, D] at integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__(tokens, positions, cache)` -> (logits, cache).

  positions [B, T] are absolute token positions; -1 marks padding (never attended to,
  never written to the cache).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, mesh=None,
               rules=shd.LOGICAL_RULES):
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    pdt = jnp.dtype(cfg.param_dtype)
    init = jax.nn.initializers.normal(cfg.initializer_range)
    L, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def param(name, shape, ones=False, zeros=False):
      if ones or zeros:
        value = jnp.ones(shape, pdt) if ones else jnp.zeros(shape, pdt)
      else:
        value = init(rngs.params(), shape, pdt)
      setattr(self, name, nnx.Param(value, **shd.param_metadata(PARAM_AXES[name])))

    param("embed", (cfg.vocab_size, d))
    param("attn_norm", (L, d), ones=True)
    param("wq", (L, d, h, hd))
    param("wk", (L, d, kv, hd))
    param("wv", (L, d, kv, hd))
    param("wo", (L, h, hd, d))
    if cfg.qkv_bias:
      param("bq", (L, h, hd), zeros=True)
      param("bk", (L, kv, hd), zeros=True)
      param("bv", (L, kv, hd), zeros=True)
    if cfg.qk_norm:
      param("q_norm", (L, hd), ones=True)
      param("k_norm", (L, hd), ones=True)
    param("mlp_norm", (L, d), ones=True)
    param("w_gate", (L, d, f))
    param("w_up", (L, d, f))
    param("w_down", (L, f, d))
    param("final_norm", (d,), ones=True)
    if not cfg.tie_embeddings:
      param("lm_head", (d, cfg.vocab_size))

  def _constrain(self, x: Array, axes: tuple[str | None, ...]) -> Array:
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(
        x, shd.named_sharding(self.mesh, self.rules, axes, x.shape))

  def _layer_params(self) -> dict[str, Array]:
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    if self.cfg.qk_norm:
      names += ["q_norm", "k_norm"]
    if self.cfg.qkv_bias:
      names += ["bq", "bk", "bv"]
    return {n: getattr(self, n)[...] for n in names}

  def unembed_matrix(self) -> Array:
    """[hidden, vocab] output projection (the embedding's transpose when tied)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return w.astype(jnp.dtype(self.cfg.dtype))

  def logits(self, hidden: Array) -> Array:
    """Final-normed hidden states [.., hidden] to f32 logits [.., vocab]."""
    return jnp.dot(hidden, self.unembed_matrix(), preferred_element_type=jnp.float32)

  def unstacked_layers(self) -> tuple[dict[str, Array], ...]:
    """Each layer's parameters as its own arrays (call under jit to get separate buffers),
    with q/k/v (and their biases) and gate/up concatenated: a decode step then runs 4
    matmuls a layer, not 7.
    Weights that are not plain arrays (LoRA's W + A @ B) are merged here, once."""
    pdt = jnp.dtype(self.cfg.param_dtype)
    stacked = self._layer_params()
    out = []
    for i in range(self.cfg.num_layers):
      p = {n: w if isinstance(w, jax.Array) else w.astype(pdt) for n, w in
           jax.tree_util.tree_map(lambda a, i=i: a[i], stacked).items()}
      fused = {"wqkv": jnp.concatenate([p.pop("wq"), p.pop("wk"), p.pop("wv")], axis=1),
               "w_gate_up": jnp.concatenate([p.pop("w_gate"), p.pop("w_up")], axis=1)}
      if self.cfg.qkv_bias:
        fused["bqkv"] = jnp.concatenate([p.pop("bq"), p.pop("bk"), p.pop("bv")], axis=0)
      out.append({**fused, **p})
    return tuple(out)

  def hidden_states(self, tokens: Array, positions: Array,
                    cache: KVCache | paged_lib.PagedKVCache | None = None, *,
                    cache_rows: Array | None = None, attend_len: int | None = None,
                    layers: tuple[dict[str, Array], ...] | None = None
                    ) -> tuple[Array, KVCache | paged_lib.PagedKVCache | None]:
    """Final-normed hidden states [B, T, hidden] (for chunked log-probs) and the cache.

    With a cache, row b of the input reads and writes cache row `cache_rows[b]` (default
    b), and attends to the first `attend_len` cache positions (default all): the sampler
    picks a bucket just past the longest live position, so a short request does not pay
    for a long cache. `layers` (from `unstacked_layers`) runs the layers unrolled over those
    arrays instead of scanned over the stacked ones: a scan copies each layer's weight slice
    before its matmuls, which doubles a memory-bound decode step's traffic. A PagedKVCache
    (paged_cache.py) is read and written through the block table rows `cache_rows`.
    """
    cfg = self.cfg
    cdt = jnp.dtype(cfg.dtype)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cdt)
    x = self._constrain(x, ("batch", "length", "act_embed"))
    inv_freq = rope_inv_freq(cfg)
    if cache is None:
      mask = attn_lib.self_attention_mask(positions)
    else:
      attend_len = attend_len or cache.length
      mask = attn_lib.cache_attention_mask(positions, attend_len)
      write_pos = jnp.where(positions >= 0, positions, cache.length)  # padding is dropped
      rows = jnp.arange(tokens.shape[0]) if cache_rows is None else cache_rows
    paged = isinstance(cache, paged_lib.PagedKVCache)
    tables = cache.block_table[rows] if paged else None

    def block(carry, lp):
      x, layer, ck, cv = carry
      hn = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
      if "wqkv" in lp:  # unstacked_layers' fused projections
        qkv = jnp.einsum("btd,dhk->bthk", hn, lp["wqkv"].astype(cdt))
        if cfg.qkv_bias:
          qkv = qkv + lp["bqkv"].astype(cdt)
        q, k, v = jnp.split(qkv, [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=2)
      else:
        q = project("btd,dhk->bthk", hn, lp["wq"], cdt)
        k = project("btd,dhk->bthk", hn, lp["wk"], cdt)
        v = project("btd,dhk->bthk", hn, lp["wv"], cdt)
        if cfg.qkv_bias:
          q, k, v = (q + lp["bq"].astype(cdt), k + lp["bk"].astype(cdt),
                     v + lp["bv"].astype(cdt))
      if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
      if paged:
        ck, cv, k, v = paged_lib.write_and_gather(ck, cv, layer, tables, positions, k, v,
                                                  attend_len)
        k, v = k.astype(cdt), v.astype(cdt)
      elif ck is not None:
        ck = ck.at[layer, rows[:, None], write_pos].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[layer, rows[:, None], write_pos].set(v.astype(cv.dtype), mode="drop")
        k, v = ck[layer, :, :attend_len], cv[layer, :, :attend_len]
        if cache_rows is not None:
          k, v = jnp.take(k, rows, axis=0), jnp.take(v, rows, axis=0)
        k, v = k.astype(cdt), v.astype(cdt)
      attn = attn_lib.attention(q, k, v, mask, implementation=cfg.attention_impl,
                                self_positions=positions if cache is None else None,
                                mesh=self.mesh, rules=self.rules)
      x = x + project("bthk,hkd->btd", attn, lp["wo"], cdt)
      hn = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
      if "w_gate_up" in lp:
        gate, up = jnp.split(jnp.einsum("btd,df->btf", hn, lp["w_gate_up"].astype(cdt)), 2,
                             axis=-1)
      else:
        gate = project("btd,df->btf", hn, lp["w_gate"], cdt)
        up = project("btd,df->btf", hn, lp["w_up"], cdt)
      mlp = self._constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
      x = x + project("btf,fd->btd", mlp, lp["w_down"], cdt)
      x = self._constrain(x, ("batch", "length", "act_embed"))
      return (x, layer + 1, ck, cv), None

    ck, cv = (None, None) if cache is None else (cache.k, cache.v)
    if layers is not None:  # unrolled, layer indices static (inference: no remat)
      carry = (x, 0, ck, cv)
      for lp in layers:
        carry, _ = block(carry, lp)
      x, _, ck, cv = carry
    else:
      if cfg.remat_policy != "none":
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[cfg.remat_policy])
      (x, _, ck, cv), _ = jax.lax.scan(block, (x, jnp.int32(0), ck, cv), self._layer_params())
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    if cache is None:
      return x, None
    if paged:
      return x, cache.replace(k=ck, v=cv)
    return x, KVCache(k=self._constrain(ck, CACHE_AXES), v=self._constrain(cv, CACHE_AXES))

  def __call__(self, tokens: Array, positions: Array, cache: KVCache | None = None,
               **kw) -> tuple[Array, KVCache | None]:
    hidden, cache = self.hidden_states(tokens, positions, cache, **kw)
    return self.logits(hidden), cache


def left_padded_positions(lengths: Any, width: int) -> Array:
  """Positions for left-padded rows: -1 on padding, then 0..len-1."""
  lengths = jnp.asarray(lengths)[:, None]
  idx = jnp.arange(width)[None, :]
  pos = idx - (width - lengths)
  return jnp.where(pos >= 0, pos, -1)


def create_model(cfg: ModelConfig, seed: int = 0, mesh=None,
                 rules=shd.LOGICAL_RULES) -> Transformer:
  """A randomly initialised model, initialised in one jitted call.

  With a mesh the parameters are created directly into their shardings (out_shardings),
  so an 8B model never sits whole on one device.
  """
  make = lambda: Transformer(cfg, nnx.Rngs(seed), mesh=mesh, rules=rules)  # noqa: E731
  graphdef, abs_state = nnx.split(nnx.eval_shape(make))
  out_shardings = None if mesh is None else shd.state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=out_shardings)()
  return nnx.merge(graphdef, state)
