"""Several processes, one program: JAX's multi-controller runtime for TPU pods and GPU hosts.

Every process runs the same training script. `initialize` joins them (from arguments, the
environment, or JAX's own cluster detection on Cloud TPU, SLURM, Open MPI and Kubernetes);
then jitted steps over a `global_mesh` span all devices, each process feeding only its own
rows (`global_batch`) and Orbax writing only its own shards. What is not SPMD — rollouts,
the simulator, the sampling engine — runs per process on its share of the tasks
(`process_slice`), with a per-process copy of the weights (`per_process_copy`), and host
values are exchanged explicitly (`broadcast_json`, `allgather`).
"""
import dataclasses
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from trustee_jax import sharding as shd

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedError(RuntimeError):
  """A multi-process setting that cannot work: names the setting or the process."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process sits: its index among `count`, and its and all devices."""
  index: int
  count: int
  local_devices: int
  global_devices: int

  @property
  def is_primary(self) -> bool:
    return self.index == 0


def process_info() -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "env",
               local_device_ids: Sequence[int] | None = None, timeout_s: int = 300,
               env: Mapping[str, str] | None = None) -> ProcessInfo:
  """Joins the JAX distributed runtime; call before anything touches a device.

  mode "env": arguments first, then $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
  $JAX_PROCESS_ID; with none of them set this stays a single process. mode "auto": JAX's
  cluster detection (every worker of a TPU VM slice, SLURM, Open MPI, Kubernetes). mode
  "off": single process. Partial settings are an error. On CPU, collectives use gloo.
  """
  env = os.environ if env is None else env
  if mode not in ("env", "auto", "off"):
    raise DistributedError(f"distributed mode {mode!r}: choose env, auto or off")
  if mode == "off":
    return process_info()
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _int_env(env, ENV_COUNT)
  pid = process_id if process_id is not None else _int_env(env, ENV_ID)
  given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
  if mode == "env" and all(v is None for v in given.values()):
    return process_info()
  if mode == "env" and any(v is None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    raise DistributedError(
        f"distributed setup is partial: {missing} not set (give all three as arguments, config "
        f"or ${ENV_ADDRESS}, ${ENV_COUNT}, ${ENV_ID}; or mode='auto' on a cluster)")
  if count is not None and not (count >= 1 and pid is not None and 0 <= pid < count):
    raise DistributedError(f"process_id {pid} is not in [0, num_processes={count})")
  if _platform(env) == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {k: v for k, v in given.items() if v is not None}
  try:
    jax.distributed.initialize(**kw, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
  except Exception as e:  # JAX's errors do not say which process or coordinator
    raise DistributedError(f"jax.distributed.initialize({kw}) failed within {timeout_s}s: "
                           f"{type(e).__name__}: {e}") from e
  return process_info()


def initialize_from_config(cfg: Any | None) -> ProcessInfo:
  """`initialize` from a config's `distributed` section (mode, coordinator_address,
  num_processes, process_id; flags set them as --config.distributed.X=...)."""
  cfg = dict(cfg or {})
  unknown = sorted(set(cfg) - {"mode", "coordinator_address", "num_processes", "process_id",
                               "timeout_s"})
  if unknown:
    raise DistributedError(f"unknown distributed config field(s) {unknown}")
  none_if_unset = lambda v: None if v in ("", -1) else v  # noqa: E731 (ConfigDict defaults)
  return initialize(none_if_unset(cfg.get("coordinator_address")),
                    none_if_unset(cfg.get("num_processes")), none_if_unset(cfg.get("process_id")),
                    mode=cfg.get("mode", "env"), timeout_s=int(cfg.get("timeout_s", 300)))


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise DistributedError(f"${name}={value!r} is not an integer") from e


def _platform(env: Mapping[str, str]) -> str:
  platforms = env.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  return platforms.split(",")[0].strip()


# ---------------------------------------------------------------------------- meshes


def global_mesh(shape: Sequence[int]) -> Mesh:
  """A (data, fsdp, tensor) mesh over every process's devices, processes outermost so that
  `data` (or else `fsdp`) crosses hosts and `tensor` stays inside one. On TPU the devices
  follow the physical topology (mesh_utils; one slice: multi-slice DCN meshes are not built
  here)."""
  shape = list(shape)
  devices = jax.devices()
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // math.prod(s for s in shape if s != -1)
  if math.prod(shape) != len(devices):
    raise DistributedError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices; the "
                           f"{jax.process_count()} processes have {len(devices)}")
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  if devices[0].platform == "tpu":  # ICI-aware placement (one slice; hosts outermost)
    from jax.experimental import mesh_utils
    ordered = list(mesh_utils.create_device_mesh(shape, devices).flat)
  return shd.make_mesh(shape, devices=ordered)


def process_local_mesh(shape: Sequence[int] = (1, -1, 1)) -> Mesh:
  """A (data, fsdp, tensor) mesh of this process's devices only (for its sampling engine)."""
  return shd.make_mesh(shape, devices=jax.local_devices())


# ---------------------------------------------------------------------------- data


def process_slice(n: int, info: ProcessInfo | None = None) -> slice:
  """This process's contiguous share of n items (tasks, rows); n must split evenly."""
  info = info or process_info()
  if n % info.count:
    raise DistributedError(f"{n} items do not split evenly over {info.count} processes")
  per = n // info.count
  return slice(info.index * per, (info.index + 1) * per)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules=shd.LOGICAL_RULES
                 ) -> dict[str, jax.Array]:
  """Global arrays, batch-sharded over (data, fsdp), from this process's rows of each.

  Every process passes the same number of rows (pad with masked rows first) and the same
  trailing shape; row order is process order, as `process_slice` hands them out.
  """
  count = jax.process_count()
  out = {}
  for name, x in local.items():
    x = np.asarray(x)
    shape = (x.shape[0] * count,) + x.shape[1:]
    sharding = shd.batch_sharding(mesh, x.ndim, rules, batch=shape[0])
    if count > 1 and sharding.is_fully_replicated:
      raise DistributedError(f"batch '{name}' of {shape[0]} rows cannot be split over "
                             f"mesh {dict(mesh.shape)}: make the rows a multiple of data*fsdp")
    out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
  return out


def allgather(x: Any) -> np.ndarray:
  """Host values from every process, stacked on a new leading axis [processes, ...]."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def agree_max(x: int) -> int:
  """The largest of every process's `x` (shapes and loop counts all processes must share)."""
  return int(np.max(allgather(np.int64(x))))


def gather_values(values: Sequence[float], capacity: int) -> np.ndarray:
  """Every process's values (at most `capacity` each), concatenated in process order."""
  values = np.asarray(values, np.float64)
  if values.size > capacity:
    raise DistributedError(f"{values.size} values exceed the agreed capacity {capacity}")
  padded = np.full(capacity, np.nan)
  padded[:values.size] = values
  flat = allgather(padded).reshape(-1)
  return flat[~np.isnan(flat)]


def replicate_host_values(tree: Any, mesh: Mesh) -> Any:
  """Host-local leaves (the same value on every process, e.g. the curriculum state) as fully
  replicated global arrays over `mesh`: the only kind Orbax saves from several processes."""
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), tree)


def broadcast_json(obj: Any) -> Any:
  """The primary process's JSON-able value, on every process (tasks drawn once, say)."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(
      np.int64(0 if data is None else data.size)))
  buf = data if data is not None else np.zeros(size, np.uint8)
  got = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(np.asarray(got, np.uint8).tobytes().decode())


def sync(name: str) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- weights


def per_process_copy(tree: Any, local_mesh: Mesh, shardings_fn) -> Any:
  """Copies globally sharded arrays so that each process holds all of them on its own
  devices, sharded as `shardings_fn(abstract_tree, local_mesh)` says (e.g.
  sharding.state_shardings): the weights of a per-process sampling engine.
  """
  count = jax.process_count()
  if count == 1:
    return jax.device_put(tree, shardings_fn(tree, local_mesh))
  locals_ = local_mesh.devices
  rows = []
  for p in range(count):  # process p's devices, in the local mesh's arrangement
    mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    rows.append(np.asarray(mine).reshape(locals_.shape))
  wide = Mesh(np.stack(rows), ("processes",) + local_mesh.axis_names,
              axis_types=(jax.sharding.AxisType.Auto,) * (1 + len(local_mesh.axis_names)))
  local_shardings = shardings_fn(tree, local_mesh)
  wide_shardings = jax.tree_util.tree_map(lambda s: NamedSharding(wide, s.spec), local_shardings)
  replicated = jax.jit(lambda t: t, out_shardings=wide_shardings)(tree)

  def to_local(x, sharding):
    by_device = {s.device: s.data for s in x.addressable_shards}
    arrays = [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)

  return jax.tree_util.tree_map(to_local, replicated, local_shardings)


def per_process_model(model, local_mesh: Mesh):
  """A Transformer on this process's devices only, with the weights of a globally sharded one
  (the sampling engine's model; merge LoRA adapters first)."""
  from flax import nnx

  from trustee_jax.models.transformer import Transformer
  if type(model) is not Transformer:
    raise DistributedError(f"per_process_model takes a plain Transformer, got "
                           f"{type(model).__name__} (lora.merge it first)")
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(model.cfg, nnx.Rngs(0), mesh=local_mesh, rules=model.rules)))
  state = per_process_copy(nnx.state(model), local_mesh,
                           lambda t, m: shd.state_shardings(t, m, model.rules))
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- files


def assert_shared_directory(path: str | os.PathLike) -> epath.Path:
  """Checks that every process sees the same directory (checkpoints need one: each process
  writes its shards there, the primary the metadata); loud when a worker sees another disk."""
  path = epath.Path(path)
  if jax.process_count() == 1:
    path.mkdir(parents=True, exist_ok=True)
    return path
  token = broadcast_json(uuid.uuid4().hex if jax.process_index() == 0 else None)
  marker = path / f".shared-check-{token}"
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
  sync(f"shared-dir-write-{token}")
  seen = marker.exists() and marker.read_text() == token
  ok = allgather(np.int32(seen))
  sync(f"shared-dir-read-{token}")
  if jax.process_index() == 0:
    marker.unlink()
  if not ok.all():
    bad = [int(i) for i in np.flatnonzero(ok == 0)]
    raise DistributedError(f"process(es) {bad} do not see {path} written by process 0: "
                           "checkpoints need a directory all hosts share (NFS, gs://...)")
  return path
