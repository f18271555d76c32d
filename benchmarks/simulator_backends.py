"""Simulator backends side by side on CPU: the embedded JAX server (f32, bf16) vs llama.cpp's.

  python benchmarks/simulator_backends.py [--gguf FILE] [--jax_model same|smollm2|FILE]
      [--dtypes float32,bfloat16] [--llamacpp] [--llamacpp_split 0] [--rounds 2]

Every backend serves the same GGUF (unless --jax_model names a stand-in) from its own process
on 127.0.0.1, and gets the same requests over HTTP, alternating (round r runs the backends
forwards when r is even, backwards when odd, as benchmarks/common.py does), after one warm-up
pass each (JAX compiles there; its seconds are reported apart):
  prefill   one request, a ~1k-token prompt, 1 new token: prompt tokens / wall
  decode    one request, a short prompt, 128 new tokens; decode tokens/s =
            (completion_tokens - 1) / (wall - wall of the same-length prompt with 1 new token)
  sim8      16 user-simulator-shaped requests (~400-token prompt, a json_schema reply of at
            most 128 tokens: thought / response / reward), 8 in flight at a time: requests/s
Prompts carry a fresh number at their start, so no server reuses a cached prefix across
requests (both keep one); backend k of a round gets the same prompts as backend 0. Greedy.
The JAX server runs this file with --serve_jax (weights in --dtype; serve_simulator.py has no
dtype flag); llama.cpp runs launch/serve_llamacpp.py. Each server is stopped at the end (and
dies with this process). The last line printed is one JSON object with every figure.
"""
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import jsonschema  # noqa: E402
from absl import app, flags  # noqa: E402

from trustee_jax.serving.lifetime import die_with_parent  # noqa: E402
from trustee_jax.world import free_port  # noqa: E402

_GGUF = flags.DEFINE_string("gguf", None, "GGUF both backends serve (default: the packaged "
                            "Qwen2.5-Coder-0.5B, verified).")
_JAX_MODEL = flags.DEFINE_string("jax_model", "same", "What the JAX server loads: 'same' (--gguf)"
                                 ", 'smollm2' (the packaged SmolLM2-135M, a stand-in) or a GGUF.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "JAX servers, one per weight "
                            "dtype (empty: none).")
_LLAMACPP = flags.DEFINE_bool("llamacpp", True, "Include llama.cpp's server.")
_LLAMACPP_SPLIT = flags.DEFINE_integer("llamacpp_split", 0, "Also a llama.cpp backend of this "
                                       "many 1-thread processes, requests round-robin (0: no).")
_LOGITS_ALL = flags.DEFINE_bool("llamacpp_logits_all", False, "Start llama.cpp with --logits_all "
                                "(what logprobs need).")
_THREADS = flags.DEFINE_integer("threads", 2, "llama.cpp threads (JAX uses every core).")
_SLOTS = flags.DEFINE_integer("num_slots", 8, "JAX engine slots.")
_CTX = flags.DEFINE_integer("cache_len", 2048, "Context per slot / llama.cpp n_ctx.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per workload.")
_WORKLOADS = flags.DEFINE_list("workloads", ["prefill", "decode", "sim8"], "Which to run.")
_PREFILL = flags.DEFINE_integer("prefill_tokens", 1000, "Prompt tokens of the prefill request.")
_DECODE = flags.DEFINE_integer("decode_tokens", 128, "New tokens of the decode request.")
_SIM_PROMPT = flags.DEFINE_integer("sim_prompt_tokens", 400, "Prompt tokens of a sim8 request.")
_SIM_TOKENS = flags.DEFINE_integer("sim_max_tokens", 128, "max_tokens of a sim8 request.")
_SIM_REQUESTS = flags.DEFINE_integer("sim_requests", 16, "Requests per sim8 pass.")
_CONC = flags.DEFINE_integer("concurrency", 8, "Requests in flight in sim8.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 900.0, "Per-request timeout.")
_STARTUP = flags.DEFINE_float("startup_timeout_s", 900.0, "Per-server startup timeout.")
# Internal: this file as the JAX server process.
_SERVE_JAX = flags.DEFINE_bool("serve_jax", False, "Internal: serve the JAX model and block.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Internal (--serve_jax): weight dtype.")
_PORT = flags.DEFINE_integer("port", 0, "Internal (--serve_jax): port.")
_PARENT = flags.DEFINE_integer("parent_pid", None, "Internal (--serve_jax): exit with this pid.")

TOPICS = ["a lost passport", "a delayed flight to Lisbon", "a broken washing machine",
          "a refund for concert tickets", "booking a dentist appointment", "a late pizza order",
          "changing a phone plan", "a hotel room with no hot water", "renewing a library card",
          "a parcel sent to the wrong address", "splitting a restaurant bill",
          "a gym membership cancellation", "a car rental upgrade", "a missing bank transfer",
          "a noisy neighbour", "a train ticket exchange"]
USER_SCHEMA = {"type": "object",
               "properties": {"thought": {"type": "string", "maxLength": 160},
                              "response": {"type": "string", "maxLength": 200},
                              "reward": {"type": "integer", "enum": [-1, 0, 1]}},
               "required": ["thought", "response", "reward"], "additionalProperties": False,
               "x-guidance": {"whitespace_flexible": False}}


# ----------------------------------------------------------------------------- the JAX server
def serve_jax() -> None:
  """Loads the model in --dtype, serves it on 127.0.0.1:--port until SIGTERM or the parent dies."""
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from trustee_jax.chat import ChatFormat  # noqa: PLC0415
  from trustee_jax.models import weights  # noqa: PLC0415
  from trustee_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415
  from trustee_jax.sampling.constrained import GrammarCompiler  # noqa: PLC0415
  from trustee_jax.sampling.engine import Engine  # noqa: PLC0415
  from trustee_jax.serving.server import ServerThread, Simulator  # noqa: PLC0415
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  if _PARENT.value:
    die_with_parent(_PARENT.value, stop.set)
  t0 = time.perf_counter()
  path = None if _JAX_MODEL.value == "smollm2" else _JAX_MODEL.value
  net = weights.load_gguf(path, param_dtype=_DTYPE.value)
  tok = load_tokenizer("smollm2" if path is None else path)
  grammar = GrammarCompiler(tok.llguidance_tokenizer(net.cfg.vocab_size), net.cfg.vocab_size)
  engine = Engine(net, num_slots=_SLOTS.value, cache_len=_CTX.value, decode_fn=tok.decode,
                  grammar_compiler=grammar)
  sim = Simulator(engine, ChatFormat(tok), tok, f"jax-{_DTYPE.value}")
  server = ServerThread(sim.app(), "127.0.0.1", _PORT.value)
  try:
    server.start()
    print(f"jax {_DTYPE.value} serving at {server.url} (loaded in "
          f"{time.perf_counter() - t0:.1f}s)", flush=True)
    while not stop.wait(1.0):
      pass
  finally:
    server.stop(timeout_s=30)
    sim.close()


# ------------------------------------------------------------------------- backend processes
class Backend:
  """One or more server processes of one kind; `urls[0]` serves the single-request workloads."""

  def __init__(self, name: str, cmds: list[list[str]], logdir: pathlib.Path):
    self.name, self.cmds, self.logdir = name, cmds, logdir
    self.procs: list[subprocess.Popen] = []
    self.urls: list[str] = []
    self.startup_s = 0.0

  def start(self) -> None:
    t0 = time.perf_counter()
    for i, cmd in enumerate(self.cmds):
      port = free_port()
      log = open(self.logdir / f"{self.name}.{i}.log", "w")  # noqa: SIM115
      self.procs.append(subprocess.Popen([*cmd, f"--port={port}", f"--parent_pid={os.getpid()}"],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True))
      self.urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(self.procs, self.urls):
      deadline = time.monotonic() + _STARTUP.value
      while True:
        if proc.poll() is not None:
          raise RuntimeError(f"{self.name} exited ({proc.returncode}) while starting: "
                             f"{self.log_tail()}")
        try:
          if httpx.get(url + "/health", timeout=5).status_code == 200:
            break
        except httpx.HTTPError:
          pass
        if time.monotonic() > deadline:
          raise TimeoutError(f"{self.name} not healthy within {_STARTUP.value}s")
        time.sleep(1.0)
    self.startup_s = round(time.perf_counter() - t0, 1)
    print(f"[{self.name}] up in {self.startup_s}s at {self.urls}", flush=True)

  def log_tail(self, n: int = 2000) -> str:
    return "".join((self.logdir / f"{self.name}.{i}.log").read_text()[-n:]
                   for i in range(len(self.procs)))

  def stop(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for proc in self.procs:
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def backends(logdir: pathlib.Path, gguf: str) -> list[Backend]:
  out = []
  jax_model = gguf if _JAX_MODEL.value == "same" else _JAX_MODEL.value
  for dtype in _DTYPES.value:
    tag = "f32" if dtype == "float32" else "bf16" if dtype == "bfloat16" else dtype
    out.append(Backend(f"jax_{tag}", [[sys.executable, __file__, "--serve_jax",
                                       f"--jax_model={jax_model}", f"--dtype={dtype}",
                                       f"--num_slots={_SLOTS.value}",
                                       f"--cache_len={_CTX.value}"]], logdir))
  llama = [sys.executable, str(REPO / "launch/serve_llamacpp.py"), f"--model={gguf}",
           f"--n_ctx={_CTX.value}", f"--logits_all={_LOGITS_ALL.value}"]
  if _LLAMACPP.value:
    out.append(Backend("llamacpp", [[*llama, f"--n_threads={_THREADS.value}"]], logdir))
  if _LLAMACPP_SPLIT.value:
    k = _LLAMACPP_SPLIT.value
    out.append(Backend(f"llamacpp_{k}x1t", [[*llama, "--n_threads=1"]] * k, logdir))
  return out


# ----------------------------------------------------------------------------------- requests
def _filler(tokens_per_word: float, n_tokens: int, i: int, topic: str) -> list[dict]:
  """A user-simulator-shaped conversation of about n_tokens (system first, user last)."""
  system = (f"{i} Case {i}: you play a customer dealing with {topic}. Stay in character, reveal "
            "details only when asked, and answer in at most two sentences.")
  messages = [{"role": "system", "content": system}]
  turn, used = 0, 40 + len(system.split()) * tokens_per_word
  while used < n_tokens - 40:
    text = (f"(turn {turn} of case {i}) About {topic}: I already tried calling twice, the first "
            f"agent said it would take {turn + 2} days and the second asked for reference "
            f"number {1000 * i + turn}. I still have no answer and I am getting worried.")
    messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
    used += len(text.split()) * tokens_per_word + 5
    turn += 1
  if messages[-1]["role"] != "user":
    messages.append({"role": "user", "content": "What would you say next?"})
  return messages


class Prompts:
  """Fresh prompts of a given size: request k of any workload starts with the number k."""

  def __init__(self, tokenizer_source: str):
    self.counter = 1000
    self.tpw = 1.35  # tokens per word of the filler, measured below when a tokenizer loads
    try:
      from trustee_jax.chat import ChatFormat  # noqa: PLC0415
      from trustee_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415
      cf = ChatFormat(load_tokenizer(tokenizer_source))
      probe = _filler(1.35, 1000, 1, TOPICS[0])
      words = sum(len(m["content"].split()) for m in probe)
      self.tpw = 1.35 * len(cf.render(probe)) / (40 + words * 1.35 + 5 * (len(probe) - 1))
    except Exception as e:  # noqa: BLE001  (sizes are then approximate; usage is still exact)
      print(f"tokenizer for prompt sizing not loaded ({e}); sizes approximate", flush=True)

  def next_id(self) -> int:
    self.counter += 1
    return self.counter

  def long(self, n_tokens: int) -> list[dict]:
    i = self.next_id()
    return _filler(self.tpw, n_tokens, i, TOPICS[i % len(TOPICS)])

  def short(self) -> list[dict]:
    i = self.next_id()
    return [{"role": "user", "content": f"{i}. Write a long Python module with many small "
                                        "functions for parsing and validating dates, each with a "
                                        "docstring and doctests. Write all of it."}]


def _body(messages: list[dict], max_tokens: int, schema: dict | None = None) -> dict:
  body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
  if schema is not None:
    body["response_format"] = {"type": "json_schema", "json_schema": {
        "name": "user", "schema": schema, "strict": True}}
  return body


async def _post(http: httpx.AsyncClient, url: str, body: dict) -> dict:
  t0 = time.perf_counter()
  resp = await http.post(url + "/v1/chat/completions", json=body)
  wall = time.perf_counter() - t0
  if resp.status_code != 200:
    raise RuntimeError(f"{url}: {resp.status_code}: {resp.text[:400]}")
  raw = resp.json()
  choice = raw["choices"][0]
  return {"wall_s": wall, "prompt_tokens": raw["usage"]["prompt_tokens"],
          "completion_tokens": raw["usage"]["completion_tokens"],
          "finish": choice["finish_reason"], "text": choice["message"].get("content") or ""}


def run_bodies(backend: Backend, bodies: list[dict], concurrency: int) -> tuple[float, list]:
  async def go():
    limits = httpx.Limits(max_connections=max(concurrency, 1) * 2)
    async with httpx.AsyncClient(timeout=_TIMEOUT.value, limits=limits) as http:
      sem = asyncio.Semaphore(concurrency)

      async def one(k, body):
        async with sem:
          return await _post(http, backend.urls[k % len(backend.urls)], body)

      t0 = time.perf_counter()
      replies = await asyncio.gather(*[one(k, b) for k, b in enumerate(bodies)])
      return time.perf_counter() - t0, replies
  return asyncio.run(go())


def _valid(text: str) -> bool:
  try:
    jsonschema.validate(json.loads(text), USER_SCHEMA)
    return True
  except (ValueError, jsonschema.ValidationError):
    return False


def make_workloads(prompts: Prompts) -> dict:
  """name -> (make the round's bodies, run them on a backend -> figures)."""
  def prefill_bodies():
    return [_body(prompts.long(_PREFILL.value), 1)]

  def prefill_run(b, bodies):
    _, (r,) = run_bodies(b, bodies, 1)
    return {"wall_s": round(r["wall_s"], 3), "prompt_tokens": r["prompt_tokens"],
            "tok_per_s": round(r["prompt_tokens"] / r["wall_s"], 1)}

  def decode_bodies():
    return [_body(prompts.short(), 1), _body(prompts.short(), _DECODE.value)]

  def decode_run(b, bodies):
    _, (one,) = run_bodies(b, bodies[:1], 1)
    _, (full,) = run_bodies(b, bodies[1:], 1)
    n = full["completion_tokens"]
    return {"wall_s": round(full["wall_s"], 3), "prefill_wall_s": round(one["wall_s"], 3),
            "prompt_tokens": full["prompt_tokens"], "completion_tokens": n,
            "finish": full["finish"],
            "tok_per_s": round((n - 1) / max(full["wall_s"] - one["wall_s"], 1e-6), 2),
            "tok_per_s_incl_prefill": round(n / full["wall_s"], 2)}

  def sim_bodies():
    return [_body(prompts.long(_SIM_PROMPT.value), _SIM_TOKENS.value, USER_SCHEMA)
            for _ in range(_SIM_REQUESTS.value)]

  def sim_run(b, bodies):
    wall, replies = run_bodies(b, bodies, _CONC.value)
    lat = sorted(r["wall_s"] for r in replies)
    return {"wall_s": round(wall, 2), "requests": len(bodies),
            "req_per_s": round(len(bodies) / wall, 3),
            "completion_tok_per_s": round(sum(r["completion_tokens"] for r in replies) / wall, 2),
            "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in replies)),
            "completion_tokens_mean": round(statistics.mean(r["completion_tokens"]
                                                            for r in replies), 1),
            "latency_p50_s": round(statistics.median(lat), 2), "latency_max_s": round(lat[-1], 2),
            "finish": sorted({r["finish"] for r in replies}),
            "valid_json": sum(_valid(r["text"]) for r in replies)}

  return {"prefill": (prefill_bodies, prefill_run, "tok_per_s"),
          "decode": (decode_bodies, decode_run, "tok_per_s"),
          "sim8": (sim_bodies, sim_run, "req_per_s")}


# ------------------------------------------------------------------------------------- driver
def _machine() -> dict:
  cpu = ""
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  info = {"cpu": cpu, "cores": os.cpu_count()}
  with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: PLC0415
    info["llama_cpp_python"] = llama_cpp.__version__
  with contextlib.suppress(ImportError):
    import jax  # noqa: PLC0415
    info["jax"] = jax.__version__
  return info


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def resolve_gguf() -> str:
  """--gguf, or the packaged 0.5B (a clear error when its packages are missing)."""
  if _GGUF.value:
    return _GGUF.value
  from trustee_jax.models import loading  # noqa: PLC0415
  return str(loading.gguf_path("qwen2.5-coder-0.5b"))


def _interrupt(*_):
  raise KeyboardInterrupt


def main(argv):
  del argv
  if _SERVE_JAX.value:
    return serve_jax()
  logging.getLogger("httpx").setLevel(logging.WARNING)
  gguf = resolve_gguf()
  result = {"gguf": gguf, "jax_model": gguf if _JAX_MODEL.value == "same" else _JAX_MODEL.value,
            "machine": _machine(), "load_start": _load(),
            "settings": {"rounds": _ROUNDS.value, "num_slots": _SLOTS.value,
                         "cache_len": _CTX.value, "llamacpp_threads": _THREADS.value,
                         "llamacpp_logits_all": _LOGITS_ALL.value,
                         "concurrency": _CONC.value, "sim_requests": _SIM_REQUESTS.value}}
  prompts = Prompts(gguf)
  workloads = {k: v for k, v in make_workloads(prompts).items() if k in _WORKLOADS.value}
  logdir = pathlib.Path(tempfile.mkdtemp(prefix="simulator_backends."))
  print(f"server logs in {logdir}", flush=True)
  bs = backends(logdir, gguf)
  figures: dict = {b.name: {} for b in bs}
  t_start = time.perf_counter()
  signal.signal(signal.SIGTERM, _interrupt)  # stop the servers and print what was measured
  try:
    for b in bs:
      b.start()
      figures[b.name]["startup_s"] = b.startup_s
    for name, (make, run, key) in workloads.items():
      warm = make()
      for b in bs:  # warm-up (JAX compiles its shapes here)
        t0 = time.perf_counter()
        run(b, warm)
        figures[b.name].setdefault("warmup_s", {})[name] = round(time.perf_counter() - t0, 1)
      for r in range(_ROUNDS.value):
        bodies = make()
        for b in (bs if r % 2 == 0 else bs[::-1]):
          load0 = _load()[0]
          fig = run(b, bodies)
          fig["load_1m"] = [load0, _load()[0]]
          figures[b.name].setdefault(name, {"runs": []})["runs"].append(fig)
          print(f"[{b.name}] {name} round {r}: {key}={fig[key]} {json.dumps(fig)}", flush=True)
      for b in bs:
        runs = figures[b.name][name]["runs"]
        figures[b.name][name]["median_" + key] = round(statistics.median(x[key] for x in runs), 3)
  except KeyboardInterrupt:
    result["interrupted"] = True
    print("interrupted: stopping the servers", flush=True)
  finally:
    for b in bs:
      b.stop()
  result["backends"] = figures
  result["summary"] = {b.name: {f"{w}_{k}": figures[b.name].get(w, {}).get("median_" + k)
                                for w, (_, _, k) in workloads.items()} for b in bs}
  result["load_end"] = _load()
  result["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
  app.run(main)
