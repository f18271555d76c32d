"""Engine tests on the real SmolLM2-135M: parity with transformers, logprobs, seeds, stops,
compile counts, continuous batching, prefix reuse, bad input, and sampling on a mesh.

One model, one tokenizer and one engine are shared by the module; generations are short.
"""
import asyncio
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trustee_jax.models import packaged, tokenizer, weights
from trustee_jax.sampling import constrained
from trustee_jax.sampling.engine import (Engine, EngineError, QueueFullError, RequestError,
                                         SamplingParams)

NUM_SLOTS = 4
CACHE_LEN = 512
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a young girl who loved to read books "
    "about the sea. One day she",
    "import numpy as np\n\n\ndef fibonacci(n):",
    "List three facts about the planet Mars, the fourth planet from the Sun, and explain "
    "why it appears red when seen from the Earth at night. First,",
]
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@pytest.fixture(scope="module")
def smol():
  return weights.load_gguf(), tokenizer.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def engine(smol):
  model, tok = smol
  with Engine(model, num_slots=NUM_SLOTS, cache_len=CACHE_LEN, decode_fn=tok.decode) as eng:
    yield eng


@pytest.fixture(scope="module")
def prompt_ids(smol):
  ids = [smol[1].encode(p) for p in PROMPTS]
  assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
  return ids


def _fresh(smol, **kw) -> Engine:
  """Another engine on the same model with the same shapes (so jit reuses the executables)."""
  kw = {"num_slots": NUM_SLOTS, "cache_len": CACHE_LEN, "decode_fn": smol[1].decode, **kw}
  return Engine(smol[0], **kw)


def _greedy(n: int, **kw) -> SamplingParams:
  return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def test_greedy_matches_transformers_generate(smol, engine, prompt_ids):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  new = 32
  got = engine.generate(prompt_ids, _greedy(new))  # all four prefilled and decoded together
  path = packaged.smollm2_gguf_path()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  hf.generation_config.eos_token_id = None  # the engine was given no stop ids either
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=0)
  width = max(map(len, prompt_ids))  # one left-padded batch, as transformers batches
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
  with torch.inference_mode():
    want = hf.generate(ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
  for completion, expected in zip(got, want):
    assert len(expected) == new
    assert completion.tokens == expected, smol[1].decode(completion.tokens)
    assert completion.finish_reason == "length"


def _full_logprobs(model, ids: list[int], temperature: float) -> np.ndarray:
  """log_softmax(logits / T) of a full forward without cache, [len(ids), vocab]."""
  width = 128
  assert len(ids) <= width
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids)] = ids
  positions = np.full((1, width), -1, np.int32)
  positions[0, :len(ids)] = np.arange(len(ids))
  logits = _forward(model, jnp.asarray(tokens), jnp.asarray(positions))
  return np.asarray(jax.nn.log_softmax(logits[0, :len(ids)] / temperature, axis=-1))


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions)[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward(smol, engine, prompt_ids, temperature):
  params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=11, top_logprobs=5)
  got = engine.generate(prompt_ids[:2], params)
  for ids, c in zip(prompt_ids[:2], got):
    full = _full_logprobs(smol[0], ids + c.tokens, temperature)
    rows = full[len(ids) - 1:len(ids) + len(c.tokens) - 1]
    want = rows[np.arange(len(c.tokens)), c.tokens]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4, rtol=0)
    for row, top in zip(rows, c.top_logprobs):
      assert len(top) == 5
      top_ids = [t for t, _ in top]
      np.testing.assert_allclose([v for _, v in top], row[top_ids], atol=1e-4, rtol=0)
      np.testing.assert_allclose(sorted(row)[-5:][::-1], [v for _, v in top], atol=1e-4, rtol=0)


def test_greedy_logprobs_are_at_temperature_one(smol, engine, prompt_ids):
  c = engine.generate([prompt_ids[0]], _greedy(8))[0]
  full = _full_logprobs(smol[0], prompt_ids[0] + c.tokens, 1.0)
  rows = full[len(prompt_ids[0]) - 1:-1]
  assert c.tokens == list(rows.argmax(-1))
  np.testing.assert_allclose(c.logprobs, rows.max(-1), atol=1e-4, rtol=0)


def test_seeds_reproducible_and_independent_of_batch(engine, prompt_ids):
  params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234)
  alone = engine.generate([prompt_ids[2]], params)[0].tokens
  assert engine.generate([prompt_ids[2]], params)[0].tokens == alone
  others = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=s) for n, s in
            [(9, 1), (30, 2), (14, 3)]]
  mixed = engine.generate([prompt_ids[0], prompt_ids[1], prompt_ids[2], prompt_ids[3]],
                          [others[0], others[1], params, others[2]])
  assert mixed[2].tokens == alone
  crowded = engine.generate([prompt_ids[2]] * 3, [params, others[1], params])
  assert crowded[0].tokens == alone and crowded[2].tokens == alone
  assert crowded[1].tokens != alone
  other_seed = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4321)
  assert engine.generate([prompt_ids[2]], other_seed)[0].tokens != alone


def test_stop_token_ids_stop_strings_and_length(smol, engine, prompt_ids):
  tok = smol[1]
  ids = prompt_ids[1]
  full = engine.generate([ids], _greedy(24))[0]
  assert (full.finish_reason, full.stop, len(full.tokens)) == ("length", None, 24)

  stop_id = full.tokens[6]
  first = full.tokens.index(stop_id)
  c = engine.generate([ids], _greedy(24, stop_token_ids=(stop_id, 99999)))[0]
  assert c.tokens == full.tokens[:first + 1]
  assert (c.finish_reason, c.stop) == ("stop", stop_id)

  text = tok.decode(full.tokens)
  word = text[len(tok.decode(full.tokens[:8])):][:6]
  assert word and text.count(word) >= 1
  c = engine.generate([ids], _greedy(24, stop_strings=("never appears here", word)))[0]
  assert (c.finish_reason, c.stop) == ("stop", word)
  assert word in tok.decode(c.tokens) and word not in tok.decode(c.tokens[:-1])
  assert c.tokens == full.tokens[:len(c.tokens)]

  c = engine.generate([ids], _greedy(7))[0]
  assert (c.tokens, c.finish_reason) == (full.tokens[:7], "length")
  c = engine.generate([ids], _greedy(1))[0]
  assert (c.tokens, c.finish_reason) == (full.tokens[:1], "length")


class _CompileCounter:
  """Counts lowerings to MLIR (every jit compile on any thread, cached on disk or not)."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def __call__(self, event, duration, **kw):
    if event == LOWERING_EVENT:
      with self._lock:
        self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_compilations_fixed_within_a_bucket(smol, engine):
  vocab = smol[0].cfg.vocab_size
  rng = np.random.default_rng(0)
  prompt = lambda n: rng.integers(100, vocab, n).tolist()  # noqa: E731
  params = _greedy(8)
  engine.generate([prompt(20)], params)  # warm: prefill width 32, one row, attend 128
  engine.generate([prompt(18), prompt(29)], params)  # and two rows
  with _CompileCounter() as counter:
    for n in (17, 21, 25, 32):
      engine.generate([prompt(n)], params)
    engine.generate([prompt(19), prompt(31)], [params, SamplingParams(max_new_tokens=5,
                                                                      temperature=0.8, seed=3)])
  assert counter.count == 0
  with _CompileCounter() as counter:  # the listener does see compiles: a new width bucket
    engine.generate([prompt(40)], params)
  assert counter.count > 0


def _run_alone(engine, prompts, params):
  return [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]


def test_staggered_requests_match_running_alone(engine, prompt_ids):
  prompts = prompt_ids + prompt_ids[:2]
  params = [_greedy(16), SamplingParams(max_new_tokens=10, temperature=1.0, seed=5),
            _greedy(6), SamplingParams(max_new_tokens=20, temperature=0.7, seed=6),
            SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, top_k=20), _greedy(8)]
  alone = _run_alone(engine, prompts, params)
  results = [None] * len(prompts)

  def client(i):
    time.sleep(0.1 * i)
    results[i] = engine.submit(prompts[i], params[i]).result(timeout=300).tokens

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == alone


def test_asyncio_clients_get_their_own_results(engine, prompt_ids):
  params = [_greedy(5), _greedy(9), SamplingParams(max_new_tokens=7, temperature=1.0, seed=9)]
  alone = _run_alone(engine, prompt_ids[:3], params)

  async def main():
    return await asyncio.gather(*(engine.agenerate(p, sp) for p, sp in
                                  zip(prompt_ids[:3], params)))

  assert [c.tokens for c in asyncio.run(main())] == alone


def test_continued_request_reuses_cache_and_matches_full_prefill(smol, engine, prompt_ids):
  tok = smol[1]
  turn1 = engine.generate([prompt_ids[1]], _greedy(16))[0]
  history = prompt_ids[1] + turn1.tokens
  prompt2 = history + tok.encode("\nAnd then she")
  turn2 = engine.generate([prompt2], _greedy(24))[0]
  assert turn2.cached_tokens == len(history) - 1  # the last sampled token was never fed
  with _fresh(smol) as fresh:
    whole = fresh.generate([prompt2], _greedy(24))[0]
  assert whole.cached_tokens == 0
  assert turn2.tokens == whole.tokens

  # Evicted: other requests take every slot, so the next turn is re-prefilled.
  history3 = prompt2 + turn2.tokens
  engine.generate([tok.encode(f"Filler request number {i}:") for i in range(NUM_SLOTS)],
                  _greedy(2))
  prompt3 = history3 + tok.encode(" The end.")
  turn3 = engine.generate([prompt3], _greedy(8))[0]
  assert turn3.cached_tokens == 0
  with _fresh(smol) as fresh:
    assert fresh.generate([prompt3], _greedy(8))[0].tokens == turn3.tokens


def test_bad_requests_raise_clear_errors(smol, engine):
  vocab = smol[0].cfg.vocab_size
  cases = [
      ([], SamplingParams(), "empty prompt"),
      ([1] * CACHE_LEN, SamplingParams(max_new_tokens=1), "exceeds the context"),
      ([1] * (CACHE_LEN - 10), SamplingParams(max_new_tokens=11), "exceeds the context"),
      ([vocab], SamplingParams(), "token ids"),
      ([-1], SamplingParams(), "token ids"),
      ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
      ([1], SamplingParams(temperature=-1.0), "temperature"),
      ([1], SamplingParams(top_p=0.0), "top_p"),
      ([1], SamplingParams(top_logprobs=21), "top_logprobs"),
      ([1], SamplingParams(json_schema={"type": "object"}), "grammar compiler"),
  ]
  for prompt, params, message in cases:
    with pytest.raises(RequestError, match=message):
      engine.submit(prompt, params)
  with Engine(smol[0], num_slots=NUM_SLOTS, cache_len=CACHE_LEN) as no_decode:
    with pytest.raises(RequestError, match="decode_fn"):
      no_decode.submit([1, 2], SamplingParams(stop_strings=("x",)))
  with pytest.raises(ValueError, match="cache_len"):
    Engine(smol[0], cache_len=smol[0].cfg.max_position_embeddings + 1)


@pytest.mark.parametrize("schema, message", [
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "Unsatisfiable.*minimum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, "Unsatisfiable"),
    ('{"type": "object",', "EOF while parsing"),
])
def test_invalid_or_unsatisfiable_schema_is_rejected(smol, schema, message):
  model, tok = smol
  compiler = constrained.GrammarCompiler(tok.llguidance_tokenizer(model.cfg.vocab_size),
                                         model.cfg.vocab_size)
  with _fresh(smol, grammar_compiler=compiler) as eng:
    with pytest.raises(RequestError, match=message):
      eng.submit([1, 2, 3], SamplingParams(json_schema=schema))
    assert eng.stats["requests_done"] == 0


def test_queue_full_is_an_error_and_accepted_requests_finish(smol, prompt_ids):
  with _fresh(smol, max_queue=2) as eng:
    accepted, rejected = [], 0
    for i in range(NUM_SLOTS + 6):
      try:
        accepted.append(eng.submit(prompt_ids[i % 4], _greedy(24)))
      except QueueFullError as e:
        assert "queue is full" in str(e)
        rejected += 1
    assert rejected > 0 and len(accepted) >= 2
    for f in concurrent.futures.as_completed(accepted, timeout=300):
      assert len(f.result().tokens) == 24
    assert eng.stats["rejected_queue_full"] == rejected
  with pytest.raises(EngineError, match="shut down"):
    eng.submit([1, 2], _greedy(2))


def test_close_fails_requests_in_flight_without_hanging(smol, prompt_ids):
  eng = _fresh(smol)
  futures = [eng.submit(p, _greedy(400)) for p in prompt_ids] + [
      eng.submit(prompt_ids[0], _greedy(400))]
  eng.close()
  for f in futures:
    with pytest.raises(EngineError):
      f.result(timeout=60)


_MESH_SCRIPT = """
import json, sys
import jax
from trustee_jax import sharding as shd
from trustee_jax.models import tokenizer, weights
from trustee_jax.sampling.engine import Engine, SamplingParams
assert len(jax.devices()) == 2, jax.devices()
mesh = shd.make_mesh((2, 1, 1))
model = weights.load_gguf(mesh=mesh)
tok = tokenizer.load_tokenizer("smollm2")
prompts = json.loads(sys.argv[1])
with Engine(model, num_slots={slots}, cache_len={cache_len}) as eng:
  out = eng.generate(prompts, SamplingParams(max_new_tokens={new}, temperature=0.0))
  spec = eng.cache.k.sharding.spec
print(json.dumps({{"tokens": [c.tokens for c in out], "cache_spec": [str(s) for s in spec]}}))
"""


def test_sampling_on_a_two_device_mesh_matches(smol, engine, prompt_ids):
  new = 16
  want = [c.tokens for c in engine.generate(prompt_ids, _greedy(new))]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  script = _MESH_SCRIPT.format(slots=NUM_SLOTS, cache_len=CACHE_LEN, new=new)
  root = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(prompt_ids)], env=env,
                        cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["tokens"] == want
  assert result["cache_spec"][1] == "data"  # the KV cache's slot axis is sharded over data


class _FaultOnce:
  """Wraps sampler.decode: the first call decoding `live` requests together consumes the
  donated KV cache (as a failed device step can) and raises; every other call passes through."""

  def __init__(self, decode, live: int):
    self.decode, self.live, self.fired = decode, live, 0

  def __call__(self, graphdef, state, layers, cache, counts, rows, last_tok, positions, *a, **kw):
    if not self.fired and int((np.asarray(positions) >= 0).sum()) == self.live:
      self.fired += 1
      for leaf in jax.tree_util.tree_leaves(cache):
        leaf.delete()
      raise RuntimeError("injected device fault")
    return self.decode(graphdef, state, layers, cache, counts, rows, last_tok, positions, *a, **kw)


def test_busy_seconds_count_device_steps_not_idle_waits(smol, prompt_ids):
  with _fresh(smol) as eng:
    t0 = time.perf_counter()
    eng.generate(prompt_ids[:2], _greedy(8))
    time.sleep(0.2)  # the step that resolved the last future adds its time as it ends
    busy = eng.metrics()["busy_seconds"]
    assert 0 < busy < time.perf_counter() - t0
    time.sleep(0.3)  # idle: no request, no device step
    assert eng.metrics()["busy_seconds"] == busy


def test_a_failed_step_fails_its_batch_then_the_engine_serves_again(monkeypatch):
  from trustee_jax.models.model_configs import get_model_config
  from trustee_jax.models.transformer import create_model
  from trustee_jax.sampling import engine as engine_module
  with Engine(create_model(get_model_config("tiny-llama")), num_slots=4, cache_len=128) as eng:
    prompts, greedy = [[5, 6, 7], [8, 9, 10, 11], [12, 13]], _greedy(24)
    before = [c.tokens for c in eng.generate(prompts, greedy)]
    fault = _FaultOnce(engine_module.sampler.decode, live=len(prompts))
    monkeypatch.setattr(engine_module.sampler, "decode", fault)
    futures = [eng.submit(p, greedy) for p in prompts]
    for f in futures:
      with pytest.raises(EngineError, match="engine step failed: RuntimeError: injected device"):
        f.result(timeout=120)
    assert fault.fired == 1
    metrics = eng.metrics()
    assert metrics["engine_errors"] == 1 and metrics["busy_slots"] == metrics["pending"] == 0
    assert metrics["running"]
    # A fresh cache replaced the consumed one: the same requests give the same tokens again.
    assert [c.tokens for c in eng.generate(prompts, greedy)] == before


def test_a_weight_swap_mid_request_leaves_nothing_to_reuse(smol, prompt_ids):
  """A request still decoding when the weights change finishes, but its slot's cache then mixes
  keys of both weights (and its token list no longer starts at position 0): none of it may be
  offered to a later prompt."""
  with _fresh(smol) as eng:
    future = eng.submit(prompt_ids[0], _greedy(160))
    deadline = time.monotonic() + 120
    while eng.metrics()["busy_slots"] == 0 and time.monotonic() < deadline:
      time.sleep(0.01)
    eng.update_params(eng.state)
    assert not future.done(), "the request ended before the swap: the test proves nothing"
    done = future.result(timeout=300)
    assert len(done.tokens) == 160
    assert [s.cached_ids for s in eng.slots] == [[]] * NUM_SLOTS
    again = eng.generate([prompt_ids[0] + done.tokens], _greedy(2))[0]
    assert again.cached_tokens == 0
