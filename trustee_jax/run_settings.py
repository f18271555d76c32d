"""What a run settles from its config before it starts: the device mesh, budgets that hold
together, and the host seeds of this process and of the held-out set."""
import jax

from trustee_jax import distributed, seeding


def training_mesh(cfg):
  """The (data, fsdp, tensor) mesh of `cfg.mesh.shape` over every process's devices, or None
  (shape (): one device, no sharding; only with one process)."""
  shape = tuple(cfg.get("mesh", {}).get("shape", ()) or ())
  if not shape and jax.process_count() > 1:
    raise distributed.DistributedError(
        f"{jax.process_count()} processes need a mesh: set --config.mesh.shape")
  return distributed.global_mesh(shape) if shape else None


def check_budgets(cfg) -> None:
  """Refuses budgets that cannot hold together: a run of at least one step of at least one task,
  and every episode (at most rollout.max_episode_tokens) within the in-process engine's cache
  (SGLang's context is the server's) and the largest length bucket."""
  for key in ("steps", "tasks_per_step", "updates_per_step", "micro_batch"):
    if cfg.train[key] < 1:
      raise ValueError(f"train.{key} must be at least 1, got {cfg.train[key]}")
  longest = cfg.rollout.max_episode_tokens
  if cfg.engine.get("backend", "jax") == "jax" and longest > cfg.engine.cache_len:
    raise ValueError(f"rollout.max_episode_tokens ({longest}) exceeds engine.cache_len "
                     f"({cfg.engine.cache_len}): the policy could not sample the episode's end")
  if longest > max(cfg.train.length_buckets):
    raise ValueError(f"rollout.max_episode_tokens ({longest}) exceeds the largest of "
                     f"train.length_buckets {tuple(cfg.train.length_buckets)}")
  if cfg.rollout.max_turn_tokens >= longest:
    raise ValueError(f"rollout.max_turn_tokens ({cfg.rollout.max_turn_tokens}) must be below "
                     f"rollout.max_episode_tokens ({longest})")


def process_seed(seed: int, info: distributed.ProcessInfo) -> int:
  """Host randomness of this process: each of several plays its own share of tasks."""
  return seed if info.count == 1 else seeding.derive_seed(seed, 0x5EED, info.index)


def validation_seed(cfg) -> int:
  """validation.seed, or the run's seed where it is -1."""
  seed = int(cfg.validation.get("seed", -1))
  return cfg.seed if seed == -1 else seed
