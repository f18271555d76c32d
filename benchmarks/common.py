"""Shared benchmark helpers: honest timing, alternating contenders, matmul and bandwidth probes.

Every benchmark here compares contenders in one run on one machine: each contender is run
once to compile/warm (that time is reported apart), then the timed runs alternate (A B B A
A B ...) so that load from other processes hits every contender alike. JAX results are
waited for with `block_until_ready`; torch runs on a fixed number of threads. The last
line a benchmark prints is one JSON object with every figure.
"""
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def pin_torch_threads(n: int = 2):
  """Imports torch and fixes its intra- and inter-op threads to `n` (before any torch work)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(n)
  try:
    torch.set_num_interop_threads(n)
  except RuntimeError:  # already set, or torch already ran parallel work
    pass
  return torch


def block(tree: Any) -> Any:
  """Waits for every JAX array in `tree`; other leaves pass through."""
  return jax.tree_util.tree_map(
      lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, tree)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """(seconds, result) of one call, JAX results waited for."""
  start = time.perf_counter()
  out = block(fn())
  return time.perf_counter() - start, out


class CompileCounter:
  """Counts JAX compilations (every jit, on any thread) and their seconds while active.

  Counts lowerings to MLIR; seconds add tracing, lowering and backend compile. Tiny
  staging jits (JAX's own, for a host array of a new shape) count too: read the seconds.
  """

  LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
  TIMED = ("/jax/core/compile/jaxpr_trace_duration", LOWERING,
           "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.count = 0
    self.seconds = 0.0

  def __call__(self, event, duration, **kw):
    if event == self.LOWERING:
      self.count += 1
    if event in self.TIMED:
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def alternate(contenders: dict[str, Callable[[], Any]], rounds: int,
              check: Callable[[str, Any], None] | None = None) -> dict[str, dict[str, Any]]:
  """Warms each contender once, then times `rounds` runs each, alternating their order.

  Round r runs the contenders forwards when r is even and backwards when odd, so neither
  always runs first. `check(name, result)` sees every result (assert equal work there).
  Returns per contender: first-call seconds (compile + run), every timed run, min, median,
  and how many JAX compilations happened inside timed runs (should be 0).
  """
  names = list(contenders)
  out: dict[str, dict[str, Any]] = {n: {"runs_s": []} for n in names}
  for n in names:
    seconds, result = timed(contenders[n])
    out[n]["first_call_s"] = seconds
    if check:
      check(n, result)
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      with CompileCounter() as compiles:
        seconds, result = timed(contenders[n])
      out[n]["runs_s"].append(seconds)
      out[n]["compiles_in_timed_runs"] = out[n].get("compiles_in_timed_runs", 0) + compiles.count
      out[n]["compile_s_in_timed_runs"] = (out[n].get("compile_s_in_timed_runs", 0.0)
                                           + compiles.seconds)
      if check:
        check(n, result)
  for n in names:
    runs = out[n]["runs_s"]
    out[n]["min_s"], out[n]["median_s"] = min(runs), statistics.median(runs)
  return out


def layer_matmul_params(cfg) -> int:
  """Weights a token multiplies through in the decoder layers (q/k/v/o and the MLP), no head:
  the per-token matmul count the FLOP figures of forward, prefill and update start from."""
  d, f, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
  return cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f)


def matmul_probe(n: int = 2048, reps: int = 5, torch_threads: int = 2) -> dict[str, float]:
  """This machine's plain f32 matmul FLOP/s at n x n: jnp.dot, torch.matmul, and the better."""
  flops = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  a, b = jnp.asarray(a_np), jnp.asarray(b_np)
  dot = jax.jit(jnp.dot)
  torch = pin_torch_threads(torch_threads)
  ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)

  def run_torch():
    with torch.inference_mode():
      return torch.matmul(ta, tb)

  res = alternate({"jax": lambda: dot(a, b), "torch": run_torch}, rounds=reps)
  jax_fs, torch_fs = flops / res["jax"]["min_s"], flops / res["torch"]["min_s"]
  return {"n": n, "jax_flops": jax_fs, "torch_flops": torch_fs,
          "best_flops": max(jax_fs, torch_fs)}


def memory_bandwidth_probe(gib: float = 1.0, reps: int = 5,
                           torch_threads: int = 2) -> dict[str, float]:
  """This machine's read bandwidth in bytes/s: a sum over `gib` GiB of f32 (far above any cache),
  by jnp.sum and torch.sum, and the better: what bounds a batch-1 decode step's weight reads."""
  n = int(gib * 2**30) // 4
  x_np = np.ones((n,), np.float32)
  x = jnp.asarray(x_np)
  total = jax.jit(jnp.sum)
  torch = pin_torch_threads(torch_threads)
  tx = torch.from_numpy(x_np)

  def run_torch():
    with torch.inference_mode():
      return torch.sum(tx)

  res = alternate({"jax": lambda: total(x), "torch": run_torch}, rounds=reps)
  jax_bw, torch_bw = 4.0 * n / res["jax"]["min_s"], 4.0 * n / res["torch"]["min_s"]
  return {"bytes": 4 * n, "jax_bytes_per_s": jax_bw, "torch_bytes_per_s": torch_bw,
          "best_bytes_per_s": max(jax_bw, torch_bw)}


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU model, cores, load, library versions, JAX devices."""
  cpu = platform.processor()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "load_avg_1m": os.getloadavg()[0]}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  return info


def emit(result: dict[str, Any]) -> None:
  """Prints the result as one JSON object on the last line of output."""
  sys.stdout.flush()
  print(json.dumps(result, default=float), flush=True)
