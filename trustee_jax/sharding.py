"""Device mesh (data, fsdp, tensor) and the logical-axis rules, in the manner of MaxText.

Every parameter and activation names its dimensions logically (transformer.PARAM_AXES);
LOGICAL_RULES maps each logical name to mesh axes. The one table below is the whole
sharding story. Divisibility rule: a dimension whose size is not a multiple of its mesh
axes' total size is replicated along them (SmolLM2's 9 query and 3 KV heads on a tensor
axis of 4, say), never padded and never an error.
"""
from collections.abc import Sequence
import math

import jax
import numpy as np
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
)


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


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
  """Shardings for an NNX state of a Transformer, from its parameters' logical axes."""
  from trustee_jax.models.transformer import PARAM_AXES  # models depend on this module

  def one(path, leaf):
    key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))  # DictKey / GetAttrKey
    name = key(path[-1])
    if name == "value" and len(path) > 1:  # nnx.Variable leaves
      name = key(path[-2])
    axes = PARAM_AXES.get(name)
    if axes is None or len(axes) != len(leaf.shape):
      return NamedSharding(mesh, P())
    return named_sharding(mesh, rules, axes, leaf.shape)

  return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES, batch: int | None = None):
  """Sharding for a batch-major array: batch over (data, fsdp), the rest replicated."""
  axes = ("batch",) + (None,) * (ndim - 1)
  shape = (batch if batch is not None else math.prod(mesh.shape[a] for a in ("data", "fsdp")),)
  return named_sharding(mesh, rules, axes, shape + (1,) * (ndim - 1))
