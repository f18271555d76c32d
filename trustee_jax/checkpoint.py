"""Orbax checkpoints of the whole training state (params, optimizer, curriculum, step, config).

Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
run killed mid-save (async saves included) leaves the previous checkpoint as the newest
complete one. A failed save raises CheckpointSaveError naming the step's directory (disk full
said plainly). A resume takes the newest checkpoint that reads: an unreadable newer one
(truncated or corrupted files, or array data that fail the checksums kept in its meta) is warned
about by step and set aside as STEP.unreadable. A restore
checks the saved model config against the running one and refuses a mismatch by name, and
then every other config field: a resumed run with another seed, learning rate or group size
would otherwise carry on silently as if it were the same run.
"""
import dataclasses
import errno
import fnmatch
import json
import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trustee_jax import runtime
from trustee_jax.default_config import default_config


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model or run shape."""


# Config fields a resume may change: how long, how often it logs, validates and saves, where its
# processes and servers are. Anything else is refused unless `resume.allow_changes` names it.
RESUMABLE_CHANGES = ("train.steps", "log.*", "validation.every", "checkpoint.*", "progress_bar",
                     "rollout_concurrency", "mesh.shape", "distributed.*", "resume.*",
                     "simulator.urls", "simulator.port", "simulator.api_key",
                     "simulator.log_dir", "simulator.timeout_s", "simulator.startup_timeout_s",
                     "model.attention_impl", "hardware.allow_cpu",  # same numerics; CPU smoke
                     "engine.kv_layout", "engine.block_size", "engine.num_blocks")  # same tokens


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": leaf} of nested mappings (lists and tuples are leaves, compared whole)."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_changes(saved: Mapping[str, Any], running: Mapping[str, Any],
                   allowed: Iterable[str] = RESUMABLE_CHANGES,
                   defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
  """key -> (saved, running) of every field that differs and no `allowed` pattern matches. A
  key the saved config lacks is no change when the running value is its `defaults` value (a
  field added to the code after the checkpoint was written, left at its default)."""
  a, b = flatten(saved), flatten(running)
  d = flatten(defaults or {})
  norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  tuples as lists
  added_at_default = {k for k in set(b) - set(a) if k in d and norm(b[k]) == norm(d[k])}
  return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - added_at_default)
          if norm(a.get(k)) != norm(b.get(k))
          and not any(fnmatch.fnmatchcase(k, p) for p in allowed)}


def check_resumable(saved_config: Any, running_config: Any, allow: Iterable[str] = ()) -> None:
  """Refuses to resume under a changed config (beyond RESUMABLE_CHANGES and `allow`), listing
  the keys; configs are the JSON strings or dicts a checkpoint's meta holds."""
  load = lambda c: json.loads(c) if isinstance(c, str) else dict(c or {})  # noqa: E731
  diff = config_changes(load(saved_config), load(running_config),
                        (*RESUMABLE_CHANGES, *allow), defaults=default_config().to_dict())
  if diff:
    shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(diff.items())[:12])
    raise CheckpointMismatchError(
        f"the run's config differs from the checkpoint's in {sorted(diff)} ({shown}). Use a new "
        f"--workdir, or resume on purpose with --config.resume.allow_changes="
        f"'({', '.join(repr(k) for k in sorted(diff))},)'")


class CheckpointStateError(CheckpointMismatchError):
  """A step's state could not be read into the running structure: corrupted or truncated
  files, or another state layout."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory could be restored; names every step tried and why."""


class CheckpointSaveError(OSError):
  """A save failed (disk full, I/O); names the step's directory, keeps the cause's errno."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """The newest checkpoint that restored, and the newer ones skipped as unreadable."""
  state: Any
  meta: dict[str, Any]
  step: int
  skipped: tuple[tuple[int, str], ...]  # (step, why), newest first; each was set aside


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums (both wrap) of a hash of each element's bits with its row-major index, and
  of the bits alone: a changed element (a flipped bit) or two swapped ones change the first
  with probability 1 - 2**-32. Reduced by XLA across the leaf's shards, so every process gets
  the same numbers without gathering the array."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  bits = bits.astype(jnp.uint32)
  pos = jnp.zeros(x.shape, jnp.uint32)  # the row-major index, mod 2**32
  strides = np.cumprod((1, *x.shape[:0:-1]))[::-1] if x.ndim else ()
  for axis, stride in enumerate(strides):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
        int(stride) % 2**32)
  mixed = _fmix32(_fmix32(bits) ^ (pos * jnp.uint32(0x9E3779B9)))
  return jnp.stack([jnp.sum(mixed), jnp.sum(bits)])


def checksums(state: Any) -> dict[str, list[int]]:
  """Leaf path -> its two checksums (_leaf_checksum); saved in a checkpoint's meta, because
  Orbax and TensorStore keep none of array data (a flipped byte would restore as wrong values)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = jax.device_get([_leaf_checksum(x) for _, x in leaves])
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(c)]
          for (path, _), c in zip(leaves, sums)}


def is_disk_full(error: BaseException) -> bool:
  """Whether ENOSPC is anywhere in the error's chain (Orbax wraps it; TensorStore words it)."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
      return True
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return False


class Checkpointer:
  """Keep-last-N checkpoints under `directory`, one per saved step; with `async_save` a save
  returns once the arrays are off the device and writes them in the background."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = False):
    self.directory = runtime.run_path(directory)  # gs://... stays a URI
    self.async_save = async_save
    self._in_flight: int | None = None  # the step an async save is writing
    self._failed: CheckpointSaveError | None = None  # the save error raised, if any
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    self.manager.reload()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `step`, first waiting for (and raising the error of) the save in flight."""
    self.wait()
    meta = {**meta, "checksums": checksums(state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
      raise self._save_error(step, e) from e
    self._in_flight = step
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is complete on disk; raises its error by path."""
    step, self._in_flight = self._in_flight, None
    if step is None:  # none started, or its error was raised already
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._save_error(step, e) from e
    if step is not None and step != self.latest_step():  # Orbax logged an error, not raised
      raise CheckpointSaveError(None, f"checkpoint step {step} was not finalised (see the "
                                f"Orbax error logged above)", str(self.directory / str(step)))

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    """The error naming the step's directory, disk-full said plainly."""
    full = is_disk_full(error)
    cause = "the disk is full (ENOSPC)" if full else f"{type(error).__name__}: {error}"
    code = errno.ENOSPC if full else getattr(error, "errno", None)
    self._failed = CheckpointSaveError(code, f"saving checkpoint step {step} failed: {cause}. "
                                       f"The checkpoints saved before it are untouched",
                                       str(self.directory / str(step)))
    return self._failed

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
      raise CheckpointStateError(
          f"checkpoint {self.directory}/{step} does not match the running state or is "
          f"damaged: {e}") from e
    want = meta.get("checksums")  # absent from checkpoints written before they were kept
    if want is not None:
      got = checksums(restored)
      bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      if bad:
        raise CheckpointStateError(
            f"checkpoint {self.directory}/{step} is damaged: its data do not match the "
            f"checksums saved with it in {bad[:8]}") from ValueError(
                f"its array data do not match the checksums saved with it in {bad[:8]}")
    return restored, meta

  def restore_latest(self, abstract_state: Any, expected_meta: dict[str, Any],
                     check_meta: Callable[[dict[str, Any]], None] | None = None
                     ) -> Restored | None:
    """The newest checkpoint that restores (None: there is none). An unreadable one (truncated
    or corrupted files) is warned about, set aside as STEP.unreadable and the one before tried;
    a config refusal is raised at once. None readable: an error listing every step and why.
    Array data are checked against the checksums saved in the meta (TensorStore keeps none), so
    a flipped byte inside a compressed chunk is seen too."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    skipped: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, meta = self.restore(step, abstract_state, expected_meta, check_meta)
      except CheckpointStateError as e:
        reason = str(e.__cause__)
      except CheckpointMismatchError:
        raise  # the model or config differs: every older step would say the same
      except (OSError, ValueError, KeyError, TypeError) as e:  # the meta file itself
        reason = f"{type(e).__name__}: {e}"
      else:
        for bad, _ in skipped:
          self.set_aside(bad)
        return Restored(state, meta, step, tuple(skipped))
      reason = reason[:600]
      logging.warning("CHECKPOINT STEP %d IS UNREADABLE, trying the one before: %s", step, reason)
      skipped.append((step, reason))
    if skipped:
      raise CheckpointRestoreError(
          f"no checkpoint under {self.directory} could be restored; tried "
          + "; ".join(f"step {s}: {why}" for s, why in skipped))
    return None

  def set_aside(self, step: int) -> pathlib.Path:
    """Renames an unreadable step's directory to STEP.unreadable (kept for a look, no longer a
    step Orbax lists or would save over); the primary process renames, all wait for it."""
    target = self.directory / f"{step}.unreadable"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    ocp.multihost.sync_global_processes(f"checkpoint_set_aside_{step}")
    self.manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has reached the step JAX's preemption service agreed to stop at
    (after a SIGTERM to any of them); False without jax.distributed."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the save in flight (raising its error), then closes the manager (which
    re-raises a failed save's error: raised once already, it is logged, not raised again)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:
        if self._failed is None:
          raise
        logging.info("closed after the failed save: %s", self._failed)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, as a restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
