"""The training loop on the tiny config: logs, checkpoints, resume after SIGKILL, refusals."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trustee_jax import config_files
from trustee_jax import policy as policy_lib
from trustee_jax import train
from trustee_jax.checkpoint import CheckpointMismatchError
from trustee_jax.train_logging import scalar_series, scalar_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str, **overrides):
  """configs/NAME.py's config; NAME may carry the file's argument (`qwen3_8b:gpu8`)."""
  stem, sep, arg = name.partition(":")
  cfg = config_files.get_config(f"{ROOT / 'configs' / stem}.py{sep}{arg}")
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def assert_signal(tb_dir: pathlib.Path, steps: list[int]) -> None:
  """Most steps trained on non-zero advantages, so their gradient was real (with all-zero
  advantages the GRPO loss has no gradient and AdamW moves the params by weight decay only).
  With the coin judge a group is flat with probability 1/8, so not every step need have one."""
  series = scalar_series(tb_dir, ["train/nonzero_advantage_frac", "train/grad_norm"])
  for tag in ("train/nonzero_advantage_frac", "train/grad_norm"):
    assert sorted(series.get(tag, {})) == steps, (tag, series)
    assert sum(v > 0 for v in series[tag].values()) > len(steps) / 2, series


def restored_state(workdir: pathlib.Path, step: int):
  mngr = ocp.CheckpointManager(workdir / "checkpoints")
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def launch(workdir, steps, extra=()):
  cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/test.py"),
         "--workdir", str(workdir), f"--config.train.steps={steps}",
         "--config.rollout_concurrency=1", *extra]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.timeout(900)
def test_train_writes_checkpoints_logs_and_episodes(tmp_path):
  # The rule oracle scores beside the coin judge: its figures are logged, never trained on.
  cfg = load_config("test", **{"train.steps": 2, "world.oracle": "rule"})
  last = train.train(cfg, tmp_path)
  assert {"reward/mean", "curriculum/level", "train/loss", "time/rollout",
          "oracle/pass_agreement", "oracle/success_rate"} <= set(last)
  assert 0 < last["rollout/policy_busy_frac"] <= 1  # the engine's device time in the rollout
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [1, 2]
  for tag in ("reward/mean", "train/clip_frac", "knobs/num_tools", "episodes/tool_calls",
              "time/update", "world/tasks/generated"):
    assert scalar_steps(tmp_path / "tb", tag) == [1, 2], tag
  assert scalar_steps(tmp_path / "tb", "val/reward_mean") == [0, 2]  # before training, every 2
  assert scalar_steps(tmp_path / "tb", "val/oracle_pass_agreement") == [0, 2]
  assert_signal(tmp_path / "tb", [1, 2])
  assert 1 <= len(json.loads((tmp_path / "validation_tasks.json").read_text())) <= 2
  lines = (tmp_path / "episodes" / "step_2.jsonl").read_text().splitlines()
  assert lines and '"messages"' in lines[0] and '"judge_reason"' in lines[0]
  assert all(json.loads(line)["oracle_score"] in (-1, 0, 1) for line in lines)
  val_tasks = json.loads((tmp_path / "validation_tasks.json").read_text())
  for step in (0, 2):  # every held-out episode, so that runs compare task by task
    val = (tmp_path / "episodes" / f"validation_{step}.jsonl").read_text().splitlines()
    assert len(val) == len(val_tasks) * cfg.validation.samples and '"messages"' in val[0]
  # The same workdir with another model shape is refused, by name.
  other = load_config("test", **{"train.steps": 3, "model.name": "tiny-qwen3",
                                 "model.tokenizer": "qwen3"})
  with pytest.raises(CheckpointMismatchError, match="another model"):
    train.train(other, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_resume_is_bit_identical(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = launch(straight, 4)
  out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == 0, out
  proc = launch(killed, 4)
  deadline = time.monotonic() + 1200
  while not (killed / "checkpoints" / "2").exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # A half-written checkpoint (Orbax's temporary directory) must be ignored on resume.
  (killed / "checkpoints" / "3.orbax-checkpoint-tmp-99").mkdir(exist_ok=True)
  proc = launch(killed, 4)
  out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == 0, out
  a, b = restored_state(straight, 4), restored_state(killed, 4)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for tag in ("reward/mean", "train/loss", "curriculum/level"):
    assert scalar_steps(killed / "tb", tag) == [1, 2, 3, 4], tag
  assert_signal(straight / "tb", [1, 2, 3, 4])
  # The steps after the resume sampled the same episodes and logged the same figures.
  tags = ("reward/mean", "train/loss", "train/grad_norm", "train/nonzero_advantage_frac",
          "episodes/response_tokens", "curriculum/level")
  want, got = scalar_series(straight / "tb", tags), scalar_series(killed / "tb", tags)
  for tag in tags:
    assert [want[tag][s] for s in (3, 4)] == [got[tag][s] for s in (3, 4)], tag
  for s in (3, 4):
    assert ((straight / "episodes" / f"step_{s}.jsonl").read_text()
            == (killed / "episodes" / f"step_{s}.jsonl").read_text()), s


@pytest.mark.timeout(900)
def test_lora_run_saves_adapters_only_resumes_refuses_another_rank_and_exports(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from trustee_jax import export
  lora_block = {"enabled": True, "rank": 4, "alpha": 8.0, "sampler_weights": "merged",
                "targets": ("wq", "wv", "w_up")}
  cfg = load_config("test", **{"train.steps": 2, "grpo.kl_beta": 0.01, "validation.every": 0})
  cfg.lora = lora_block
  assert "train/loss" in train.train(cfg, tmp_path)
  params = restored_state(tmp_path, 2)["params"]
  assert set(params) == {"lora"}  # the frozen base is not checkpointed
  assert sorted(params["lora"]) == ["w_up_a", "w_up_b", "wq_a", "wq_b", "wv_a", "wv_b"]
  cfg.train.steps = 3
  train.train(cfg, tmp_path)  # resumes from step 2
  assert (tmp_path / "checkpoints" / "3").is_dir()
  other = load_config("test", **{"train.steps": 4})
  other.lora = dict(lora_block, rank=8)
  with pytest.raises(CheckpointMismatchError, match="lora"):
    train.train(other, tmp_path)
  # Export merges the saved adapters into the base the run loaded.
  out = export.export_hf(tmp_path, tmp_path / "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.default_rng(0).integers(0, 49152, size=(2, 9))
  with torch.no_grad():
    theirs = hf(torch.as_tensor(tokens)).logits.numpy()
  policy = export.restore_policy(tmp_path)
  positions = np.broadcast_to(np.arange(9), tokens.shape)
  ours = np.asarray(policy.model(tokens, positions)[0])
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
  saved = restored_state(tmp_path, 3)["params"]["lora"]
  saved_b = np.asarray(jax.tree_util.tree_leaves(saved["wq_b"])[0])
  base = policy_lib.load_policy(cfg)[0]
  assert np.abs(saved_b).max() > 0  # the adapters trained (B starts at zero)
  # and the export carries them: it is not the base
  assert np.abs(np.asarray(base(tokens, positions)[0]) - ours).max() > 1e-6
  assert_signal(tmp_path / "tb", [1, 2, 3])


_MESH_STEP = """
import asyncio, importlib.util, json, sys
import jax
import numpy as np
from trustee_jax import train
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cfg = module.get_config()
cfg.train.steps, cfg.validation.every, cfg.rollout_concurrency = 1, 0, 1
cfg.mesh.shape = (1, 2, 1)

async def main():
  world = await train.build_world(cfg)
  trainer = train.Trainer(cfg, sys.argv[2], world=world)
  try:
    out = await trainer.train_step(1)
    leaves = jax.tree_util.tree_leaves(trainer.state["params"])
    print(json.dumps({"fsdp_leaves": sum("fsdp" in str(x.sharding.spec) for x in leaves),
                      "devices": len(leaves[0].sharding.device_set),
                      "loss": out["scalars"]["train/loss"]}))
  finally:
    trainer.close()
    await world.aclose()
asyncio.run(main())
"""


@pytest.mark.timeout(900)
def test_a_step_on_a_two_device_mesh_keeps_params_sharded(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _MESH_STEP, str(ROOT / "configs/test.py"),
                         str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2 and result["fsdp_leaves"] > 0
  assert np.isfinite(result["loss"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_processes_train_one_policy(tmp_path):
  """2 processes on 127.0.0.1 (one CPU device each, data=2): each plays its own task, the
  update is one sharded step, the checkpoint is one, the primary logs the whole batch, and a
  single process resumes the run."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/test.py"),
       "--workdir", str(tmp_path), "--config.train.steps=2", "--config.rollout_concurrency=1",
       "--config.train.tasks_per_step=4",  # 2 groups a process: a coin-flat step is rare
       "--config.mesh.shape=(2,1,1)", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=1100)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert scalar_steps(tmp_path / "tb", "reward/mean_all_processes") == [1, 2]
  assert scalar_steps(tmp_path / "process_1" / "tb", "reward/mean") == [1, 2]
  assert_signal(tmp_path / "tb", [1, 2])
  # One process resumes what two wrote (another topology: Orbax reshards onto one device).
  train.train(load_config("test", **{"train.steps": 3, "rollout_concurrency": 1,
                                  "train.tasks_per_step": 4}), tmp_path)
  assert (tmp_path / "checkpoints" / "3").is_dir()


def test_old_logprobs_are_the_sampling_policys_in_every_mini_batch(tmp_path):
  """4 mini-batches, recompute on: every update's old log-probs are those of the params that
  sampled the step (so the first update's ratio is exactly 1 and later ones' are not), not of
  params an earlier mini-batch of the same step already moved."""
  import asyncio

  import jax.numpy as jnp

  cfg = load_config("test", **{"train.tasks_per_step": 4, "train.updates_per_step": 4,
                               "train.recompute_old_logprobs": True, "validation.every": 0,
                               "rollout_concurrency": 1})

  async def main():
    world = await train.build_world(cfg)  # the test config's coin judge: rewards vary
    trainer = train.Trainer(cfg, tmp_path, world=world)
    start = jax.tree_util.tree_map(jnp.copy, trainer.state["params"])
    seen, real = [], trainer.update_fn

    def spy(trainable, frozen, opt_state, batch):
      seen.append({k: np.asarray(v) for k, v in {
          "old": batch["old_logprobs"], "mask": batch["loss_mask"], "adv": batch["advantages"],
          "now": trainer.policy.logprobs(trainable, batch["tokens"], batch["positions"]),
          "start": trainer.policy.logprobs(start, batch["tokens"], batch["positions"])}.items()})
      return real(trainable, frozen, opt_state, batch)
    trainer.update_fn = spy
    try:
      out = await trainer.train_step(1)
    finally:
      trainer.close()
      await world.aclose()
    return out["scalars"], seen

  scalars, seen = asyncio.run(main())
  assert len(seen) == 4
  assert scalars["train/nonzero_advantage_frac"] > 0.5  # the coin judge gives groups signal
  for i, s in enumerate(seen):
    np.testing.assert_array_equal(s["old"], s["start"])  # the sampling policy's, every time
    moved = float(np.max(np.abs(s["now"] - s["old"]) * s["mask"]))
    assert (moved == 0.0) == (i == 0), (i, moved)  # ratio exactly 1 only in the first update


def test_resume_with_a_changed_learning_rate_is_refused_unless_allowed(tmp_path):
  overrides = {"train.steps": 1, "validation.every": 0, "rollout_concurrency": 1}
  train.train(load_config("test", **overrides), tmp_path)
  changed = load_config("test", **{**overrides, "train.steps": 2,
                                   "train.optimizer.learning_rate": 3e-4})
  with pytest.raises(CheckpointMismatchError, match="train.optimizer.learning_rate"):
    train.train(changed, tmp_path)
  changed.resume.allow_changes = ("train.optimizer.learning_rate",)
  assert "train/loss" in train.train(changed, tmp_path)  # resumed on purpose: step 2
  assert (tmp_path / "checkpoints" / "2").is_dir()


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_a_damaged_one_is_skipped(tmp_path):
  """SIGTERM: the step in progress finishes, is checkpointed (off the every-100 cadence) and
  the run exits 0. Then a resume whose newest checkpoint is damaged takes the one before."""
  proc = launch(tmp_path, 50, ("--config.checkpoint.every=100", "--config.validation.every=0"))
  deadline = time.monotonic() + 1000
  while not (tmp_path / "episodes" / "step_1.jsonl").exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  assert "stopping after step" in out, out[-4000:]
  [stop] = checkpoint_steps(tmp_path)
  assert 1 <= stop < 50 and int(restored_state(tmp_path, stop)["step"]) == stop
  assert scalar_steps(tmp_path / "tb", "reward/mean")[-1] == stop
  assert scalar_steps(tmp_path / "tb", "checkpoint/stopped_by_sigterm") == [stop]
  # Two more steps, each checkpointed; then the newest one's array files are truncated.
  cfg = load_config("test", **{"train.steps": stop + 2, "validation.every": 0,
                               "rollout_concurrency": 1})
  train.train(cfg, tmp_path)
  assert checkpoint_steps(tmp_path) == [stop + 1, stop + 2]
  for f in (tmp_path / "checkpoints" / str(stop + 2) / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:8])
  cfg.train.steps = stop + 3
  train.train(cfg, tmp_path)  # resumes from stop + 1, trains stop + 2 and stop + 3 again
  assert checkpoint_steps(tmp_path) == [stop + 2, stop + 3]
  assert (tmp_path / "checkpoints" / f"{stop + 2}.unreadable").is_dir()
  assert scalar_steps(tmp_path / "tb", "checkpoint/unreadable_skipped") == [stop + 1]


def test_a_paged_engine_trains_the_step_the_dense_one_does(tmp_path):
  """engine.kv_layout only changes where the KV cache lives: the same step samples the same
  episodes and computes the same update."""
  overrides = {"train.steps": 1, "validation.every": 0, "rollout_concurrency": 1}
  runs = {}
  for layout in ("dense", "paged"):
    last = train.train(load_config("test", **{**overrides, "engine.kv_layout": layout}),
                       tmp_path / layout)
    runs[layout] = (last, (tmp_path / layout / "episodes" / "step_1.jsonl").read_text())
  assert runs["paged"][1] == runs["dense"][1]
  for tag in ("reward/mean", "train/loss", "train/grad_norm", "episodes/response_tokens"):
    assert runs["paged"][0][tag] == pytest.approx(runs["dense"][0][tag], rel=1e-5, abs=1e-6), tag
  assert runs["dense"][0]["train/nonzero_advantage_frac"] > 0  # the coin judge: a real update


def test_a_fixed_validation_seed_gives_runs_of_every_seed_one_held_out_set(tmp_path):
  """validation.seed draws the held-out tasks apart from the run's seed; -1 follows the run."""
  import asyncio

  async def tasks(seed: int, validation_seed: int, workdir: pathlib.Path) -> list[dict]:
    cfg = load_config("test", **{"seed": seed, "validation.seed": validation_seed,
                                 "validation.num_tasks": 4})
    trainer = train.Trainer(cfg, workdir, world=await train.build_world(cfg))
    try:
      return [t.to_dict() for t in await trainer._validation_tasks()]
    finally:
      trainer.close()

  fixed = [asyncio.run(tasks(s, 7, tmp_path / f"fixed{s}")) for s in (0, 1)]
  own = [asyncio.run(tasks(s, -1, tmp_path / f"own{s}")) for s in (0, 1)]
  assert fixed[0] == fixed[1] and own[0] != own[1]
  assert own[0] == asyncio.run(tasks(0, 0, tmp_path / "zero"))  # -1 is the run's seed


def test_prefetched_tasks_are_the_tasks_the_step_would_have_made(tmp_path):
  """train.prefetch_tasks makes step N+1's tasks while step N's update runs; the run is the
  same with it off: the same tasks, episodes and rewards, step by step. Step 2 is the first
  prefetched one and follows a real update, so two steps a run carry the whole claim."""
  runs = {}
  for prefetch in (True, False):
    cfg = load_config("test", **{"train.steps": 2, "validation.every": 0,
                                 "train.prefetch_tasks": prefetch})
    train.train(cfg, tmp_path / str(prefetch))
    runs[prefetch] = [[(e["task"], e["messages"], e["reward"]) for e in map(json.loads, (
        tmp_path / str(prefetch) / "episodes" / f"step_{s}.jsonl").read_text().splitlines())]
        for s in (1, 2)]
    flags = scalar_series(tmp_path / str(prefetch) / "tb", ["tasks/prefetched"])
    assert flags["tasks/prefetched"] == ({1: 0.0, 2: 1.0} if prefetch else {1: 0.0, 2: 0.0})
  assert runs[True] == runs[False]
  assert_signal(tmp_path / "True" / "tb", [1, 2])
