"""launch/serve_sglang.sh and launch/check_sglang_flags.py.

The fast tests read the script's --print-args output. The slow ones build (or reuse) a
CPU-only SGLang 0.5.23 environment under .venv-sglang-check/ (sglang with --no-deps plus the
few packages `sglang.srt.server_args` and the OpenAI protocol models import; about a minute
from scratch) and let SGLang's own parser and pydantic models judge the flags and the bodies.
"""
import asyncio
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import httpx
import pytest

from trustee_jax.simulator.client import ClientConfig, SimulatorClient

_REPO = pathlib.Path(__file__).resolve().parent.parent
_SCRIPT = _REPO / "launch" / "serve_sglang.sh"
_CHECK = _REPO / "launch" / "check_sglang_flags.py"
_VENV = _REPO / ".venv-sglang-check"
_SGLANG = "sglang==0.5.23"
# What sglang.srt.server_args imports (shared/DESIGN.md §8), plus openai==2.8.0 (SGLang's
# pin) for sglang.srt.entrypoints.openai.protocol.
_DEPS = ("numpy", "orjson", "psutil", "pybase64", "requests", "torch==2.13.0", "triton",
         "packaging", "pillow", "starlette", "msgspec", "pydantic", "pyzmq", "tqdm", "ipython",
         "aiohttp", "openai==2.8.0")
_NO_NETWORK = ("NewConnectionError", "Failed to establish a new connection",
               "Temporary failure in name resolution", "Network is unreachable",
               "ConnectTimeoutError", "ProxyError", "Name or service not known")
_ENV_KEYS = ("MODEL", "PORT", "MEM_FRACTION", "DP_SIZE", "API_KEY", "YARN_FACTOR")


def _print_args(*extra, **env):
  clean = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
  out = subprocess.run(["bash", str(_SCRIPT), "--print-args", *extra], env={**clean, **env},
                       capture_output=True, text=True, timeout=30, check=True)
  return out.stdout.splitlines()


def _pairs(argv):
  return dict(zip(argv[::2], argv[1::2]))


def test_print_args_defaults():
  argv = _print_args()
  assert _pairs(argv) == {"--model-path": "Qwen/Qwen3-8B", "--host": "127.0.0.1",
                          "--port": "30000", "--reasoning-parser": "qwen3",
                          "--tool-call-parser": "qwen25", "--grammar-backend": "llguidance",
                          "--mem-fraction-static": "0.85"}
  assert len(argv) == 14


def test_print_args_options_and_extras():
  argv = _print_args("--log-level", "info", MODEL="/models/q", PORT="31000",
                     MEM_FRACTION="0.7", DP_SIZE="2", API_KEY="sk-secret")
  pairs = _pairs(argv)
  assert (pairs["--model-path"], pairs["--port"], pairs["--mem-fraction-static"]) == (
      "/models/q", "31000", "0.7")
  assert pairs["--dp-size"] == "2" and pairs["--log-level"] == "info"
  assert pairs["--api-key"] == "REDACTED" and "sk-secret" not in argv


def test_yarn_long_context_is_the_references():
  pairs = _pairs(_print_args(YARN_FACTOR="4"))
  assert json.loads(pairs["--json-model-override-args"]) == {"rope_scaling": {
      "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
  assert pairs["--context-length"] == "131072"
  bad = subprocess.run(["bash", str(_SCRIPT), "--print-args"], env={"YARN_FACTOR": "four",
                       "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
  assert bad.returncode == 1 and "YARN_FACTOR" in bad.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_serving_refuses_without_a_gpu():
  out = subprocess.run(["bash", str(_SCRIPT)], capture_output=True, text=True, timeout=30)
  assert out.returncode == 1 and "GPU only" in out.stderr


def _pip(python, *args):
  return subprocess.run([str(python), "-m", "pip", "install", "-q",
                         "--disable-pip-version-check", *args],
                        capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def sglang_python():
  """The Python of .venv-sglang-check, built from scratch if it does not import SGLang."""
  python = _VENV / "bin" / "python"
  probe = ("import sglang, sglang.srt.server_args, sglang.srt.entrypoints.openai.protocol; "
           f"assert sglang.__version__ == {_SGLANG.split('==')[1]!r}, sglang.__version__")
  if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True,
                                        timeout=120).returncode == 0:
    return python
  subprocess.run([sys.executable, "-m", "venv", "--clear", str(_VENV)], check=True, timeout=300)
  for args in (("--no-deps", _SGLANG), _DEPS):
    out = _pip(python, *args)
    if out.returncode != 0:
      log = out.stdout + out.stderr
      if any(marker in log for marker in _NO_NETWORK):
        pytest.skip(f"cannot build {_VENV.name}: no network to the package index "
                    f"({log.strip().splitlines()[-1]})")
      raise RuntimeError(f"pip install {' '.join(args)} failed:\n{log[-3000:]}")
  check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
  assert check.returncode == 0, f"{_VENV.name} does not import SGLang:\n{check.stderr[-3000:]}"
  return python


def _check(python, *args, env=None):
  clean = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
  return subprocess.run([str(python), str(_CHECK), *args], capture_output=True, text=True,
                        timeout=300, env={**clean, **(env or {})})


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sglang_accepts_the_scripts_flags(sglang_python):
  out = _check(sglang_python)
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["sglang"] == "0.5.23"
  expected = {"model_path": "Qwen/Qwen3-8B", "host": "127.0.0.1", "port": 30000,
              "reasoning_parser": "qwen3", "tool_call_parser": "qwen25",
              "grammar_backend": "llguidance", "mem_fraction_static": 0.85}
  assert report["bare"]["parsed"] == expected
  yarn = '{"rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}}'
  assert report["all_options"]["parsed"] == {**expected, "dp_size": 2, "api_key": "REDACTED",
                                             "json_model_override_args": yarn,
                                             "context_length": 131072}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("extra,problem", [
    (["--tool-call-parser", "qwen99"], "invalid choice"),
    (["--grammar", "xgrammar"], "no flag --grammar"),  # argparse alone would take the prefix
    (["--mem-fraction-static", "most"], "invalid float"),
])
def test_check_rejects_what_sglang_would(sglang_python, extra, problem):
  out = _check(sglang_python, "--", *extra)
  assert out.returncode == 1 and problem in out.stderr


def _contract_module():
  spec = importlib.util.spec_from_file_location(
      "sglang_contract_bodies", pathlib.Path(__file__).parent / "test_sglang_contract.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _client_requests(reply):
  """The request bodies SimulatorClient sends for a plain chat, a tool turn and a JSON role."""
  sent = []

  def handler(request):
    sent.append(json.loads(request.content))
    return httpx.Response(200, json=reply)

  tools = [{"type": "function", "function": {
      "name": "get_weather", "description": "Weather in a city.",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]}}}]
  schema = {"type": "object", "properties": {"reason": {"type": "string"},
                                             "score": {"enum": [-1, 0, 1]}},
            "required": ["reason", "score"], "additionalProperties": False}
  messages = [{"role": "system", "content": "You are a user."},
              {"role": "user", "content": "Weather in Lisbon?"}]

  async def main():
    cfg = ClientConfig(urls=("http://127.0.0.1:1",), model="Qwen/Qwen3-8B")
    async with SimulatorClient(cfg, transport=httpx.MockTransport(handler)) as c:
      await c.chat(messages, temperature=1.0, top_p=0.95, max_tokens=512, seed=3, stop=["\n\n"],
                   frequency_penalty=0.1, n=2, logprobs=True, top_logprobs=5,
                   chat_template_kwargs={"enable_thinking": False})
      await c.chat(messages, role="policy", tools=tools, tool_choice="auto")
      await c.chat_json(messages, schema, role="judge", max_tokens=2048, temperature=0.6)
  asyncio.run(main())
  return sent


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bodies_fit_sglangs_protocol_models(sglang_python, tmp_path):
  contract = _contract_module()
  replies = contract.sglang_completions()
  errors = contract.sglang_errors()
  bodies = {"requests": _client_requests(replies["json_thinking_off"]),
            "replies": list(replies.values()),
            "errors": [body for _, body in errors.values() if "object" in body]}
  path = tmp_path / "bodies.json"
  path.write_text(json.dumps(bodies))
  out = _check(sglang_python, "--protocol", str(path))
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["protocol"] == {"requests": 3, "replies": 5, "errors": 4}
  # And the models do judge: a reply with a finish_reason SGLang never sends is refused.
  broken = json.loads(json.dumps(replies["json_thinking_off"]))
  broken["choices"][0]["finish_reason"] = "done"
  path.write_text(json.dumps({"replies": [broken]}))
  out = _check(sglang_python, "--protocol", str(path))
  assert out.returncode == 1 and "replies[0]" in out.stderr
