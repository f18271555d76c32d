"""Logical-axis rules, and sharded init / load / forward on 8 fake CPU devices.

The 8-device checks run this file as a script in a subprocess, because
XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax initialises and
must not leak into the rest of the suite. The child prints one JSON line of measurements.
"""
import json
import tempfile

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from trustee_jax import sharding as shd

MESH = AbstractMesh((1, 2, 4), shd.MESH_AXES)  # data x fsdp x tensor


def test_divisibility_rule_replicates_what_does_not_divide():
  spec = lambda axes, shape: shd.logical_to_spec(shd.LOGICAL_RULES, axes, shape, MESH)
  # SmolLM2: 9 query / 3 KV heads cannot split 4 ways; 576 splits 2 ways.
  assert spec(("layers", "embed", "q_heads", "head_dim"), (30, 576, 9, 64)) == P(
      None, "fsdp", None, None)
  assert spec(("layers", "embed", "q_heads", "head_dim"), (30, 576, 8, 64)) == P(
      None, "fsdp", "tensor", None)
  assert spec(("layers", "embed", "mlp"), (2, 575, 1536)) == P(None, None, "tensor")
  # batch over (data, fsdp): data has size 1 so only fsdp is used.
  assert spec(("batch", "length"), (4, 7)) == P("fsdp", None)
  assert spec(("batch", "length"), (3, 7)) == P(None, None)


def test_a_mesh_axis_is_used_once_per_array():
  rules = (("a", "tensor"), ("b", "tensor"))
  assert shd.logical_to_spec(rules, ("a", "b"), (8, 8), MESH) == P("tensor", None)


def test_make_mesh_checks_its_shape():
  import jax
  n = len(jax.devices())
  assert shd.make_mesh((1, 1, -1)).shape == {"data": 1, "fsdp": 1, "tensor": n}
  with pytest.raises(ValueError, match="at most one entry may be -1"):
    shd.make_mesh((-1, 1, -1))
  with pytest.raises(ValueError, match=f"needs {2 * n} devices, have {n}"):
    shd.make_mesh((1, 2, n))


# ------------------------------------------------------------------ axes carried by parameters

# The name -> axes table the models were sharded by before the axes moved onto the parameters.
OLD_TABLE = {
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"), "wq": ("layers", "embed", "q_heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "q_heads", "head_dim", "embed"), "bq": ("layers", "q_heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"), "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "norm"), "k_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
_COMMON = {"embed", "final_norm", "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate",
           "w_up", "w_down"}


def _abstract_state(name, **overrides):
  from flax import nnx

  from trustee_jax.models.model_configs import get_model_config
  from trustee_jax.models.transformer import Transformer
  cfg = get_model_config(name, **overrides)
  return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


@pytest.mark.parametrize("name,extra", [
    ("tiny-qwen2", {"bq", "bk", "bv"}), ("tiny-qwen3", {"q_norm", "k_norm"}),
    ("tiny-llama", set())])
def test_every_parameter_carries_its_logical_axes(name, extra):
  from trustee_jax.models.model_configs import get_model_config
  state = _abstract_state(name)
  if not get_model_config(name).tie_embeddings:
    extra = extra | {"lm_head"}
  assert set(state) == _COMMON | extra
  for key, var in state.items():
    assert var.get_metadata()[shd.AXES_KEY] == OLD_TABLE[key], key
    assert len(OLD_TABLE[key]) == var.ndim


def test_a_loaded_model_keeps_the_axes(tmp_path):
  from flax import nnx

  from trustee_jax.models import weights
  from trustee_jax.models.model_configs import get_model_config
  from trustee_jax.models.transformer import create_model
  cfg = get_model_config("tiny-qwen2", vocab_size=128)
  loaded = weights.load_hf(weights.save_hf(create_model(cfg), tmp_path))
  assert {k: v.get_metadata()[shd.AXES_KEY] for k, v in nnx.state(loaded).items()} == {
      k: OLD_TABLE[k] for k in nnx.state(loaded)}


def test_a_parameter_without_axes_is_an_error_naming_it():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  state = _abstract_state("tiny-llama")
  shd.state_shardings(state, MESH)  # the model's own state: every leaf has axes
  missing = nnx.State({"lora": {"extra": nnx.Param(jax.ShapeDtypeStruct((4, 8), jnp.float32))}})
  with pytest.raises(ValueError, match="parameter 'lora/extra' .*has no logical axes"):
    shd.state_shardings(missing, MESH)
  wrong = nnx.State({"w": nnx.Param(jnp.zeros((4, 8)), **shd.param_metadata(("embed",)))})
  with pytest.raises(ValueError, match=r"parameter 'w' has 1 logical axes \('embed',\) for its 2"):
    shd.state_shardings(wrong, MESH)
  with pytest.raises(ValueError, match="parameter 'w' .*has no logical axes"):
    shd.state_shardings({"w": jnp.zeros((4, 8))}, MESH)  # a bare array has none either


def test_rules_from_config_overrides_entries_and_names_unknown_ones():
  import ml_collections

  from trustee_jax.default_config import default_config
  assert shd.rules_from_config(default_config().mesh.rules) == shd.LOGICAL_RULES
  rules = shd.rules_from_config(ml_collections.ConfigDict({"mlp": None,
                                                          "embed": ("data", "fsdp")}))
  assert [n for n, _ in rules] == [n for n, _ in shd.LOGICAL_RULES]
  assert dict(rules)["mlp"] is None and dict(rules)["embed"] == ("data", "fsdp")
  assert dict(rules)["vocab"] == "tensor"  # the rest as LOGICAL_RULES
  w_up = _abstract_state("tiny-qwen3")["w_up"]
  spec = lambda r: shd.state_shardings(  # noqa: E731
      {"w_up": w_up}, MESH, r)["w_up"].get_value().spec
  assert spec(shd.LOGICAL_RULES) == P(None, "fsdp", "tensor")
  assert spec(rules) == P(None, "fsdp", None)
  with pytest.raises(ValueError, match=r"unknown logical axis name\(s\) \['mlps'\]"):
    shd.rules_from_config({"mlps": None})
  with pytest.raises(ValueError, match="mesh.rules.mlp: unknown mesh axis 'model'"):
    shd.rules_from_config({"mlp": "model"})


# ------------------------------------------------------------------ 8 devices, in a child


def _child() -> dict:
  """Sharded vs unsharded init, load and forward on a 2x4 (fsdp x tensor) mesh."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from trustee_jax.models import weights
  from trustee_jax.models.model_configs import get_model_config
  from trustee_jax.models.transformer import KVCache, create_model

  assert len(jax.devices()) == 8, jax.devices()
  mesh = shd.make_mesh((1, 2, 4))
  fwd = nnx.jit(lambda m, t, p: m(t, p)[0])
  step = nnx.jit(lambda m, t, p, c: m(t, p, c))
  rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                           / np.abs(np.asarray(b)).max())
  configs = {
      "smollm2": get_model_config("smollm2-135m", num_layers=2, initializer_range=0.2),
      "divisible": get_model_config("tiny-qwen3", vocab_size=256, num_heads=8,
                                    num_kv_heads=4, initializer_range=0.2),
  }
  out = {}
  for label, cfg in configs.items():
    sharded = create_model(cfg, seed=0, mesh=mesh)
    graphdef, state = nnx.split(sharded)
    plain = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))  # same params,
    plain.mesh = None  # one device, no sharding constraints
    names = [n for n in ("embed", "lm_head", "wq", "wk", "wo", "w_gate", "w_down", "attn_norm",
                         "q_norm") if hasattr(plain, n)]
    arrays = {n: getattr(sharded, n)[...] for n in names}
    res = {
        "specs": {n: [list(s) if isinstance(s, tuple) else s for s in a.sharding.spec]
                  for n, a in arrays.items()},
        "shard_shapes": {n: list(a.addressable_shards[0].data.shape) for n, a in arrays.items()},
    }
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    batch = shd.batch_sharding(mesh, 2)
    ref = fwd(plain, tokens, pos)
    res["forward_rel"] = rel(fwd(sharded, jax.device_put(tokens, batch),
                                 jax.device_put(pos, batch)), ref)
    if label == "divisible":
      eager = create_model(cfg, seed=0)  # the unsharded init path draws the same numbers
      res["init_diff"] = max(float(np.abs(np.asarray(getattr(eager, n)[...])
                                          - np.asarray(a)).max()) for n, a in arrays.items())
      cache = KVCache.zeros(cfg, 2, 12)
      _, c_plain = step(plain, tokens, pos, cache)
      _, c_sharded = step(sharded, jax.device_put(tokens, batch), jax.device_put(pos, batch),
                          cache)
      nxt, nxt_pos = tokens[:, :1], jnp.full((2, 1), 10)
      res["decode_rel"] = rel(step(sharded, nxt, nxt_pos, c_sharded)[0],
                              step(plain, nxt, nxt_pos, c_plain)[0])
      with tempfile.TemporaryDirectory() as tmp:
        loaded = weights.load_hf(weights.save_hf(sharded, tmp), mesh=mesh)
      res["loaded_specs_equal"] = all(
          getattr(loaded, n)[...].sharding.spec == a.sharding.spec for n, a in arrays.items())
      res["loaded_diff"] = max(float(np.abs(np.asarray(getattr(loaded, n)[...])
                                            - np.asarray(a)).max()) for n, a in arrays.items())
      res["loaded_forward_rel"] = rel(fwd(loaded, tokens, pos), ref)
    out[label] = res
  # mesh.rules from a config: mlp -> None replicates the MLP weights on a 2-device tensor axis
  from trustee_jax.models import loading
  two = shd.make_mesh((1, 1, 2), devices=jax.devices()[:2])
  spec = lambda m, n: [s for s in getattr(m, n)[...].sharding.spec]  # noqa: E731
  default = loading.load_model("tiny-qwen3", mesh=two)
  replicated = loading.load_model("tiny-qwen3", mesh=two,
                                  rules=shd.rules_from_config({"mlp": None}))
  out["rules"] = {"default": {n: spec(default, n) for n in ("w_up", "wq")},
                  "override": {n: spec(replicated, n) for n in ("w_up", "wq")},
                  "model_rules": dict(replicated.rules)["mlp"]}
  return out


@pytest.fixture(scope="module")
def eight_devices(run_on_cpu_devices) -> dict:
  return run_on_cpu_devices(__file__, 8)


def test_smollm2_shaped_heads_are_replicated(eight_devices):
  r = eight_devices["smollm2"]
  assert r["specs"]["wq"] == [None, "fsdp", None, None]  # 9 heads on tensor=4
  assert r["specs"]["wk"] == [None, "fsdp", None, None]  # 3 KV heads
  assert r["specs"]["wo"] == [None, None, None, "fsdp"]
  assert r["specs"]["embed"] == ["tensor", "fsdp"]
  assert r["specs"]["w_gate"] == [None, "fsdp", "tensor"]
  assert r["specs"]["w_down"] == [None, "tensor", "fsdp"]
  assert r["specs"]["attn_norm"] == [None, None]
  assert r["shard_shapes"]["wq"] == [2, 288, 9, 64]
  assert r["shard_shapes"]["embed"] == [49152 // 4, 288]


def test_divisible_heads_are_split_over_tensor(eight_devices):
  r = eight_devices["divisible"]
  assert r["specs"]["wq"] == [None, "fsdp", "tensor", None]
  assert r["specs"]["wk"] == [None, "fsdp", "tensor", None]
  assert r["specs"]["wo"] == [None, "tensor", None, "fsdp"]
  assert r["specs"]["lm_head"] == ["fsdp", "tensor"]
  assert r["specs"]["q_norm"] == [None, None]
  assert r["shard_shapes"]["wq"] == [2, 32, 2, 16]
  assert r["shard_shapes"]["wk"] == [2, 32, 1, 16]


def test_rules_from_a_config_move_a_parameter_on_two_devices(eight_devices):
  r = eight_devices["rules"]
  assert r["default"] == {"w_up": [None, None, "tensor"], "wq": [None, None, "tensor", None]}
  assert r["override"] == {"w_up": [None, None, None], "wq": [None, None, "tensor", None]}
  assert r["model_rules"] is None  # the model's activations follow the same rules


@pytest.mark.parametrize("label", ["smollm2", "divisible"])
def test_sharded_forward_equals_unsharded(eight_devices, label):
  assert eight_devices[label]["forward_rel"] <= 1e-5


def test_sharded_init_and_decode(eight_devices):
  r = eight_devices["divisible"]
  assert r["init_diff"] <= 1e-6  # create_model(mesh=...) draws the same parameters
  assert r["decode_rel"] <= 1e-5  # prefill + one decode step with the KV cache


def test_load_hf_onto_a_mesh(eight_devices):
  r = eight_devices["divisible"]
  assert r["loaded_specs_equal"] and r["loaded_diff"] == 0.0
  assert r["loaded_forward_rel"] <= 1e-5


if __name__ == "__main__":
  print(json.dumps(_child()))
