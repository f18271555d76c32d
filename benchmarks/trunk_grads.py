"""The decoder trunk's forward + backward (SmolLM2-135M, 8 x 256, f32), differentiated two ways,
alternating: through the layer scan over the stacked [L, ...] weights (what the update does), and
with respect to per-layer copies of the weights run unrolled (`Transformer.unstacked_layers`'s
shape, unfused), their gradients stacked once at the end for the optimizer.

  python benchmarks/trunk_grads.py [--remat full] [--rounds 3]

Issue 21 names the scan's backward, which writes residuals and weight gradients into [L, ...]
stacks, as the candidate cause of the update trailing PyTorch; this measures what removing the
stacks is worth before the update is rebuilt around it. The per-layer path runs without remat
(an unrolled trunk's remat is not what is compared). The loss is sum(hidden * a fixed probe);
both paths must give the same loss and gradients. The last line is one JSON object.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from trustee_jax.models import weights  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  model = weights.load_gguf()
  model.cfg = model.cfg.replace(remat_policy=args.remat)
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  b, t = args.batch, args.length
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, t)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  probe = jax.random.normal(jax.random.key(0), (b, t, cfg.hidden_size))
  names = list(nnx.merge(graphdef, params)._layer_params())  # pylint: disable=protected-access

  @jax.jit
  def scanned(params):
    def loss(params):
      hidden, _ = nnx.merge(graphdef, params).hidden_states(tokens, positions)
      return jnp.sum(hidden * probe)
    value, grads = jax.value_and_grad(loss)(params)
    return value, {n: getattr(grads, n)[...] for n in names}

  per_layer = jax.jit(lambda p: tuple({n: getattr(p, n)[...][i] for n in names}
                                      for i in range(cfg.num_layers)))(params)

  @jax.jit
  def unrolled(params, layers):
    def loss(layers):
      hidden, _ = nnx.merge(graphdef, params).hidden_states(tokens, positions, layers=layers)
      return jnp.sum(hidden * probe)
    value, grads = jax.value_and_grad(loss)(layers)
    return value, {n: jnp.stack([g[n] for g in grads]) for n in names}

  last: dict[str, tuple] = {}  # each contender's latest (loss, gradients), compared below
  res = common.alternate({"scan": lambda: scanned(params),
                          "per_layer": lambda: unrolled(params, per_layer)}, rounds=args.rounds,
                         check=last.__setitem__)
  (loss_s, g_s), (loss_u, g_u) = last["scan"], last["per_layer"]
  grad_diff = max(float(jnp.max(jnp.abs(g_s[n] - g_u[n]))) for n in names)
  assert grad_diff <= 1e-3 * max(float(jnp.max(jnp.abs(g_s[n]))) for n in names), grad_diff
  out = {"benchmark": "trunk_grads", "model": "smollm2-135m (GGUF, f32)", "batch": b,
         "length": t, "scan_remat": args.remat, "machine": common.machine(),
         "loss": {"scan": float(loss_s), "per_layer": float(loss_u)},
         "max_abs_grad_diff": grad_diff}
  for name, r in res.items():
    out[name] = {"min_s": r["min_s"], "median_s": r["median_s"], "runs_s": r["runs_s"],
                 "first_call_s": r["first_call_s"]}
  out["per_layer_over_scan_speed"] = res["scan"]["min_s"] / res["per_layer"]["min_s"]
  common.emit(out)


if __name__ == "__main__":
  main()
