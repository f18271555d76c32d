"""Every attention implementation that runs on CPU against the einsum reference (f32).

Covered: GQA (4 query heads on 2 KV heads), left-padded (prefill) and right-padded
(training) rows, causality, chunked prefill against a KV cache whose unwritten tail holds
garbage, decode at per-row positions, splash attention in Pallas interpret mode (forward and
gradients, on one device and under shard_map on a (data=1, fsdp=2, tensor=2) mesh of fake CPU
devices), and a whole tiny model's logits and gradients with xla (one device) and splash (the
mesh) against einsum. Only valid query rows are compared: a padding row's output is unspecified
(see models/attention.py). The mesh checks run this file as a script in a subprocess, because
XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax initialises.
"""
import json

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from trustee_jax import sharding as shd
from trustee_jax.models import attention as attn
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import KVCache, create_model, left_padded_positions

TOL = 1e-5
H, KV, D = 4, 2, 16


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(b: int, t: int, s: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, H, D)), jax.random.normal(ks[1], (b, s, KV, D)),
          jax.random.normal(ks[2], (b, s, KV, D)))


def _padded_positions(width: int) -> jax.Array:
  """Rows: full, left-padded (prefill), right-padded (training), a single token."""
  left = left_padded_positions(np.array([width, width // 2, 1]), width)
  right = jnp.where(jnp.arange(width) < width // 3, jnp.arange(width), -1)[None]
  return jnp.concatenate([left, right])


def _valid_rows(x, positions):
  return np.asarray(x)[np.asarray(positions) >= 0]


def test_xla_matches_einsum_on_padded_causal_self_attention():
  positions = _padded_positions(12)
  q, k, v = _qkv(4, 12, 12)
  mask = attn.self_attention_mask(positions)
  ref = attn.einsum_attention(q, k, v, mask)
  out = attn.attention(q, k, v, mask, implementation="xla", self_positions=positions)
  assert rel_diff(_valid_rows(out, positions), _valid_rows(ref, positions)) <= TOL
  # The mask matters on these inputs: without causality or padding the outputs differ.
  unmasked = attn.einsum_attention(q, k, v, jnp.ones_like(mask))
  assert rel_diff(_valid_rows(unmasked, positions), _valid_rows(ref, positions)) > 0.1


def test_xla_matches_einsum_against_a_kv_cache():
  """Chunked prefill (4 queries at an offset) and decode (1 query) over a 16-slot cache whose
  slots past each row's position hold values that must not be read."""
  q, k, v = _qkv(3, 4, 16, seed=1)
  chunk = jnp.array([[5, 6, 7, 8], [-1, -1, 0, 1], [9, 10, 11, 12]])
  decode = jnp.array([[3], [15], [-1]])
  for positions, queries in ((chunk, q), (decode, q[:, :1])):
    mask = attn.cache_attention_mask(positions, 16)
    ref = attn.einsum_attention(queries, k, v, mask)
    out = attn.attention(queries, k, v, mask, implementation="xla")
    assert rel_diff(_valid_rows(out, positions), _valid_rows(ref, positions)) <= TOL
    future = attn.einsum_attention(queries, k, v, jnp.ones_like(mask))
    assert rel_diff(_valid_rows(future, positions), _valid_rows(ref, positions)) > 0.1


def test_splash_matches_einsum_in_interpret_mode():
  """The TPU kernel, run by the Pallas interpreter: forward and gradients at T=128."""
  t = attn.SPLASH_BLOCK
  positions = _padded_positions(t)
  q, k, v = _qkv(4, t, t, seed=2)
  mask = attn.self_attention_mask(positions)
  weight = (positions >= 0)[:, :, None, None].astype(jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(weight * fn(q, k, v) ** 2)

  ref_fn = lambda q, k, v: attn.einsum_attention(q, k, v, mask)  # noqa: E731
  splash_fn = lambda q, k, v: attn.splash_attention(q, k, v, positions, interpret=True)  # noqa: E731
  assert rel_diff(_valid_rows(splash_fn(q, k, v), positions),
                  _valid_rows(ref_fn(q, k, v), positions)) <= TOL
  grads = jax.grad(loss(splash_fn), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert rel_diff(g, r) <= TOL


def test_splash_refuses_what_it_cannot_run():
  q, k, v = _qkv(1, 8, 8)
  positions = jnp.arange(8)[None]
  with pytest.raises(ValueError, match="divisible by 128"):
    attn.splash_attention(q, k, v, positions, interpret=True)
  with pytest.raises(ValueError, match="self-attention only"):
    attn.attention(q, k, v, attn.cache_attention_mask(positions, 8), implementation="splash")


def test_cudnn_fails_loudly_without_a_gpu():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 8, 8))
  positions = jnp.arange(8)[None]
  with pytest.raises(RuntimeError, match="cuDNN"):
    attn.attention(q, k, v, attn.self_attention_mask(positions), implementation="cudnn",
                   self_positions=positions)


@pytest.mark.parametrize("backend,dtype,self_attention,length,expected", [
    ("gpu", "bfloat16", True, 100, "cudnn"),
    ("gpu", "float32", True, 256, "einsum"),  # cuDNN has no f32 flash kernel
    ("tpu", "float32", True, 256, "splash"),
    ("tpu", "bfloat16", True, 100, "einsum"),  # not a multiple of the splash block
    ("tpu", "bfloat16", False, 256, "einsum"),  # decode / cached prefill
    ("cpu", "float32", True, 256, "xla"),
    ("cpu", "bfloat16", False, 1, "xla"),
])
def test_auto_picks_per_backend(backend, dtype, self_attention, length, expected):
  assert attn.resolve_implementation("auto", backend=backend, dtype=dtype,
                                     self_attention=self_attention, length=length) == expected
  assert attn.resolve_implementation("xla", backend=backend, dtype=dtype,
                                     self_attention=self_attention, length=length) == "xla"


def test_unknown_implementation_is_rejected():
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    get_model_config("tiny-llama", attention_impl="flash")


# ------------------------------------------------------------------ whole model


@pytest.fixture(scope="module")
def tiny_models():
  """The same tiny random Llama with einsum and with xla attention."""
  model = create_model(get_model_config("tiny-llama", vocab_size=256, initializer_range=0.2),
                       seed=3)
  xla = nnx.clone(model)
  xla.cfg = model.cfg.replace(attention_impl="xla")
  return model, xla


@nnx.jit
def _forward(model, tokens, positions, cache):
  return model(tokens, positions, cache)


def test_model_logits_and_gradients_match_with_xla_attention(tiny_models):
  positions = _padded_positions(12)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, positions.shape))
  logits = [_forward(m, tokens, positions, None)[0] for m in tiny_models]
  assert rel_diff(_valid_rows(logits[1], positions), _valid_rows(logits[0], positions)) <= TOL

  def loss(model):
    logp = jax.nn.log_softmax(model(tokens, positions)[0])
    return jnp.sum(jnp.where(positions[..., None] >= 0, logp, 0.0)[..., 0])

  grads = [nnx.jit(nnx.grad(loss))(m) for m in tiny_models]
  for g, r in zip(jax.tree_util.tree_leaves(grads[1]), jax.tree_util.tree_leaves(grads[0])):
    assert rel_diff(g, r) <= 1e-4


def test_model_prefill_then_decode_match_with_xla_attention(tiny_models):
  """Left-padded prefill in two chunks into a cache, then two decode steps."""
  lengths, width = np.array([8, 5, 2]), 8
  positions = left_padded_positions(lengths, width)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, width + 2)))
  outs = []
  for model in tiny_models:
    cache = KVCache.zeros(model.cfg, batch=3, length=16)
    steps = []
    for sl in (slice(0, 4), slice(4, 8)):
      logits, cache = _forward(model, tokens[:, sl], positions[:, sl], cache)
      steps.append(logits)
    for j in range(2):
      logits, cache = _forward(model, tokens[:, width + j:width + j + 1],
                               jnp.asarray(lengths + j)[:, None], cache)
      steps.append(logits)
    outs.append(jnp.concatenate(steps, axis=1))
  all_pos = jnp.concatenate([positions, jnp.asarray(lengths)[:, None] + jnp.arange(2)], 1)
  assert rel_diff(_valid_rows(outs[1], all_pos), _valid_rows(outs[0], all_pos)) <= TOL


def test_splash_compiles_for_a_tpu_topology():
  """Ahead-of-time lowering and compiling of splash's forward and backward for TPU v5p, as
  benchmarks/memory_8b.py compiles against a topology (needs libtpu; skipped without it)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731

  def loss(q, k, v, positions):
    out = attn.attention(q, k, v, attn.self_attention_mask(positions), implementation="splash",
                         self_positions=positions)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  q, kv = spec((1, 256, H, 128), jnp.bfloat16), spec((1, 256, KV, 128), jnp.bfloat16)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      q, kv, kv, spec((1, 256), jnp.int32)).compile()
  assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernel, not an XLA fallback


# ------------------------------------------------------------------ splash on a mesh

MESH_SHAPE = (1, 2, 2)  # data x fsdp x tensor
SHARDED_Q = P("fsdp", None, "tensor", None)  # batch rows over fsdp, heads over tensor


def test_splash_specs_split_rows_and_heads_evenly_or_refuse():
  mesh = AbstractMesh(MESH_SHAPE, shd.MESH_AXES)
  specs = attn.splash_specs(mesh, shd.LOGICAL_RULES, (4, 128, H, D), (4, 128, KV, D))
  assert specs == (SHARDED_Q, SHARDED_Q, P("fsdp", None))
  with pytest.raises(ValueError, match=r"4 query heads and 1 KV heads .* \{'tensor': 2\}"):
    attn.splash_specs(mesh, shd.LOGICAL_RULES, (4, 128, H, D), (4, 128, 1, D))
  unsplit_kv = shd.rules_from_config({"kv_heads": None})
  with pytest.raises(ValueError, match=r"q_heads on \('tensor',\) and kv_heads on \(\)"):
    attn.splash_specs(mesh, unsplit_kv, (4, 128, H, D), (4, 128, KV, D))


def _shard_map_specs(fn, *args) -> list[str]:
  """The in_specs of the arguments of each top-level shard_map in `fn`'s jaxpr (the kernel's
  mask arrays, replicated constants, come first)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [str(e.params["in_specs"][-len(args) - 1:]) for e in jaxpr.eqns
          if e.primitive.name == "shard_map"]


def _mesh_child() -> dict:
  """In a child with fake devices: sharded splash (the op, and a whole tiny model) vs einsum."""
  build = attn._splash_kernel
  attn._splash_kernel = lambda h, t, s, interpret: build(h, t, s, True)  # Pallas interpreter
  mesh = shd.make_mesh(MESH_SHAPE)
  t = attn.SPLASH_BLOCK
  positions = _padded_positions(t)
  q, k, v = _qkv(4, t, t, seed=2)
  mask = attn.self_attention_mask(positions)
  weight = (positions >= 0)[:, :, None, None].astype(jnp.float32)
  ref_fn = lambda q, k, v: attn.einsum_attention(q, k, v, mask)  # noqa: E731
  mesh_fn = lambda q, k, v: attn.attention(q, k, v, mask, implementation="splash",  # noqa: E731
                                           self_positions=positions, mesh=mesh)
  loss = lambda fn: lambda q, k, v: jnp.sum(weight * fn(q, k, v) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss(mesh_fn), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
  # No mesh passed: the mesh comes from the inputs' NamedSharding (eager call).
  placed = [jax.device_put(x, NamedSharding(mesh, SHARDED_Q)) for x in (q, k, v)]
  eager = attn.attention(*placed, mask, implementation="splash", self_positions=positions)

  model_cfg = get_model_config("tiny-llama", vocab_size=256, initializer_range=0.2)
  models = [create_model(model_cfg.replace(attention_impl=impl), seed=3, mesh=mesh)
            for impl in ("einsum", "splash")]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, positions.shape))

  def model_loss(model):
    logp = jax.nn.log_softmax(model(tokens, positions)[0])
    return jnp.sum(jnp.where(positions[..., None] >= 0, logp, 0.0)[..., 0])

  logits = [_forward(m, tokens, positions, None)[0] for m in models]
  model_grads = [nnx.jit(nnx.grad(model_loss))(m) for m in models]
  graphdef, state = nnx.split(models[1])
  model_jaxpr = str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(tokens, positions)[0])(
      state))
  return {
      "devices": len(jax.devices()),
      "forward_rel": rel_diff(_valid_rows(mesh_fn(q, k, v), positions),
                              _valid_rows(ref_fn(q, k, v), positions)),
      "grad_rel": max(rel_diff(g, r) for g, r in zip(grads, ref_grads)),
      "in_specs": _shard_map_specs(mesh_fn, q, k, v),
      "eager_rel": rel_diff(_valid_rows(eager, positions), _valid_rows(ref_fn(q, k, v), positions)),
      "eager_spec": str(eager.sharding.spec),
      "model_logits_rel": rel_diff(_valid_rows(logits[1], positions),
                                   _valid_rows(logits[0], positions)),
      "model_grad_rel": max(rel_diff(g, r) for g, r in zip(
          jax.tree_util.tree_leaves(model_grads[1]), jax.tree_util.tree_leaves(model_grads[0]))),
      "model_shard_maps": model_jaxpr.count("shard_map"),
  }


@pytest.fixture(scope="module")
def splash_on_a_mesh(run_on_cpu_devices) -> dict:
  return run_on_cpu_devices(__file__, int(np.prod(MESH_SHAPE)))


def test_sharded_splash_matches_einsum(splash_on_a_mesh):
  r = splash_on_a_mesh
  assert r["devices"] == 4
  assert r["in_specs"] == [str((SHARDED_Q, SHARDED_Q, SHARDED_Q, P("fsdp", None)))]
  assert r["forward_rel"] <= TOL and r["grad_rel"] <= TOL


def test_splash_takes_the_mesh_from_sharded_inputs(splash_on_a_mesh):
  assert splash_on_a_mesh["eager_spec"] == str(SHARDED_Q)
  assert splash_on_a_mesh["eager_rel"] <= TOL


def test_model_on_a_mesh_matches_einsum_with_splash_attention(splash_on_a_mesh):
  r = splash_on_a_mesh
  assert r["model_shard_maps"] >= 1  # the model handed its mesh to splash
  assert r["model_logits_rel"] <= TOL and r["model_grad_rel"] <= 1e-4


def test_auto_picks_splash_for_a_tpu_mesh_and_it_compiles_sharded():
  """"auto" on a mesh of v5p devices (a CPU host compiling ahead of time) is sharded splash:
  forward and backward lower and compile for the 2x2 topology (needs libtpu; skipped without)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  mesh = shd.make_mesh(MESH_SHAPE, devices=devices)
  assert attn.mesh_backend(mesh) == "tpu"
  spec = lambda shape, dtype, p: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=NamedSharding(mesh, p))

  def loss(q, k, v, positions):
    out = attn.attention(q, k, v, attn.self_attention_mask(positions), implementation="auto",
                         self_positions=positions, mesh=mesh)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  q = spec((2, 256, H, 128), jnp.bfloat16, SHARDED_Q)
  kv = spec((2, 256, KV, 128), jnp.bfloat16, SHARDED_Q)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      q, kv, kv, spec((2, 256), jnp.int32, P("fsdp", None))).compile()
  assert "tpu_custom_call" in compiled.as_text()


if __name__ == "__main__":
  print(json.dumps(_mesh_child()))
