"""Fault tests for SimulatorClient against a scripted, misbehaving HTTP server on 127.0.0.1."""
import asyncio
import contextlib
import json
import socket
import time

import jsonschema
import pytest

from trustee_jax.simulator import client as client_lib
from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError

_SCORE_SCHEMA = {"type": "object", "properties": {"reason": {"type": "string"},
                                                  "score": {"enum": [-1, 0, 1]}},
                 "required": ["score"], "additionalProperties": False}


def _completion(content="hello", finish_reason="stop", reasoning=None, tool_calls=None):
  message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
  if tool_calls is not None:
    message["tool_calls"] = tool_calls
  return {"id": "x", "object": "chat.completion", "model": "m",
          "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def reply(status=200, body=None, headers=None, delay=0.0):
  """An action: wait `delay`, then answer with `status`, a JSON (or raw str) body and headers."""
  async def act(writer, _request):
    if delay:
      await asyncio.sleep(delay)
    data = (body if isinstance(body, str) else json.dumps(
        _completion() if body is None else body)).encode()
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
  return act


def ok(content="hello", **kw):
  return reply(200, _completion(content, **kw))


def hang():
  """An action that never answers (until the server shuts down)."""
  async def act(_writer, _request):
    await asyncio.sleep(3600)
  return act


def drop():
  """An action that closes the connection without any reply."""
  async def act(_writer, _request):
    return None
  return act


class ScriptedServer:
  """HTTP/1.1 on 127.0.0.1:<free port>; request i gets actions[i], the last one repeating."""

  def __init__(self, *actions):
    self.actions = list(actions)
    self.requests = []
    self.in_flight = 0
    self.max_in_flight = 0
    self._tasks = set()

  async def __aenter__(self):
    self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
    self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
    return self

  async def __aexit__(self, *exc_info):
    self._server.close()
    for task in list(self._tasks):
      task.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    await self._server.wait_closed()

  async def _handle(self, reader, writer):
    task = asyncio.current_task()
    self._tasks.add(task)
    try:
      head = (await reader.readuntil(b"\r\n\r\n")).decode()
      headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
      headers = {k.lower(): v for k, v in headers.items()}
      body = await reader.readexactly(int(headers.get("content-length", 0)))
      request = {"headers": headers, "json": json.loads(body), "time": time.monotonic()}
      action = self.actions[min(len(self.requests), len(self.actions) - 1)]
      self.requests.append(request)
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      try:
        await action(writer, request)
      finally:
        self.in_flight -= 1
    except (ConnectionError, asyncio.IncompleteReadError):
      pass
    finally:
      writer.close()
      self._tasks.discard(task)


def _config(*urls, **kw):
  kw = {"timeout_s": 2.0, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
        **kw}
  return ClientConfig(urls=tuple(urls), **kw)


def _nonzero(stats):
  return {k: v for k, v in stats.items() if v}


def _messages():
  return [{"role": "user", "content": "hi"}]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(10)
def test_500s_then_success():
  async def main():
    async with ScriptedServer(reply(500, {"object": "error", "message": "boom"}),
                              reply(503, "overloaded"), ok("fine")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        result = await c.chat(_messages(), role="user")
        assert result.content == "fine" and result.finish_reason == "stop"
        assert result.usage["total_tokens"] == 5 and result.endpoint == srv.url
        assert _nonzero(c.stats()) == {"calls/user": 1, "retries/http_5xx": 2}
        assert len(srv.requests) == 3
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_always_500_raises_after_max_retries():
  async def main():
    async with ScriptedServer(reply(500, {"object": "error", "message": "kaboom"})) as srv:
      async with SimulatorClient(_config(srv.url, max_retries=2)) as c:
        with pytest.raises(SimulatorError) as info:
          await c.chat(_messages(), role="judge")
        assert info.value.cause == "http_5xx" and info.value.endpoint == srv.url
        assert "kaboom" in str(info.value)
        assert len(srv.requests) == 3
        assert _nonzero(c.stats()) == {"calls/judge": 1, "retries/http_5xx": 2,
                                       "failures/http_5xx": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_hang_past_timeout_is_bounded():
  async def main():
    async with ScriptedServer(hang()) as srv:
      cfg = _config(srv.url, timeout_s=0.3, max_retries=1)
      async with SimulatorClient(cfg) as c:
        start = time.monotonic()
        with pytest.raises(SimulatorError) as info:
          await c.chat(_messages(), role="tool")
        elapsed = time.monotonic() - start
        assert info.value.cause == "timeout"
        assert 0.55 < elapsed < 2 * 0.3 + 0.05 + 1.0  # (retries+1)*timeout + backoff + slack
        assert _nonzero(c.stats()) == {"calls/tool": 1, "retries/timeout": 1,
                                       "failures/timeout": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_hang_then_success():
  async def main():
    async with ScriptedServer(hang(), ok("late")) as srv:
      async with SimulatorClient(_config(srv.url, timeout_s=0.3)) as c:
        assert (await c.chat(_messages(), role="tool")).content == "late"
        assert _nonzero(c.stats()) == {"calls/tool": 1, "retries/timeout": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_dropped_connection_is_retried():
  async def main():
    async with ScriptedServer(drop(), drop(), ok("back")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        assert (await c.chat(_messages(), role="user")).content == "back"
        assert _nonzero(c.stats()) == {"calls/user": 1, "retries/connect": 2}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_always_dropped_fails_loudly():
  async def main():
    async with ScriptedServer(drop()) as srv:
      async with SimulatorClient(_config(srv.url, max_retries=1)) as c:
        with pytest.raises(SimulatorError) as info:
          await c.chat(_messages(), role="user")
        assert info.value.cause == "connect"
        assert _nonzero(c.stats()) == {"calls/user": 1, "retries/connect": 1,
                                       "failures/connect": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_malformed_bodies_are_retried_then_fail():
  async def main():
    async with ScriptedServer(reply(200, "{not json"), reply(200, {"choices": []}),
                              reply(200, {"choices": [{"message": {"content": "x"},
                                                       "finish_reason": "abort"}]}),
                              ok("good")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        assert (await c.chat(_messages())).content == "good"
        assert _nonzero(c.stats()) == {"calls/default": 1, "retries/bad_response": 3}
    async with ScriptedServer(reply(200, "<html>gateway</html>")) as srv:
      async with SimulatorClient(_config(srv.url, max_retries=1)) as c:
        with pytest.raises(SimulatorError, match="gateway") as info:
          await c.chat(_messages())
        assert info.value.cause == "bad_response"
        assert c.stats()["failures/bad_response"] == 1
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_429_retry_after_is_honoured():
  async def main():
    async with ScriptedServer(reply(429, {"object": "error", "message": "slow down",
                                          "type": "rate_limit_error", "code": 429},
                                    headers={"Retry-After": "1"}), ok("now")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        assert (await c.chat(_messages(), role="user")).content == "now"
        waited = srv.requests[1]["time"] - srv.requests[0]["time"]
        assert 0.95 <= waited < 3.0  # backoff alone would be <= 0.05 s
        assert _nonzero(c.stats()) == {"calls/user": 1, "retries/http_429": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_408_is_retried_as_a_timeout():
  async def main():
    async with ScriptedServer(reply(408, "Request Timeout"), ok("queued")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        assert (await c.chat(_messages(), role="user")).content == "queued"
        assert _nonzero(c.stats()) == {"calls/user": 1, "retries/timeout": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_400_fails_at_once_with_the_servers_message():
  async def main():
    body = {"object": "error", "message": "context length 9000 exceeds 8192",
            "type": "BadRequest", "param": None, "code": 400}
    async with ScriptedServer(reply(400, body), ok()) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        with pytest.raises(SimulatorError, match="context length 9000") as info:
          await c.chat(_messages(), role="task")
        assert info.value.cause == "http_4xx"
        assert len(srv.requests) == 1
        assert _nonzero(c.stats()) == {"calls/task": 1, "failures/http_4xx": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_round_robin_skips_a_dead_endpoint():
  async def main():
    dead = f"http://127.0.0.1:{_free_port()}"
    async with ScriptedServer(ok("alive")) as srv:
      async with SimulatorClient(_config(dead, srv.url)) as c:
        for _ in range(4):
          assert (await c.chat(_messages(), role="user")).endpoint == srv.url
        assert len(srv.requests) == 4
        # Calls 0 and 2 start on the dead endpoint and move on to the live one.
        assert _nonzero(c.stats()) == {"calls/user": 4, "retries/connect": 2}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_round_robin_spreads_calls():
  async def main():
    async with ScriptedServer(ok("a")) as a, ScriptedServer(ok("b")) as b:
      async with SimulatorClient(_config(a.url, b.url)) as c:
        contents = [(await c.chat(_messages())).content for _ in range(4)]
        assert contents == ["a", "b", "a", "b"]
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_one_conversation_stays_on_one_url_and_fails_over():
  async def main():
    async with contextlib.AsyncExitStack() as stack:
      servers = [await stack.enter_async_context(ScriptedServer(ok(name))) for name in "abc"]
      async with SimulatorClient(_config(*(s.url for s in servers))) as c:
        by_task = {t: {(await c.chat(_messages(), affinity=t)).content for _ in range(4)}
                   for t in ("task-1", "task-2", "task-3", "task-4", "task-5")}
        assert all(len(seen) == 1 for seen in by_task.values())  # pinned, turn after turn
        assert len(set().union(*by_task.values())) > 1  # and tasks spread over the URLs
    async with ScriptedServer(reply(500, {"error": "down"})) as bad, ScriptedServer(ok("b")) as b:
      async with SimulatorClient(_config(bad.url, b.url, max_retries=1)) as c:
        pinned_to_bad = next(t for t in (f"t{i}" for i in range(64))
                             if client_lib.zlib.crc32(t.encode()) % 2 == 0)
        assert (await c.chat(_messages(), affinity=pinned_to_bad)).content == "b"
  asyncio.run(main())


def test_reasoning_is_read_under_either_name():
  body = _completion("answer")
  msg = body["choices"][0]["message"]
  msg.pop("reasoning_content")
  msg["reasoning"] = "thought"  # vLLM's newer name
  assert client_lib.parse_choice(body, "u").reasoning_content == "thought"
  msg["reasoning_content"] = "sglang"
  assert client_lib.parse_choice(body, "u").reasoning_content == "sglang"


@pytest.mark.timeout(10)
def test_concurrency_is_bounded():
  async def main():
    async with ScriptedServer(reply(200, None, delay=0.1)) as srv:
      async with SimulatorClient(_config(srv.url, max_concurrency=2)) as c:
        await asyncio.gather(*[c.chat(_messages()) for _ in range(6)])
        assert srv.max_in_flight == 2 and len(srv.requests) == 6
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_request_body_and_api_key():
  async def main():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "call_1", "index": 0, "type": "function",
            "function": {"name": "f", "arguments": {"x": 1}}}
    async with ScriptedServer(ok("", tool_calls=[call], finish_reason="tool_calls")) as srv:
      cfg = _config(srv.url, api_key="sekrit", model="qwen")
      async with SimulatorClient(cfg) as c:
        result = await c.chat(_messages(), tools=[tool], tool_choice="auto", temperature=0.7,
                              top_k=20, max_tokens=64,
                              chat_template_kwargs={"enable_thinking": False})
    request = srv.requests[0]
    assert request["headers"]["authorization"] == "Bearer sekrit"
    assert request["json"] == {"model": "qwen", "messages": _messages(), "tools": [tool],
                               "tool_choice": "auto", "temperature": 0.7, "top_k": 20,
                               "max_tokens": 64,
                               "chat_template_kwargs": {"enable_thinking": False}}
    assert result.tool_calls == [{"id": "call_1", "type": "function",
                                  "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert result.finish_reason == "tool_calls" and result.content == ""
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_chat_json_reasks_schema_invalid_output():
  async def main():
    async with ScriptedServer(ok('{"score": 5}'), ok('<think>hm</think>{"score": 1}')) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        value = await c.chat_json(_messages(), _SCORE_SCHEMA, role="judge", seed=7,
                                  temperature=0.0)
        assert value == {"score": 1}
        assert _nonzero(c.stats()) == {"calls/judge": 2, "reasks/schema": 1}
    first, second = (r["json"] for r in srv.requests)
    assert first["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "judge", "schema": _SCORE_SCHEMA, "strict": True}}
    assert (first["seed"], second["seed"]) == (7, 8)
    assert first["temperature"] == second["temperature"] == 0.0
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_prompted_json_asks_in_the_prompt_and_repairs_a_cut_reply():
  """The reference's JSON: no grammar; the schema in the prompt; a reply cut mid-object (as by
  max_tokens) closed and validated; one that cannot be repaired re-asked."""
  user_schema = {"type": "object", "properties": {
      "response": {"type": "string"}, "reward": {"type": "integer", "enum": [-1, 0, 1]}},
      "required": ["response", "reward"], "x-guidance": {"whitespace_flexible": False}}
  async def main():
    async with ScriptedServer(ok("Sure, here: {\"response\": "),
                              ok('<think>ok</think>```json\n{"response": "Fine", "reward": 1',
                                 finish_reason="length")) as srv:
      async with SimulatorClient(_config(srv.url, json_mode="prompted")) as c:
        value = await c.chat_json(_messages(), user_schema, role="user", seed=3)
        assert value == {"response": "Fine", "reward": 1}
        assert _nonzero(c.stats()) == {"calls/user": 2, "reasks/invalid_json": 1,
                                       "repairs/user": 1}
    first = srv.requests[0]["json"]
    assert "response_format" not in first
    assert first["messages"][-1]["content"].endswith(
        json.dumps({k: v for k, v in user_schema.items() if k != "x-guidance"}))
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_chat_json_reasks_a_reply_cut_by_max_tokens():
  async def main():
    # A cut reply is re-asked even when what arrived happens to parse.
    async with ScriptedServer(ok('{"score": 1}', finish_reason="length"),
                              ok('```json\n{"score": 0}\n```')) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        assert await c.chat_json(_messages(), _SCORE_SCHEMA, role="judge") == {"score": 0}
        assert _nonzero(c.stats()) == {"calls/judge": 2, "reasks/length": 1}
        assert "seed" not in srv.requests[1]["json"]
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_chat_json_gives_up_after_max_reasks():
  async def main():
    async with ScriptedServer(ok("I refuse to answer in JSON.")) as srv:
      async with SimulatorClient(_config(srv.url, max_reasks=2)) as c:
        with pytest.raises(SimulatorError, match="no JSON object") as info:
          await c.chat_json(_messages(), _SCORE_SCHEMA, role="judge")
        assert info.value.cause == "invalid_output"
        assert len(srv.requests) == 3
        assert _nonzero(c.stats()) == {"calls/judge": 3, "reasks/invalid_json": 2,
                                       "failures/invalid_output": 1}
  asyncio.run(main())


@pytest.mark.timeout(10)
def test_chat_json_rejects_a_bad_schema_before_any_request():
  async def main():
    async with ScriptedServer(ok("{}")) as srv:
      async with SimulatorClient(_config(srv.url)) as c:
        with pytest.raises(jsonschema.exceptions.SchemaError):
          await c.chat_json(_messages(), {"type": "objekt"}, role="judge")
      assert not srv.requests
  asyncio.run(main())


def test_stats_lists_every_cause_and_reason_at_zero():
  c = SimulatorClient(_config("http://127.0.0.1:9"))
  stats = c.stats()
  assert all(stats[f"retries/{k}"] == 0 and stats[f"failures/{k}"] == 0
             for k in client_lib.CAUSES)
  assert all(stats[f"reasks/{r}"] == 0 for r in client_lib.REASK_REASONS)
  asyncio.run(c.aclose())


@pytest.mark.parametrize("body,expected", [
    ('{"object": "error", "message": "bad seed", "type": "BadRequest", "code": 400}',
     "bad seed"),
    ('{"error": {"message": "no such model", "type": "invalid_request_error"}}',
     "no such model"),
    ('{"error": "Unauthorized"}', "Unauthorized"),
    ('{"detail": "Not Found"}', "Not Found"),
    ("Internal Server Error", "Internal Server Error"),
    ("", "(empty body)"),
])
def test_error_message(body, expected):
  assert client_lib.error_message(body) == expected


def test_retry_after_seconds():
  assert client_lib.retry_after_seconds("2") == 2.0
  assert client_lib.retry_after_seconds(None) is None
  assert client_lib.retry_after_seconds("soon") is None
  assert client_lib.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
  future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
  assert 25 < client_lib.retry_after_seconds(future) <= 30


def test_config_is_checked():
  with pytest.raises(ValueError, match="tuple of URLs"):
    ClientConfig(urls="http://127.0.0.1:1")
  with pytest.raises(ValueError, match="http://"):
    ClientConfig(urls=("127.0.0.1:1",))
  with pytest.raises(ValueError):
    ClientConfig(urls=("http://a",), max_retries=-1)
