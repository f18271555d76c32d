"""Checkpoints under faults, on a small state: damaged files, a full disk, async saves and a
SIGKILL while one is in flight."""
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trustee_jax.checkpoint import (CheckpointMismatchError, CheckpointRestoreError, Checkpointer,
                                    CheckpointSaveError, abstract_like, is_disk_full)

META = {"model_config": {"name": "tiny"}, "lora": None, "config": "{}"}


def state_at(step: int, size: int = 64) -> dict[str, jax.Array]:
  """A small state whose every value says which step wrote it."""
  return {"w": jnp.full((size, size), float(step)), "b": jnp.arange(size) + step,
          "step": jnp.asarray(step, jnp.int32)}


def assert_state_of(state, step: int, size: int = 64) -> None:
  want_leaves = jax.tree_util.tree_leaves(state_at(step, size))
  assert len(jax.tree_util.tree_leaves(state)) == len(want_leaves)
  for got, want in zip(jax.tree_util.tree_leaves(state), want_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def saved(directory: pathlib.Path, steps, async_save: bool = False) -> Checkpointer:
  ckpt = Checkpointer(directory, keep=5, async_save=async_save)
  for s in steps:
    ckpt.save(s, state_at(s), META)
  ckpt.wait()
  return ckpt


def damage(step_dir: pathlib.Path, how: str) -> None:
  """Truncates, or flips the first bytes of, every data file of a step (OCDBT's index nodes
  and compressed chunks: both are caught. A flip inside a chunk's compressed data is not: no
  checksum covers it, see restore_latest)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, list(step_dir.rglob("*"))
  for f in files:
    data = bytearray(f.read_bytes())
    if how == "truncate":
      data = data[:len(data) // 2]
    else:
      data[:32] = bytes(b ^ 0xFF for b in data[:32])
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_loudly(tmp_path, how, caplog):
  ckpt = saved(tmp_path, [1, 2, 3])
  damage(tmp_path / "3", how)
  restored = ckpt.restore_latest(abstract_like(state_at(0)), META)
  assert restored.step == 2 and [s for s, _ in restored.skipped] == [3]
  assert_state_of(restored.state, 2)
  assert "STEP 3 IS UNREADABLE" in caplog.text
  # Set aside, not deleted: the run can save step 3 again, the damaged files stay for a look.
  assert (tmp_path / "3.unreadable").is_dir() and ckpt.latest_step() == 2
  ckpt.save(3, state_at(3), META)
  assert_state_of(ckpt.restore_latest(abstract_like(state_at(0)), META).state, 3)
  ckpt.close()


def test_no_readable_checkpoint_is_an_error_listing_every_step_tried(tmp_path):
  ckpt = saved(tmp_path, [1, 2])
  damage(tmp_path / "2", "truncate")
  (tmp_path / "1" / "meta" / "metadata").write_text("{not json")
  with pytest.raises(CheckpointRestoreError, match=r"tried step 2: .*; step 1: "):
    ckpt.restore_latest(abstract_like(state_at(0)), META)
  assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()  # nothing set aside
  assert Checkpointer(tmp_path / "empty").restore_latest(abstract_like(state_at(0)), META) is None


def test_a_config_refusal_is_raised_at_once_not_skipped_as_damage(tmp_path):
  ckpt = saved(tmp_path, [1, 2])

  def refuse(meta):
    raise CheckpointMismatchError("the run's config differs")
  with pytest.raises(CheckpointMismatchError, match="config differs"):
    ckpt.restore_latest(abstract_like(state_at(0)), META, check_meta=refuse)
  with pytest.raises(CheckpointMismatchError, match="another model"):
    ckpt.restore_latest(abstract_like(state_at(0)), {**META, "model_config": {"name": "big"}})
  assert ckpt.latest_step() == 2 and not list(tmp_path.glob("*.unreadable"))


@pytest.mark.parametrize("async_save,where", [(False, "write"), (True, "write"),
                                              (True, "background")])
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                      async_save, where):
  ckpt = saved(tmp_path, [1], async_save=async_save)

  def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path))

  async def disk_full_later(*args):  # run by the background thread, after save() returned
    disk_full()
  # The meta file's write: at once in save(), or (a coroutine) in the async save's thread.
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn",
                      disk_full if where == "write" else disk_full_later)
  if where == "background":
    ckpt.save(2, state_at(2), META)  # returns: the write fails afterwards
  with pytest.raises(CheckpointSaveError, match=r"step 2 .*disk is full") as info:
    ckpt.save(2, state_at(2), META) if where == "write" else ckpt.wait()
  assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "2")
  ckpt.close()  # the error was raised once; closing does not raise it again
  monkeypatch.undo()
  reopened = Checkpointer(tmp_path)
  assert reopened.latest_step() == 1
  restored = reopened.restore_latest(abstract_like(state_at(0)), META)
  assert restored.step == 1 and not restored.skipped
  assert_state_of(restored.state, 1)


def test_disk_full_is_found_however_orbax_wraps_it():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("commit failed") from e
  except RuntimeError as wrapped:
    assert is_disk_full(wrapped)
  assert is_disk_full(ValueError("RESOURCE_EXHAUSTED: No space left on device [writing]"))
  assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def slow_finalize(monkeypatch, seconds: float) -> None:
  """Makes every async save's background part take `seconds` longer (before the commit)."""
  real = ocp.CheckpointManager._finalize

  def slow(self, *args, **kwargs):
    time.sleep(seconds)
    return real(self, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "_finalize", slow)


def test_an_async_save_returns_early_and_the_next_save_waits_for_it(tmp_path, monkeypatch):
  slow_finalize(monkeypatch, 1.5)
  ckpt = Checkpointer(tmp_path, keep=5, async_save=True)
  params = jnp.full((256, 256), 1.0)
  t0 = time.perf_counter()
  ckpt.save(1, {"w": params}, META)
  assert time.perf_counter() - t0 < 1.5 and ckpt.manager.is_saving_in_progress()
  # The trainer's next update donates the params' buffers: the save must hold its own copy.
  jax.jit(lambda x: x * 0 - 7, donate_argnums=0)(params).block_until_ready()
  ckpt.save(2, {"w": jnp.full((256, 256), 2.0)}, META)  # waits for step 1 to commit first
  assert (tmp_path / "1").is_dir()
  ckpt.close()  # waits for step 2
  assert sorted(Checkpointer(tmp_path).manager.all_steps()) == [1, 2]
  for step in (1, 2):
    got, _ = Checkpointer(tmp_path).restore(step, abstract_like({"w": params}), META)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.full((256, 256), float(step)))


_SAVE_THEN_HANG = """
import sys, time
import orbax.checkpoint as ocp
sys.path.insert(0, sys.argv[2])
from test_checkpoint_faults import META, state_at
from trustee_jax.checkpoint import Checkpointer
real = ocp.CheckpointManager._finalize
def slow(self, *args, **kwargs):
  time.sleep(600)  # the files are being written; the commit (rename) has not happened
  return real(self, *args, **kwargs)
ckpt = Checkpointer(sys.argv[1], keep=5, async_save=True)
ckpt.save(1, state_at(1, 512), META)
ckpt.wait()
ocp.CheckpointManager._finalize = slow
ckpt.save(2, state_at(2, 512), META)
print("SAVING", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_sigkill_during_an_async_save_resumes_from_the_previous_complete_step(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _SAVE_THEN_HANG, str(tmp_path),
                           str(pathlib.Path(__file__).parent)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=pathlib.Path(__file__).parent.parent,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("SAVING"):
      break
  assert proc.poll() is None, "".join(lines)
  deadline = time.monotonic() + 60
  while not any("tmp" in p.name for p in tmp_path.iterdir()):  # step 2 is mid-write
    assert time.monotonic() < deadline, list(tmp_path.iterdir())
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restored = Checkpointer(tmp_path).restore_latest(abstract_like(state_at(0, 512)), META)
  assert restored.step == 1 and not restored.skipped
  assert_state_of(restored.state, 1, 512)


def test_array_data_that_read_but_changed_are_caught_by_their_checksums(tmp_path):
  """Data that decode cleanly but are not what was saved (a flipped byte inside a compressed
  chunk, which TensorStore cannot see) fail the checksums kept in the meta: the step is set
  aside and the one before restored."""
  import shutil
  ckpt = saved(tmp_path / "run", [1, 2])
  impostor = Checkpointer(tmp_path / "other", keep=5)  # step 2 of a run whose w is all 7.0
  impostor.save(2, {**state_at(2), "w": jnp.full((64, 64), 7.0)}, META)
  impostor.close()
  shutil.rmtree(tmp_path / "run" / "2" / "state")
  shutil.copytree(tmp_path / "other" / "2" / "state", tmp_path / "run" / "2" / "state")
  restored = ckpt.restore_latest(abstract_like(state_at(0)), META)
  assert restored.step == 1 and "checksums" in restored.skipped[0][1]
  assert "['w']" in restored.skipped[0][1] and "['b']" not in restored.skipped[0][1]
  assert_state_of(restored.state, 1)
  ckpt.close()
