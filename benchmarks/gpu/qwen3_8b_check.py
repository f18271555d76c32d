"""Qwen3-8B on one GPU with random weights: throughput, MFU and decode against their bounds.

  python benchmarks/gpu/qwen3_8b_check.py          # one H100/H200: ~6-8 minutes
  python benchmarks/gpu/qwen3_8b_check.py --tiny   # the same code on tiny-qwen3, CPU, seconds
  python benchmarks/gpu/qwen3_8b_check.py --sections probes,decode --attention cudnn

Sections, each in its own try/except (a failing part is reported in the JSON, the rest run):
- probes: a measured bf16 matmul peak (a chain of large jnp.dot products in one program) and
  the on-device copy bandwidth (read + write of a large array), beside the datasheet peak.
- lora, full: the forward the trainer runs (update.make_logprob_fn: the old-logprob recompute)
  and the GRPO update (update.make_update_fn over policy.build, as the Trainer builds it), for
  configs/qwen3_8b.py's gpu variant (LoRA over a bf16 base) and gpu8's settings on one device
  (full fine-tune: f32 masters, bf16 compute). tokens/s and MFU = 6 x (2 x for the forward)
  non-embedding parameters incl. the LM head x tokens/s, over the datasheet and the measured
  peak. A full fine-tune that runs out of memory is reported under "oom", not as a failure.
- decode: sampler.decode, the engine's step (layers unstacked, as the engine runs it), at each
  batch: steps/s against the bound of reading the weights once a step at the measured copy
  bandwidth (and the bound with the step's KV-cache reads added).
Every measurement runs once per attention implementation (model.attention_impl), the timed
repeats alternating between them (benchmarks/common.alternate); compile and first-call
seconds are reported apart from the median of the repeats. Parts that would start after
--budget_s are skipped and listed. The last line is one JSON object; exit code 1 if any failed.
"""
import argparse
import gc
import math
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def configure_env(argv: list[str]) -> None:
  """Before jax starts: --tiny runs on CPU; on a GPU, JAX may use 95% of its memory (without
  preallocation the BFC allocator still stops at 75% by default: too little for 8B)."""
  if "--tiny" in argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  elif not (os.environ.get("XLA_CLIENT_MEM_FRACTION") or
            os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")):
    os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.95"


if __name__ == "__main__":
  configure_env(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common, memory_8b, update_8b  # noqa: E402
from trustee_jax import grpo, policy as policy_lib, update  # noqa: E402
from trustee_jax.models import attention, loading  # noqa: E402
from trustee_jax.models.transformer import KVCache, ModelConfig  # noqa: E402
from trustee_jax.sampling import sampler  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity), by device_kind.
DATASHEET_BF16_FLOPS = (("H200", "H200", 989e12), ("H100 SXM", "H100 80GB HBM3", 989e12),
                        ("H100 SXM", "H100 SXM", 989e12), ("A100", "A100", 312e12))
SECTIONS = ("probes", "lora", "decode", "full")


def datasheet_peak(device_kind: str) -> tuple[str, float | None]:
  """(name, bf16 dense FLOP/s) of a device kind from the datasheet table, else ('unknown', None)."""
  for name, key, flops in DATASHEET_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return name, flops
  return "unknown", None


def flops_params(cfg: ModelConfig) -> int:
  """Parameters a token's matmuls use: all but the embedding lookup (the LM head counts)."""
  return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def error_text(error: BaseException) -> str:
  """The error's type and first lines: enough to name the cause in one JSON field."""
  return f"{type(error).__name__}: {str(error).strip()[:600]}"


class Run:
  """The run's clock, budget and outcome lists (errors fail the run; oom and skipped do not)."""

  def __init__(self, budget_s: float):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.errors: list[str] = []
    self.oom: list[str] = []
    self.skipped: list[str] = []

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def may_start(self, name: str) -> bool:
    """False (and `name` listed as skipped) once the budget is spent."""
    if self.elapsed() <= self.budget_s:
      print(f"[{self.elapsed():6.1f}s] {name}", file=sys.stderr, flush=True)
      return True
    self.skipped.append(f"{name}: budget of {self.budget_s:.0f} s spent")
    return False

  def fail(self, name: str, error: BaseException, *, oom_ok: bool = False) -> dict[str, Any]:
    """Records a failed part (an OOM where `oom_ok` as such) and returns its JSON entry."""
    text = error_text(error)
    if oom_ok and is_oom(error):
      self.oom.append(f"{name}: {text}")
      return {"oom": text}
    self.errors.append(f"{name}: {text}")
    traceback.print_exc(file=sys.stderr)
    return {"error": text}


def measure(run: Run, name: str, contenders: dict[str, tuple[Callable, Callable]], *,
            repeats: int, oom_ok: bool = False) -> dict[str, dict[str, Any]]:
  """Per contender (lower, call): compiles `lower()` (its XLA memory plan recorded), warms
  `call(compiled)`, then times the ones that worked, alternating, `repeats` runs each."""
  out: dict[str, dict[str, Any]] = {}
  ready: dict[str, Callable[[], Any]] = {}
  for key, (lower, call) in contenders.items():
    if any("oom" in e for e in out.values()):  # a donated state may be gone with it
      run.skipped.append(f"{name}.{key}: not run after an out-of-memory contender")
      continue
    if not run.may_start(f"{name}.{key}"):
      continue
    try:
      t0 = time.perf_counter()
      compiled = lower().compile()
      entry = {"compile_s": time.perf_counter() - t0, "compiled_plan": vars(
          memory_8b.Program.of(compiled)) if compiled.memory_analysis() else None}
      entry["first_call_s"] = common.timed(lambda c=compiled: call(c))[0]
      out[key], ready[key] = entry, (lambda c=compiled, f=call: f(c))
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the others still run
      out[key] = run.fail(f"{name}.{key}", e, oom_ok=oom_ok)
  if ready:
    try:
      timed = common.alternate(ready, rounds=repeats)
      for key, t in timed.items():
        out[key].update(runs_s=t["runs_s"], median_s=t["median_s"],
                        compiles_in_timed_runs=t.get("compiles_in_timed_runs", 0))
    except Exception as e:  # noqa: BLE001
      for key in ready:
        out[key].update(run.fail(f"{name}.{key} (timed)", e, oom_ok=oom_ok))
  return out


def with_rates(entry: dict[str, Any], tokens: int, flops_per_token: float,
               peaks: dict[str, float | None]) -> dict[str, Any]:
  """Adds tokens/s and the MFU against each peak to a timed entry (untimed ones pass)."""
  if "median_s" not in entry:
    return entry
  rate = tokens / entry["median_s"]
  entry["tokens_per_s"] = rate
  for name, peak in peaks.items():
    entry[f"mfu_{name}"] = flops_per_token * rate / peak if peak else None
  return entry


def probe_matmul(n: int, chain: int, repeats: int) -> dict[str, Any]:
  """Measured bf16 matmul FLOP/s (best run): `chain` dependent n x n products in one program."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, n), jnp.bfloat16)
  w = (jax.random.normal(kw, (n, n)) / math.sqrt(n)).astype(jnp.bfloat16)  # keeps |x| ~ 1
  fn = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: jnp.dot(y, w), x))
  t = common.alternate({"matmul": lambda: fn(x, w)}, rounds=repeats)["matmul"]
  return {"n": n, "chain": chain, "runs_s": t["runs_s"],
          "flops_per_s": 2.0 * n ** 3 * chain / t["min_s"]}  # a peak: the best run


def probe_copy(nbytes: int, repeats: int) -> dict[str, Any]:
  """Measured on-device copy bandwidth (best run): bytes read + written by `x + 1`."""
  x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
  fn = jax.jit(lambda x: x + jnp.bfloat16(1))
  t = common.alternate({"copy": lambda: fn(x)}, rounds=repeats)["copy"]
  return {"bytes": nbytes, "runs_s": t["runs_s"], "bytes_per_s": 2.0 * nbytes / t["min_s"]}


def peak_bytes() -> int | None:
  """The device's peak bytes in use so far in this process (None where not reported: CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def graphdef_with(graphdef, trainable, frozen, impl: str):
  """(graphdef of the same model attending by `impl`, the model's attention_impl)."""
  model = nnx.merge(graphdef, trainable, frozen)
  model.cfg = model.cfg.replace(attention_impl=impl)
  return update.split(model)[0], model.cfg.attention_impl


def train_section(run: Run, mode: str, c, args, impls: list[str],
                  peaks: dict[str, float | None]) -> dict[str, Any]:
  """Forward and GRPO update of one config (LoRA or full), each attention implementation."""
  m = c.model
  model = loading.load_model(args.model, param_dtype=m.param_dtype, dtype=m.dtype, seed=c.seed,
                             remat_policy=m.remat_policy, attention_impl=impls[0])
  cfg = model.cfg
  policy, trainable = policy_lib.build(c, model, temperature=c.rollout.temperature,
                                       chunk_size=c.train.logprob_chunk, with_reference=False)
  del model
  gcfg = grpo.GRPOConfig.from_dict(c.grpo)
  n = flops_params(cfg)
  tokens = args.batch * args.seq_len
  b = update_8b.batch(args.batch, args.seq_len, cfg.vocab_size)
  if gcfg.kl_beta > 0:  # the Trainer feeds the reference's log-probs; any finite ones do here
    b["ref_logprobs"] = b["old_logprobs"]
  out = {"param_dtype": m.param_dtype, "compute_dtype": m.dtype, "remat": m.remat_policy,
         "lora_rank": policy.lora_cfg.rank if policy.lora_cfg else None,
         "trainable_params": sum(x.size for x in jax.tree_util.tree_leaves(trainable)),
         "rows": args.batch, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
         "tokens_per_call": tokens}
  graphdefs = {}
  for impl in impls:
    graphdefs[impl], out.setdefault("attention_impl", {})[impl] = graphdef_with(
        policy.graphdef, trainable, policy.frozen, impl)
  kw = dict(temperature=c.rollout.temperature, chunk_size=c.train.logprob_chunk)

  fwd = {}
  for impl, g in graphdefs.items():
    fn = update.make_logprob_fn(g, **kw)
    fwd[impl] = (lambda fn=fn: fn.lower(trainable, policy.frozen, b["tokens"], b["positions"]),
                 lambda exe: exe(trainable, policy.frozen, b["tokens"], b["positions"]))
  out["forward"] = {k: with_rates(v, tokens, 2 * n, peaks)
                    for k, v in measure(run, f"{mode}.forward", fwd, repeats=args.repeats,
                                        oom_ok=mode == "full").items()}

  if not run.may_start(f"{mode}.optimizer_init"):
    return out
  optimizer = update.build_optimizer(c.train.optimizer)
  try:
    state = {"params": trainable, "opt": jax.block_until_ready(optimizer.init(trainable))}
  except Exception as e:  # noqa: BLE001 - full fine-tuning may not fit one GPU
    out["update"] = run.fail(f"{mode}.optimizer_init", e, oom_ok=mode == "full")
    return {**out, "process_peak_bytes": peak_bytes()}
  del trainable  # donated to the first update: only `state` holds the live params

  def step(exe):
    state["params"], state["opt"], metrics = exe(state["params"], policy.frozen, state["opt"], b)
    return metrics

  upd = {}
  for impl, g in graphdefs.items():
    fn = update.make_update_fn(g, optimizer, gcfg, micro_batch=args.micro_batch, **kw)
    upd[impl] = (lambda fn=fn: fn.lower(state["params"], policy.frozen, state["opt"], b), step)
  out["update"] = {k: with_rates(v, tokens, 6 * n, peaks)
                   for k, v in measure(run, f"{mode}.update", upd, repeats=args.repeats,
                                       oom_ok=mode == "full").items()}
  return {**out, "process_peak_bytes": peak_bytes()}


def decode_section(run: Run, c, args, impls: list[str], copy_bytes_per_s: float | None
                   ) -> dict[str, Any]:
  """sampler.decode steps/s per batch and attention implementation, against the bandwidth bound."""
  m = c.model
  model = loading.load_model(args.model, param_dtype=m.param_dtype, dtype=m.dtype, seed=c.seed)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  del model
  layers = jax.block_until_ready(sampler.unstack_layers(graphdef, state))
  graphdefs = {impl: graphdef_with(graphdef, state, nnx.State({}), impl)[0] for impl in impls}
  weight_bytes = flops_params(cfg) * jnp.dtype(m.param_dtype).itemsize  # read once a step
  ctx, steps = args.decode_context, args.steps
  out: dict[str, Any] = {"param_dtype": m.param_dtype, "weight_bytes_per_step": weight_bytes,
                         "context": ctx,
                         "steps_per_call": steps, "attention_impl": {
                             impl: attention.resolve_implementation(
                                 impl, backend=jax.default_backend(), dtype=m.dtype,
                                 self_attention=False, length=1) for impl in impls}}
  for batch in args.decode_batches:
    rows = jnp.arange(batch, dtype=jnp.int32)
    tokens = jnp.zeros((batch,), jnp.int32)
    positions = jnp.full((batch,), ctx - steps, jnp.int32)  # the last step writes ctx - 1
    sampling = sampler.RowSampling(
        temperature=jnp.ones((batch,)), top_p=jnp.ones((batch,)),
        top_k=jnp.zeros((batch,), jnp.int32), frequency_penalty=jnp.zeros((batch,)),
        seed=jnp.arange(batch, dtype=jnp.uint32), gen_index=jnp.zeros((batch,), jnp.int32))
    dev = {"cache": KVCache.zeros(cfg, batch, ctx),
           "counts": jnp.zeros((batch, cfg.vocab_size), jnp.int32)}
    static = dict(steps=steps, attend_len=ctx, use_filter=False, n_top=0, draw=True,
                  use_penalty=False)  # the Trainer's sampling: temperature 1, no penalty

    def call(exe):
      dev["cache"], dev["counts"], outs = exe(state, layers, dev["cache"], dev["counts"], rows,
                                              tokens, positions, sampling, None)
      return outs

    contenders = {impl: (lambda g=g: sampler.decode.lower(
        g, state, layers, dev["cache"], dev["counts"], rows, tokens, positions, sampling, None,
        **static), call) for impl, g in graphdefs.items()}
    kv_bytes = 2 * batch * ctx * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * \
        dev["cache"].k.dtype.itemsize
    results = measure(run, f"decode.batch_{batch}", contenders, repeats=args.repeats)
    for impl, entry in results.items():
      if "median_s" in entry:
        entry["steps_per_s"] = steps / entry["median_s"]
        entry["tokens_per_s"] = batch * entry["steps_per_s"]
        if copy_bytes_per_s:
          entry["weight_bound_steps_per_s"] = copy_bytes_per_s / weight_bytes
          entry["of_weight_bound"] = entry["steps_per_s"] / entry["weight_bound_steps_per_s"]
          entry["weight_kv_bound_steps_per_s"] = copy_bytes_per_s / (weight_bytes + kv_bytes)
      out.setdefault(impl, {})[f"batch_{batch}"] = {"kv_bytes_per_step": kv_bytes, **entry}
    del dev
  return out


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="tiny-qwen3 on CPU, small shapes")
  ap.add_argument("--seq_len", type=int, default=None, help="tokens per row (1024; tiny 64)")
  ap.add_argument("--batch", type=int, default=None, help="rows per update (4; tiny 2)")
  ap.add_argument("--steps", type=int, default=None,
                  help="decode steps per timed call (16; tiny 4)")
  ap.add_argument("--micro_batch", type=int, default=1, help="rows per micro-batch")
  ap.add_argument("--repeats", type=int, default=None, help="timed runs per contender (3; tiny 2)")
  ap.add_argument("--decode_batches", default=None, help="comma list (1,64; tiny 1,8)")
  ap.add_argument("--decode_context", type=int, default=None,
                  help="KV positions each decode step attends to (2048; tiny 128)")
  ap.add_argument("--attention", default="",
                  help="comma list (default: cudnn,einsum on GPU, xla,einsum elsewhere)")
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument("--budget_s", type=float, default=330.0,
                  help="parts that would start later are skipped (and listed)")
  args = ap.parse_args(argv)
  tiny = args.tiny
  for name, big, small in (("seq_len", 1024, 64), ("batch", 4, 2), ("steps", 16, 4),
                           ("decode_context", 2048, 128), ("repeats", 3, 2),
                           ("decode_batches", "1,64", "1,8")):
    if getattr(args, name) is None:
      setattr(args, name, small if tiny else big)
  args.model = "tiny-qwen3" if tiny else "qwen3-8b"
  args.decode_batches = [int(x) for x in args.decode_batches.split(",")]
  args.sections = args.sections.split(",")
  unknown = sorted(set(args.sections) - set(SECTIONS))
  if unknown:
    ap.error(f"unknown sections {unknown}; known: {SECTIONS}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  run = Run(args.budget_s)
  device = jax.devices()[0]
  impls = (args.attention.split(",") if args.attention else
           ["cudnn", "einsum"] if device.platform == "gpu" else ["xla", "einsum"])
  configs = {"lora": memory_8b.load_config("gpu"), "full": memory_8b.load_config("gpu8")}
  sheet_name, sheet_flops = datasheet_peak(device.device_kind)
  result: dict[str, Any] = {
      "benchmark": "qwen3_8b_check", "model": args.model, "tiny": args.tiny,
      "device": {"kind": device.device_kind, "platform": device.platform,
                 "count": jax.device_count(),
                 "memory_limit_bytes": (device.memory_stats() or {}).get("bytes_limit")},
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "attention_impls": impls,
      "configs": {"lora": "qwen3_8b:gpu", "full": "qwen3_8b:gpu8 settings on one device"},
      "args": {k: v for k, v in vars(args).items()},
      "peaks": {"datasheet": sheet_name, "datasheet_bf16_flops": sheet_flops}}
  peaks = {"datasheet": sheet_flops, "measured": None}
  copy_bw = None
  if "probes" in args.sections and run.may_start("probes"):
    try:
      n = 512 if args.tiny else 8192
      mm = probe_matmul(n, chain=8 if args.tiny else 16, repeats=args.repeats)
      cp = probe_copy(2**24 if args.tiny else 2**31, repeats=args.repeats)
      result["peaks"].update(matmul=mm, copy=cp)
      peaks["measured"], copy_bw = mm["flops_per_s"], cp["bytes_per_s"]
    except Exception as e:  # noqa: BLE001
      result["peaks"]["error"] = run.fail("probes", e)["error"]
  for name in ("lora", "decode", "full"):
    if name not in args.sections or not run.may_start(name):
      continue
    try:
      if name == "decode":
        result[name] = decode_section(run, configs["lora"], args, impls, copy_bw)
      else:
        result[name] = train_section(run, name, configs[name], args, impls, peaks)
    except Exception as e:  # noqa: BLE001 - each section reports its own failure
      result[name] = run.fail(name, e, oom_ok=name == "full")
    gc.collect()  # the section's weights go before the next one's arrive
  result.update(errors=run.errors, oom=run.oom, skipped=run.skipped, ok=not run.errors,
                total_s=run.elapsed(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
  sys.stderr.flush()
  common.emit(result)
  return 1 if run.errors else 0


if __name__ == "__main__":
  sys.exit(main())
