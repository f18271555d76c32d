"""Where and on what a run runs: its workdir (a local directory or a gs:// / s3:// URI, through
etils.epath), the accelerator backend its config names, and how it is asked to stop (SIGTERM)."""
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath

PLATFORMS = ("", "cpu", "gpu", "tpu")  # hardware.platform: "" = any backend


class BackendError(RuntimeError):
  """The config names an accelerator that this process's JAX does not have."""


def is_uri(path: str | os.PathLike) -> bool:
  """Whether `path` names a remote location (scheme://...) rather than a local file."""
  return "://" in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
  """A run's directory as an epath.Path: a URI kept whole, a local path made absolute. (Both
  pathlib's and epath's absolute() turn gs://b/run into <cwd>/gs:/b/run, a local directory.)"""
  text = os.fspath(path)
  if not is_uri(text):
    return epath.Path(text).absolute()
  try:
    return epath.Path(text)
  except KeyError:
    raise ValueError(f"{text}: etils.epath knows no filesystem for the scheme "
                     f"{text.partition('://')[0]}:// (it has gs://, s3://, az://, hf://)") from None


def check_backend(hardware: Mapping[str, Any], backend: str) -> None:
  """Refuses to start a config whose `hardware.platform` (gpu | tpu) is not JAX's backend: JAX
  without its accelerator plugin runs on CPU without a word, and an 8B run there would crawl.
  `hardware.allow_cpu` lets such a config run on CPU on purpose (a smoke test)."""
  want = hardware.get("platform", "") or ""
  if want not in PLATFORMS:
    raise ValueError(f"hardware.platform must be one of {PLATFORMS}, got {want!r}")
  if want in ("", backend) or (backend == "cpu" and hardware.get("allow_cpu", False)):
    return
  name = hardware.get("name", "") or want.upper()
  hint = (" or pass --config.hardware.allow_cpu=True to run it on CPU anyway"
          if backend == "cpu" else "")
  raise BackendError(f"the config's hardware ({name}) needs a {want} backend, but JAX's backend "
                     f"is {backend}: install the accelerator's JAX (bash install.sh {want}){hint}")


def backend_summary(backend: str, devices: Sequence[Any], local_count: int,
                    process_count: int) -> str:
  """One line naming the backend, the kinds and counts of devices, and the processes."""
  kinds: dict[str, int] = {}
  for d in devices:
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  shown = ", ".join(f"{n}x {kind}" for kind, n in kinds.items())
  return (f"JAX backend {backend}: {len(devices)} device(s) ({shown}), {local_count} on this "
          f"process, {process_count} process(es)")


def device_memory(devices: Sequence[Any]) -> dict[str, float] | None:
  """GiB in use, peak and limit of the fullest local device, or None where the backend reports
  no memory (CPU's memory_stats() is None)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  if not stats:
    return None
  gib = 1024.0 ** 3
  fullest = max(stats, key=lambda s: s.get("bytes_in_use", 0))
  return {"in_use": fullest.get("bytes_in_use", 0) / gib,
          "peak": max(s.get("peak_bytes_in_use", 0) for s in stats) / gib,
          "limit": fullest.get("bytes_limit", 0) / gib}


class SigtermStop:
  """Turns the first SIGTERM into a request to stop after the current step (a second one kills,
  as by default). Installed with one process only: with several, JAX's preemption service
  catches SIGTERM and `Checkpointer.reached_preemption` says when all processes stop."""

  def __init__(self, install: bool):
    self.received = False
    self._previous = None
    if install and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    self.received = True
    logging.warning("SIGTERM: finishing the current step, then a checkpoint and exit")
    self.uninstall()

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
