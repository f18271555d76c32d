"""A server's watchdog on the process that started it (serving/lifetime.py)."""
import subprocess
import sys
import threading

import pytest

from trustee_jax.serving import lifetime


def test_on_death_runs_once_the_watched_process_dies():
  watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  died = threading.Event()
  try:
    assert lifetime.alive(watched.pid)
    lifetime.die_with_parent(watched.pid, died.set)
    assert not died.wait(1.5)  # alive: nothing happens
    watched.kill()
    watched.wait()
    assert died.wait(10), "the watchdog did not notice"
    assert not lifetime.alive(watched.pid)
  finally:
    if watched.poll() is None:
      watched.kill()


def test_a_parent_already_gone_is_refused():
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with pytest.raises(SystemExit, match="already gone"):
    lifetime.die_with_parent(gone.pid, lambda: None)
