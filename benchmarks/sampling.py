"""Sampling engine against transformers `generate`, and the engine's own scheduling gains.

  python benchmarks/sampling.py                     # CPU: SmolLM2-135M from the GGUF
  python benchmarks/sampling.py --gpu               # GPU: Qwen3-8B shape, random bf16 weights
  python benchmarks/sampling.py --model tiny-qwen3 --random_weights --batches 1,4  # smoke test

Sections (all in one run, contenders alternating, compile time reported apart, equal work
asserted):
  decode:       B prompts x N new tokens, greedy: Engine(num_slots=B) vs transformers
                `generate` (min_new_tokens = max_new_tokens, EOS off), torch on fixed threads;
                at batch 1 also against the bound of reading every weight once a token at
                the bandwidth common.memory_bandwidth_probe measures in the same run (CPU).
  constrained:  B requests under a JSON schema vs the same B unconstrained, each request
                cut to exactly the length its constrained run had (greedy, so fixed).
  makespan:     16 requests arriving staggered (evenly over the first half of the time one
                static batch of them takes), max_new_tokens spread 16..256: the
                continuous-batching engine vs Engine(static_batching=True) fed the same
                arrivals, and vs one static batch formed when the last request arrives.
  conversation: a 4-turn conversation continued with prefix reuse vs re-prefilled
                (the engine's caches dropped between turns).
  breakdown:    ms per decode step: the engine's jitted decode, the model step alone, and
                the sampling alone (where the time goes).
The last line is one JSON object.
"""
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from trustee_jax.models import loading, model_configs, tokenizer  # noqa: E402
from trustee_jax.models.hf_config import config_to_hf  # noqa: E402
from trustee_jax.models.transformer import create_model  # noqa: E402
from trustee_jax.sampling import constrained  # noqa: E402
from trustee_jax.sampling.engine import Engine, SamplingParams  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2", f"A packaged GGUF ({', '.join(loading.PACKAGED)}) "
                             "or a named config (with --random_weights).")
_RANDOM = flags.DEFINE_bool("random_weights", False, "Random weights of --model's shape.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Param and compute dtype.")
_GPU = flags.DEFINE_bool("gpu", False, "GPU preset: qwen3-8b, random bf16, batches 1,64, "
                         "256-token prompts, 128 new tokens, torch on cuda.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Decode batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens in the decode section.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens in the decode section.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed runs per contender.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads (CPU).")
_SECTIONS = flags.DEFINE_list("sections", ["decode", "constrained", "makespan", "conversation",
                                           "breakdown"],
                              "Sections to run.")
_CONSTRAINED_BATCH = flags.DEFINE_integer("constrained_batch", 16, "Requests, constrained.")
_MAKESPAN_ROUNDS = flags.DEFINE_integer("makespan_rounds", 2, "Timed runs, makespan.")
_WINDOW = flags.DEFINE_float("arrival_window", 0.5, "Makespan: the 16 arrivals spread evenly "
                             "over this fraction of one static batch's run time.")
_CONV_CONTEXT = flags.DEFINE_integer("conversation_context", 300, "First-turn prompt tokens.")

JUDGE = {"type": "object", "additionalProperties": False, "required": ["reason", "score"],
         "properties": {"reason": {"type": "string", "minLength": 80, "maxLength": 240},
                        "score": {"enum": [-1, 0, 1]}}}


def _load(torch):
  """(model, tokenizer, hf_model, torch device) for the flags."""
  import transformers  # pylint: disable=import-outside-toplevel
  device = "cuda" if _GPU.value else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
  tok = tokenizer.load_tokenizer(loading.default_tokenizer(_MODEL.value))
  if _MODEL.value in loading.PACKAGED and not _RANDOM.value:
    model = loading.load_model(_MODEL.value, param_dtype=_DTYPE.value)
    path = loading.gguf_path(_MODEL.value)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=tdtype)
    return model, tok, hf.to(device).eval()
  name = "smollm2-135m" if _MODEL.value == "smollm2" else _MODEL.value
  cfg = model_configs.get_model_config(name, param_dtype=_DTYPE.value, dtype=_DTYPE.value)
  model = create_model(cfg, seed=0)
  hf_config = transformers.AutoConfig.for_model(**config_to_hf(cfg, _DTYPE.value))
  with torch.device(device):  # random init straight on the device (8B on the GPU)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=tdtype)
  return model, tok, hf.eval()


def _prompts(tok, n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
  """n distinct prompts of exactly `length` tokens cut from varied English text."""
  rng = np.random.default_rng(seed)
  words = ("the a river city engine model quiet bright under over music number seven "
           "garden letter winter reason simple travel market window story").split()
  out = []
  for _ in range(n):
    ids = tok.encode(" ".join(rng.choice(words, length * 2)))[:length]
    out.append([i % vocab for i in ids])
  return out


def _hf_generate(torch, hf, prompts, new_tokens):
  """transformers greedy generate on a left-padded batch, exactly `new_tokens` each."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf.generation_config.eos_token_id = None
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, pad_token_id=0)
  width = max(map(len, prompts))
  device = hf.device
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

  def run():
    with torch.inference_mode():
      out = hf.generate(ids, attention_mask=mask, generation_config=config)
    if device.type == "cuda":
      torch.cuda.synchronize()
    return out[:, width:].tolist()

  return run


def decode_weight_bytes(cfg, itemsize: int) -> int:
  """Bytes of weights one decode step reads: every layer, the final norm and the output
  matrix (a separate head's embedding table is read one row a token, so it is left out)."""
  unread = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
  return (cfg.num_params() - unread) * itemsize


def decode_section(torch, model, tok, hf, cache_len, bandwidth=None):
  results = {}
  for batch in map(int, _BATCHES.value):
    prompts = _prompts(tok, batch, _PROMPT_LEN.value, model.cfg.vocab_size)
    new = _NEW.value
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    counts = {}

    def check(name, out, batch=batch, new=new):
      counts[name] = [len(t) for t in out]
      assert counts[name] == [new] * batch, (name, counts[name])

    with Engine(model, num_slots=batch, cache_len=cache_len) as eng:
      def run_engine(eng=eng, prompts=prompts):
        eng.update_params(eng.state)  # no prefix reuse across runs: every run prefills
        return [c.tokens for c in eng.generate(prompts, params)]
      res = common.alternate({"engine": run_engine,
                              "transformers": _hf_generate(torch, hf, prompts, new)},
                             rounds=_ROUNDS.value, check=check)
      same = np.mean([a == b for a, b in zip(run_engine(), _hf_generate(torch, hf, prompts,
                                                                        new)())])
    entry = {name: {"tokens_per_s": batch * new / r["min_s"],
                    "median_tokens_per_s": batch * new / r["median_s"],
                    "first_call_s": r["first_call_s"], "runs_s": r["runs_s"],
                    "compiles_in_timed_runs": r["compiles_in_timed_runs"],
                "compile_s_in_timed_runs": r["compile_s_in_timed_runs"]}
             for name, r in res.items()}
    entry["engine"]["compile_s"] = res["engine"]["first_call_s"] - res["engine"]["min_s"]
    entry["speedup"] = entry["engine"]["tokens_per_s"] / entry["transformers"]["tokens_per_s"]
    entry["identical_greedy_fraction"] = float(same)
    if bandwidth and batch == 1:  # batch 1 reads every weight once a token
      weight_bytes = decode_weight_bytes(model.cfg, np.dtype(_DTYPE.value).itemsize)
      bound = bandwidth["best_bytes_per_s"] / weight_bytes
      entry["bandwidth_bound"] = {
          "weight_bytes_per_token": weight_bytes, "tokens_per_s": bound,
          "engine_fraction": entry["engine"]["tokens_per_s"] / bound,
          "transformers_fraction": entry["transformers"]["tokens_per_s"] / bound}
    results[f"batch_{batch}"] = entry
    print(f"decode batch {batch}: {entry}", flush=True)
  return results


def constrained_section(model, tok, cache_len):
  vocab = model.cfg.vocab_size
  compiler = constrained.GrammarCompiler(tok.llguidance_tokenizer(vocab), vocab)
  n = _CONSTRAINED_BATCH.value
  prompts = [tok.encode(tok.hf.apply_chat_template(
      [{"role": "user", "content": f"Judge answer number {i}: is it helpful? Reply in JSON."}],
      tokenize=False, add_generation_prompt=True)) for i in range(n)]
  with Engine(model, num_slots=n, cache_len=cache_len, grammar_compiler=compiler) as eng, \
       Engine(model, num_slots=n, cache_len=cache_len, decode_chunk=1) as one_step:
    schema_params = SamplingParams(max_new_tokens=320, temperature=0.0, json_schema=JUDGE)
    first = eng.generate(prompts, schema_params)
    lengths = [len(c.tokens) for c in first]
    assert all(c.finish_reason == "stop" for c in first), [c.finish_reason for c in first]
    free = [SamplingParams(max_new_tokens=k, temperature=0.0) for k in lengths]

    def check(name, out):
      assert [len(c.tokens) for c in out] == lengths, name

    def fresh(engine, params):
      engine.update_params(engine.state)  # no prefix reuse across runs
      return engine.generate(prompts, params)

    res = common.alternate({"constrained": lambda: fresh(eng, schema_params),
                            "unconstrained": lambda: fresh(eng, free),
                            "unconstrained_one_step_chunks": lambda: fresh(one_step, free)},
                           rounds=_ROUNDS.value, check=check)
  total = sum(lengths)
  out = {name: {"tokens_per_s": total / r["min_s"], "runs_s": r["runs_s"],
                "compiles_in_timed_runs": r["compiles_in_timed_runs"],
                "compile_s_in_timed_runs": r["compile_s_in_timed_runs"]}
         for name, r in res.items()}
  mask_s, steps = _mask_time(compiler, [c.tokens for c in first])
  out.update(requests=n, tokens=total, mean_tokens=total / n, decode_steps=steps,
             host_mask_ms_per_step=1000 * mask_s / steps,
             host_mask_share_of_constrained=mask_s / res["constrained"]["min_s"],
             slowdown=res["constrained"]["min_s"] / res["unconstrained"]["min_s"],
             slowdown_from_one_step_chunks=res["unconstrained_one_step_chunks"]["min_s"]
             / res["unconstrained"]["min_s"])
  print(f"constrained: {out}", flush=True)
  return out


def _mask_time(compiler, outputs: list[list[int]]) -> tuple[float, int]:
  """Host seconds the engine's per-step mask work takes for these outputs (fill + consume,
  every live row each step, as the engine does it), and the number of steps."""
  grammar = constrained.json_schema_grammar(JUDGE)
  matchers = [compiler.matcher(grammar) for _ in outputs]
  steps = max(map(len, outputs))
  total = 0.0
  for j in range(steps):
    start = time.perf_counter()
    mask = compiler.allocate(len(outputs))
    for i, toks in enumerate(outputs):
      if j < len(toks):
        constrained.fill_mask(matchers[i], mask, i)
        assert matchers[i].consume_token(toks[j])
    total += time.perf_counter() - start
  return total, steps


def _staggered(eng, prompts, params, gap):
  """Submits request i at i*gap seconds from its own thread; returns makespan, tokens."""
  eng.update_params(eng.state)  # no prefix reuse across runs
  done = [None] * len(prompts)
  start = time.perf_counter()

  def client(i):
    time.sleep(max(0.0, start + i * gap - time.perf_counter()))
    done[i] = eng.submit(prompts[i], params[i]).result()

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return time.perf_counter() - start, [c.tokens for c in done]


def _pow2_upto(smallest: int, n: int, cap: int) -> list[int]:
  out, b = [], smallest
  while True:
    out.append(min(b, cap))
    if b >= n or b >= cap:
      return out
    b *= 2


def _precompile(eng: Engine, prompt_len: int, max_len: int) -> None:
  """Compiles every prefill and decode shape staggered arrivals can produce, on dummy
  buffers shaped like the engine's: prefill groups of 1..num_slots rows, decode chunks of
  1..decode_chunk steps, attention buckets up to `max_len` (the engine's bucket rules)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from trustee_jax.models.transformer import KVCache  # pylint: disable=import-outside-toplevel
  from trustee_jax.sampling import sampler  # pylint: disable=import-outside-toplevel
  cache = KVCache.zeros(eng.cfg, eng.num_slots, eng.cache_len)
  counts = jnp.zeros((eng.num_slots, eng.cfg.vocab_size), jnp.int32)

  def rows(n):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return sampler.RowSampling(full(0.0, jnp.float32), full(1.0, jnp.float32),
                               full(0, jnp.int32), full(0.0, jnp.float32),
                               full(0, jnp.uint32), full(0, jnp.int32))

  width = _pow2_upto(16, prompt_len, eng.cache_len)[-1]
  attend = _pow2_upto(128, prompt_len, eng.cache_len)[-1]
  for n in _pow2_upto(1, eng.num_slots, eng.num_slots):
    cache, counts, out = sampler.prefill(
        eng.graphdef, eng.state, cache, counts, jnp.zeros((n, width), jnp.int32),
        jnp.full((n, width), -1, jnp.int32), jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), jnp.int32), rows(n), None, attend_len=attend, use_filter=False,
        n_top=0)
  for n in _pow2_upto(1, eng.num_slots, eng.num_slots):  # busy rows, bucketed
    for attend in _pow2_upto(128, max_len, eng.cache_len):
      for steps in _pow2_upto(1, eng.decode_chunk, eng.decode_chunk):
        cache, counts, out = sampler.decode(
            eng.graphdef, eng.state, eng.layers, cache, counts, jnp.zeros((n,), jnp.int32),
            jnp.zeros((n,), jnp.int32), jnp.full((n,), -1, jnp.int32), rows(n), None,
            steps=steps, attend_len=attend, use_filter=False, n_top=0, draw=False,
            use_penalty=False)
  common.block(out)


def makespan_section(model, tok, cache_len):
  n = 16
  lengths = np.random.default_rng(1).permutation(np.linspace(16, 256, n).astype(int)).tolist()
  prompts = _prompts(tok, n, _PROMPT_LEN.value, model.cfg.vocab_size, seed=2)
  params = [SamplingParams(max_new_tokens=k, temperature=0.0) for k in lengths]
  with Engine(model, num_slots=n, cache_len=cache_len) as cont, \
       Engine(model, num_slots=n, cache_len=cache_len, static_batching=True) as static:
    compile_s, want = common.timed(lambda: [c.tokens for c in cont.generate(prompts, params)])
    cont.update_params(cont.state)
    batch_s, again = common.timed(lambda: [c.tokens for c in cont.generate(prompts, params)])
    assert again == want
    gap = _WINDOW.value * batch_s / n  # arrivals spread over part of one batch's run time
    start = time.perf_counter()
    _precompile(cont, _PROMPT_LEN.value, _PROMPT_LEN.value + max(lengths) + cont.decode_chunk)
    precompile_s = time.perf_counter() - start
    runs = {"continuous": [], "static_engine": [], "one_static_batch": []}
    compiled, compiled_s = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for r in range(_MAKESPAN_ROUNDS.value):
      order = ["continuous", "static_engine", "one_static_batch"]
      for name in (order if r % 2 == 0 else order[::-1]):
        with common.CompileCounter() as compiles:
          if name == "one_static_batch":  # formed once the last request has arrived
            cont.update_params(cont.state)
            seconds, tokens = common.timed(lambda: [c.tokens for c in cont.generate(prompts,
                                                                                    params)])
            seconds += (n - 1) * gap
          else:
            seconds, tokens = _staggered(cont if name == "continuous" else static, prompts,
                                         params, gap)
        compiled[name] += compiles.count
        compiled_s[name] += compiles.seconds
        assert tokens == want, name  # equal work: the same tokens every time
        runs[name].append(seconds)
  out = {name: {"makespan_s": min(v), "runs_s": v, "compiles_in_timed_runs": compiled[name],
                "compile_s_in_timed_runs": compiled_s[name]}
         for name, v in runs.items()}
  out.update(arrival_gap_s=gap, first_batch_s=compile_s, precompile_s=precompile_s,
             max_new_tokens=lengths, total_tokens=sum(lengths),
             ratio_vs_static_engine=out["continuous"]["makespan_s"]
             / out["static_engine"]["makespan_s"],
             ratio_vs_one_static_batch=out["continuous"]["makespan_s"]
             / out["one_static_batch"]["makespan_s"])
  print(f"makespan: {out}", flush=True)
  return out


def conversation_section(model, tok, cache_len):
  context = _prompts(tok, 1, _CONV_CONTEXT.value, model.cfg.vocab_size, seed=3)[0]
  users = [tok.encode(f"\nUser: tell me more about point {k}.\nAssistant:") for k in range(4)]
  params = SamplingParams(max_new_tokens=32, temperature=0.0)

  def conversation(eng, reuse):
    history, tokens, cached, prefilled = list(context), [], 0, 0
    for k in range(4):
      if k == 0 or not reuse:
        eng.update_params(eng.state)  # drops every resident cache: full re-prefill
      before = eng.stats["prefill_tokens"]
      c = eng.generate([history + users[k]], params)[0]
      prefilled += eng.stats["prefill_tokens"] - before
      cached += c.cached_tokens
      history = history + users[k] + c.tokens
      tokens.append(c.tokens)
    return tokens, cached, prefilled

  info = {}
  with Engine(model, num_slots=1, cache_len=cache_len) as eng:
    def check(name, out):
      info.setdefault(name, out[1:])
      assert out[0] == info.setdefault("tokens", out[0]), name  # same replies both ways

    res = common.alternate({"prefix_reuse": lambda: conversation(eng, True),
                            "re_prefill": lambda: conversation(eng, False)},
                           rounds=_ROUNDS.value, check=check)
  out = {name: {"seconds": r["min_s"], "runs_s": r["runs_s"],
                "compiles_in_timed_runs": r["compiles_in_timed_runs"],
                "compile_s_in_timed_runs": r["compile_s_in_timed_runs"],
                "cached_tokens": info[name][0], "prefilled_tokens": info[name][1]}
         for name, r in res.items()}
  out["speedup"] = out["re_prefill"]["seconds"] / out["prefix_reuse"]["seconds"]
  print(f"conversation: {out}", flush=True)
  return out


def breakdown_section(model, cache_len):
  """Per decode step at each batch: the engine's jitted decode (model + sampling), the model
  step alone (argmax only), and the sampling alone, timed alternately over 8-step chunks."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from trustee_jax.models.transformer import KVCache  # pylint: disable=import-outside-toplevel
  from trustee_jax.sampling import sampler  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  layers = sampler.unstack_layers(graphdef, state)
  cfg, steps, attend = model.cfg, 8, 128

  @functools.partial(jax.jit, donate_argnames=("cache",))
  def model_steps(state, cache, tok, pos):
    net = nnx.merge(graphdef, state)

    def step(carry, _):
      cache, tok, pos = carry
      logits, cache = net(tok[:, None], pos[:, None], cache, attend_len=attend, layers=layers)
      return (cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32), pos + 1), None
    (cache, tok, _), _ = jax.lax.scan(step, (cache, tok, pos), None, length=steps)
    return cache, tok

  sample = jax.jit(sampler.sample_rows, static_argnames=("use_filter", "n_top", "draw"))
  out = {}
  for batch in map(int, _BATCHES.value):
    full = lambda v, dt, b=batch: jnp.full((b,), v, dt)  # noqa: E731
    rows = sampler.RowSampling(full(0.0, jnp.float32), full(1.0, jnp.float32),
                               full(0, jnp.int32), full(0.0, jnp.float32),
                               full(0, jnp.uint32), full(0, jnp.int32))
    bufs = {"engine": [KVCache.zeros(cfg, batch, cache_len),
                       jnp.zeros((batch, cfg.vocab_size), jnp.int32)],
            "model": [KVCache.zeros(cfg, batch, cache_len)]}
    tok, pos = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), 40, jnp.int32)
    logits = jax.random.normal(jax.random.key(0), (batch, cfg.vocab_size))

    def engine_step(b=bufs, tok=tok, pos=pos, rows=rows, slots=jnp.arange(batch)):
      b["engine"][0], b["engine"][1], o = sampler.decode(
          graphdef, state, layers, b["engine"][0], b["engine"][1], slots, tok, pos, rows, None,
          steps=steps, attend_len=attend, use_filter=False, n_top=0, draw=False,
          use_penalty=False)
      return o

    def model_step(b=bufs, tok=tok, pos=pos):
      b["model"][0], o = model_steps(state, b["model"][0], tok, pos)
      return o

    res = common.alternate({
        "engine_decode": engine_step, "model_only": model_step,
        "sampling_only": lambda logits=logits, rows=rows, c=bufs["engine"]: [
            sample(logits, rows, None, None, use_filter=False, n_top=0, draw=False)
            for _ in range(steps)]},
        rounds=_ROUNDS.value + 2)
    out[f"batch_{batch}"] = {f"{k}_ms_per_step": 1000 * r["min_s"] / steps
                             for k, r in res.items()}
  print(f"breakdown: {out}", flush=True)
  return out


def main(_):
  if _GPU.value:
    flags.FLAGS.model, flags.FLAGS.random_weights, flags.FLAGS.dtype = "qwen3-8b", True, "bfloat16"
    if not flags.FLAGS["batches"].present:
      flags.FLAGS.batches = ["1", "64"]
    if not flags.FLAGS["prompt_len"].present:
      flags.FLAGS.prompt_len = 256
    if not flags.FLAGS["new_tokens"].present:
      flags.FLAGS.new_tokens = 128
    if not flags.FLAGS["sections"].present:
      flags.FLAGS.sections = ["decode", "constrained", "breakdown"]
    if not flags.FLAGS["constrained_batch"].present:
      flags.FLAGS.constrained_batch = 64
  torch = common.pin_torch_threads(_THREADS.value)
  model, tok, hf = _load(torch)
  cache_len = 1024 if _GPU.value else 512
  out = {"benchmark": "sampling", "model": _MODEL.value, "random_weights": _RANDOM.value,
         "dtype": _DTYPE.value, "prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW.value,
         "machine": common.machine(), "backend": jax.default_backend()}
  if "decode" in _SECTIONS.value and not _GPU.value:
    out["memory_bandwidth_probe"] = common.memory_bandwidth_probe(torch_threads=_THREADS.value)
    print(f"memory bandwidth probe: {out['memory_bandwidth_probe']}", flush=True)
  sections = {"decode": lambda: decode_section(torch, model, tok, hf, cache_len,
                                               out.get("memory_bandwidth_probe")),
              "constrained": lambda: constrained_section(model, tok, cache_len),
              "makespan": lambda: makespan_section(model, tok, cache_len),
              "conversation": lambda: conversation_section(model, tok, 1024),
              "breakdown": lambda: breakdown_section(model, cache_len)}
  for name in _SECTIONS.value:
    start = time.perf_counter()
    out[name] = sections[name]()
    out[name]["section_s"] = time.perf_counter() - start
  out["aims"] = _aims(out)
  common.emit(out)


def _aims(out):
  """The issue's aims, met or not (CPU aims unless --gpu)."""
  aims = {}
  d = out.get("decode", {})
  if _GPU.value:
    if "batch_64" in d:
      aims["batch_64_speedup>=5"] = d["batch_64"]["speedup"] >= 5
    return aims
  if "batch_1" in d:
    aims["batch_1_speedup>=2"] = d["batch_1"]["speedup"] >= 2
  if "batch_16" in d:
    aims["batch_16_speedup>=1.5"] = d["batch_16"]["speedup"] >= 1.5
  if "constrained" in out:
    aims["constrained_slowdown<=1.2"] = out["constrained"]["slowdown"] <= 1.2
  if "makespan" in out:
    aims["makespan_ratio<=0.8"] = out["makespan"]["ratio_vs_static_engine"] <= 0.8
  return aims


if __name__ == "__main__":
  app.run(main)
