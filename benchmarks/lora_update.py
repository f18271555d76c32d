"""LoRA GRPO update tokens/s: the shipped projection, x @ W + s * (x @ A) @ B
(`lora.LoraWeight.project`), against merging W + s * A @ B first inside the layer scan (the
earlier design), on one packaged GGUF model's shape, alternating in one process.

  python benchmarks/lora_update.py [--model qwen2.5-coder-0.5b] [--seqs 4] [--length 256]
      [--micro_batch 2] [--rank 16] [--remat full] [--rounds 2]

Merging first makes the backward form W's full-size gradient (one more matmul of W's size per
projection and token) before reducing it to A's and B's; the projection form never does. Both
contenders run `update.make_update_fn` on the same adapters (B randomised, so the delta is not
zero), the same frozen f32 base and the same batch (train_step.make_batch: random tokens,
old log-probs near the model's own, random advantages); their first losses and updated
adapters must agree. The last line is one JSON object.
"""
import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import make_batch  # noqa: E402
from trustee_jax import grpo, lora, step_batch, update  # noqa: E402
from trustee_jax.models import loading  # noqa: E402


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergeFirstWeight(lora.LoraWeight):
  """The earlier design: W + s * A @ B formed per layer, then one einsum."""

  def project(self, spec, x, dtype):
    return jnp.einsum(spec, x, self.astype(dtype))


class MergeFirstTransformer(lora.LoraTransformer):
  """A LoraTransformer whose block sees MergeFirstWeight projections."""

  def _layer_params(self):
    return {n: MergeFirstWeight(w.w, w.a, w.b, w.scale) if isinstance(w, lora.LoraWeight) else w
            for n, w in super()._layer_params().items()}


def contender(graphdef, adapters, base, batch: dict, micro_batch: int):
  """One update function and its state; returns a thunk doing one update."""
  opt = update.build_optimizer(ml_collections.ConfigDict(
      {"learning_rate": 1e-4, "grad_clip": 1.0, "weight_decay": 0.0}))
  cfg = grpo.GRPOConfig(clip_low=0.2, clip_high=0.2, dual_clip_c=3.0, kl_beta=0.0,
                        agg="token-mean")
  fn = update.make_update_fn(graphdef, opt, cfg, micro_batch=micro_batch, temperature=1.0,
                             chunk_size=8192)
  dev = {k: jnp.asarray(v[:, 1:] if k in step_batch.TARGET_ALIGNED else v)
         for k, v in batch.items()}
  state = {"first": None}  # (loss, updated adapters) of the first call

  def step():
    params = jax.tree_util.tree_map(jnp.copy, adapters)  # every run updates the same point
    new, _, metrics = fn(params, base, opt.init(params), dev)
    state["first"] = state["first"] or (float(metrics["loss"]), new)
    return metrics["loss"]
  return step, state


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2", choices=loading.PACKAGED)
  ap.add_argument("--seqs", type=int, default=4)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--prompt", type=int, default=64, help="tokens outside the loss mask")
  ap.add_argument("--micro_batch", type=int, default=2)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args()

  base_model = loading.load_model(args.model, remat_policy=args.remat)
  cfg = base_model.cfg
  graphdef, params = nnx.split(base_model)
  batch = make_batch(graphdef, params, cfg, args.seqs, args.length, args.prompt, 0)
  lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
  adapted = lora.add_lora(base_model, lcfg, seed=0)
  key = jax.random.key(1)
  for name in lcfg.targets:  # B = 0 would make the delta, and half its gradient, vanish
    b = getattr(adapted.lora, f"{name}_b")
    key, sub = jax.random.split(key)
    b.value = 0.01 * jax.random.normal(sub, b.shape, b.dtype)
  shipped_gd, adapters, base = update.split(adapted)
  merge_gd = nnx.graphdef(nnx.eval_shape(lambda: MergeFirstTransformer(
      cfg, nnx.Rngs(0), lora=lcfg)))
  merge_gd = nnx.split(nnx.merge(merge_gd, adapters, base), lora.LoraParam, ...)[0]

  steps, states = {}, {}
  for name, gd in (("project", shipped_gd), ("merge_first", merge_gd)):
    steps[name], states[name] = contender(gd, adapters, base, batch, args.micro_batch)
  res = common.alternate(steps, rounds=args.rounds)
  (loss_p, new_p), (loss_m, new_m) = states["project"]["first"], states["merge_first"]["first"]
  diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(new_p),
                                                       jax.tree_util.tree_leaves(new_m))]
  tokens = args.seqs * args.length
  out = {"benchmark": "lora_update", "model": f"{args.model} (GGUF, f32 base)",
         "rank": args.rank, "targets": list(lcfg.targets), "remat": args.remat,
         "sequences": args.seqs, "length": args.length, "micro_batch": args.micro_batch,
         "machine": common.machine(),
         "first_loss": {"project": loss_p, "merge_first": loss_m},
         "loss_rel_diff": abs(loss_p - loss_m) / max(abs(loss_m), 1e-12),
         "max_adapter_diff_after_update": max(diffs)}
  for name, r in res.items():
    out[name] = {"tokens_per_s": tokens / r["min_s"], "runs_s": r["runs_s"],
                 "first_call_s": r["first_call_s"],
                 "compiles_in_timed_runs": r["compiles_in_timed_runs"]}
  out["project_over_merge_first"] = out["project"]["tokens_per_s"] / out["merge_first"][
      "tokens_per_s"]
  out["aim_met"] = out["project_over_merge_first"] > 1 and out["loss_rel_diff"] < 1e-4
  assert out["loss_rel_diff"] < 1e-4, out["first_loss"]
  common.emit(out)


if __name__ == "__main__":
  main()
