"""Contract: SimulatorClient against llama.cpp's server (trustee_jax/serving/llamacpp.py) on
127.0.0.1.

Serves the packaged Qwen2.5-Coder-0.5B GGUF with llama-cpp-python (requirements-llamacpp.txt)
and drives it the way the simulator roles do: `chat_json` with a json_schema response_format
(the user simulator's own schema), the API key, /health and /v1/models, and n > 1 refused
loudly. Skipped when llama_cpp is not installed or the packaged model is not available.
"""
import asyncio
import os
import pathlib
import re
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                    "(pip install -r requirements-llamacpp.txt)")

from trustee_jax.serving import llamacpp  # noqa: E402
from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError  # noqa: E402
from trustee_jax.simulator.user import UserConfig, user_schema  # noqa: E402
from trustee_jax.world import stop_server  # noqa: E402

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
      [sys.executable, "-m", "trustee_jax.serving.llamacpp", f"--model={gguf}",
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
    stop_server(proc, timeout_s=60)


def _client(url: str, **kw) -> SimulatorClient:
  return SimulatorClient(ClientConfig(urls=(url,), api_key=KEY, model="qwen", timeout_s=120,
                                      max_retries=1, **kw))


def test_a_build_with_amx_int8_kernels_is_refused_with_the_fix():
  """ggml's AMX int8 kernels segfault on the first decode here; the shim refuses such a build."""
  with pytest.raises(SystemExit, match="mno-amx-int8"):
    llamacpp.check_no_amx_kernels("CPU : AVX2 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1")
  llamacpp.check_no_amx_kernels("CPU : AVX2 = 1 | AVX512_VNNI = 1 | REPACK = 1")


def test_the_installed_build_has_no_amx_int8_kernels():
  import llama_cpp  # noqa: PLC0415
  llamacpp.check_no_amx_kernels(llama_cpp.llama_print_system_info().decode())


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


def test_a_long_task_schema_is_served_not_crashed_on(server):
  """The task generator's schema (strings up to hundreds of characters, an anyOf of the sampled
  tools' parameters) made llama.cpp's grammar parser give up and the process segfault; the shim
  hands it a grammar without length bounds and the client validates the reply in full."""
  from trustee_jax.simulator import tasks, tools_pool  # noqa: PLC0415
  pool = tools_pool.load_shipped_pool()
  category = sorted(pool)[0]
  tools = [t for toolset in pool[category].values() for t in toolset][:2]
  names = [tools_pool.tool_name(t) for t in tools]
  schema = tasks.task_schema(names, 2, tasks.TaskGenConfig(max_tokens=384), tools)
  assert any(p.get("maxLength", 0) > 100 for p in schema["properties"].values()
             if isinstance(p, dict))
  messages = [{"role": "user", "content": "Write one task for a support agent as JSON."}]

  async def go():
    async with _client(server) as client:
      try:
        await client.chat_json(messages, schema, role="task", seed=3, temperature=0.0,
                               max_tokens=384)
      except SimulatorError as e:  # an invalid reply after re-asks is fine; a dead server is not
        assert e.cause != "connect", e

  asyncio.run(go())
  assert httpx.get(server + "/health", timeout=10).status_code == 200  # still serving


def test_grammar_schema_loosens_only_what_does_not_parse():
  """In this process: the module defines its absl flags only when run (`cli`)."""
  schema = {"type": "object", "properties": {
      "a": {"type": "string", "minLength": 1, "maxLength": 300, "pattern": "^.{1,300}$"},
      "b": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 5}},
      "c": {"type": "array", "maxItems": 50, "items": {"type": "integer"}}}}
  loose = {"type": "object", "properties": {
      "a": {"type": "string", "minLength": 1},
      "b": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
      "c": {"type": "array", "items": {"type": "integer"}}}}
  check = llamacpp.GrammarCheck(_gguf())
  assert llamacpp.loosened_schema(schema) == loose
  assert llamacpp.grammar_schema(schema, lambda x: True) is schema
  assert llamacpp.grammar_schema(schema, lambda x: x == loose) == loose
  assert llamacpp.grammar_schema(schema, lambda x: False) is None
  # the real parser, on the vocabulary alone
  assert [check(schema), check({"type": "string", "maxLength": 40})] == [True, True]


def test_launcher_wrapper_runs_the_module():
  """launch/serve_llamacpp.py is `python -m trustee_jax.serving.llamacpp`: same flags."""
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "serve_llamacpp.py"), "--helpfull"],
                       capture_output=True, text=True, cwd="/")  # absl's help exits with 1
  assert "trustee_jax.serving.llamacpp:" in out.stdout and "--n_ctx" in out.stdout, out.stderr
