"""The training loop: curriculum knobs -> tasks -> rollouts -> GRPO updates -> logs -> checkpoint.

Host randomness derives from the config seed by folding in step, task, episode and turn,
so the checkpoint (params, optimizer, curriculum, step) is all a resumed run needs.
"""
import asyncio
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from trustee_jax import curriculum as cur
from trustee_jax import controls, distributed, grpo, lora, rollout, runtime, seeding, step_batch
from trustee_jax import update
from trustee_jax import policy as policy_lib
from trustee_jax.checkpoint import Checkpointer, abstract_like, check_resumable
from trustee_jax.run_settings import check_budgets, process_seed, training_mesh, validation_seed
from trustee_jax.chat import ChatFormat
from trustee_jax.sampling.sglang_backend import build_policy_backend, logprob_gap
from trustee_jax.simulator import validation_file
from trustee_jax.simulator.tasks import Task
from trustee_jax.train_logging import RunLogger, oracle_scalars, show_progress_bar, step_line
from trustee_jax.world import build_world


HOST_STATE = ("curriculum", "step")  # state every process holds whole, on the host side


class Trainer:
  """Owns the policy, its engine, the world, the optimizer and the run's files."""

  def __init__(self, cfg, workdir: str | pathlib.Path, world=None):
    check_budgets(cfg)
    self.cfg = cfg
    self.workdir = runtime.run_path(workdir)  # gs://... stays a URI
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.info = distributed.process_info()
    if self.info.count > 1:  # each process writes its shards of one shared directory
      distributed.assert_shared_directory(self.workdir)
    self.host_seed = process_seed(cfg.seed, self.info)
    self.mesh = training_mesh(cfg)
    model, self.tokenizer = policy_lib.load_policy(cfg, self.mesh)
    self.chat = ChatFormat(self.tokenizer)
    t = cfg.train
    self.grpo_cfg = grpo.GRPOConfig.from_dict(cfg.grpo)
    self.cur_cfg = cur.CurriculumConfig.from_dict(cfg.curriculum)
    self.rollout_cfg = rollout.RolloutConfig.from_dict(cfg.rollout)
    self.optimizer = update.build_optimizer(t.optimizer)
    self.policy, trainable = policy_lib.build(
        cfg, model, temperature=self.rollout_cfg.temperature, chunk_size=t.logprob_chunk,
        with_reference=self.grpo_cfg.kl_beta > 0)
    del model  # its weights live on in `trainable` and `policy.frozen`
    self.state = {"params": trainable, "opt_state": self.optimizer.init(trainable),
                  "curriculum": cur.init_state(self.cur_cfg),
                  "step": jnp.zeros((), jnp.int32)}
    shardings = None
    if self.mesh is not None:  # outputs keep the inputs' layout; scalars (Adam's count) replicated
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      shardings = jax.tree_util.tree_map(
          lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
          else replicated, (self.state["params"], self.state["opt_state"]))
      self.state["opt_state"] = jax.device_put(self.state["opt_state"], shardings[1])
    self.update_fn = update.make_update_fn(
        self.policy.graphdef, self.optimizer, self.grpo_cfg, micro_batch=t.micro_batch,
        temperature=self.rollout_cfg.temperature, chunk_size=t.logprob_chunk,
        out_shardings=shardings)
    self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    self.unreadable_checkpoints: tuple[tuple[int, str], ...] = ()  # (step, why) set aside
    self.sigterm: runtime.SigtermStop | None = None  # while run() runs
    self.next_tasks: tuple[int, asyncio.Task] | None = None  # (step, its tasks being made)
    self.meta = self.policy.meta
    self.start_step = self._maybe_restore()
    self.engine = build_policy_backend(cfg, self.engine_model, self.tokenizer.decode)
    if cfg.engine.get("backend", "jax") == "sglang":  # the server samples this run's weights
      self.engine.update_params(self.engine_model())
    self.world = world
    logdir = self.workdir if self.info.is_primary else self.workdir / f"process_{self.info.index}"
    self.log = RunLogger(logdir, purge_step=self.start_step + 1 if self.start_step else None)

  def engine_model(self):
    """The sampler's model: with several processes, a copy of the (merged) policy on this
    process's devices, so that each process's engine runs its own requests unsynchronised."""
    model = self.policy.sampler_model(self.state["params"])
    if self.info.count == 1 and self.cfg.engine.get("backend", "jax") == "jax":
      return model
    if isinstance(model, lora.LoraTransformer):  # SGLang loads plain HF weights
      model = lora.merge(model)
    return model if self.info.count == 1 else distributed.per_process_model(
        model, distributed.process_local_mesh())

  def checkpoint_view(self) -> dict[str, Any]:
    """The state as saved: with several processes the host-held parts (curriculum, step) as
    replicated global arrays, which Orbax writes once."""
    if self.info.count == 1:
      return self.state
    return {k: distributed.replicate_host_values(v, self.mesh) if k in HOST_STATE else v
            for k, v in self.state.items()}

  def _maybe_restore(self) -> int:
    """The newest readable checkpoint's step (0: none), its state loaded; unreadable newer ones
    are skipped (Checkpointer.restore_latest warns and sets them aside) and remembered."""
    allow = tuple(self.cfg.get("resume", {}).get("allow_changes", ()))
    found = self.ckpt.restore_latest(
        abstract_like(self.checkpoint_view()), self.meta,
        check_meta=lambda meta: check_resumable(meta.get("config"), self.meta["config"], allow))
    if found is None:
      return 0
    restored, self.unreadable_checkpoints = found.state, found.skipped
    for key in HOST_STATE:  # back to this process's own copies
      restored[key] = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), restored[key])
    self.state = restored
    return int(found.step)

  # ---- one step ------------------------------------------------------------------------

  async def _tasks(self, step: int, key=None, n: int | None = None, seed_step: int | None = None,
                   level: int = 0, validation: bool = False, host_seed: int | None = None):
    """This process's share of the step's tasks (knobs drawn alike on every process), at the
    curriculum's level or, when given, at a fixed `level` (soft draws off)."""
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), step) if key is None else key
    n = self.cfg.train.tasks_per_step if n is None else n
    cur_cfg, state = self.cur_cfg, self.state["curriculum"]
    if level:
      cur_cfg = dataclasses.replace(cur_cfg, epsilon=0.0)
      state = state.replace(level=jnp.full_like(state.level, level))
    knobs = cur.knobs(cur_cfg, state, key, n).unbatch()
    mine = knobs[distributed.process_slice(len(knobs), self.info)]
    seed = seeding.derive_seed(self.host_seed if host_seed is None else host_seed,
                               step if seed_step is None else seed_step)
    if validation:
      return await self.world.make_validation_tasks(mine, seed)
    drop = self.cfg.world.task_refill.level_drop
    easier_state = state.replace(level=jnp.maximum(state.level - drop, cur_cfg.level_min))

    def easier(count: int) -> list:  # refill knobs: the reference's temporarily easier level
      refill_key = jax.random.fold_in(jax.random.fold_in(key, self.info.index), count)
      return cur.knobs(cur_cfg, easier_state, refill_key, count).unbatch()
    return await self.world.make_tasks(mine, seed, easier=easier)

  def _step_batch(self, episodes: list[rollout.Episode]) -> step_batch.StepBatch:
    """The step's rows, advantages over all of this process's episodes at once."""
    longest = max((len(e.tokens) for e in episodes), default=1)
    return step_batch.build(episodes, self.grpo_cfg, num_groups=self.cfg.train.tasks_per_step,
                            width=rollout.pad_to_bucket(longest, tuple(self.cfg.train.length_buckets)))

  def _row_multiple(self) -> int:
    """Rows per process that keep the global count a multiple of micro_batch and of the mesh's
    batch shards, with every process supplying the same count."""
    m = self.cfg.train.micro_batch
    if self.mesh is not None:
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      m = m * shards // np.gcd(m, shards)
    return m // np.gcd(m, self.info.count)

  def _minibatches(self, batch: step_batch.StepBatch) -> list[dict[str, jax.Array]]:
    """Every update's device arrays, with old and reference log-probs computed here, under the
    params that sampled the step, before the first update changes them (Tunix and verl)."""
    parts = step_batch.minibatch_rows(batch.group_ids, self.cfg.train.updates_per_step)
    buckets, multiple = tuple(self.cfg.train.length_buckets), self._row_multiple()
    out = []
    for i in range(distributed.agree_max(len(parts))):  # the same calls on every process
      rows = parts[i] if i < len(parts) else np.zeros((0,), np.int64)
      longest = int(batch.lengths[rows].max()) if len(rows) else 1
      width = rollout.pad_to_bucket(distributed.agree_max(longest), buckets)
      num_rows = -(-distributed.agree_max(len(rows)) // multiple) * multiple
      arrays = self._device_batch(step_batch.take(batch, rows, width=width, num_rows=num_rows))
      tokens, positions = arrays["tokens"], arrays["positions"]
      if self.cfg.train.recompute_old_logprobs:
        sampled = arrays["old_logprobs"]
        arrays["old_logprobs"] = self.policy.logprobs(self.state["params"], tokens, positions)
        arrays["logprob_gap"] = logprob_gap(sampled, arrays["old_logprobs"], arrays["loss_mask"])
      if self.policy.reference_logprobs is not None:
        arrays["ref_logprobs"] = self.policy.reference_logprobs(tokens, positions)
      out.append(arrays)
    return out

  def _update(self, episodes: list[rollout.Episode]) -> dict[str, float]:
    batch = self._step_batch(episodes)
    metrics: list[dict[str, float]] = []
    for arrays in self._minibatches(batch):
      gap = arrays.pop("logprob_gap", None)
      params, opt_state, m = self.update_fn(self.state["params"], self.policy.frozen,
                                            self.state["opt_state"], arrays)
      self.state["params"], self.state["opt_state"] = params, opt_state
      m = {k: float(v) for k, v in m.items()}
      m.update({k: float(v) for k, v in (gap or {}).items()})
      metrics.append(m)
    self.engine.update_params(self.engine_model())
    out = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    if "rollout/logprob_gap_max" in out:  # the largest of any minibatch, not their mean
      out["rollout/logprob_gap_max"] = max(m["rollout/logprob_gap_max"] for m in metrics)
    adv = batch.advantages
    out["advantage_abs_mean"] = float(np.mean(np.abs(adv))) if len(adv) else 0.0
    out["nonzero_advantage_frac"] = float(np.mean(adv != 0)) if len(adv) else 0.0
    return out

  def _device_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The update's arrays, rows sharded over the mesh's (data, fsdp) axes when there is one
    (each process supplies its own rows)."""
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return distributed.global_batch(arrays, self.mesh)

  def _prefetch_tasks(self, step: int) -> bool:
    """Starts making `step`'s tasks in the background (train.prefetch_tasks, not past the last
    step); the curriculum state must already be the one that step draws from."""
    if not self.cfg.train.get("prefetch_tasks", False) or step > self.cfg.train.steps:
      return False
    self.next_tasks = (step, asyncio.create_task(self._tasks(step)))
    return True

  def _cancel_prefetch(self) -> None:
    if self.next_tasks is not None:
      self.next_tasks[1].cancel()
      self.next_tasks = None

  async def train_step(self, step: int) -> dict[str, Any]:
    times = {}
    t0 = time.perf_counter()
    pending, self.next_tasks = self.next_tasks, None
    prefetched = pending is not None and pending[0] == step
    if prefetched:
      tasks = await pending[1]  # made while the last update ran; its failure is raised here
    else:
      if pending is not None:
        pending[1].cancel()
      tasks = await self._tasks(step)
    times["time/tasks"] = time.perf_counter() - t0  # with a prefetch: what the step waited
    t0, busy0 = time.perf_counter(), self.engine.metrics().get("busy_seconds")
    result = await rollout.run_rollouts(
        tasks, engine=self.engine, chat=self.chat, tokenizer=self.tokenizer, world=self.world,
        cfg=self.rollout_cfg, seed=self.host_seed, step=step,
        max_concurrent=self.cfg.rollout_concurrency, min_group=self.grpo_cfg.min_group_size)
    times["time/rollout"] = time.perf_counter() - t0
    scalars: dict[str, float] = {**times, "tasks/prefetched": float(prefetched)}
    if busy0 is not None:  # the rest of the rollout the policy waited on the world
      scalars["rollout/policy_busy_frac"] = (
          (self.engine.metrics()["busy_seconds"] - busy0) / max(times["time/rollout"], 1e-9))
    rewards = np.asarray([e.reward for e in result.episodes], np.float32)
    # The curriculum moves on every process's rewards (the same update everywhere).
    all_rewards = rewards if self.info.count == 1 else distributed.gather_values(
        rewards, len(tasks) * self.rollout_cfg.group_size).astype(np.float32)
    if all_rewards.size:
      # The curriculum reads only the rewards, so it moves first and the next step's tasks
      # are made while the update runs (in a thread: JAX releases the GIL).
      self.state["curriculum"] = cur.update(self.cur_cfg, self.state["curriculum"],
                                            jnp.asarray(all_rewards))
      t0 = time.perf_counter()
      trained = controls.negative_control(self.cfg.train.get("control", ""), result.episodes,
                                          seeding.derive_seed(self.host_seed, step, 0xC0))
      if self._prefetch_tasks(step + 1):
        metrics = await asyncio.to_thread(self._update, trained)
      else:
        metrics = self._update(trained)
      scalars.update({k if "/" in k else f"train/{k}": v for k, v in metrics.items()})
      times["time/update"] = scalars["time/update"] = time.perf_counter() - t0
    else:
      scalars["train/skipped_no_episodes"] = 1.0
    self.state["step"] = jnp.asarray(step, jnp.int32)
    scalars.update(self.log.episode_scalars(result, rewards, tasks, self.grpo_cfg))
    if self.info.count > 1:  # this process's figures above; the batch's reward here
      scalars["reward/mean_all_processes"] = float(np.mean(all_rewards)) if all_rewards.size \
          else float("nan")
    scalars["curriculum/level"] = float(np.mean(np.asarray(self.state["curriculum"].level)))
    scalars.update(self.world.stats())
    return {"scalars": scalars, "result": result, "tasks": tasks}

  # ---- validation ----------------------------------------------------------------------

  async def _validation_tasks(self) -> list:
    """A fixed set: `validation.file`'s rows (the reference's valid.parquet fields), or else
    generated once at the start and saved in the workdir (reloaded on resume); with several
    processes each has its share, in its own log directory."""
    if self.cfg.validation.get("file"):
      tasks = validation_file.load_tasks(self.cfg.validation.file)
      return tasks[distributed.process_slice(len(tasks), self.info)]
    path = self.log.workdir / "validation_tasks.json"
    if path.exists():
      return [Task.from_dict(d) for d in json.loads(path.read_text())]
    seed = validation_seed(self.cfg)
    key = jax.random.fold_in(jax.random.key(seed), 0x7FFFFFFF)  # not a train step
    tasks = await self._tasks(-1, key=key, n=self.cfg.validation.num_tasks, seed_step=-1,
                              level=int(self.cfg.validation.get("level", 0)),
                              validation=True, host_seed=process_seed(seed, self.info))
    path.write_text(json.dumps([t.to_dict() for t in tasks], indent=1))
    return tasks

  async def validate(self, step: int, tasks: list) -> dict[str, float]:
    """Validation sampling settings (DESIGN.md §7) on the fixed tasks; logged apart, every
    episode written (episodes/validation_STEP.jsonl) so runs compare task by task."""
    v = self.cfg.validation
    cfg = dataclasses.replace(self.rollout_cfg, group_size=v.samples, temperature=v.temperature,
                              top_p=v.top_p, top_k=v.top_k)
    result = await rollout.run_rollouts(
        tasks, engine=self.engine, chat=self.chat, tokenizer=self.tokenizer, world=self.world,
        cfg=cfg, seed=seeding.derive_seed(process_seed(validation_seed(self.cfg), self.info), -1),
        step=step, max_concurrent=self.cfg.rollout_concurrency, min_group=1)
    eps = result.episodes
    self.log.episodes(step, eps, tasks, float(v.get("level", 0)), kind="validation")
    return {"val/reward_mean": float(np.mean([e.reward for e in eps])) if eps else float("nan"),
            "val/success_rate": float(np.mean([e.judge_score == 1 for e in eps])) if eps else 0.0,
            "val/episodes": float(len(eps)), **oracle_scalars(eps, "val/oracle_")}

  # ---- the loop ------------------------------------------------------------------------

  async def run(self) -> dict[str, Any]:
    cfg = self.cfg
    last = {}
    if self.unreadable_checkpoints:  # counted where the curves are, named in the log
      self.log.scalars(self.start_step, {
          "checkpoint/unreadable_skipped": float(len(self.unreadable_checkpoints))})
    val_tasks = await self._validation_tasks() if cfg.validation.every else []
    if val_tasks and self.start_step == 0:  # the untrained policy, the curves' starting point
      self.log.scalars(0, await self.validate(0, val_tasks))
      self.log.flush()
    bar = tqdm.tqdm(range(self.start_step + 1, cfg.train.steps + 1), desc="train",
                    initial=self.start_step, total=cfg.train.steps,
                    disable=not show_progress_bar(cfg.progress_bar, self.info.is_primary,
                                                  sys.stderr))
    self.sigterm = sigterm = runtime.SigtermStop(install=self.info.count == 1)
    for step in bar:
      out = await self.train_step(step)
      scalars = out["scalars"]
      if val_tasks and step % cfg.validation.every == 0:
        scalars.update(await self.validate(step, val_tasks))
      # Logs first, flushed, then the checkpoint: a run killed after the save has every
      # scalar up to it on disk, and its resume purges only the steps after it.
      self._log_step(step, scalars, out)
      # Every process asks every step: JAX's preemption service makes them agree on the step.
      stop = self.ckpt.reached_preemption(step) or sigterm.received
      if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop:
        t0 = time.perf_counter()  # async: the rest of the write overlaps the next step
        self.ckpt.save(step, self.checkpoint_view(), self.meta)
        self.log.scalars(step, {"time/checkpoint": time.perf_counter() - t0})
      bar.set_postfix(reward=f"{scalars.get('reward/mean', float('nan')):.2f}",
                      level=f"{scalars['curriculum/level']:.0f}")
      last = scalars
      if stop:
        self.log.scalars(step, {"checkpoint/stopped_by_sigterm": 1.0})
        logging.warning("stopping after step %d on SIGTERM/preemption, checkpoint saved; rerun "
                        "the same command to resume", step)
        break
    sigterm.uninstall()
    self._cancel_prefetch()  # stopped early: the next step's tasks are made again on resume
    self.ckpt.wait()  # never return with a save in flight
    self.log.flush()
    return last

  def _log_step(self, step: int, scalars: dict[str, float], out: dict[str, Any]) -> None:
    self.log.scalars(step, scalars)
    if self.cfg.log.episodes_every and step % self.cfg.log.episodes_every == 0:
      self.log.episodes(step, out["result"].episodes[:self.cfg.log.episodes_per_log],
                        out["tasks"], scalars["curriculum/level"])
    self.log.flush()
    if self.info.is_primary:
      logging.info("%s", step_line(step, self.cfg.train.steps, scalars,
                                   runtime.device_memory(jax.local_devices())))

  def close(self) -> None:
    self._cancel_prefetch()
    if self.sigterm is not None:
      self.sigterm.uninstall()
    self.engine.close()
    self.ckpt.close()
    self.log.close()


def train(cfg, workdir: str | pathlib.Path, world=None) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the last step's scalars."""
  async def main():
    w = world if world is not None else await build_world(cfg)
    trainer = Trainer(cfg, workdir, world=w)
    try:
      return await trainer.run()
    finally:
      trainer.close()
      if world is None:
        await w.aclose()
  return asyncio.run(main())
