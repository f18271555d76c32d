"""Embedded simulator server throughput: 16 concurrent requests against the same 16 one by one.

  python benchmarks/simulator.py [--model smollm2|qwen2.5-coder-0.5b|...] [--dtype bfloat16]
      [--num_slots 16] [--reps 1]

Mixes: short chats (short prompt, a few dozen new tokens) and user-simulator-shaped requests
(~1k-token prompt, at most 64 new tokens); then json_schema-constrained against free text,
both concurrent. Every request goes through HTTP to the server on 127.0.0.1. Sampling is
greedy, so both modes generate the same tokens. A warm-up pass compiles the shapes first;
the timed passes alternate sequential and concurrent so load from other processes on the
machine hits both alike. The last line printed is one JSON object with every figure.
"""
import asyncio
import contextlib
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jax  # noqa: E402
import jsonschema  # noqa: E402
from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2", "Model to serve, named as in "
                             "launch/serve_simulator.py (a packaged GGUF, an HF dir, a shape).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Weights and compute dtype "
                           "(default: the model's, see launch/serve_simulator.py).")
_SLOTS = flags.DEFINE_integer("num_slots", 16, "Engine slots.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 2048, "Context per slot.")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Requests per mix.")
_SHORT_TOKENS = flags.DEFINE_integer("short_tokens", 32, "max_tokens of a short chat.")
_LONG_PROMPT = flags.DEFINE_integer("long_prompt", 1000, "Prompt tokens of a user-sim request.")
_LONG_TOKENS = flags.DEFINE_integer("long_tokens", 64, "max_tokens of a user-sim request.")
_REPS = flags.DEFINE_integer("reps", 1, "Timed (sequential, concurrent) pairs per mix.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer of --model, served and building "
                                 "the prompts (default: the model's own).")
_ONE_SLOT = flags.DEFINE_bool("one_slot_baseline", True, "Also time the sequential passes on "
                              "a 1-slot server.")

MIXES = ("short_chat", "user_sim_1k")

TOPICS = ["a lost passport", "a delayed flight to Lisbon", "a broken washing machine",
          "a refund for concert tickets", "booking a dentist appointment", "a late pizza order",
          "changing a phone plan", "a hotel room with no hot water", "renewing a library card",
          "a parcel sent to the wrong address", "splitting a restaurant bill",
          "a gym membership cancellation", "a car rental upgrade", "a missing bank transfer",
          "a noisy neighbour", "a train ticket exchange", "a faulty laptop charger",
          "planning a birthday party", "a leaking kitchen tap", "a visa application"]
VERDICT = {"type": "object", "additionalProperties": False, "required": ["reason", "score"],
           "properties": {"reason": {"type": "string", "maxLength": 120},
                          "score": {"type": "integer", "minimum": 1, "maximum": 5}}}


def short_chats(n: int, max_tokens: int) -> list[dict]:
  return [{"messages": [{"role": "user", "content": f"In one sentence, how do I deal with "
                                                    f"{TOPICS[i % len(TOPICS)]}?"}],
           "max_tokens": max_tokens} for i in range(n)]


def user_sim_chats(n: int, prompt_tokens: int, max_tokens: int, chat_format) -> list[dict]:
  """Distinct ~prompt_tokens conversations shaped like the user simulator's (no shared prefix)."""
  out = []
  for i in range(n):
    topic = TOPICS[i % len(TOPICS)]
    system = (f"Case {i}: you play a customer dealing with {topic}. Stay in character, reveal "
              "details only when asked, and answer in at most two sentences.\n")
    messages = [{"role": "system", "content": system}]
    turn = 0
    while len(chat_format.render(messages)) < prompt_tokens - 60:
      messages.append({"role": "user" if turn % 2 else "assistant", "content": (
          f"(turn {turn} of case {i}) About {topic}: I already tried calling twice, the first "
          f"agent said it would take {turn + 2} days and the second asked for reference "
          f"number {1000 * i + turn}. I still have no answer and I am getting worried.")})
      turn += 1
    if messages[-1]["role"] != "user":
      messages.append({"role": "user", "content": "What would you say next?"})
    out.append({"messages": messages, "max_tokens": max_tokens})
  return out


async def _one(http, body: dict) -> dict:
  resp = await http.post("/v1/chat/completions", json={"model": "bench", "temperature": 0,
                                                       **body})
  if resp.status_code != 200:
    raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
  return resp.json()


async def run_mix(url: str, bodies: list[dict], concurrent: bool) -> dict:
  """Sends the bodies together or one after another; tokens/s over the wall time."""
  async with httpx.AsyncClient(base_url=url, timeout=3600,
                               limits=httpx.Limits(max_connections=64)) as http:
    start = time.perf_counter()
    if concurrent:
      replies = await asyncio.gather(*[_one(http, b) for b in bodies])
    else:
      replies = [await _one(http, b) for b in bodies]
    wall = time.perf_counter() - start
  out_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
  in_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
  return {"wall_s": round(wall, 2), "completion_tokens": out_tokens, "prompt_tokens": in_tokens,
          "out_tok_per_s": round(out_tokens / wall, 2), "req_per_s": round(len(bodies) / wall, 3),
          "finish": sorted({r["choices"][0]["finish_reason"] for r in replies}),
          "texts": [r["choices"][0]["message"]["content"] for r in replies]}


def timed(sim, url: str, bodies: list[dict], concurrent: bool) -> dict:
  """One pass from cold prompt caches (else a pass would reuse the previous one's prefill)."""
  sim.engine.update_params(sim.engine.state)  # drops every slot's cached prefix
  return asyncio.run(run_mix(url, bodies, concurrent))


def compare(sim, url: str, bodies: list[dict], reps: int) -> dict:
  """Alternating sequential/concurrent passes; the speedup is of the median wall times."""
  seq, conc = [], []
  for _ in range(reps):
    seq.append(timed(sim, url, bodies, concurrent=False))
    conc.append(timed(sim, url, bodies, concurrent=True))
  same = all(s["texts"] == c["texts"] for s, c in zip(seq, conc))
  s_wall = statistics.median(r["wall_s"] for r in seq)
  c_wall = statistics.median(r["wall_s"] for r in conc)
  strip = lambda r: {k: v for k, v in r.items() if k != "texts"}  # noqa: E731
  return {"sequential": [strip(r) for r in seq], "concurrent": [strip(r) for r in conc],
          "speedup": round(s_wall / c_wall, 2), "same_outputs": same}


def _bodies(n: int, chat_format) -> dict[str, list[dict]]:
  judge = [{"messages": [{"role": "user", "content": f"Rate, 1 to 5, how well an agent "
                                                     f"handled {TOPICS[i % len(TOPICS)]}. "
                                                     "Answer in JSON with reason and score."}],
            "max_tokens": 64} for i in range(n)]
  return {"short_chat": short_chats(n, _SHORT_TOKENS.value),
          "user_sim_1k": user_sim_chats(n, _LONG_PROMPT.value, _LONG_TOKENS.value, chat_format),
          "free_text": judge,
          "json_schema": [{**b, "response_format": {"type": "json_schema", "json_schema": {
              "name": "verdict", "schema": VERDICT}}} for b in judge]}


@contextlib.contextmanager
def serving(num_slots: int):
  """A fresh embedded server over SmolLM2 (or --model) with `num_slots` slots."""
  from trustee_jax.serving.server import ServerThread, load_simulator  # noqa: PLC0415
  t0 = time.perf_counter()
  sim = load_simulator(_MODEL.value, _TOKENIZER.value, num_slots=num_slots,
                       cache_len=_CACHE_LEN.value, dtype=_DTYPE.value)
  try:
    with ServerThread(sim.app()) as server:
      print(f"[{num_slots} slots] loaded in {time.perf_counter() - t0:.1f}s", flush=True)
      yield sim, server.url
  finally:
    sim.close()


def main_server(bodies: dict[str, list[dict]]) -> dict:
  """On the --num_slots server: sequential against concurrent, json_schema against free text."""
  n = _REQUESTS.value
  results: dict = {"num_slots": _SLOTS.value, "requests": n}
  with serving(_SLOTS.value) as (sim, url):
    results["model"], results["dtype"] = sim.model_name, sim.engine.cfg.dtype
    t0 = time.perf_counter()
    for batch in bodies.values():  # compiles the shapes of both modes
      timed(sim, url, batch, concurrent=True)
      timed(sim, url, batch[:2], concurrent=False)
    results["warmup_s"] = round(time.perf_counter() - t0, 1)
    for name in MIXES:
      r = results[name] = compare(sim, url, bodies[name], _REPS.value)
      print(f"{name}: sequential {r['sequential'][-1]['out_tok_per_s']} tok/s, concurrent "
            f"{r['concurrent'][-1]['out_tok_per_s']} tok/s, speedup {r['speedup']}x", flush=True)
    free = timed(sim, url, bodies["free_text"], concurrent=True)
    schema = timed(sim, url, bodies["json_schema"], concurrent=True)
    valid = sum(_valid(t) for t in schema.pop("texts"))
    free.pop("texts")
    results["json_schema_vs_free"] = {
        "free": free, "json_schema": schema, "valid_json": f"{valid}/{n}",
        "tok_per_s_ratio": round(schema["out_tok_per_s"] / free["out_tok_per_s"], 2)}
    print(f"json_schema {schema['out_tok_per_s']} tok/s vs free {free['out_tok_per_s']} tok/s "
          f"({valid}/{n} valid)", flush=True)
    results["engine_stats"] = dict(sim.engine.stats)
  return results


def one_slot_baseline(bodies: dict[str, list[dict]], results: dict) -> None:
  """The same requests one by one on a 1-slot server (decode steps then run one row, not 16)."""
  with serving(1) as (sim, url):
    for name in MIXES:
      timed(sim, url, bodies[name][:2], concurrent=False)  # compiles
      seq = timed(sim, url, bodies[name], concurrent=False)
      conc_wall = statistics.median(r["wall_s"] for r in results[name]["concurrent"])
      results[name]["sequential_1_slot"] = {k: v for k, v in seq.items() if k != "texts"}
      results[name]["speedup_vs_1_slot"] = round(seq["wall_s"] / conc_wall, 2)
      print(f"{name}: 1-slot sequential {seq['out_tok_per_s']} tok/s, speedup of "
            f"{_SLOTS.value} concurrent over it {results[name]['speedup_vs_1_slot']}x", flush=True)


def main(argv):
  del argv
  cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from trustee_jax.chat import ChatFormat  # noqa: PLC0415
  from trustee_jax.models import loading  # noqa: PLC0415
  from trustee_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415
  tok = load_tokenizer(_TOKENIZER.value or loading.default_tokenizer(_MODEL.value))
  bodies = _bodies(_REQUESTS.value, ChatFormat(tok))
  results = main_server(bodies)
  if _ONE_SLOT.value:
    one_slot_baseline(bodies, results)
  print(json.dumps(results))


def _valid(text: str) -> bool:
  try:
    jsonschema.validate(json.loads(text), VERDICT)
    return True
  except (ValueError, jsonschema.ValidationError):
    return False


if __name__ == "__main__":
  app.run(main)
