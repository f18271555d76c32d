"""A server process that dies with the process that started it, even one killed by SIGKILL.

On Linux the kernel sends SIGTERM (prctl PR_SET_PDEATHSIG) when the parent exits; a watchdog
thread polls the pid everywhere (and notices being orphaned), for other platforms and for a
`parent_pid` that is not the direct parent. Light: no JAX, so a server's --help stays fast.
"""
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def alive(pid: int) -> bool:
  """Whether process `pid` exists (one of another user's counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def die_with_parent(parent_pid: int, on_death: Callable[[], None]) -> None:
  """Calls `on_death` (once) when `parent_pid` dies; refuses to start if it is already gone.

  PR_SET_PDEATHSIG fires when the parent *thread* that forked us exits; the watchdog covers
  the rest.
  """
  linux = sys.platform.startswith("linux")
  if linux and os.getppid() == parent_pid:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
  if not alive(parent_pid):
    raise SystemExit(f"parent process {parent_pid} is already gone")

  def watch():
    while not threading.Event().wait(1.0):
      if not alive(parent_pid) or (linux and os.getppid() == 1):
        print(f"parent process {parent_pid} died; stopping", flush=True)
        on_death()
        return

  threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
