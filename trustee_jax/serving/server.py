"""Embedded OpenAI-compatible simulator server: FastAPI + uvicorn over the sampling engine.

Concurrent requests are decoded together in the engine's slots. A request is rendered with
the model's chat template, validated and queued before any reply is written, so a bad or
unservable request gets its 400/429 as a status code; a streamed reply then sends the role
chunk at once and the message itself when generation has finished (the engine returns
whole completions). Constrained output (response_format, a forced tool call) is an
llguidance grammar that leaves a thinking model's `<think>` block free (protocol.py).
A failed engine step is a 500 naming the cause for the requests it held (an error event in a
stream already under way); the engine carries on. A client that disconnects has its requests
cancelled in the engine. GET /metrics reports busy slots, the queue and the counters.
"""
import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import secrets
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from trustee_jax.chat import ChatFormat
from trustee_jax.models import loading
from trustee_jax.models.tokenizer import Tokenizer
from trustee_jax.sampling.constrained import GrammarCompiler
from trustee_jax.sampling.engine import (Completion, Engine, EngineError, QueueFullError,
                                         RequestError)
from trustee_jax.serving import schema as sm
from trustee_jax.serving.protocol import APIError, Protocol

_log = logging.getLogger(__name__)


def _error_response(e: APIError) -> JSONResponse:
  body = sm.ErrorResponse(error=sm.ErrorBody(message=e.message, type=e.type, param=e.param,
                                             code=e.code))
  return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
  """The first pydantic error as a 400: bad JSON, a missing field, an unknown role, ..."""
  first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
  loc = [str(p) for p in first.get("loc", ()) if p != "body"]
  if first.get("type") == "json_invalid":
    return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="json_invalid")
  if first.get("type") == "extra_forbidden":
    return APIError(400, f"unrecognized request argument: {'.'.join(loc)}", param=".".join(loc),
                    code="unknown_parameter")
  where = ".".join(loc)
  message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
  return APIError(400, message, param=where or None, code="invalid_value")


def _install_error_handlers(app: fastapi.FastAPI) -> None:
  @app.exception_handler(APIError)
  async def _api_error(_, exc: APIError):
    return _error_response(exc)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, exc: RequestValidationError):
    return _error_response(_validation_error(exc))

  @app.exception_handler(StarletteHTTPException)
  async def _http(_, exc: StarletteHTTPException):
    return _error_response(APIError(exc.status_code, str(exc.detail),
                                    type="invalid_request_error" if exc.status_code < 500
                                    else "server_error", headers=exc.headers))


class ClientGone(Exception):
  """The client closed the connection before its reply was ready."""


async def _await_all(futures: list[concurrent.futures.Future],
                     disconnected: Callable[[], Awaitable[bool]] | None = None,
                     poll_s: float = 0.25) -> list[Completion]:
  """The completions of `futures`; an engine failure is a 500 naming it. Polls
  `disconnected` meanwhile: a client gone cancels its requests, freeing their slots."""
  gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
  try:
    while not gathered.done():
      await asyncio.wait({gathered}, timeout=poll_s)
      if not gathered.done() and disconnected is not None and await disconnected():
        raise ClientGone()
    return gathered.result()
  except EngineError as e:
    raise APIError(500, str(e), type="server_error", code="engine_error") from e
  finally:
    gathered.cancel()  # no-op once done; else cancels the engine requests (wrap_future chains)


def _sse(payload: sm.BaseModel | dict) -> str:
  text = payload.model_dump_json() if isinstance(payload, sm.BaseModel) else _json(payload)
  return f"data: {text}\n\n"


def _json(obj: Any) -> str:
  return json.dumps(obj, ensure_ascii=False)


async def _stream(first: list[sm.BaseModel], futures: list[concurrent.futures.Future],
                  rest) -> AsyncIterator[str]:
  """SSE: the opening chunks at once, then `rest(completions)`'s chunks, then [DONE]."""
  for chunk in first:
    yield _sse(chunk)
  try:
    completions = await _await_all(futures)
    for chunk in rest(completions):
      yield _sse(chunk)
  except APIError as e:
    yield _sse({"error": sm.ErrorBody(message=e.message, type=e.type, code=e.code).model_dump()})
  yield "data: [DONE]\n\n"


def _submit(engine: Engine, jobs, retry_after_s: int) -> list[concurrent.futures.Future]:
  """Queues (prompt, params) jobs; engine refusals become 400/429/503."""
  try:
    return [engine.submit(prompt, params) for prompt, params in jobs]
  except RequestError as e:
    code = "context_length_exceeded" if "exceeds the context" in str(e) else "invalid_value"
    raise APIError(400, str(e), code=code) from e
  except QueueFullError as e:
    raise APIError(429, f"{e}; retry later", type="rate_limit_exceeded",
                   code="rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)}) from e
  except EngineError as e:
    raise APIError(503, str(e), type="server_error", code="engine_unavailable") from e


def build_app(engine: Engine, chat_format: ChatFormat, tokenizer: Tokenizer, model_name: str,
              api_key: str | None = None, *, default_max_tokens: int | None = None,
              enable_thinking_default: bool = True, retry_after_s: int = 1) -> fastapi.FastAPI:
  """The OpenAI-compatible app serving `engine` under `model_name` (any requested name is served).

  api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (401 otherwise).
  default_max_tokens: cap on a chat reply that names no max_tokens (else: the rest of the context).
  enable_thinking_default: a thinking model thinks unless chat_template_kwargs says otherwise.
  """
  proto = Protocol(chat_format, tokenizer, model_name, engine.cache_len,
                   default_max_tokens=default_max_tokens,
                   enable_thinking_default=enable_thinking_default)

  def check_key(authorization: str | None = fastapi.Header(None)) -> None:
    if api_key is None:
      return
    token = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(token.encode(), api_key.encode()):
      raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                     code="invalid_api_key")

  app = fastapi.FastAPI(title="trustee-jax simulator", docs_url=None, redoc_url=None)
  _install_error_handlers(app)
  v1 = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(check_key)])

  disconnects = collections.Counter()
  ignored = collections.Counter()

  def ignore_unknown_fields(req: sm.SamplingFields) -> None:
    """Unknown top-level fields (another server's extensions) are ignored, warned about and
    counted, as vLLM and SGLang do, rather than refused."""
    names = sorted(req.model_extra or {})
    if names:
      _log.warning("ignoring request fields this server does not know: %s", names)
      ignored.update(names)

  @app.get("/health")
  async def health() -> JSONResponse:
    if not engine.running:
      return JSONResponse({"status": "engine stopped", "model": model_name}, status_code=503)
    return JSONResponse({"status": "ok", "model": model_name})

  @app.get("/metrics")
  async def metrics() -> dict[str, Any]:
    """Engine load and counters (busy_slots, pending, engine_errors, ...) and client
    disconnects, as JSON."""
    return {**engine.metrics(), "client_disconnects": disconnects["total"],
            "ignored_fields": dict(ignored)}

  async def await_or_disconnect(request: fastapi.Request, futures) -> list[Completion]:
    try:
      return await _await_all(futures, request.is_disconnected)
    except ClientGone as e:
      disconnects["total"] += 1
      raise APIError(499, "client closed the request", code="client_closed") from e

  @v1.get("/models")
  async def models() -> sm.ModelList:
    return sm.ModelList(data=[sm.ModelCard(id=model_name, max_model_len=engine.cache_len)])

  @v1.post("/chat/completions")
  async def chat_completions(req: sm.ChatCompletionRequest, request: fastapi.Request):
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    ignore_unknown_fields(req)

    def prepare():
      plan = proto.plan_chat(req)
      return plan, _submit(engine, plan.jobs, retry_after_s)

    plan, futures = await run_in_threadpool(prepare)
    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)
      return StreamingResponse(
          _stream(proto.chat_opening_chunks(rid, plan), futures,
                  lambda comps: proto.chat_chunks(rid, plan, comps, include_usage)),
          media_type="text/event-stream")
    completions = await await_or_disconnect(request, futures)
    return await run_in_threadpool(proto.chat_response, rid, plan, completions)

  @v1.post("/completions")
  async def completions(req: sm.CompletionRequest, request: fastapi.Request):
    rid = f"cmpl-{uuid.uuid4().hex}"
    ignore_unknown_fields(req)

    def prepare():
      plan = proto.plan_completion(req)
      return plan, _submit(engine, plan.jobs, retry_after_s)

    plan, futures = await run_in_threadpool(prepare)
    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)
      return StreamingResponse(
          _stream([], futures,
                  lambda comps: proto.completion_chunks(rid, plan, comps, include_usage)),
          media_type="text/event-stream")
    done = await await_or_disconnect(request, futures)
    return await run_in_threadpool(proto.completion_response, rid, plan, done)

  app.include_router(v1)
  return app


class ServerThread:
  """uvicorn serving `app` from a background thread, on a free port of 127.0.0.1 by default.

  Use as a context manager, or start()/stop(). stop() lets in-flight requests finish for up
  to `graceful_timeout_s`, then cancels them; it does not close the engine (its owner does).
  """

  def __init__(self, app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0, *,
               startup_timeout_s: float = 60.0, graceful_timeout_s: float = 10.0,
               log_level: str = "warning"):
    self.host, self._port = host, port
    self._startup_timeout_s = startup_timeout_s
    self._server = uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=int(graceful_timeout_s),
        lifespan="off"))
    self._socket: socket.socket | None = None
    self._bound_port: int | None = None
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  @property
  def port(self) -> int:
    if self._bound_port is None:
      raise RuntimeError("the server is not started")
    return self._bound_port

  @property
  def url(self) -> str:
    """The base URL, e.g. http://127.0.0.1:41234 (the API lives under /v1)."""
    return f"http://{self.host}:{self.port}"

  def start(self) -> "ServerThread":
    """Binds the socket, starts serving, and returns once the server accepts connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind((self.host, self._port))
    except OSError as e:
      sock.close()
      raise OSError(f"cannot bind {self.host}:{self._port}: {e}") from e
    self._socket, self._bound_port = sock, sock.getsockname()[1]
    self._thread = threading.Thread(target=self._run, name="simulator-server", daemon=True)
    self._thread.start()
    waited = 0.0
    while not self._server.started:
      if not self._thread.is_alive():
        raise RuntimeError(f"the simulator server failed to start: {self._error!r}")
      if waited > self._startup_timeout_s:
        self.stop()
        raise TimeoutError(f"the simulator server did not start in {self._startup_timeout_s}s")
      self._thread.join(0.02)
      waited += 0.02
    return self

  def _run(self) -> None:
    try:
      self._server.run(sockets=[self._socket])
    except BaseException as e:  # noqa: BLE001 - reported by start()/stop()
      self._error = e
      raise

  def stop(self, timeout_s: float = 30.0) -> None:
    """Graceful shutdown; raises if the server thread does not end within timeout_s."""
    if self._thread is None:
      return
    self._server.should_exit = True
    self._thread.join(timeout_s)
    if self._thread.is_alive():
      self._server.force_exit = True
      self._thread.join(5.0)
      raise TimeoutError(f"the simulator server at {self.url} did not stop in {timeout_s}s")
    self._thread = None

  def __enter__(self) -> "ServerThread":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


@dataclasses.dataclass
class Simulator:
  """A frozen model ready to serve: its engine, chat format and tokenizer."""
  engine: Engine
  chat_format: ChatFormat
  tokenizer: Tokenizer
  model_name: str

  def app(self, api_key: str | None = None, **options: Any) -> fastapi.FastAPI:
    return build_app(self.engine, self.chat_format, self.tokenizer, self.model_name, api_key,
                     **options)

  def close(self) -> None:
    self.engine.close()


def load_simulator(model: str = "smollm2", tokenizer: str | None = None, *,
                   served_name: str | None = None, num_slots: int = 16, cache_len: int = 4096,
                   max_queue: int = 4096, decode_chunk: int = 8, seed: int = 0,
                   dtype: str | None = None, kv_layout: str = "dense") -> Simulator:
  """The model to serve, named as `models.loading` names it (a packaged GGUF, a Hugging Face
  directory, or a named random shape), with its weights and compute in `dtype` if given."""
  net, tok = loading.load_model_and_tokenizer(model, tokenizer or "", param_dtype=dtype,
                                              dtype=dtype, seed=seed)
  vocab = net.cfg.vocab_size
  if tok.vocab_size > vocab:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model only {vocab}")
  grammar = GrammarCompiler(tok.llguidance_tokenizer(vocab), vocab)
  engine = Engine(net, num_slots=num_slots, cache_len=cache_len, max_queue=max_queue,
                  decode_chunk=decode_chunk, decode_fn=tok.decode, grammar_compiler=grammar,
                  seed=seed, kv_layout=kv_layout)
  return Simulator(engine, ChatFormat(tok), tok, served_name or model)
