"""The training loop: curriculum knobs -> tasks -> rollouts -> GRPO updates -> logs -> checkpoint.

Host randomness derives from the config seed by folding in step, task, episode and turn,
so the checkpoint (params, optimizer, curriculum, step) is all a resumed run needs.
"""
import asyncio
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from trustee_jax import curriculum as cur
from trustee_jax import distributed, grpo, lora, rollout, update
from trustee_jax.checkpoint import Checkpointer, abstract_like
from trustee_jax.chat import ChatFormat
from trustee_jax.models import loading
from trustee_jax.sampling.engine import Engine
from trustee_jax.simulator.tasks import Task
from trustee_jax.train_logging import RunLogger
from trustee_jax.world import build_world


def load_policy(cfg, mesh=None) -> tuple[Any, Any]:
  """(model, tokenizer) from `cfg.model.name` (see `models.loading`: a packaged GGUF, a Hugging
  Face directory, or a named random config, whose tokenizer `cfg.model.tokenizer` names), with
  the weights in `cfg.model.param_dtype`; with a mesh they load straight into their shardings."""
  m = cfg.model
  tokenizer = loading.policy_tokenizer(m.name, m.get("tokenizer", ""))
  return loading.load_model_and_tokenizer(
      m.name, tokenizer, mesh=mesh, param_dtype=m.get("param_dtype"), dtype=m.get("dtype"),
      seed=cfg.seed, remat_policy=m.get("remat_policy"))


def model_meta(model) -> dict[str, Any]:
  return {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
          for k, v in dataclasses.asdict(model.cfg).items()
          if k not in ("dtype", "remat_policy", "name")}


def training_mesh(cfg):
  """The (data, fsdp, tensor) mesh of `cfg.mesh.shape` over every process's devices, or None
  (shape (): one device, no sharding; only with one process)."""
  shape = tuple(cfg.get("mesh", {}).get("shape", ()) or ())
  if not shape and jax.process_count() > 1:
    raise distributed.DistributedError(
        f"{jax.process_count()} processes need a mesh: set --config.mesh.shape")
  return distributed.global_mesh(shape) if shape else None


def lora_config(cfg) -> lora.LoraConfig | None:
  """The run's LoRA settings, or None for a full fine-tune (no `lora` block or not enabled)."""
  block = cfg.get("lora")
  if block is None or not block.get("enabled", False):
    return None
  if block.get("sampler_weights", "merged") not in ("merged", "adapters"):
    raise ValueError(f"lora.sampler_weights must be 'merged' or 'adapters', got "
                     f"{block.sampler_weights!r}")
  return lora.LoraConfig.from_dict(block)


def check_budgets(cfg) -> None:
  """Refuses token budgets that cannot hold together: every episode (at most
  rollout.max_episode_tokens) must fit the policy engine's cache and the largest length bucket."""
  longest = cfg.rollout.max_episode_tokens
  if longest > cfg.engine.cache_len:
    raise ValueError(f"rollout.max_episode_tokens ({longest}) exceeds engine.cache_len "
                     f"({cfg.engine.cache_len}): the policy could not sample the episode's end")
  if longest > max(cfg.train.length_buckets):
    raise ValueError(f"rollout.max_episode_tokens ({longest}) exceeds the largest of "
                     f"train.length_buckets {tuple(cfg.train.length_buckets)}")
  if cfg.rollout.max_turn_tokens >= longest:
    raise ValueError(f"rollout.max_turn_tokens ({cfg.rollout.max_turn_tokens}) must be below "
                     f"rollout.max_episode_tokens ({longest})")


CONTROLS = ("", "negate_advantages", "permute_rewards")


def negative_control(control: str, episodes: list[rollout.Episode], seed: int
                     ) -> list[rollout.Episode]:
  """The episodes the update trains on under a negative control of the learning benchmark:
  "permute_rewards" shuffles the rewards across the step's episodes (seeded), so they no longer
  say which episode did well; "negate_advantages" negates them, which flips every group-relative
  advantage's sign (the group std is unchanged); "" (a real run) leaves them be. Logged rewards
  and the curriculum always see the true rewards."""
  if control not in CONTROLS:
    raise ValueError(f"train.control must be one of {CONTROLS}, got {control!r}")
  if not control:
    return episodes
  rewards = [-e.reward for e in episodes] if control == "negate_advantages" else \
      np.random.default_rng(seed).permutation([e.reward for e in episodes])
  return [dataclasses.replace(e, reward=float(r)) for e, r in zip(episodes, rewards)]


HOST_STATE = ("curriculum", "step")  # state every process holds whole, on the host side


class Trainer:
  """Owns the policy, its engine, the world, the optimizer and the run's files."""

  def __init__(self, cfg, workdir: str | pathlib.Path, world=None):
    check_budgets(cfg)
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.info = distributed.process_info()
    if self.info.count > 1:  # each process writes its shards of one shared directory
      distributed.assert_shared_directory(self.workdir)
    # Host randomness (tasks, sampling) differs per process: each plays its own share of tasks.
    self.host_seed = cfg.seed if self.info.count == 1 else rollout.derive_seed(
        cfg.seed, 0x5EED, self.info.index)
    self.mesh = training_mesh(cfg)
    self.model, self.tokenizer = load_policy(cfg, self.mesh)
    self.chat = ChatFormat(self.tokenizer)
    t = cfg.train
    self.grpo_cfg = grpo.GRPOConfig.from_dict(cfg.grpo)
    self.cur_cfg = cur.CurriculumConfig.from_dict(cfg.curriculum)
    self.rollout_cfg = rollout.RolloutConfig.from_dict(cfg.rollout)
    self.optimizer = update.build_optimizer(t.optimizer)
    kw = dict(temperature=self.rollout_cfg.temperature, chunk_size=t.logprob_chunk)
    self.lora_cfg = lora_config(cfg)
    if self.lora_cfg is None:  # full fine-tune: the params are the whole model
      self.graphdef, params = nnx.split(self.model)
      self.base = None
      self.update_fn = update.make_update_fn(self.graphdef, self.optimizer, self.grpo_cfg,
                                             micro_batch=t.micro_batch, **kw)
      self.logprob_fn = update.make_logprob_fn(self.graphdef, **kw)
      self.ref_logprob_fn, ref = self.logprob_fn, params
    else:  # LoRA: the params are the adapters; the frozen base is the KL reference
      self.model = lora.add_lora(self.model, self.lora_cfg, seed=cfg.seed)
      self.graphdef, params, self.base = lora.split(self.model)
      self.update_fn = lora.make_lora_update_fn(self.graphdef, self.base, self.optimizer,
                                                self.grpo_cfg, micro_batch=t.micro_batch, **kw)
      self.logprob_fn = lora.make_lora_logprob_fn(self.graphdef, self.base, **kw)
      self.ref_logprob_fn, ref = lora.make_reference_logprob_fn(self.model, **kw), self.base
    self.ref_params = ref if self.grpo_cfg.kl_beta > 0 else None
    self.state = {"params": params, "opt_state": self.optimizer.init(params),
                  "curriculum": cur.init_state(self.cur_cfg),
                  "step": jnp.zeros((), jnp.int32)}
    self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.checkpoint.keep)
    self.meta = {"model_config": model_meta(self.model), "config": cfg.to_json_best_effort()}
    if self.lora_cfg is not None:  # adapters of another rank or targets are refused on restore
      self.meta["lora"] = json.loads(json.dumps(dataclasses.asdict(self.lora_cfg)))
    self.start_step = self._maybe_restore()
    self.engine = Engine(self.engine_model(),
                         num_slots=cfg.engine.num_slots, cache_len=cfg.engine.cache_len,
                         decode_chunk=cfg.engine.decode_chunk,
                         unstack_layers=cfg.engine.get("unstack_layers", True),
                         decode_fn=self.tokenizer.decode)
    self.world = world
    logdir = self.workdir if self.info.is_primary else self.workdir / f"process_{self.info.index}"
    self.log = RunLogger(logdir, purge_step=self.start_step + 1 if self.start_step else None)

  def sampler_model(self):
    """The policy as the engine samples it: the params, or base + adapters (merged once per
    update with lora.sampler_weights="merged", else merged a layer at a time as it runs)."""
    if self.lora_cfg is None:
      return nnx.merge(self.graphdef, self.state["params"])
    adapted = nnx.merge(self.graphdef, self.state["params"], self.base)
    merged = self.cfg.lora.get("sampler_weights", "merged") == "merged"
    return lora.merge(adapted) if merged else adapted

  def engine_model(self):
    """The sampler's model: with several processes, a copy of the (merged) policy on this
    process's devices, so that each process's engine runs its own requests unsynchronised."""
    model = self.sampler_model()
    if self.info.count == 1:
      return model
    if isinstance(model, lora.LoraTransformer):
      model = lora.merge(model)
    return distributed.per_process_model(model, distributed.process_local_mesh())

  def checkpoint_view(self) -> dict[str, Any]:
    """The state as saved: with several processes the host-held parts (curriculum, step) as
    replicated global arrays, which Orbax writes once."""
    if self.info.count == 1:
      return self.state
    return {k: distributed.replicate_host_values(v, self.mesh) if k in HOST_STATE else v
            for k, v in self.state.items()}

  def _maybe_restore(self) -> int:
    step = self.ckpt.latest_step()
    if step is None:
      return 0
    restored, _ = self.ckpt.restore(step, abstract_like(self.checkpoint_view()), self.meta)
    for key in HOST_STATE:  # back to this process's own copies
      restored[key] = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), restored[key])
    self.state = restored
    return int(step)

  # ---- one step ------------------------------------------------------------------------

  async def _tasks(self, step: int, key=None, n: int | None = None, seed_step: int | None = None,
                   level: int = 0, validation: bool = False):
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
    make = self.world.make_validation_tasks if validation else self.world.make_tasks
    seed = rollout.derive_seed(self.host_seed, step if seed_step is None else seed_step)
    return await make(mine, seed)

  def _advantages(self, arrays) -> np.ndarray:
    n = len(arrays["rewards"])
    return np.asarray(grpo.group_advantages(
        jnp.asarray(arrays["rewards"]), jnp.asarray(arrays["group_ids"]), jnp.ones(n, bool),
        self.grpo_cfg, num_groups=self.cfg.train.tasks_per_step))

  def _minibatches(self, episodes: list[rollout.Episode]) -> list[list[int]]:
    """Episode indices per optimizer update: whole groups, `updates_per_step` parts."""
    groups = sorted({e.task_index for e in episodes})
    parts = np.array_split(np.asarray(groups), min(self.cfg.train.updates_per_step, len(groups)))
    return [[i for i, e in enumerate(episodes) if e.task_index in set(p.tolist())]
            for p in parts]

  def _pad_rows(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads this process's rows with all-masked ones: every process to the same count, the
    global count a multiple of micro_batch and of the mesh's batch shards."""
    m = self.cfg.train.micro_batch
    if self.mesh is not None:
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      m = m * shards // np.gcd(m, shards)
    per_process = m // np.gcd(m, self.info.count)
    n = len(arrays["tokens"])
    target = -(-distributed.agree_max(n) // per_process) * per_process
    extra = target - n
    if not extra:
      return arrays
    return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype) if k != "positions"
                               else np.full((extra,) + v.shape[1:], -1, v.dtype)])
            for k, v in arrays.items()}

  def _part_arrays(self, part: list[rollout.Episode]) -> dict[str, np.ndarray]:
    """One mini-batch's arrays; every process pads to the same length bucket and row count."""
    buckets = tuple(self.cfg.train.length_buckets)
    longest = distributed.agree_max(max((len(e.tokens) for e in part), default=1))
    width = rollout.pad_to_bucket(longest, buckets)
    if part:
      arrays = rollout.to_arrays(part, (width,))
      arrays["advantages"] = self._advantages(arrays)
    else:  # this process has no episodes in this mini-batch; others do
      arrays = rollout.to_arrays([rollout.Episode(0, 0, *(np.zeros(1),) * 4)], (width,))
      arrays = {k: v[:0] for k, v in arrays.items()}
      arrays["advantages"] = np.zeros((0,), np.float32)
    return self._pad_rows({k: v for k, v in arrays.items() if k not in ("rewards", "group_ids")})

  def _update(self, episodes: list[rollout.Episode]) -> dict[str, float]:
    metrics: list[dict[str, float]] = []
    parts = self._minibatches(episodes)
    for i in range(distributed.agree_max(len(parts))):  # the same update calls on every process
      part = [episodes[j] for j in parts[i]] if i < len(parts) else []
      arrays = self._part_arrays(part)
      adv = arrays["advantages"][:len(part)]  # this process's real rows (the rest is padding)
      batch = self._device_batch(arrays)
      if self.cfg.train.recompute_old_logprobs:
        sampled = batch["old_logprobs"][:, 1:]
        recomputed = self.logprob_fn(self.state["params"], batch["tokens"], batch["positions"])
        gap = jnp.sum(jnp.abs(recomputed - sampled) * batch["loss_mask"][:, 1:])
        batch["old_logprobs"] = batch["old_logprobs"].at[:, 1:].set(recomputed)
      else:
        gap = None
      if self.ref_params is not None:
        ref = self.ref_logprob_fn(self.ref_params, batch["tokens"], batch["positions"])
        batch["ref_logprobs"] = jnp.pad(ref, ((0, 0), (1, 0)))
      params, opt_state, m = self.update_fn(self.state["params"], self.state["opt_state"], batch)
      self.state["params"], self.state["opt_state"] = params, opt_state
      m = {k: float(v) for k, v in m.items()}
      if gap is not None:
        m["old_logprob_gap"] = float(gap) / max(m["tokens"], 1.0)
      m["advantage_abs_mean"] = float(np.mean(np.abs(adv))) if len(adv) else 0.0
      m["nonzero_advantage_frac"] = float(np.mean(adv != 0)) if len(adv) else 0.0
      metrics.append(m)
    self.engine.update_params(self.engine_model())
    return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}

  def _device_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The update's arrays, rows sharded over the mesh's (data, fsdp) axes when there is one
    (each process supplies its own rows)."""
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return distributed.global_batch(arrays, self.mesh)

  async def train_step(self, step: int) -> dict[str, Any]:
    times = {}
    t0 = time.perf_counter()
    tasks = await self._tasks(step)
    times["time/tasks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = await rollout.run_rollouts(
        tasks, engine=self.engine, chat=self.chat, tokenizer=self.tokenizer, world=self.world,
        cfg=self.rollout_cfg, seed=self.host_seed, step=step,
        max_concurrent=self.cfg.rollout_concurrency)
    times["time/rollout"] = time.perf_counter() - t0
    scalars: dict[str, float] = dict(times)
    rewards = np.asarray([e.reward for e in result.episodes], np.float32)
    # The curriculum moves on every process's rewards (the same update everywhere).
    all_rewards = rewards if self.info.count == 1 else distributed.gather_values(
        rewards, len(tasks) * self.rollout_cfg.group_size).astype(np.float32)
    if all_rewards.size:
      t0 = time.perf_counter()
      trained = negative_control(self.cfg.train.get("control", ""), result.episodes,
                                 rollout.derive_seed(self.host_seed, step, 0xC0))
      scalars.update({f"train/{k}": v for k, v in self._update(trained).items()})
      times["time/update"] = scalars["time/update"] = time.perf_counter() - t0
      self.state["curriculum"] = cur.update(self.cur_cfg, self.state["curriculum"],
                                            jnp.asarray(all_rewards))
    else:
      scalars["train/skipped_no_episodes"] = 1.0
    self.state["step"] = jnp.asarray(step, jnp.int32)
    scalars.update(self.log.episode_scalars(result, rewards, tasks))
    if self.info.count > 1:  # this process's figures above; the batch's reward here
      scalars["reward/mean_all_processes"] = float(np.mean(all_rewards)) if all_rewards.size \
          else float("nan")
    scalars["curriculum/level"] = float(np.mean(np.asarray(self.state["curriculum"].level)))
    scalars.update(self.world.stats())
    return {"scalars": scalars, "result": result, "tasks": tasks}

  # ---- validation ----------------------------------------------------------------------

  async def _validation_tasks(self) -> list:
    """A fixed set, generated once at the start and saved in the workdir (reloaded on resume);
    with several processes each has its share, in its own log directory."""
    path = self.log.workdir / "validation_tasks.json"
    if path.exists():
      return [Task.from_dict(d) for d in json.loads(path.read_text())]
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), 0x7FFFFFFF)  # not a train step
    tasks = await self._tasks(-1, key=key, n=self.cfg.validation.num_tasks, seed_step=-1,
                              level=int(self.cfg.validation.get("level", 0)),
                              validation=True)
    path.write_text(json.dumps([t.to_dict() for t in tasks], indent=1))
    return tasks

  async def validate(self, step: int, tasks: list) -> dict[str, float]:
    """Validation sampling settings (DESIGN.md §7) on the fixed tasks; logged apart."""
    v = self.cfg.validation
    cfg = dataclasses.replace(self.rollout_cfg, group_size=v.samples, temperature=v.temperature,
                              top_p=v.top_p, top_k=v.top_k)
    result = await rollout.run_rollouts(
        tasks, engine=self.engine, chat=self.chat, tokenizer=self.tokenizer, world=self.world,
        cfg=cfg, seed=rollout.derive_seed(self.host_seed, -1), step=step,
        max_concurrent=self.cfg.rollout_concurrency, min_group=1)
    eps = result.episodes
    return {"val/reward_mean": float(np.mean([e.reward for e in eps])) if eps else float("nan"),
            "val/success_rate": float(np.mean([e.judge_score == 1 for e in eps])) if eps else 0.0,
            "val/episodes": float(len(eps))}

  # ---- the loop ------------------------------------------------------------------------

  async def run(self) -> dict[str, Any]:
    cfg = self.cfg
    last = {}
    val_tasks = await self._validation_tasks() if cfg.validation.every else []
    if val_tasks and self.start_step == 0:  # the untrained policy, the curves' starting point
      self.log.scalars(0, await self.validate(0, val_tasks))
      self.log.flush()
    bar = tqdm.tqdm(range(self.start_step + 1, cfg.train.steps + 1), desc="train",
                    initial=self.start_step, total=cfg.train.steps, disable=not cfg.progress_bar)
    for step in bar:
      out = await self.train_step(step)
      scalars = out["scalars"]
      if val_tasks and step % cfg.validation.every == 0:
        scalars.update(await self.validate(step, val_tasks))
      # Logs first, flushed, then the checkpoint: a run killed after the save has every
      # scalar up to it on disk, and its resume purges only the steps after it.
      self._log_step(step, scalars, out)
      if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
        t0 = time.perf_counter()
        self.ckpt.save(step, self.checkpoint_view(), self.meta)
        self.log.scalars(step, {"time/checkpoint": time.perf_counter() - t0})
      bar.set_postfix(reward=f"{scalars.get('reward/mean', float('nan')):.2f}",
                      level=f"{scalars['curriculum/level']:.0f}")
      last = scalars
    self.log.flush()
    return last

  def _log_step(self, step: int, scalars: dict[str, float], out: dict[str, Any]) -> None:
    self.log.scalars(step, scalars)
    if self.cfg.log.episodes_every and step % self.cfg.log.episodes_every == 0:
      self.log.episodes(step, out["result"].episodes[:self.cfg.log.episodes_per_log],
                        out["tasks"], scalars["curriculum/level"])
    self.log.flush()

  def close(self) -> None:
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


def config_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), default=str, sort_keys=True)
