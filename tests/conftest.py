"""Shared test set-up: CPU only, JAX's persistent compilation cache only on request, and no
network: hub libraries are told they are offline, and any in-process connection to (or name
lookup of) an address other than loopback or a Unix socket raises NetworkBlocked naming it.

The environment variables are set here, before anything imports transformers or huggingface_hub,
so subprocesses (servers, training runs) inherit them; the socket guard itself only covers this
process. Tests marked `eval` build virtualenvs with pip and are exempt from the guard.
"""
import gc
import ipaddress
import os
import pathlib
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

import jax  # noqa: E402
import pytest  # noqa: E402

# JAX's persistent compilation cache is opt-in (TRUSTEE_TEST_JAX_CACHE=1): writing an entry
# serialises the CPU executable, and in CI (jaxlib 0.10.2) that once aborted the whole pytest
# process from an engine thread (SIGABRT inside `executable.serialize()`, no Python error).
if os.environ.get("TRUSTEE_TEST_JAX_CACHE") == "1":
  _CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
  jax.config.update("jax_compilation_cache_dir", str(_CACHE))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
_guard = {"on": True}  # switched off only while an `eval` test runs


class NetworkBlocked(RuntimeError):
  """A test tried to reach a non-local address (not an OSError, so no library retries it)."""


def is_local(family: int, address) -> bool:
  """Whether a connect() target is this machine: a Unix socket or a loopback host."""
  if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
    return True
  host = str(address[0]).split("%")[0]
  if host.lower() in _LOCAL_NAMES:
    return True
  try:
    ip = ipaddress.ip_address(host)
  except ValueError:
    return False  # an unresolved host name other than localhost
  mapped = getattr(ip, "ipv4_mapped", None)
  return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _is_local_name(host) -> bool:
  """Whether a name lookup stays on this machine: no host, loopback, an IP literal (connect()
  checks it) or this machine's own host name."""
  if host is None or (isinstance(host, (str, bytes)) and not host):
    return True
  host = host.decode() if isinstance(host, bytes) else str(host)
  if host.lower() in _LOCAL_NAMES or host == socket.gethostname():
    return True
  try:
    ipaddress.ip_address(host.split("%")[0])
    return True
  except ValueError:
    return False


def _guarded_lookup(getaddrinfo):
  def guarded_getaddrinfo(host, *args, **kwargs):
    if _guard["on"] and not _is_local_name(host):
      raise NetworkBlocked(f"tests run offline: name lookup of {host!r} refused by "
                           "tests/conftest.py (loopback and Unix sockets only)")
    return getaddrinfo(host, *args, **kwargs)
  return guarded_getaddrinfo


def _guarded(connect):
  def guarded_connect(sock: socket.socket, address):
    if _guard["on"] and not is_local(sock.family, address):
      raise NetworkBlocked(f"tests run offline: connection to {address!r} refused by "
                           "tests/conftest.py (loopback and Unix sockets only)")
    return connect(sock, address)
  return guarded_connect


@pytest.fixture(scope="session", autouse=True)
def offline():
  """The whole session: offline hub libraries and no outbound connections."""
  with pytest.MonkeyPatch.context() as mp:
    for key, value in OFFLINE_ENV.items():
      mp.setenv(key, value)
    mp.setattr(socket.socket, "connect", _guarded(socket.socket.connect))
    mp.setattr(socket.socket, "connect_ex", _guarded(socket.socket.connect_ex))
    mp.setattr(socket, "getaddrinfo", _guarded_lookup(socket.getaddrinfo))
    yield


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_code():
  """After each test file, drops JAX's compiled executables and the memory they map.

  Each CPU executable holds about three memory mappings of JIT code. Without this, one pytest
  process compiling for the whole suite reached 65,420 mappings by tests/test_train.py (RSS 7.5
  GB), hit the kernel's vm.max_map_count (65,530), and XLA aborted mid-compile ("LLVM ERROR:
  Unable to allocate section memory", exit 134): the CI failures of the last two stops."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def _network_for_eval_tests(request):
  """Tests marked `eval` (pip-built benchmark virtualenvs) may use the network."""
  if request.node.get_closest_marker("eval") is None:
    yield
    return
  _guard["on"] = False
  try:
    yield
  finally:
    _guard["on"] = True


def _run_on_cpu_devices(script: str, count: int) -> dict:
  """Runs a test file as a script on `count` fake CPU devices (XLA_FLAGS must be set before jax
  starts, hence a subprocess, which inherits conftest's compilation cache if it is on) and
  returns the JSON object its last line prints."""
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
         "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
  for flag in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes"):
    if getattr(jax.config, flag) is not None:
      env[flag.upper()] = str(getattr(jax.config, flag))
  proc = subprocess.run([sys.executable, script], env=env, cwd=root, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def run_on_cpu_devices():
  """`run_on_cpu_devices(__file__, n)`: a test file's script half on n fake CPU devices."""
  return _run_on_cpu_devices
