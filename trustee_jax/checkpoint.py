"""Orbax checkpoints of the whole training state (params, optimizer, curriculum, step, config).

Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
run killed mid-save leaves the previous checkpoint as the newest complete one. A restore
checks the saved model config against the running one and refuses a mismatch by name.
"""
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model or run shape."""


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

  def restore(self, step: int, abstract_state: Any, expected_meta: dict[str, Any]
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure of `abstract_state`; checks the model config first."""
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
