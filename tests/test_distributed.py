"""Multi-process JAX: 2 processes on 127.0.0.1 (2 CPU devices each, gloo collectives) run one
sharded GRPO step on a (data=2, fsdp=2) mesh that must equal the single-process step; both
write one Orbax checkpoint that a single process restores; per-process engine copies, JSON
broadcast and the shared-directory check work; bad settings fail loudly before any join.

The children run this file as a script (XLA_FLAGS must be set before jax starts).
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from trustee_jax import distributed as dist

N_ROWS, T = 8, 8
MESH_SHAPE = (2, 2, 1)  # data across the two processes, fsdp inside each


def _setup():
  """Model config, GRPO batch (all rows) and optimizer shared by child and parent."""
  import optax

  from trustee_jax import grpo
  from trustee_jax.models.model_configs import get_model_config
  cfg = get_model_config("tiny-qwen3", vocab_size=256, num_heads=4, num_kv_heads=2,
                         initializer_range=0.2)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, cfg.vocab_size, (N_ROWS, T)).astype(np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (N_ROWS, 1)),
           "loss_mask": (rng.random((N_ROWS, T - 1)) > 0.3).astype(np.float32),
           "old_logprobs": -rng.random((N_ROWS, T - 1)).astype(np.float32) * 3,
           "turn_rewards": np.zeros((N_ROWS, T - 1), np.float32),
           "advantages": rng.normal(size=N_ROWS).astype(np.float32)}
  return cfg, batch, optax.sgd(1.0), grpo.GRPOConfig(kl_beta=0.0)  # SGD: params move by -grad


def _step(params, graphdef, batch, opt, gcfg):
  """One update of a copy of `params` (the update donates what it is given)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from trustee_jax import update
  fn = update.make_update_fn(graphdef, opt, gcfg, micro_batch=4, chunk_size=64)
  return fn(jax.tree_util.tree_map(jnp.copy, params), nnx.State({}), opt.init(params), batch)


def _child(pid: int, port: int, out: pathlib.Path) -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental import multihost_utils

  from trustee_jax.checkpoint import Checkpointer
  from trustee_jax.models.transformer import create_model

  info = dist.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
  res = {"info": [info.index, info.count, info.local_devices, info.global_devices]}
  cfg, batch, opt, gcfg = _setup()
  mesh = dist.global_mesh(MESH_SHAPE)
  graphdef, params = nnx.split(create_model(cfg, seed=0, mesh=mesh))
  local = {k: v[dist.process_slice(N_ROWS)] for k, v in batch.items()}
  gbatch = dist.global_batch(local, mesh)
  res["batch_spec"] = [str(a) for a in gbatch["tokens"].sharding.spec]
  res["wq_spec"] = [str(a) for a in params["wq"][...].sharding.spec]
  new_params, _, metrics = _step(params, graphdef, gbatch, opt, gcfg)
  res["loss"] = float(metrics["loss"])
  host = multihost_utils.process_allgather(nnx.to_pure_dict(new_params), tiled=True)
  if pid == 0:
    np.savez(out / "params.npz", **{k: np.asarray(v) for k, v in host.items()})
  ckpt_dir = dist.assert_shared_directory(out / "ckpt")
  ckpt = Checkpointer(pathlib.Path(str(ckpt_dir)), keep=1)
  ckpt.save(1, {"params": new_params}, {"model_config": {"name": cfg.name}})
  ckpt.close()
  # a per-process copy for this process's sampling engine gives the global model's logits
  local_mesh = dist.process_local_mesh((1, 2, 1))
  local_model = dist.per_process_model(nnx.merge(graphdef, new_params), local_mesh)
  copy = nnx.state(local_model)
  res["copy_devices"] = sorted({d.id for x in jax.tree_util.tree_leaves(copy)
                                for d in x.sharding.device_set})
  res["copy_wq_spec"] = [str(a) for a in copy["wq"][...].sharding.spec]
  tokens = jnp.asarray(batch["tokens"][:2])
  pos = jnp.asarray(batch["positions"][:2])
  local_logits = nnx.jit(lambda m: m(tokens, pos)[0])(local_model)
  global_logits = multihost_utils.process_allgather(
      jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, pos)[0])(new_params), tiled=True)
  res["copy_diff"] = float(np.abs(np.asarray(local_logits) - np.asarray(global_logits)).max())
  res["broadcast"] = dist.broadcast_json({"tasks": ["a", "b"], "from": pid} if pid == 0
                                         else None)
  res["allgather"] = dist.allgather(np.int32(pid * 10)).tolist()
  dist.sync("done")
  (out / f"result{pid}.json").write_text(json.dumps(res))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[pathlib.Path, list[dict]]:
  out = tmp_path_factory.mktemp("dist")
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  port = _free_port()
  logs = [open(out / f"log{i}.txt", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(out)], env=env,
                            cwd=root, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  for i, code in enumerate(codes):
    assert code == 0, f"process {i}:\n" + (out / f"log{i}.txt").read_text()[-4000:]
  return out, [json.loads((out / f"result{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def single_process():
  """The same step in this (single-device) process, without a mesh."""
  from flax import nnx

  from trustee_jax.models.transformer import create_model
  cfg, batch, opt, gcfg = _setup()
  graphdef, params = nnx.split(create_model(cfg, seed=0))
  new_params, _, metrics = _step(params, graphdef, batch, opt, gcfg)
  return params, new_params, float(metrics["loss"])


def test_two_processes_join_one_runtime(two_processes):
  _, results = two_processes
  assert [r["info"] for r in results] == [[0, 2, 2, 4], [1, 2, 2, 4]]
  assert results[0]["batch_spec"] == ["('data', 'fsdp')", "None"]
  assert results[0]["wq_spec"] == ["None", "fsdp", "None", "None"]


def test_sharded_step_equals_single_process(two_processes, single_process):
  from flax import nnx
  out, results = two_processes
  before, after, loss = single_process
  assert abs(results[0]["loss"] - loss) <= 1e-5 and results[0]["loss"] == results[1]["loss"]
  got = np.load(out / "params.npz")
  want = nnx.to_pure_dict(after)
  start = nnx.to_pure_dict(before)
  assert set(got.files) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], np.asarray(want[name]), atol=1e-6, rtol=1e-5,
                               err_msg=name)
    assert np.abs(got[name] - np.asarray(start[name])).max() > 1e-5, name  # it moved


def test_checkpoint_from_two_processes_restores_in_one(two_processes, single_process):
  from flax import nnx

  from trustee_jax.checkpoint import Checkpointer, abstract_like
  out, _ = two_processes
  _, after, _ = single_process
  ckpt = Checkpointer(out / "ckpt", keep=1)
  restored, meta = ckpt.restore(1, abstract_like({"params": after}),
                                {"model_config": {"name": "tiny-qwen3"}})
  ckpt.close()
  got = np.load(out / "params.npz")
  for name, value in nnx.to_pure_dict(restored["params"]).items():
    np.testing.assert_array_equal(np.asarray(value), got[name], err_msg=name)


def test_per_process_copy_broadcast_and_allgather(two_processes):
  _, results = two_processes
  assert results[0]["copy_devices"] == [0, 1] and results[1]["copy_devices"] == [2048, 2049]
  assert results[0]["copy_wq_spec"] == ["None", "fsdp", "None", "None"]
  assert max(r["copy_diff"] for r in results) <= 1e-5
  assert results[1]["broadcast"] == {"tasks": ["a", "b"], "from": 0}
  assert results[0]["allgather"] == results[1]["allgather"] == [0, 10]


# ---------------------------------------------------------------- single-process behaviour


def test_no_settings_is_one_process_and_partial_settings_are_loud():
  assert dist.initialize(env={}).count == 1
  assert dist.initialize("127.0.0.1:1", 2, 0, mode="off").count == 1
  with pytest.raises(dist.DistributedError, match=r"partial: \['num_processes', 'process_id'\]"):
    dist.initialize(env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
  with pytest.raises(dist.DistributedError, match=r"process_id 2 is not in \[0, num_processes=2"):
    dist.initialize("127.0.0.1:1", 2, 2)
  with pytest.raises(dist.DistributedError, match=r"\$JAX_NUM_PROCESSES='two'"):
    dist.initialize(env={"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(dist.DistributedError, match="mode 'mpi'"):
    dist.initialize(mode="mpi")
  with pytest.raises(dist.DistributedError, match=r"unknown distributed config field\(s\) \['port'"):
    dist.initialize_from_config({"port": 1})
  assert dist.initialize_from_config({"mode": "env", "coordinator_address": "",
                                      "num_processes": -1, "process_id": -1}).count == 1


def test_process_slice_and_single_process_helpers():
  info = dist.ProcessInfo(index=1, count=4, local_devices=8, global_devices=32)
  assert dist.process_slice(16, info) == slice(4, 8)
  with pytest.raises(dist.DistributedError, match="10 items do not split evenly over 4"):
    dist.process_slice(10, info)
  assert dist.broadcast_json({"a": 1}) == {"a": 1}
  assert dist.allgather(np.int32(3)).tolist() == [3]


if __name__ == "__main__":
  _child(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
