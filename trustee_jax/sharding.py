"""Device mesh (data, fsdp, tensor) and the logical-axis rules, in the manner of MaxText.

Every parameter and activation names its dimensions logically: a parameter carries its logical
axes as Variable metadata from its creation (`nnx.Param(x, out_sharding=axes)`, the key Flax
itself reads; see `param_metadata`), so this module imports no model; LOGICAL_RULES maps each
logical name to mesh axes (`rules_from_config` overrides entries from a run's `mesh.rules`).
The one table below is the whole sharding story. Divisibility rule: a dimension whose size
is not a multiple of its mesh axes' total size is replicated along them (SmolLM2's 9 query and
3 KV heads on a tensor axis of 4, say), never padded and never an error.
"""
from collections.abc import Mapping, Sequence
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None: replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("lora_rank", None),
)

AXES_KEY = "out_sharding"  # the Variable metadata key Flax 0.12 reads (nnx.get_partition_spec)


def param_metadata(axes: Sequence[str | None]) -> dict:
  """Variable metadata for a parameter with logical `axes` (one per dimension):
  `nnx.Param(x, **param_metadata(axes))`. Not sharded eagerly: `state_shardings` lays it out
  under the rules (and the divisibility rule), in the jit that creates or loads it."""
  return {AXES_KEY: tuple(axes), "eager_sharding": False}


def rules_from_config(overrides: Mapping | None = None) -> tuple:
  """LOGICAL_RULES with entries replaced by `overrides` (a run's `mesh.rules`: logical name ->
  a mesh axis, a tuple of them, or None to replicate); empty: LOGICAL_RULES. An unknown
  logical name or mesh axis is an error naming it."""
  overrides = dict(overrides.items()) if overrides else {}
  known = dict(LOGICAL_RULES)
  unknown = sorted(str(k) for k in overrides if k not in known)
  if unknown:
    raise ValueError(f"mesh.rules: unknown logical axis name(s) {unknown}; known: {sorted(known)}")

  def mesh_axes(name, value):
    if value is None:
      return None
    axes = (value,) if isinstance(value, str) else tuple(value)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; mesh axes are "
                       f"{MESH_AXES} (or None to replicate)")
    return None if not axes else axes[0] if isinstance(value, str) else axes

  return tuple((name, mesh_axes(name, overrides[name]) if name in overrides else axes)
               for name, axes in LOGICAL_RULES)


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(rules, axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh) -> P:
  """PartitionSpec for logical `axes` of an array of `shape`, under the divisibility rule."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    total = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or size % total:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def named_sharding(mesh: Mesh, rules, axes, shape) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(rules, axes, shape, mesh))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
  """Shardings (same tree) for an NNX state, from the logical axes each parameter carries
  (`param_metadata`). A parameter without axes, or with a count that differs from its rank,
  is a ValueError naming its path: nothing is replicated silently."""
  def one(path, leaf):
    axes = leaf.get_metadata().get(AXES_KEY) if isinstance(leaf, nnx.Variable) else None
    shape = tuple(getattr(leaf, "shape", ()))
    if axes is None:
      raise ValueError(f"parameter {_path_str(path)!r} (shape {shape}) has no logical axes: "
                       f"create it with nnx.Param(x, **sharding.param_metadata(axes))")
    if len(axes) != len(shape):
      raise ValueError(f"parameter {_path_str(path)!r} has {len(axes)} logical axes {tuple(axes)}"
                       f" for its {len(shape)} dimensions {shape}")
    sharding = named_sharding(mesh, rules, axes, shape)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  return jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES, batch: int | None = None):
  """Sharding for a batch-major array: batch over (data, fsdp), the rest replicated."""
  axes = ("batch",) + (None,) * (ndim - 1)
  shape = (batch if batch is not None else math.prod(mesh.shape[a] for a in ("data", "fsdp")),)
  return named_sharding(mesh, rules, axes, shape + (1,) * (ndim - 1))
