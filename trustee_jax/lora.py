"""LoRA on the stacked attention and MLP projections: a frozen base, small trainable adapters.

Each target W [L, in.., out..] gets A [L, in.., r] and B [L, r, out..] and is used as
W + (alpha / r) * A @ B, applied as x @ W + (alpha / r) * (x @ A) @ B inside the layer scan
(`LoraWeight.project`), so training never forms a merged weight nor its full-size gradient.
B starts at zero, so a fresh adapter is the base exactly, and the frozen base with adapters
off is the KL reference for free. `merge` folds the adapters into a plain Transformer for
export (weights.save_hf) or for a sampler that should not pay the merge.

This module is the model surgery only (add, split, merge); the update that differentiates the
adapters alone is `update.make_update_fn` over `update.split(model)`, as for a full fine-tune.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from trustee_jax import sharding as shd
from trustee_jax.models.transformer import ModelConfig, Transformer

Array = jax.Array

# Target -> how many of its dims after `layers` are inputs (the rest are outputs).
INPUT_DIMS: dict[str, int] = {"wq": 1, "wk": 1, "wv": 1, "wo": 2,
                              "w_gate": 1, "w_up": 1, "w_down": 1}
ALL_TARGETS = tuple(INPUT_DIMS)
_RANK = "r"  # the rank axis's letter in LoraWeight.project's einsums


class LoraError(ValueError):
  """A LoRA setting or model that cannot be adapted: names the field and the cause."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, scale (alpha / rank) and which projections get adapters."""
  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = ALL_TARGETS
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.rank < 1:
      raise LoraError(f"lora.rank must be >= 1, got {self.rank}")
    unknown = sorted(set(self.targets) - set(INPUT_DIMS))
    if unknown or not self.targets:
      raise LoraError(f"lora.targets {tuple(self.targets)}: unknown {unknown}; "
                      f"choose from {ALL_TARGETS}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank

  @classmethod
  def from_dict(cls, d: Any) -> "LoraConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - known - {"enabled", "sampler_weights"})
    if extra:
      raise LoraError(f"unknown lora config field(s) {extra}; known: {sorted(known)}")
    kw = {k: v for k, v in d.items() if k in known}
    if "targets" in kw:
      kw["targets"] = tuple(kw["targets"])
    return cls(**kw)


class LoraParam(nnx.Param):
  """An adapter parameter: the only kind a LoRA update differentiates."""


def adapter_axes(name: str, target_axes: tuple[str, ...]) -> tuple[str, ...]:
  """Logical axes of an adapter leaf ('wq_a', 'w_down_b', ...) from its target W's axes:
  A keeps W's layer and input axes, B its layer and output axes; the rank is 'lora_rank'."""
  target, part = name.rsplit("_", 1)
  axes, n_in = tuple(target_axes), INPUT_DIMS[target]
  if part == "a":
    return axes[:1 + n_in] + ("lora_rank",)
  return axes[:1] + ("lora_rank",) + axes[1 + n_in:]


def _delta(a: Array, b: Array, scale: float) -> Array:
  """scale * A @ B in f32 for one layer: a [in.., r], b [r, out..] -> [in.., out..]."""
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """A projection with its adapter; the layer scan slices it like an array.

  The decoder block applies every projection through `transformer.project`, which calls
  `project` here: x @ W + s * (x @ A) @ B, never forming W + s * A @ B, so a LoRA update's
  backward computes rank-r gradients only, not W's full-size one. `astype` is the merged
  weight (summed in f32, cast once), for merging and for unstacked inference layers.
  """
  w: Array
  a: Array
  b: Array
  scale: float = dataclasses.field(metadata=dict(static=True))

  def astype(self, dtype) -> Array:
    return (self.w.astype(jnp.float32) + _delta(self.a, self.b, self.scale)).astype(dtype)

  def project(self, spec: str, x: Array, dtype) -> Array:
    """`einsum(spec, x, W + s * A @ B)` computed as x @ W + s * (x @ A) @ B, in `dtype`."""
    (x_axes, w_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    if _RANK in spec:
      raise LoraError(f"einsum spec {spec!r} uses the rank axis letter {_RANK!r}")
    n_in = self.a.ndim - 1
    ins, outs = w_axes[:n_in], w_axes[n_in:]
    rest = "".join(c for c in x_axes if c not in ins)
    xa = jnp.einsum(f"{x_axes},{ins}{_RANK}->{rest}{_RANK}", x, self.a.astype(dtype))
    delta = jnp.einsum(f"{rest}{_RANK},{_RANK}{outs}->{out_axes}", xa * jnp.asarray(
        self.scale, dtype), self.b.astype(dtype))
    return jnp.einsum(spec, x, self.w.astype(dtype)) + delta


class LoraAdapters(nnx.Module):
  """`{target}_a` (uniform, PEFT's bound 1/sqrt(fan_in)) and `{target}_b` (zeros), each
  carrying its logical axes (`adapter_axes`) as metadata, as the base parameters do."""

  def __init__(self, lcfg: LoraConfig, targets: dict[str, nnx.Variable], rngs: nnx.Rngs):
    pdt = jnp.dtype(lcfg.param_dtype)
    for name in lcfg.targets:
      w, n_in = targets[name], INPUT_DIMS[name]
      axes = w.get_metadata()[shd.AXES_KEY]
      layers, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
      bound = 1.0 / math.sqrt(math.prod(ins))
      a = jax.random.uniform(rngs.params(), (layers, *ins, lcfg.rank), pdt, -bound, bound)
      b = jnp.zeros((layers, lcfg.rank, *outs), pdt)
      for part, value in (("a", a), ("b", b)):
        leaf = f"{name}_{part}"
        setattr(self, leaf, LoraParam(value, **shd.param_metadata(adapter_axes(leaf, axes))))


def _targets(base: Transformer) -> dict[str, nnx.Variable]:
  """The (possibly abstract) base parameters that can take adapters: shapes and axes."""
  return {name: getattr(base, name) for name in INPUT_DIMS}


class LoraTransformer(Transformer):
  """A Transformer whose targeted projections are W + scale * A @ B (`self.lora`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, lora: LoraConfig, mesh=None,
               rules=shd.LOGICAL_RULES, lora_seed: int = 0):
    super().__init__(cfg, rngs, mesh=mesh, rules=rules)
    self.lora_cfg = lora
    self.lora = LoraAdapters(lora, _targets(self), nnx.Rngs(lora_seed))

  def _layer_params(self) -> dict[str, Any]:
    lp = super()._layer_params()
    for name in self.lora_cfg.targets:
      lp[name] = LoraWeight(lp[name], getattr(self.lora, f"{name}_a")[...],
                            getattr(self.lora, f"{name}_b")[...], self.lora_cfg.scale)
    return lp


# ---------------------------------------------------------------------------- building


def abstract_model(cfg: ModelConfig, lcfg: LoraConfig, *, mesh=None, rules=shd.LOGICAL_RULES,
                   seed: int = 0) -> LoraTransformer:
  """Shapes only (no allocation): for graphdefs and ahead-of-time compiles."""
  return nnx.eval_shape(lambda: LoraTransformer(cfg, nnx.Rngs(0), lora=lcfg, mesh=mesh,
                                                rules=rules, lora_seed=seed))


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, *, seed: int = 0, mesh=None,
                  rules=shd.LOGICAL_RULES) -> nnx.State:
  """Fresh adapters (state paths ('lora', '{target}_a|b')), created in their shardings."""
  def make():
    m = LoraTransformer(cfg, nnx.Rngs(0), lora=lcfg, mesh=mesh, rules=rules, lora_seed=seed)
    return nnx.split(m, LoraParam, ...)[1]  # the base it built is dead code under jit
  if mesh is None:
    return jax.jit(make)()
  shardings = shd.state_shardings(jax.eval_shape(make), mesh, rules)
  return jax.jit(make, out_shardings=shardings)()


def add_lora(model: Transformer, lcfg: LoraConfig, *, seed: int = 0) -> LoraTransformer:
  """Wraps a loaded base (its parameters are shared, not copied) with fresh adapters."""
  if isinstance(model, LoraTransformer):
    raise LoraError("model already has LoRA adapters; merge() it first")
  graphdef = nnx.graphdef(abstract_model(model.cfg, lcfg, mesh=model.mesh,
                                        rules=model.rules, seed=seed))
  adapters = init_adapters(model.cfg, lcfg, seed=seed, mesh=model.mesh, rules=model.rules)
  return nnx.merge(graphdef, adapters, nnx.state(model))


def split(model: LoraTransformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, adapters, base): the trainable and the frozen halves of an adapted model."""
  if not isinstance(model, LoraTransformer):
    raise LoraError(f"expected a LoraTransformer, got {type(model).__name__}; use add_lora")
  return nnx.split(model, LoraParam, ...)


def base_graphdef(model: Transformer) -> nnx.GraphDef:
  """The plain Transformer graphdef matching `model`'s base state (adapters off)."""
  return nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(model.cfg, nnx.Rngs(0), mesh=model.mesh, rules=model.rules)))


# ---------------------------------------------------------------------------- merging


def merge_params(base: nnx.State, adapters: nnx.State, lcfg: LoraConfig) -> nnx.State:
  """The base state with every target replaced by W + delta (W's dtype), a layer at a time
  so no whole f32 copy is ever made. Pure: jit it, or call `merge`."""
  ad = adapters["lora"]

  def visit(path, w):
    name = str(getattr(path[0], "key", path[0]))
    if name not in lcfg.targets:
      return w
    layer = lambda xs: LoraWeight(*xs, lcfg.scale).astype(w.dtype)  # noqa: E731
    return jax.lax.map(layer, (w, ad[f"{name}_a"][...], ad[f"{name}_b"][...]))

  return jax.tree_util.tree_map_with_path(visit, base)


def merge(model: LoraTransformer, adapters: nnx.State | None = None) -> Transformer:
  """A plain Transformer with the adapters folded in (same dtype and shardings as the base),
  for weights.save_hf or a sampler. `adapters` overrides the model's own."""
  graphdef, own, base = split(model)
  adapters = own if adapters is None else adapters
  kw = {}
  if model.mesh is not None:
    kw["out_shardings"] = jax.tree_util.tree_map(lambda x: x.sharding, base)
  merged = jax.jit(merge_params, static_argnums=2, **kw)(base, adapters, model.lora_cfg)
  return nnx.merge(base_graphdef(model), merged)


def lora_param_count(cfg: ModelConfig, lcfg: LoraConfig) -> int:
  """Adapter parameters of a model shape, from its abstract state (nothing allocated)."""
  targets = _targets(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  total = 0
  for name in lcfg.targets:
    shape, n_in = targets[name].shape, INPUT_DIMS[name]
    total += shape[0] * lcfg.rank * (math.prod(shape[1:1 + n_in]) + math.prod(shape[1 + n_in:]))
  return total
