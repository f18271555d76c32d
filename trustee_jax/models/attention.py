"""Grouped-query attention with a choice of implementation (ModelConfig.attention_impl).

- einsum: the reference; materialises f32 scores [B, KV, G, T, S].
- xla: `jax.nn.dot_product_attention(implementation="xla")` with the same boolean mask (the
  same numerics on any backend; XLA still builds the scores, so no memory is saved).
- cudnn: cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/f16 only).
  Self-attention passes `is_causal` (cuDNN skips the upper triangle) and the padding as the
  mask, which cuDNN turns into a [B, 1, T, S] bias: one per call, not per head. Not yet run
  on a GPU (tests check only that it fails loudly on CPU).
- splash: TPU splash attention (Pallas) for self-attention without a KV cache, padding as
  segment ids and a causal block mask; T must be a multiple of SPLASH_BLOCK. On a mesh (given,
  or carried by concrete inputs) the kernel runs under `jax.shard_map`, each device on its own
  rows (batch over data and fsdp) and heads (q/KV heads over tensor, which must divide both
  head counts); the sequence stays whole per device. Tested in Pallas interpret mode on one
  and on four fake CPU devices, and compiled ahead of time for v5p.
- auto: `resolve_implementation`'s pick for the backend, dtype and call.

Every implementation gives the same output on valid query rows (position >= 0); a padding
query row's output is finite and unspecified (nothing reads it). cudnn and splash take
causality from token order, so valid positions must increase along a row (left- or
right-padded rows, as the sampler and step_batch build them).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from trustee_jax import sharding as shd

Array = jax.Array

IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "splash", "auto")
SPLASH_BLOCK = 128  # splash's default tile (BlockSizes.get_default); T and S must divide by it


def check_implementation(name: str) -> str:
  """`name` if it is a known implementation, else a ValueError naming the choices."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; known: {IMPLEMENTATIONS}")
  return name


def resolve_implementation(name: str, *, backend: str, dtype, self_attention: bool,
                           length: int) -> str:
  """The implementation `name` stands for on `backend` ("cpu" | "gpu" | "tpu"), where "auto" is:
  cudnn on GPU in bf16/f16 (cuDNN has no f32 flash kernel), splash on TPU for self-attention
  of a multiple of SPLASH_BLOCK tokens, xla on CPU (as exact as einsum and measured no slower:
  prefill ~0.6x the time), and einsum, the reference, otherwise."""
  check_implementation(name)
  if name != "auto":
    return name
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and half:
    return "cudnn"
  if backend == "tpu" and self_attention and length % SPLASH_BLOCK == 0:
    return "splash"
  return "xla" if backend == "cpu" else "einsum"


def self_attention_mask(positions: Array) -> Array:
  """[B, T, T]: query i sees key j iff both are tokens (position >= 0) and pos[j] <= pos[i]."""
  valid = positions >= 0
  return ((positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]
          & valid[:, :, None])


def cache_attention_mask(positions: Array, attend_len: int) -> Array:
  """[B, T, attend_len] over a position-indexed KV cache (key j holds position j): a token
  query sees the cache up to its own position."""
  key_pos = jnp.arange(attend_len)[None, None, :]
  return (key_pos <= positions[:, :, None]) & (positions >= 0)[:, :, None]


def einsum_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The reference. q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H,D]."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, t: int, s: int, interpret: bool):
  """A causal splash kernel for [H, T, D] queries (cached: building the block mask is slow).
  Built eagerly even when called in a trace (shard_map's would capture, and the cache leak, its
  mask arrays as tracers)."""
  causal = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, s))] * num_heads)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, positions: Array, *,
                     interpret: bool = False) -> Array:
  """Causal self-attention by TPU splash attention; padding (position -1) is its own segment.
  `interpret` runs the Pallas kernel in Python (CPU tests)."""
  b, t, h, d = q.shape
  if t % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a length divisible by {SPLASH_BLOCK}, got {t}; "
                     f"use attention_impl 'xla' or 'auto' for this shape")
  kernel = _splash_kernel(h, t, t, interpret)
  segments = (positions >= 0).astype(jnp.int32)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B,T,N,D] -> [B,N,T,D]
  qh = heads_first(q * jnp.asarray(1 / math.sqrt(d), q.dtype))
  out = jax.vmap(lambda qb, kb, vb, sb: kernel(qb, kb, vb, segment_ids=splash.SegmentIds(
      q=sb, kv=sb)))(qh, heads_first(k), heads_first(v), segments)
  return heads_first(out).astype(q.dtype)


def splash_mesh(mesh: Mesh | None, q: Array) -> Mesh | None:
  """The mesh splash must shard over: `mesh`, else the mesh of a concrete `q`'s NamedSharding;
  None on one device (a traced `q` does not show its sharding: pass the mesh)."""
  if mesh is None and not isinstance(q, jax.core.Tracer) and isinstance(
      getattr(q, "sharding", None), NamedSharding):
    mesh = q.sharding.mesh
  return mesh if mesh is not None and mesh.size > 1 else None


def _mesh_axes(rules, name: str, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes of size > 1 that `rules` put logical axis `name` on."""
  axes = dict(rules).get(name)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if mesh.shape[a] > 1)


def splash_specs(mesh: Mesh, rules, q_shape: tuple[int, ...], kv_shape: tuple[int, ...]
                 ) -> tuple[P, P, P]:
  """(q, k/v, positions) PartitionSpecs for splash under shard_map: batch and heads by `rules`,
  length and head_dim whole. The heads must split evenly, q and KV heads over the same axes:
  replicating one but not the other would pair a shard's query heads with the wrong KV heads."""
  q_axes, kv_axes = _mesh_axes(rules, "q_heads", mesh), _mesh_axes(rules, "kv_heads", mesh)
  shards = math.prod(mesh.shape[a] for a in q_axes)
  if q_axes != kv_axes or q_shape[2] % shards or kv_shape[2] % shards:
    sizes = {a: mesh.shape[a] for a in q_axes + kv_axes}
    raise ValueError(
        f"splash attention on a mesh needs the {q_shape[2]} query heads and {kv_shape[2]} KV "
        f"heads to split evenly over the same mesh axes; the rules put q_heads on {q_axes} and "
        f"kv_heads on {kv_axes} (axis sizes {sizes}): pick a tensor axis size that divides both "
        f"head counts, or attention_impl 'xla'")
  q_spec = shd.logical_to_spec(rules, ("batch", None, "q_heads", None), q_shape, mesh)
  kv_spec = shd.logical_to_spec(rules, ("batch", None, "kv_heads", None), kv_shape, mesh)
  return q_spec, kv_spec, P(q_spec[0], None)


def sharded_splash_attention(q: Array, k: Array, v: Array, positions: Array, mesh: Mesh,
                             rules=shd.LOGICAL_RULES, *, interpret: bool = False) -> Array:
  """`splash_attention` under `jax.shard_map` over `mesh`: each device runs the kernel on its
  batch rows and heads (`splash_specs`), positions (the padding segments) split like the rows."""
  q_spec, kv_spec, pos_spec = splash_specs(mesh, rules, q.shape, k.shape)
  local = functools.partial(splash_attention, interpret=interpret)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, pos_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, positions)


def mesh_backend(mesh: Mesh | None) -> str:
  """The platform of `mesh`'s devices, else the default backend: "auto" then picks for the
  devices it compiles for (a TPU topology compiled ahead of time from a CPU host is "tpu")."""
  devices = getattr(mesh, "devices", None)  # an AbstractMesh has none
  return jax.default_backend() if devices is None else devices.flat[0].platform.lower()


def attention(q: Array, k: Array, v: Array, mask: Array, *, implementation: str = "einsum",
              self_positions: Array | None = None, mesh: Mesh | None = None,
              rules=shd.LOGICAL_RULES) -> Array:
  """Grouped-query attention. q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H,D].

  `self_positions` [B, T] are the queries' positions when the keys are the queries themselves
  (training, prefill without a cache); None when the keys come from a KV cache (then only the
  mask tells causality). `mask` is authoritative for einsum, xla and cudnn. `mesh` and `rules`
  (the model's) lay splash out over the devices, and "auto" picks for the mesh's platform; the
  other implementations are partitioned by XLA from their inputs' shardings.
  """
  impl = resolve_implementation(implementation, backend=mesh_backend(mesh), dtype=q.dtype,
                                self_attention=self_positions is not None, length=q.shape[1])
  if impl == "einsum":
    return einsum_attention(q, k, v, mask)
  if impl == "splash":
    if self_positions is None:
      raise ValueError("splash attention runs self-attention only (no KV cache); use "
                       "attention_impl 'xla' or 'auto' for decode and cached prefill")
    mesh = splash_mesh(mesh, q)
    if mesh is None:
      return splash_attention(q, k, v, self_positions)
    return sharded_splash_attention(q, k, v, self_positions, mesh, rules)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl,
                                      is_causal=impl == "cudnn" and self_positions is not None)
