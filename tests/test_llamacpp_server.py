"""Contract: SimulatorClient against llama.cpp's server (launch/serve_llamacpp.py) on 127.0.0.1.

Serves the packaged Qwen2.5-Coder-0.5B GGUF with llama-cpp-python (requirements-llamacpp.txt)
and drives it the way the simulator roles do: `chat_json` with a json_schema response_format
(the user simulator's own schema), the API key, /health and /v1/models, and n > 1 refused
loudly. Skipped when llama_cpp is not installed or the packaged model is not available.
"""
import asyncio
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                    "(pip install -r requirements-llamacpp.txt)")

from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError  # noqa: E402
from trustee_jax.simulator.user import UserConfig, user_schema  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "test-key-llamacpp"
_URL = re.compile(r"serving at (http://\S+)/v1")


def _gguf() -> pathlib.Path:
  try:
    from trustee_jax.models import packaged  # noqa: PLC0415
    return pathlib.Path(packaged.qwen25_coder_gguf_path("0.5b"))
  except Exception as e:  # noqa: BLE001  (not installed, not yet packaged, or failing its check)
    pytest.skip(f"packaged Qwen2.5-Coder-0.5B GGUF not available: {e}")


@pytest.fixture(scope="module")
def server():
  """The launcher on a free port of 127.0.0.1, with an API key; stopped by SIGTERM at the end."""
  gguf = _gguf()
  env = {**os.environ, "TRUSTEE_SIMULATOR_API_KEY": KEY}
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "launch" / "serve_llamacpp.py"), f"--model={gguf}",
       "--port=0", "--n_ctx=2048", "--n_threads=2", f"--parent_pid={os.getpid()}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  lines: list[str] = []
  url = None
  deadline = time.monotonic() + 120
  try:
    while url is None:
      line = proc.stdout.readline()
      if not line:
        raise RuntimeError(f"launcher exited ({proc.wait()}): {''.join(lines)[-2000:]}")
      lines.append(line)
      match = _URL.search(line)
      url = match.group(1) if match else None
      if time.monotonic() > deadline:
        raise TimeoutError("".join(lines)[-2000:])
    while httpx.get(url + "/health", timeout=5).status_code != 200:
      time.sleep(0.5)
    yield url
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _client(url: str, **kw) -> SimulatorClient:
  return SimulatorClient(ClientConfig(urls=(url,), api_key=KEY, model="qwen", timeout_s=120,
                                      max_retries=1, **kw))


def test_health_models_and_key(server):
  assert httpx.get(server + "/health").json() == {"status": "ok"}
  models = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
  assert models.status_code == 200 and models.json()["data"], models.text
  assert httpx.get(server + "/v1/models").status_code == 401


def test_chat_json_user_role(server):
  """One user-simulator-shaped request: the role's schema, a seed, greedy; the reply validates."""
  schema = user_schema(UserConfig(max_response_chars=160, max_thought_chars=120))
  messages = [{"role": "user", "content": (
      "You play a customer whose parcel was sent to the wrong address. Reply to the support "
      "agent's last message in one sentence, as JSON with your private thought, your reply and "
      "a reward (-1, 0 or 1) for the agent's message.\n\nAgent: I am sorry to hear that. "
      "Could you give me your order number so I can look it up?")}]

  async def go():
    async with _client(server) as client:
      value = await client.chat_json(messages, schema, role="user", seed=7, temperature=0.0,
                                     max_tokens=256)
      return value, client.stats()

  value, stats = asyncio.run(go())
  jsonschema.validate(value, schema)
  assert value["reward"] in (-1, 0, 1) and isinstance(value["response"], str)
  assert stats["calls/user"] == 1
  assert sum(v for k, v in stats.items() if k.startswith(("retries/", "failures/"))) == 0, stats


def test_n_above_one_is_refused(server):
  async def go():
    async with _client(server) as client:
      await client.chat([{"role": "user", "content": "hi"}], n=2, max_tokens=4)

  with pytest.raises(SimulatorError) as err:
    asyncio.run(go())
  assert err.value.cause == "http_4xx" and "n=2" in err.value.message
