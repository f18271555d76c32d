"""Serves a GGUF with llama-cpp-python's OpenAI-compatible server, shaped for SimulatorClient.

  python -m trustee_jax.serving.llamacpp --model qwen2.5-coder-0.5b|FILE.gguf [--host 127.0.0.1]
      [--port 8000] [--n_ctx 4096] [--n_threads 2] [--logits_all] [--api_key KEY]
      [--parent_pid PID]

Needs `pip install -r requirements-llamacpp.txt` (llama-cpp-python built from source). The
chat template is the GGUF's own (`tokenizer.chat_template`, rendered with jinja2) unless
--chat_format names one of llama-cpp-python's built-in formats. Prints the base URL once it
accepts requests; SIGTERM/SIGINT stop it (uvicorn's graceful shutdown); with --parent_pid it
also stops when that process dies.

llama-cpp-python 0.3.36's server differs from what this project's client sends in a few ways;
a small ASGI shim in front of it closes the gaps:
  * `response_format: {"type": "json_schema", "json_schema": {"schema": S}}` (OpenAI's, what
    SimulatorClient.chat_json sends) is rejected there (it knows only `json_object`, with an
    optional `schema`): the shim rewrites it to `{"type": "json_object", "schema": S}`, which
    its chat handler turns into a GBNF grammar (llama_cpp.llama_grammar's converter; keys it
    does not know, such as `x-guidance`, are ignored). A grammar llama.cpp cannot parse crashes
    the process mid-request, so the shim checks it first and loosens the schema if need be
    (`grammar_schema`).
  * `n` is silently dropped there (always one choice): the shim answers n > 1 with a 400.
  * `logprobs: true` without `top_logprobs` returns no logprobs there: the shim asks for one.
    Logprobs need --logits_all (which also computes logits for every prompt token: slower
    prefill, and an n_ctx x vocab f32 buffer), else the request is a 400. They are the
    model's own distribution before any grammar mask (as in llama.cpp), so a yes/no verdict's
    P(yes) is exp(lp_yes) / (exp(lp_yes) + exp(lp_no)) from the top_logprobs at that position.
  * tools render through the GGUF's template, but no `tool_calls` are parsed from the reply.
  * its sampling defaults are not OpenAI's (repeat_penalty 1.1, top_k 40, min_p 0.05): the
    shim sends 1.0 / 0 / 0.0 unless the request names them, as SGLang and OpenAI do.
  * llama.cpp's OpenMP threads busy-wait by default, which falls apart on a shared CPU:
    OMP_WAIT_POLICY=PASSIVE unless the environment says otherwise (--omp_wait_policy).
  * there is no `/health`: the shim answers it (200 once the model is loaded, which is before
    the socket is bound).
It serves one request at a time (an asyncio lock around the one llama.cpp context): concurrent
requests wait in order, so 8 clients get the throughput of 1 and up to 8x the latency. Run
several processes (one thread each) on different ports and list them all in the client's
`urls` to use more cores for more requests.

`launch/serve_llamacpp.py` is the same command (a wrapper around `cli`). The flags are defined
by `cli`, not on import, so the shim can be imported beside other modules that define absl
flags of the same names (the embedded server's CLI, the launchers).
"""
import json
import os
import pathlib
import socket
from collections.abc import Callable
from typing import Any

from absl import app, flags

from trustee_jax.serving.lifetime import die_with_parent

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, on absl's global FLAGS (called once, by `cli`)."""
  flags.DEFINE_string("model", "qwen2.5-coder-0.5b", "A .gguf file, or 'smollm2' / "
                      "'qwen2.5-coder-0.5b' / 'qwen2.5-coder-1.5b' (trustee_jax.models.packaged).")
  flags.DEFINE_string("served_model_name", None, "Model name in replies and /v1/models "
                      "(default: --model).")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
  flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port).")
  flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1 "
                      "(or $TRUSTEE_SIMULATOR_API_KEY).")
  flags.DEFINE_integer("n_ctx", 4096, "Context (prompt + reply) in tokens.")
  flags.DEFINE_integer("n_threads", 2, "Threads for decode and for prompt batches.")
  flags.DEFINE_integer("n_batch", 512, "Prompt tokens per llama_decode call.")
  flags.DEFINE_bool("logits_all", False, "Keep logits of every position (needed for logprobs; "
                    "slower prefill).")
  flags.DEFINE_string("chat_format", None, "A llama-cpp-python chat format name (default: the "
                      "GGUF's own chat template).")
  flags.DEFINE_integer("parent_pid", None, "Exit when this process dies.")
  flags.DEFINE_enum(
      "omp_wait_policy", "passive", ["passive", "active"], "OpenMP worker wait policy "
      "($OMP_WAIT_POLICY wins). llama.cpp's OpenMP threads spin between ops by default; on a CPU "
      "shared with other work that collapses throughput (2 threads beside a training job: 4 vs "
      "41 decode tok/s measured here), so the default is passive.")
  flags.DEFINE_bool("verbose", False, "llama.cpp's own logging (timings per request).")
  flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                    "uvicorn's log level.")


# OpenAI's (and SGLang's) sampling defaults where llama-cpp-python's differ.
OPENAI_DEFAULTS = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
_CHAT_PATH = "/v1/chat/completions"
_MAX_BODY = 64 << 20


def resolve_model(model: str) -> pathlib.Path:
  """A packaged model name (verified before use) or a .gguf path -> the GGUF file."""
  from trustee_jax.models import loading  # noqa: PLC0415
  if model in loading.PACKAGED:
    return loading.gguf_path(model)
  path = pathlib.Path(model)
  if not path.is_file():
    raise FileNotFoundError(f"--model {model!r} is neither one of {loading.PACKAGED} nor a file")
  return path


MAX_GRAMMAR_REPEAT = 8


def loosened_schema(schema: Any) -> Any:
  """`schema` without string `maxLength`, `pattern`, and `maxItems` above MAX_GRAMMAR_REPEAT:
  what llama.cpp unrolls into nested rules until, past its limit ("number of rules ... exceeds
  sane defaults"), it cannot parse the grammar."""
  if isinstance(schema, list):
    return [loosened_schema(v) for v in schema]
  if not isinstance(schema, dict):
    return schema
  return {k: loosened_schema(v) for k, v in schema.items()
          if not (k in ("maxLength", "pattern") or (k == "maxItems" and isinstance(v, int)
                                                    and v > MAX_GRAMMAR_REPEAT))}


def grammar_schema(schema: dict, parses: Callable[[dict], bool]) -> dict | None:
  """The schema to build the reply's grammar from: `schema` when llama.cpp parses its grammar,
  else the loosened one, else None (any JSON object). A grammar llama.cpp cannot parse is not
  an error there: it is printed and the process crashes in the sampler (seen with a task
  schema). The client validates every reply against the full schema anyway, and re-asks."""
  if parses(schema):
    return schema
  loose = loosened_schema(schema)
  return loose if parses(loose) else None


class GrammarCheck:
  """Whether llama.cpp parses a schema's GBNF grammar, checked on a vocabulary-only copy of
  the model (no weights) before the request reaches the real one."""

  def __init__(self, model_path: pathlib.Path):
    import llama_cpp  # noqa: PLC0415
    self._llama_cpp = llama_cpp
    self._model = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)

  def __call__(self, schema: dict) -> bool:
    from llama_cpp import llama_grammar  # noqa: PLC0415
    try:
      gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception:  # noqa: BLE001  (the converter raises on schemas it cannot express)
      return False
    sampler = self._llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
    if not sampler:
      return False
    self._llama_cpp.llama_sampler_free(sampler)
    return True


def rewrite_chat_request(body: dict, logits_all: bool, parses: Callable[[dict], bool]
                         ) -> tuple[dict | None, str | None]:
  """The request as llama-cpp-python needs it, or (None, message) for a 400."""
  body = dict(body)
  n = body.get("n")
  if n is not None and n != 1:
    return None, f"n={n} is not supported by this server (llama-cpp-python returns one choice)"
  fmt = body.get("response_format")
  if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
    spec = fmt.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    schema = grammar_schema(schema, parses) if isinstance(schema, dict) else None
    body["response_format"] = ({"type": "json_object", "schema": schema} if schema is not None
                               else {"type": "json_object"})
  if body.get("logprobs"):
    if not logits_all:
      return None, "logprobs need the server started with --logits_all"
    if not body.get("top_logprobs"):
      body["top_logprobs"] = 1  # llama-cpp-python returns none for logprobs without top_logprobs
  for key, value in OPENAI_DEFAULTS.items():
    body.setdefault(key, value)
  body.pop("chat_template_kwargs", None)  # per-request template kwargs are not supported there
  return body, None


def _error_body(message: str, code: str) -> bytes:
  return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                               "param": None, "code": code}}).encode()


class Shim:
  """ASGI middleware: /health, and chat requests rewritten by `rewrite_chat_request`."""

  def __init__(self, inner, logits_all: bool, parses: Callable[[dict], bool]):
    self.inner, self.logits_all, self.parses = inner, logits_all, parses

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.inner(scope, receive, send)
    path, method = scope["path"], scope["method"]
    if path == "/health" and method in ("GET", "HEAD"):
      return await _send(send, 200, b'{"status":"ok"}')
    if path != _CHAT_PATH or method != "POST":
      return await self.inner(scope, receive, send)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return None
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      if size > _MAX_BODY:
        return await _send(send, 413, _error_body("request body too large", "too_large"))
      if not message.get("more_body"):
        break
    raw = b"".join(chunks)
    try:
      body = json.loads(raw)
    except ValueError as e:
      return await _send(send, 400, _error_body(f"request body is not valid JSON: {e}",
                                                "json_invalid"))
    if isinstance(body, dict):
      body, problem = rewrite_chat_request(body, self.logits_all, self.parses)
      if problem:
        return await _send(send, 400, _error_body(problem, "unsupported_parameter"))
      raw = json.dumps(body).encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(raw)).encode()))
    sent = False

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}
      return await receive()

    return await self.inner({**scope, "headers": headers}, replay, send)


async def _send(send, status: int, body: bytes) -> None:
  await send({"type": "http.response.start", "status": status,
              "headers": [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode())]})
  await send({"type": "http.response.body", "body": body})


def check_no_amx_kernels(system_info: str) -> None:
  """Refuses a llama.cpp build with ggml's AMX int8 kernels: with Q4_K_M weights they segfault
  on the first decode on Sapphire Rapids-class CPUs (ggml-org/llama.cpp#20824)."""
  if "AMX_INT8 = 1" in system_info:
    raise SystemExit(
        "this llama-cpp-python was built with ggml's AMX int8 kernels, which segfault on the "
        "first decode on this CPU (ggml-org/llama.cpp#20824): rerun `bash install.sh` (it "
        "rebuilds without them), or build with CMAKE_ARGS='-DGGML_NATIVE=ON "
        "-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8' pip install "
        "--force-reinstall --no-cache-dir --no-binary llama-cpp-python -r "
        "requirements-llamacpp.txt")


def build_app(model_path: pathlib.Path, served_name: str, *, n_ctx: int, n_threads: int,
              n_batch: int, logits_all: bool, chat_format: str | None, api_key: str | None,
              verbose: bool):
  """llama-cpp-python's FastAPI app (model loaded) behind the shim."""
  try:
    import llama_cpp  # noqa: PLC0415
    from llama_cpp.server.app import create_app  # noqa: PLC0415
    from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit(f"llama-cpp-python[server] is not installed ({e}): see the header of "
                     "requirements-llamacpp.txt for the build command") from e
  check_no_amx_kernels(llama_cpp.llama_print_system_info().decode())
  # Every field named: pydantic-settings would otherwise fill them from $MODEL, $N_CTX, ...
  model_settings = ModelSettings(
      model=str(model_path), model_alias=served_name, n_gpu_layers=0, n_ctx=n_ctx,
      n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads, n_threads_batch=n_threads,
      logits_all=logits_all, chat_format=chat_format, verbose=verbose, cache=False)
  server_settings = ServerSettings(host="127.0.0.1", port=0, api_key=api_key,
                                   interrupt_requests=False)
  return Shim(create_app(server_settings=server_settings, model_settings=[model_settings]),
              logits_all, GrammarCheck(model_path))


def main(argv):
  del argv
  f = FLAGS
  # libgomp reads this when llama.cpp's libraries load, i.e. at the llama_cpp import below.
  os.environ.setdefault("OMP_WAIT_POLICY", f.omp_wait_policy.upper())
  import uvicorn  # noqa: PLC0415
  path = resolve_model(f.model)
  api_key = f.api_key or os.environ.get("TRUSTEE_SIMULATOR_API_KEY")
  served = f.served_model_name or f.model
  asgi = build_app(path, served, n_ctx=f.n_ctx, n_threads=f.n_threads, n_batch=f.n_batch,
                   logits_all=f.logits_all, chat_format=f.chat_format, api_key=api_key,
                   verbose=f.verbose)
  sock = socket.socket(socket.AF_INET6 if ":" in f.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((f.host, f.port))
  host, port = sock.getsockname()[:2]
  server = uvicorn.Server(uvicorn.Config(asgi, log_level=f.log_level, lifespan="off",
                                         timeout_graceful_shutdown=30))
  if f.parent_pid:
    die_with_parent(f.parent_pid, lambda: setattr(server, "should_exit", True))
  url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
  print(f"llama.cpp simulator {served} ({path.name}) serving at {url}/v1 "
        f"(n_ctx={f.n_ctx}, threads={f.n_threads}, logits_all={f.logits_all}, "
        f"api_key={'on' if api_key else 'off'}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        "one request at a time)", flush=True)
  server.run(sockets=[sock])
  print("simulator stopped", flush=True)


def cli() -> None:
  """`python -m trustee_jax.serving.llamacpp` (and launch/serve_llamacpp.py)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
