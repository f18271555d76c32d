"""Soak test of the embedded simulator server: many concurrent clients for a bounded time.

  python benchmarks/soak.py [--duration_s 600] [--concurrency 32] [--warmup_s 60]
      [--num_slots 8]

Starts `python -m trustee_jax.serving` (tiny-llama, random weights, smollm2 tokenizer) on
127.0.0.1 as a child process with --parent_pid (it dies with this process). Then
`concurrency` asyncio clients send a weighted mix, for --warmup_s untimed (it compiles the
engine's shapes) and then for --duration_s timed: plain chats (some naming a model the server
does not have: it serves any name), streams, json_schema replies, forced tool calls, n > 1,
raw completions, requests the client abandons mid-flight (plain and streamed), and malformed
ones (each must get a 4xx). Then it
waits for the engine to drain, reads /metrics (busy slots must be 0), stops the server with
SIGTERM and prints one JSON object last. Exits 1 if a valid request failed, a malformed one
got no 4xx, slots stay busy, the engine failed a step, or the server did not stop cleanly.
"""
import asyncio
import collections
import dataclasses
import json
import logging
import os
import pathlib
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jsonschema  # noqa: E402
import psutil  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
VERDICT = {"type": "object", "additionalProperties": False, "required": ["reason", "score"],
           "properties": {"reason": {"type": "string", "maxLength": 20},
                          "score": {"type": "integer", "minimum": 1, "maximum": 5}}}
TOPICS = ["a lost passport", "a delayed flight", "a broken washing machine", "a refund",
          "a dentist appointment", "a late pizza", "a phone plan", "a leaking tap"]
CHAT = "/v1/chat/completions"
# (path, body or raw text, HTTP method): each must be answered with a 4xx.
MALFORMED = [
    (CHAT, '{"messages": [', "POST"),
    (CHAT, "[1, 2]", "POST"),
    (CHAT, {"model": "m"}, "POST"),
    (CHAT, {"model": "m", "messages": "hello"}, "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
     "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "text", "foo": 1}}, "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "word " * 600}]}, "POST"),
    (CHAT, {"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "POST"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "POST"),
    ("/v1/completions", {"prompt": [1, 10**7], "max_tokens": 2}, "POST"),
    ("/v1/nothing", {}, "POST"),
    (CHAT, None, "GET"),
]
# Request kind -> weight in the mix.
KINDS = {"chat": 4, "stream": 3, "json_schema": 2, "tools": 2, "n_choices": 2, "completion": 1,
         "cancel": 1, "cancel_stream": 1, "malformed": 2}
VALID = ("chat", "stream", "json_schema", "tools", "n_choices", "completion")


class BadReply(Exception):
  """A valid request got an error status or a reply of the wrong shape."""


def _messages(rng: random.Random) -> list[dict]:
  return [{"role": "user", "content": f"In one sentence: what do I do about "
                                      f"{rng.choice(TOPICS)}? ({rng.randrange(10**6)})"}]


def _check_chat(resp: httpx.Response, n: int = 1) -> dict:
  if resp.status_code != 200:
    raise BadReply(f"{resp.status_code}: {resp.text[:300]}")
  reply = resp.json()
  if len(reply["choices"]) != n or reply["usage"]["completion_tokens"] < n:
    raise BadReply(f"expected {n} choices with tokens: {resp.text[:300]}")
  return reply


async def _chat(http: httpx.AsyncClient, rng: random.Random) -> None:
  model = "no-such-model" if rng.random() < 0.2 else "soak"
  _check_chat(await http.post(CHAT, json={"model": model, "messages": _messages(rng),
                                          "max_tokens": rng.randint(2, 24),
                                          "temperature": rng.choice([0.0, 0.7, 1.0])}))


async def _n_choices(http: httpx.AsyncClient, rng: random.Random) -> None:
  n = rng.randint(2, 4)
  _check_chat(await http.post(CHAT, json={"model": "soak", "messages": _messages(rng), "n": n,
                                          "max_tokens": rng.randint(2, 16), "seed": 1}), n)


async def _json_schema(http: httpx.AsyncClient, rng: random.Random) -> None:
  reply = _check_chat(await http.post(CHAT, json={
      "model": "soak", "messages": _messages(rng), "max_tokens": 64, "temperature": 1.0,
      "response_format": {"type": "json_schema",
                          "json_schema": {"name": "verdict", "schema": VERDICT}}}))
  choice = reply["choices"][0]
  if choice["finish_reason"] == "stop":  # a random model may run out of tokens first
    jsonschema.validate(json.loads(choice["message"]["content"]), VERDICT)


async def _tools(http: httpx.AsyncClient, rng: random.Random) -> None:
  reply = _check_chat(await http.post(CHAT, json={
      "model": "soak", "messages": _messages(rng), "max_tokens": 64, "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
  choice = reply["choices"][0]
  if choice["finish_reason"] == "tool_calls":
    (call,) = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])


async def _completion(http: httpx.AsyncClient, rng: random.Random) -> None:
  resp = await http.post("/v1/completions", json={"model": "soak", "prompt": f"Once {rng.random()}",
                                                  "max_tokens": rng.randint(1, 16)})
  if resp.status_code != 200 or not resp.json()["choices"]:
    raise BadReply(f"{resp.status_code}: {resp.text[:300]}")


async def _stream(http: httpx.AsyncClient, rng: random.Random, abandon: bool = False) -> None:
  """A streamed chat read to [DONE] (or, abandoning, closed after the first chunk)."""
  body = {"model": "soak", "messages": _messages(rng), "stream": True,
          "max_tokens": 400 if abandon else rng.randint(2, 24),
          "stream_options": {"include_usage": True}}
  async with http.stream("POST", CHAT, json=body) as resp:
    if resp.status_code != 200:
      raise BadReply(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
    events = []
    async for line in resp.aiter_lines():
      if line.startswith("data: "):
        events.append(line[6:])
        if abandon:
          return
  if events[-1] != "[DONE]" or any('"error"' in e for e in events):
    raise BadReply(f"stream ended badly: {events[-2:]}")
  if not json.loads(events[-2])["usage"]["completion_tokens"]:
    raise BadReply("stream without completion tokens")


async def _cancel(http: httpx.AsyncClient, rng: random.Random) -> None:
  """A long request the client abandons after a moment (its connection closes)."""
  try:
    await asyncio.wait_for(http.post(CHAT, json={"model": "soak", "messages": _messages(rng),
                                                 "max_tokens": 400}),
                           timeout=rng.uniform(0.05, 0.5))
  except asyncio.TimeoutError:
    pass


async def _malformed(http: httpx.AsyncClient, rng: random.Random) -> int:
  path, body, method = rng.choice(MALFORMED)
  content = body if isinstance(body, str) else json.dumps(body) if body is not None else None
  resp = await http.request(method, path, content=content,
                            headers={"content-type": "application/json"})
  return resp.status_code


REQUESTS = {"chat": _chat, "stream": _stream, "json_schema": _json_schema, "tools": _tools,
            "n_choices": _n_choices, "completion": _completion, "cancel": _cancel,
            "cancel_stream": lambda h, r: _stream(h, r, abandon=True), "malformed": _malformed}


@dataclasses.dataclass
class Tally:
  """What the clients saw: counts, latencies and error samples per request kind."""
  served: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  malformed_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  latency_s: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  error_samples: list = dataclasses.field(default_factory=list)


async def _one(http: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
  start = time.perf_counter()
  try:
    result = await REQUESTS[kind](http, rng)
  except Exception as e:  # noqa: BLE001 - every failure is counted and sampled
    tally.errors[kind] += 1
    if len(tally.error_samples) < 10:
      tally.error_samples.append(f"{kind}: {type(e).__name__}: {e}"[:400])
    return
  if kind == "malformed":
    tally.malformed_status[str(result)] += 1
    if not 400 <= result < 500:
      tally.errors[kind] += 1
      return
  tally.served[kind] += 1
  tally.latency_s[kind].append(time.perf_counter() - start)


async def _client(http: httpx.AsyncClient, seed: int, deadline: float, tally: Tally) -> None:
  rng = random.Random(seed)
  kinds, weights = list(KINDS), list(KINDS.values())
  while time.monotonic() < deadline:
    await _one(http, rng.choices(kinds, weights)[0], rng, tally)


def _quantiles(values: list[float]) -> dict[str, float]:
  if not values:
    return {}
  cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
  return {"p50_s": round(cuts[49], 4), "p99_s": round(cuts[98], 4), "max_s": round(max(values), 4)}


async def _drained_metrics(http: httpx.AsyncClient, timeout_s: float) -> dict:
  """/metrics once no slot is busy and nothing waits (or when timeout_s is up)."""
  deadline = time.monotonic() + timeout_s
  while True:
    metrics = (await http.get("/metrics")).json()
    if (metrics["busy_slots"] == 0 and metrics["pending"] == 0) or time.monotonic() > deadline:
      return metrics
    await asyncio.sleep(0.2)


async def _rss_sampler(proc: psutil.Process, samples: list[float], every_s: float = 2.0) -> None:
  while True:
    samples.append(proc.memory_info().rss / 2**20)
    await asyncio.sleep(every_s)


async def _phase(http: httpx.AsyncClient, duration_s: float, concurrency: int,
                 seed: int) -> tuple[Tally, float]:
  """`concurrency` clients sending the mix for duration_s; what they saw, and the wall time."""
  tally, start = Tally(), time.monotonic()
  await asyncio.gather(*[_client(http, seed + i, start + duration_s, tally)
                         for i in range(concurrency)])
  return tally, time.monotonic() - start


async def _load(url: str, proc: psutil.Process, duration_s: float, warmup_s: float,
                concurrency: int, seed: int) -> dict[str, Any]:
  limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
    # The same load, not timed: it compiles the engine's shapes (batch, length, sampling flags).
    warm, _ = await _phase(http, warmup_s, concurrency, seed + 10**6)
    rss_warm = proc.memory_info().rss / 2**20
    rss: list[float] = []
    sampler = asyncio.create_task(_rss_sampler(proc, rss))
    tally, wall = await _phase(http, duration_s, concurrency, seed)
    metrics = await _drained_metrics(http, timeout_s=60)
    sampler.cancel()
    health = (await http.get("/health")).status_code
  valid_latency = [s for k in VALID for s in tally.latency_s[k]]
  return {
      "wall_s": round(wall, 1), "warmup_s": warmup_s, "warmup_served": dict(warm.served),
      "warmup_errors": dict(warm.errors), "warmup_error_samples": warm.error_samples,
      "served": dict(tally.served), "errors": dict(tally.errors),
      "valid_served": sum(tally.served[k] for k in VALID),
      "valid_errors": sum(t.errors[k] for k in VALID for t in (warm, tally)),
      "malformed_status": dict(tally.malformed_status),
      "malformed_not_4xx": tally.errors["malformed"] + warm.errors["malformed"],
      "error_samples": tally.error_samples,
      "latency_valid": _quantiles(valid_latency),
      "latency_by_kind": {k: _quantiles(v) for k, v in sorted(tally.latency_s.items())},
      "valid_req_per_s": round(len(valid_latency) / wall, 2),
      "busy_slots_after": metrics["busy_slots"], "pending_after": metrics["pending"],
      "engine_errors": metrics["engine_errors"],
      "engine_requests_cancelled": metrics["requests_cancelled"],
      "client_disconnects_seen": metrics["client_disconnects"],
      "engine_requests_done": metrics["requests_done"], "health_after": health,
      "rss_warm_mb": round(rss_warm, 1), "rss_max_mb": round(max(rss, default=rss_warm), 1),
      "rss_mid_mb": round(rss[len(rss) // 2] if rss else rss_warm, 1),  # a leak keeps growing
      "rss_end_mb": round(proc.memory_info().rss / 2**20, 1)}


def _start_server(log_path: pathlib.Path, num_slots: int, cache_len: int
                  ) -> tuple[subprocess.Popen, str]:
  """The simulator server as a child that dies with us; returns it and its base URL."""
  log = open(log_path, "wb")  # noqa: SIM115 - the child writes it until it exits
  server = subprocess.Popen(
      [sys.executable, "-m", "trustee_jax.serving", "--model=tiny-llama", "--tokenizer=smollm2",
       "--host=127.0.0.1", "--port=0", f"--num_slots={num_slots}", f"--cache_len={cache_len}",
       "--default_max_tokens=32", "--graceful_timeout_s=10", f"--parent_pid={os.getpid()}"],
      stdout=log, stderr=subprocess.STDOUT)
  log.close()
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    match = re.search(r"serving at (http://\S+)/v1", log_path.read_text(errors="replace"))
    if match:
      return server, match.group(1)
    if server.poll() is not None:
      break
    time.sleep(0.25)
  server.kill()
  raise RuntimeError(f"the simulator server did not start; its log:\n{log_path.read_text()}")


def failures(result: dict[str, Any]) -> list[str]:
  """Why a soak result fails (empty when it passes)."""
  checks = {"valid requests errored": result["valid_errors"],
            "malformed requests got no 4xx": result["malformed_not_4xx"],
            "slots still busy": result["busy_slots_after"],
            "requests still waiting": result["pending_after"],
            "engine steps failed": result["engine_errors"],
            "health not ok after the run": result["health_after"] != 200,
            "server did not stop cleanly": result["server_exit_code"] != 0}
  return [f"{what}: {value}" for what, value in checks.items() if value]


def run_soak(duration_s: float = 600, concurrency: int = 32, *, warmup_s: float = 60,
             num_slots: int = 8, cache_len: int = 512, seed: int = 0) -> dict[str, Any]:
  """Starts the server, runs the mix for warmup_s then (timed) duration_s, stops the server;
  every figure."""
  with tempfile.TemporaryDirectory() as tmp:
    log_path = pathlib.Path(tmp) / "server.log"
    started = time.monotonic()
    server, url = _start_server(log_path, num_slots, cache_len)
    try:
      proc = psutil.Process(server.pid)
      rss_start = proc.memory_info().rss / 2**20
      result = {"concurrency": concurrency, "duration_s": duration_s, "num_slots": num_slots,
                "server_start_s": round(time.monotonic() - started, 1),
                "rss_start_mb": round(rss_start, 1),
                **asyncio.run(_load(url, proc, duration_s, warmup_s, concurrency, seed))}
      server.send_signal(signal.SIGTERM)
      result["server_exit_code"] = server.wait(timeout=90)
      result["server_stopped_msg"] = "simulator stopped" in log_path.read_text(errors="replace")
    finally:
      if server.poll() is None:
        server.kill()
        server.wait()
    result["rss_growth_after_warmup_mb"] = round(result["rss_end_mb"] - result["rss_warm_mb"], 1)
    result["failures"] = failures(result)
  return result


def main(argv) -> None:
  del argv
  fv = flags.FLAGS
  logging.getLogger("httpx").setLevel(logging.WARNING)  # absl logs every request otherwise
  result = run_soak(fv.duration_s, fv.concurrency, warmup_s=fv.warmup_s,
                    num_slots=fv.num_slots, seed=fv.seed)
  common.emit(result)
  sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
  flags.DEFINE_float("duration_s", 600, "How long the clients send requests.")
  flags.DEFINE_integer("concurrency", 32, "Concurrent clients.")
  flags.DEFINE_float("warmup_s", 60, "Untimed load first (compiles the engine's shapes); its "
                     "errors count too.")
  flags.DEFINE_integer("num_slots", 8, "Engine slots of the server.")
  flags.DEFINE_integer("seed", 0, "Seed of the request mix.")
  app.run(main)
