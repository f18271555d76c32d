"""benchmarks/gpu/qwen3_8b_check.py: its helpers here, and its --tiny run end to end on CPU (the
same code a GPU session runs on Qwen3-8B), whose JSON must carry every figure."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.gpu import qwen3_8b_check as check
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind, name, flops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12), ("NVIDIA H100 PCIe", "unknown", None),
    ("cpu", "unknown", None)])
def test_datasheet_peak(kind, name, flops):
  assert check.datasheet_peak(kind) == (name, flops)


def test_flops_params_is_every_weight_but_the_embedding():
  cfg = get_model_config("qwen3-8b")
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  total = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model)))
  assert check.flops_params(cfg) == total - model.embed.size
  assert 7.5e9 < check.flops_params(cfg) < 7.6e9  # 8.19B less the 0.62B embedding


def test_a_failing_contender_is_reported_and_the_others_still_run():
  run = check.Run(budget_s=60)
  x = jnp.ones((4,))
  good = jax.jit(lambda x: x * 2)

  def broken():
    raise RuntimeError("no such kernel")

  out = check.measure(run, "unit", {"good": (lambda: good.lower(x), lambda exe: exe(x)),
                                    "bad": (broken, lambda exe: exe(x))}, repeats=2)
  assert out["bad"] == {"error": "RuntimeError: no such kernel"}
  assert run.errors == ["unit.bad: RuntimeError: no such kernel"]
  assert len(out["good"]["runs_s"]) == 2 and out["good"]["median_s"] > 0
  assert out["good"]["compiled_plan"]["args"] == 16  # XLA's plan of the compiled program


def test_an_out_of_memory_is_reported_as_such_only_where_allowed():
  run = check.Run(budget_s=60)
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 65.5GiB")
  assert "oom" in run.fail("full.update", oom, oom_ok=True)
  assert run.oom and not run.errors
  assert "error" in run.fail("lora.update", oom)  # LoRA must fit: a failure
  assert run.errors[0].startswith("lora.update: RuntimeError: RESOURCE_EXHAUSTED")


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.heavy
@pytest.mark.slow  # ~60-90 s on two loaded cores: 12 compiles, 4 of them GRPO updates
def test_tiny_run_reports_every_figure():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "benchmarks/gpu/qwen3_8b_check.py", "--tiny"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["ok"] and r["errors"] == [] and r["skipped"] == [] and r["oom"] == []
  assert r["model"] == "tiny-qwen3" and r["device"]["platform"] == "cpu"
  assert r["jax"] == jax.__version__ and r["device"]["kind"]
  assert r["peaks"]["datasheet"] == "unknown" and r["peaks"]["datasheet_bf16_flops"] is None
  assert _positive(r["peaks"]["matmul"]["flops_per_s"])
  assert _positive(r["peaks"]["copy"]["bytes_per_s"])
  impls = r["attention_impls"]
  assert impls == ["xla", "einsum"]
  for mode in ("lora", "full"):
    assert r[mode]["attention_impl"] == {i: i for i in impls}
    for part in ("forward", "update"):
      for impl in impls:
        e = r[mode][part][impl]
        assert _positive(e["tokens_per_s"]) and _positive(e["compile_s"]), (mode, part, impl)
        assert 0 < e["mfu_measured"] <= 1 and e["mfu_datasheet"] is None, (mode, part, e)
        assert len(e["runs_s"]) == 2 and e["compiles_in_timed_runs"] == 0
        assert _positive(e["compiled_plan"]["peak"])
  assert r["lora"]["lora_rank"] == 64 and r["full"]["param_dtype"] == "float32"
  assert r["full"]["trainable_params"] > r["lora"]["trainable_params"]
  for impl in impls:
    for batch in (1, 8):
      e = r["decode"][impl][f"batch_{batch}"]
      assert _positive(e["steps_per_s"]) and _positive(e["weight_bound_steps_per_s"])
      assert e["tokens_per_s"] == pytest.approx(batch * e["steps_per_s"])
      assert e["weight_kv_bound_steps_per_s"] < e["weight_bound_steps_per_s"]
      assert _positive(e["of_weight_bound"])  # below 1 on a GPU; CPU caches blur it
