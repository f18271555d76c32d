"""Contract: SimulatorClient against replies shaped exactly as SGLang 0.5.23 sends them.

The bodies below were produced with SGLang 0.5.23's own pydantic models
(python/sglang/srt/entrypoints/openai/protocol.py: ChatCompletionResponse dumped with
`model_dump_json(by_alias=True)` as http_server.model_json_response does, ErrorResponse as
serving_base.create_error_response does; the 401 body is utils/auth.py's middleware; 429 and
408 are what SGLang's router answers when its queue is full or a request waited too long).
tests/test_sglang_flags.py (slow) validates them again against those models, so a change in
SGLang's protocol shows up there. A stub FastAPI app on uvicorn (as SGLang itself runs)
serves them on 127.0.0.1.
"""
import asyncio
import collections
import json
import socket
import threading
import time

import fastapi
import pytest
import uvicorn

from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError

_SCHEMA = {"type": "object", "properties": {"reason": {"type": "string"},
                                            "score": {"enum": [-1, 0, 1]}},
           "required": ["reason", "score"], "additionalProperties": False}
_TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} of a place",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}} for name in ("get_weather", "get_time")]


def _completion(message, finish_reason, matched_stop=None, usage=None):
  """A ChatCompletionResponse body as SGLang 0.5.23 serialises it."""
  return {"id": "8a1f0c2be7d34d59a4f6c3e1b2d7e9f0", "object": "chat.completion",
          "created": 1767225600, "model": "Qwen/Qwen3-8B",
          "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None,
                       "finish_reason": finish_reason, "matched_stop": matched_stop}],
          "usage": usage or {"prompt_tokens": 412, "total_tokens": 508, "completion_tokens": 96,
                             "prompt_tokens_details": None, "reasoning_tokens": 71,
                             "completion_tokens_details": None},
          "metadata": {"weight_version": "default"}}


def _error(message, err_type, code):
  """SGLang's ErrorResponse body: {"object": "error", "message", "type", "param", "code"}."""
  return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


def sglang_completions():
  """Named 200 bodies: thinking on (qwen3 reasoning parser), tool calls (qwen25), cuts, aborts."""
  return {
      "json_after_reasoning": _completion(
          {"content": '{"reason": "The agent booked the flight.", "score": 1}',
           "reasoning_content": "The user wanted a flight to Lisbon. The agent called "
                                "search_flights then book_flight.\n"}, "stop", 151645),
      "json_thinking_off": _completion(
          {"content": '{"reason": "Wrong city.", "score": -1}', "reasoning_content": None},
          "stop", 151645),
      "tool_calls": _completion(
          {"content": "", "reasoning_content": "I should look up the weather first.\n",
           "tool_calls": [
               {"id": "call_3f9d2c7a1b8e4f6d9c0a5b2e", "index": 0, "type": "function",
                "function": {"name": "get_weather",
                             "arguments": '{"city": "Lisbon", "unit": "celsius"}'}},
               {"id": "call_7b1e9d4c2a6f8e3b5d0c9a1f", "index": 1, "type": "function",
                "function": {"name": "get_time", "arguments": '{"timezone": "Europe/Lisbon"}'}},
           ]}, "tool_calls"),
      "cut_in_reasoning": _completion(
          {"content": "", "reasoning_content": "Let me think about the schema. The user"},
          "length", None,
          {"prompt_tokens": 300, "total_tokens": 2348, "completion_tokens": 2048,
           "prompt_tokens_details": None, "reasoning_tokens": 2048,
           "completion_tokens_details": None}),
      "aborted": _completion(
          {"content": "", "reasoning_content": "The user"}, "abort", None,
          {"prompt_tokens": 300, "total_tokens": 302, "completion_tokens": 2,
           "prompt_tokens_details": None, "reasoning_tokens": 0,
           "completion_tokens_details": None}),
  }


def sglang_errors():
  """Named error replies as (status, body): SGLang's ErrorResponse and its auth middleware."""
  return {
      "context_too_long": (400, _error(
          "The input (9000 tokens) is longer than the model's context length (8192 tokens).",
          "BadRequest", 400)),
      "validation": (400, _error(
          "1 validation error for ChatCompletionRequest\nmessages\n  Field required",
          "Bad Request", 400)),
      "unauthorized": (401, {"error": "Unauthorized"}),
      "queue_timeout_abort": (503, _error("Request timed out in the waiting queue.", "503", 503)),
      "internal": (500, _error("Internal server error: CUDA error: an illegal memory access "
                               "was encountered", "InternalServerError", 500)),
  }


class StubSGLang:
  """FastAPI on uvicorn in a thread; answers each chat request with the next scripted reply."""

  def __init__(self, api_key=None):
    self.script = collections.deque()
    self.requests = []
    app = fastapi.FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
      if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
        return fastapi.responses.JSONResponse({"error": "Unauthorized"}, status_code=401)
      self.requests.append(await request.json())
      status, body, headers = self.script.popleft()
      content = body if isinstance(body, str) else json.dumps(body)
      media = "text/plain" if isinstance(body, str) else "application/json"
      return fastapi.Response(content, status_code=status, headers=headers, media_type=media)

    self._sock = socket.socket()
    self._sock.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
    self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    self._thread = threading.Thread(target=self._server.run,
                                    kwargs={"sockets": [self._sock]}, daemon=True)

  def __enter__(self):
    self._thread.start()
    deadline = time.monotonic() + 10
    while not self._server.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError("stub SGLang server did not start")
      time.sleep(0.01)
    return self

  def __exit__(self, *exc_info):
    self._server.should_exit = True
    self._thread.join(timeout=10)
    self._sock.close()

  def then(self, status, body, headers=None):
    self.script.append((status, body, headers or {}))
    return self


@pytest.fixture(scope="module")
def stub():
  with StubSGLang(api_key="sk-test") as server:
    yield server


@pytest.fixture
def sglang(stub):
  stub.script.clear()
  stub.requests.clear()
  return stub


def _run(stub, body, **config):
  """Runs `body(client)` against the stub with short timeouts; returns (result, stats)."""
  cfg = {"timeout_s": 5.0, "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
         "api_key": "sk-test", **config}
  async def main():
    async with SimulatorClient(ClientConfig(urls=(stub.url,), **cfg)) as c:
      try:
        return await body(c), {k: v for k, v in c.stats().items() if v}
      except SimulatorError as e:
        return e, {k: v for k, v in c.stats().items() if v}
  return asyncio.run(main())


def _ask_judge(c):
  return c.chat_json([{"role": "user", "content": "judge"}], _SCHEMA, role="judge",
                     max_tokens=2048, chat_template_kwargs={"enable_thinking": True})


@pytest.mark.timeout(30)
def test_json_after_reasoning(sglang):
  sglang.then(200, sglang_completions()["json_after_reasoning"])
  value, stats = _run(sglang, _ask_judge)
  assert value == {"reason": "The agent booked the flight.", "score": 1}
  assert stats == {"calls/judge": 1}
  sent = sglang.requests[0]
  assert sent["response_format"]["json_schema"]["schema"] == _SCHEMA
  assert sent["chat_template_kwargs"] == {"enable_thinking": True}


@pytest.mark.timeout(30)
def test_reasoning_content_is_kept(sglang):
  sglang.then(200, sglang_completions()["json_after_reasoning"])
  result, _ = _run(sglang, lambda c: c.chat([{"role": "user", "content": "x"}]))
  assert result.reasoning_content.startswith("The user wanted a flight")
  assert result.usage["reasoning_tokens"] == 71 and result.finish_reason == "stop"


@pytest.mark.timeout(30)
def test_json_with_thinking_off(sglang):
  sglang.then(200, sglang_completions()["json_thinking_off"])
  value, _ = _run(sglang, _ask_judge)
  assert value == {"reason": "Wrong city.", "score": -1}


@pytest.mark.timeout(30)
def test_tool_calls(sglang):
  sglang.then(200, sglang_completions()["tool_calls"])
  result, stats = _run(sglang, lambda c: c.chat([{"role": "user", "content": "weather?"}],
                                                 role="policy", tools=_TOOLS,
                                                 tool_choice="auto"))
  assert result.finish_reason == "tool_calls" and result.content == ""
  assert [(t["id"], t["type"], t["function"]["name"], json.loads(t["function"]["arguments"]))
          for t in result.tool_calls] == [
              ("call_3f9d2c7a1b8e4f6d9c0a5b2e", "function", "get_weather",
               {"city": "Lisbon", "unit": "celsius"}),
              ("call_7b1e9d4c2a6f8e3b5d0c9a1f", "function", "get_time",
               {"timezone": "Europe/Lisbon"})]
  assert all(set(t) == {"id", "type", "function"} for t in result.tool_calls)
  assert stats == {"calls/policy": 1}


@pytest.mark.timeout(30)
def test_cut_in_reasoning_is_reasked(sglang):
  replies = sglang_completions()
  sglang.then(200, replies["cut_in_reasoning"]).then(200, replies["json_after_reasoning"])
  value, stats = _run(sglang, _ask_judge)
  assert value["score"] == 1
  assert stats == {"calls/judge": 2, "reasks/length": 1}


@pytest.mark.timeout(30)
def test_graceful_abort_is_retried(sglang):
  replies = sglang_completions()
  sglang.then(200, replies["aborted"]).then(200, replies["json_thinking_off"])
  value, stats = _run(sglang, _ask_judge)
  assert value["score"] == -1
  assert stats == {"calls/judge": 1, "retries/bad_response": 1}


@pytest.mark.parametrize("name", ["context_too_long", "validation", "unauthorized"])
@pytest.mark.timeout(30)
def test_client_errors_fail_at_once_with_sglangs_message(sglang, name):
  status, body = sglang_errors()[name]
  sglang.then(status, body)
  error, stats = _run(sglang, _ask_judge)
  assert isinstance(error, SimulatorError) and error.cause == "http_4xx"
  assert (body.get("message") or body.get("error")) in error.message
  assert stats == {"calls/judge": 1, "failures/http_4xx": 1}
  assert len(sglang.requests) == 1


@pytest.mark.timeout(30)
def test_wrong_api_key_is_refused_by_the_middleware(sglang):
  error, stats = _run(sglang, _ask_judge, api_key="sk-wrong")
  assert error.cause == "http_4xx" and "401: Unauthorized" in error.message
  assert not sglang.requests


@pytest.mark.parametrize("name,cause", [("queue_timeout_abort", "http_5xx"),
                                        ("internal", "http_5xx")])
@pytest.mark.timeout(30)
def test_server_errors_are_retried(sglang, name, cause):
  status, body = sglang_errors()[name]
  sglang.then(status, body).then(200, sglang_completions()["json_thinking_off"])
  value, stats = _run(sglang, _ask_judge)
  assert value["score"] == -1
  assert stats == {"calls/judge": 1, f"retries/{cause}": 1}


@pytest.mark.timeout(30)
def test_router_429_and_408_are_retried(sglang):
  ok = sglang_completions()["json_thinking_off"]
  sglang.then(429, "Too Many Requests", {"Retry-After": "0"}).then(408, "Request Timeout")
  sglang.then(200, ok)
  value, stats = _run(sglang, _ask_judge)
  assert value["score"] == -1
  assert stats == {"calls/judge": 1, "retries/http_429": 1, "retries/timeout": 1}


@pytest.mark.timeout(30)
def test_persistent_503_fails_with_sglangs_message(sglang):
  status, body = sglang_errors()["queue_timeout_abort"]
  for _ in range(3):
    sglang.then(status, body)
  error, stats = _run(sglang, _ask_judge)
  assert error.cause == "http_5xx" and "waiting queue" in error.message
  assert stats == {"calls/judge": 1, "retries/http_5xx": 2, "failures/http_5xx": 1}
