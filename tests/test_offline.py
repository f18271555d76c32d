"""The offline guard of tests/conftest.py: non-local connections raise naming the address,
loopback and Unix sockets work, and the hub libraries (and subprocesses) are told to stay offline."""
import os
import socket
import subprocess
import sys

import httpx
import pytest

import conftest

_FAR = ("203.0.113.7", 443)  # TEST-NET-3: never a real host


@pytest.fixture
def listener():
  """A TCP server socket on 127.0.0.1 (any port)."""
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]


@pytest.mark.parametrize("family, address, local", [
    (socket.AF_INET, ("127.0.0.1", 80), True), (socket.AF_INET, ("127.8.0.2", 80), True),
    (socket.AF_INET, ("localhost", 80), True), (socket.AF_INET6, ("::1", 80, 0, 0), True),
    (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0), True), (socket.AF_UNIX, "/tmp/s", True),
    (socket.AF_INET, _FAR, False), (socket.AF_INET, ("huggingface.co", 443), False),
    (socket.AF_INET6, ("2001:db8::1", 443, 0, 0), False),
])
def test_is_local(family, address, local):
  assert conftest.is_local(family, address) is local


def test_a_non_local_connection_raises_naming_the_address():
  with pytest.raises(conftest.NetworkBlocked, match=r"203\.0\.113\.7', 443"):
    socket.create_connection(_FAR, timeout=1)
  with socket.socket() as sock, pytest.raises(conftest.NetworkBlocked):
    sock.connect_ex(_FAR)
  with pytest.raises(conftest.NetworkBlocked, match="lookup of 'huggingface.co'"):
    httpx.get("https://huggingface.co/api/models", timeout=1)  # not retried or wrapped
  with pytest.raises(conftest.NetworkBlocked, match=r"203\.0\.113\.7', 443"):
    httpx.get("https://203.0.113.7/", timeout=1)


def test_loopback_and_unix_sockets_work(listener, tmp_path):
  for host in ("127.0.0.1", "localhost"):
    with socket.create_connection((host, listener), timeout=2):
      pass
  path = str(tmp_path / "s.sock")
  with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
    server.bind(path)
    server.listen()
    client.connect(path)


def test_hub_libraries_and_subprocesses_are_offline():
  from huggingface_hub import constants
  assert constants.HF_HUB_OFFLINE
  probe = "import os; print(','.join(os.environ.get(k, '') for k in %r))" % list(
      conftest.OFFLINE_ENV)
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=os.environ.copy(), check=True, timeout=60).stdout.strip()
  assert out == "1,1,1"
