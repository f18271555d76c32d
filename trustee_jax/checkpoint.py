"""Orbax checkpoints of the whole training state (params, optimizer, curriculum, step, config).

Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
run killed mid-save leaves the previous checkpoint as the newest complete one. A restore
checks the saved model config against the running one and refuses a mismatch by name, and
then every other config field: a resumed run with another seed, learning rate or group size
would otherwise carry on silently as if it were the same run.
"""
import fnmatch
import json
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model or run shape."""


# Config fields a resume may change: how long, how often it logs, validates and saves, where its
# processes and servers are. Anything else is refused unless `resume.allow_changes` names it.
RESUMABLE_CHANGES = ("train.steps", "log.*", "validation.every", "checkpoint.*", "progress_bar",
                     "rollout_concurrency", "mesh.shape", "distributed.*", "resume.*",
                     "simulator.urls", "simulator.port", "simulator.api_key",
                     "simulator.log_dir", "simulator.timeout_s", "simulator.startup_timeout_s")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": leaf} of nested mappings (lists and tuples are leaves, compared whole)."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_changes(saved: Mapping[str, Any], running: Mapping[str, Any],
                   allowed: Iterable[str] = RESUMABLE_CHANGES) -> dict[str, tuple[Any, Any]]:
  """key -> (saved, running) of every field that differs and no `allowed` pattern matches."""
  a, b = flatten(saved), flatten(running)
  norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  tuples as lists
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if norm(a.get(k)) != norm(b.get(k))
          and not any(fnmatch.fnmatchcase(k, p) for p in allowed)}


def check_resumable(saved_config: Any, running_config: Any, allow: Iterable[str] = ()) -> None:
  """Refuses to resume under a changed config (beyond RESUMABLE_CHANGES and `allow`), listing
  the keys; configs are the JSON strings or dicts a checkpoint's meta holds."""
  load = lambda c: json.loads(c) if isinstance(c, str) else dict(c or {})  # noqa: E731
  diff = config_changes(load(saved_config), load(running_config),
                        (*RESUMABLE_CHANGES, *allow))
  if diff:
    shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(diff.items())[:12])
    raise CheckpointMismatchError(
        f"the run's config differs from the checkpoint's in {sorted(diff)} ({shown}). Use a new "
        f"--workdir, or resume on purpose with --config.resume.allow_changes="
        f"'({', '.join(repr(k) for k in sorted(diff))},)'")


class Checkpointer:
  """Keep-last-N checkpoints under `directory`, one per saved step."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    self.manager.reload()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, expected_meta: dict[str, Any],
              check_meta: Callable[[dict[str, Any]], None] | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure of `abstract_state`; checks the model config first,
    then runs `check_meta` (e.g. the config check) on the saved meta."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    for key in ("model_config", "lora"):
      saved, want = meta.get(key), expected_meta.get(key)
      if saved != want:
        diff = {k: (saved.get(k), want.get(k)) for k in set(saved or {}) | set(want or {})
                if (saved or {}).get(k) != (want or {}).get(k)} if isinstance(saved, dict) else {}
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} was written for another model ({key}): "
            f"{json.dumps(diff, default=str) if diff else (saved, want)} (saved, running). "
            "Use a new --workdir or the matching config.")
    if check_meta is not None:
      check_meta(meta)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match the running state: {e}") from e
    return restored, meta

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, as a restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
