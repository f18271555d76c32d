"""GRPO update tokens/s of a packaged GGUF model (SmolLM2-135M unless --model names another;
8 x 256): update.make_update_fn against the same update written in PyTorch, on the same CPU,
alternating.

  python benchmarks/train_step.py [--model smollm2] [--seqs 8] [--length 256] [--prompt 64]
      [--rounds 2] [--runs 1] [--micro_batch 8] [--torch_threads 2] [--breakdown]
      [--profile_dir DIR]

Each contender runs in its own worker process (the two together need ~13 GB at 8 x 256, more
than a shared 2-core box spares): the rounds alternate jax, torch, torch, jax, ...; each worker
loads, does one untimed update (compile, warm-up) and `--runs` timed ones.

Both sides start from the same weights (the packaged GGUF, f32) and the same batch (random
tokens, a loss mask on the last length - prompt tokens, old log-probs near the model's own so
some ratios clip, random advantages) and do one whole optimizer update: forward, the clipped
GRPO token-mean loss (asymmetric clip 0.2/0.2, dual clip 3, no KL term), backward, global-norm
clipping at 1.0 and AdamW (lr 1e-6, weight decay 0.01), over micro-batches of --micro_batch
sequences whose gradients add up (the same update for any split). JAX: `update.make_update_fn`
(chunked vocabulary log-probs with entropy, micro-batch scan). PyTorch: transformers' model of
the same file (Llama or Qwen2), full [n, T, V] logits and log_softmax (entropy under no_grad, as
a metric), backward per micro-batch, torch.optim.AdamW.
Parity: the loss of the first update (same params) must agree on both sides.

Achieved FLOP/s counts the model's matmul FLOPs of forward + backward (3x the forward's:
projections, MLP, unembedding, attention over the whole square), not any recompute, as a
fraction of this machine's plain f32 matmul FLOP/s (best of jnp.dot and torch.matmul at 2048^2,
measured in the same run). Tunix is compared in its own same-run benchmark
(`benchmarks/peers/tunix_compare.py`), not against a remembered figure. The last line is one JSON
object.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from trustee_jax import grpo, step_batch, update  # noqa: E402
from trustee_jax.models import loading  # noqa: E402
from trustee_jax.models.transformer import ModelConfig  # noqa: E402

CLIP, DUAL_CLIP, LR, WEIGHT_DECAY, GRAD_CLIP = 0.2, 3.0, 1e-6, 0.01, 1.0


def update_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Matmul FLOPs of forward + backward (3x forward) with full logits over the whole sequence."""
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  per_token = common.layer_matmul_params(cfg)
  per_token += d * cfg.vocab_size
  attention = cfg.num_layers * 2 * batch * length * length * h * hd
  return 3 * 2.0 * (per_token * batch * length + attention)


def make_batch(graphdef, params, cfg: ModelConfig, n: int, t: int, prompt: int, seed: int):
  """Random tokens; old log-probs = the model's own + noise (ratios spread round 1)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (n, t), dtype=np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy()
  logp = np.asarray(update.make_logprob_fn(graphdef, temperature=1.0, chunk_size=8192)(
      params, nnx.State({}), jnp.asarray(tokens), jnp.asarray(positions)))
  old = np.zeros((n, t), np.float32)
  old[:, 1:] = logp + rng.normal(0, 0.1, logp.shape)
  mask = np.zeros((n, t), np.float32)
  mask[:, prompt:] = 1.0
  return {"tokens": tokens, "positions": positions, "loss_mask": mask, "old_logprobs": old,
          "turn_rewards": np.zeros((n, t), np.float32),
          "advantages": rng.normal(0, 1, (n,)).astype(np.float32)}


def jax_runner(model, batch: dict, micro_batch: int):
  graphdef, params, frozen = update.split(model)
  params = jax.tree_util.tree_map(jnp.copy, params)  # donated to the update; `model` is reused
  opt = update.build_optimizer(ml_collections.ConfigDict(
      {"learning_rate": LR, "grad_clip": GRAD_CLIP, "weight_decay": WEIGHT_DECAY}))
  cfg = grpo.GRPOConfig(clip_low=CLIP, clip_high=CLIP, dual_clip_c=DUAL_CLIP, kl_beta=0.0,
                        agg="token-mean")
  fn = update.make_update_fn(graphdef, opt, cfg, micro_batch=micro_batch, temperature=1.0,
                             chunk_size=8192)
  # our update reads the per-token arrays aligned with the targets tokens[:, 1:]
  dev = {k: jnp.asarray(v[:, 1:] if k in step_batch.TARGET_ALIGNED else v)
         for k, v in batch.items()}
  state = {"params": params, "opt": opt.init(params)}

  def step():
    state["params"], state["opt"], metrics = fn(state["params"], frozen, state["opt"], dev)
    return metrics["loss"]
  return step


def torch_runner(torch, batch: dict, micro_batch: int, model_name: str):
  import transformers  # pylint: disable=import-outside-toplevel
  path = loading.gguf_path(model_name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  hf.train()
  opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8)
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  ids = t["tokens"].long()
  normaliser = t["loss_mask"][:, 1:].sum()  # token-mean over the whole batch

  def micro_loss(rows):
    targets = ids[rows, 1:]
    mask = t["loss_mask"][rows, 1:]
    old = t["old_logprobs"][rows, 1:]
    adv = t["advantages"][rows, None].expand_as(mask)
    logits = hf(input_ids=ids[rows], use_cache=False).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    with torch.no_grad():  # a logged metric, as on the JAX side; a row at a time (memory)
      entropy = torch.stack([-(row.exp() * row).sum(-1) for row in logp_all])
      del entropy
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    pg = torch.maximum(pg1, pg2)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * DUAL_CLIP), pg)
    return (pg * mask).sum() / normaliser

  def step():
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, ids.shape[0], micro_batch):  # gradients accumulate
      loss = micro_loss(slice(start, start + micro_batch))
      loss.backward()
      total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(hf.parameters(), GRAD_CLIP)
    opt.step()
    return total
  return step


def breakdown(args) -> dict:
  """Where a JAX update's time goes: the whole update, then the decoder trunk's forward +
  backward, the chunked log-prob head's, and the optimizer, each jitted alone at the update's
  shapes (alternating), with their model FLOP/s (the head's backward recomputes its logits:
  4 passes of 2*N*d*V); `rest_s` is what the parts do not explain (loss, scan, glue)."""
  model = loading.load_model(args.model)
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  data = dict(np.load(args.batch))
  mb, t, d, v = args.micro_batch, args.length, cfg.hidden_size, cfg.vocab_size
  tokens = jnp.asarray(data["tokens"][:mb])
  positions = jnp.asarray(data["positions"][:mb])
  probe = jax.random.normal(jax.random.key(0), (mb, t, d))

  @jax.jit
  def trunk(params):
    def loss(params):
      hidden, _ = nnx.merge(graphdef, params).hidden_states(tokens, positions)
      return jnp.sum(hidden * probe)
    return jax.value_and_grad(loss)(params)

  unembed = nnx.merge(graphdef, params).unembed_matrix()
  targets = tokens[:, 1:]

  @jax.jit
  def head(h, w):
    def loss(h, w):
      logp, ent = grpo.chunked_token_logprobs(h, w, targets, 1.0, 8192)
      return jnp.sum(logp) + 0.0 * jnp.sum(ent)
    return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

  opt = update.build_optimizer(ml_collections.ConfigDict(
      {"learning_rate": LR, "grad_clip": GRAD_CLIP, "weight_decay": WEIGHT_DECAY}))
  opt_state = opt.init(params)

  @jax.jit
  def optimizer(params, opt_state):
    updates, new = opt.update(params, opt_state, params)
    return optax.apply_updates(params, updates), new

  h = probe[:, :-1]
  parts = {"whole_update": jax_runner(model, data, mb), "trunk_fwd_bwd": lambda: trunk(params),
           "head_fwd_bwd": lambda: head(h, unembed),
           "optimizer": lambda: optimizer(params, opt_state)}
  res = common.alternate(parts, rounds=1)
  k = args.seqs // mb
  tokens_mb = mb * t
  head_flops = 4 * 2.0 * tokens_mb * d * v
  trunk_flops = update_flops(cfg, mb, t) - 3 * 2.0 * tokens_mb * d * v
  out = {"whole_update_s": res["whole_update"]["min_s"]}
  for name, flops in (("trunk_fwd_bwd", trunk_flops), ("head_fwd_bwd", head_flops),
                      ("optimizer", None)):
    per_update = res[name]["min_s"] * (1 if name == "optimizer" else k)
    out[name] = {"s_per_update": per_update,
                 "gflop_s": None if flops is None else flops * k / per_update / 1e9}
  out["rest_s"] = out["whole_update_s"] - sum(
      out[n]["s_per_update"] for n in ("trunk_fwd_bwd", "head_fwd_bwd", "optimizer"))
  out["loadavg_1m"] = os.getloadavg()[0]
  return out


def run_worker(args) -> dict:
  """One contender in this process: warm-up update, then `args.runs` timed ones."""
  data = dict(np.load(args.batch))
  if args.worker == "jax":
    model = loading.load_model(args.model, remat_policy=args.remat)
    step = jax_runner(model, data, args.micro_batch)
  else:
    torch = common.pin_torch_threads(args.torch_threads)
    step = torch_runner(torch, data, args.micro_batch, args.model)
  first_s, loss = common.timed(step)
  runs = [common.timed(step)[0] for _ in range(args.runs)]
  if args.worker == "jax" and args.profile_dir:
    with jax.profiler.trace(args.profile_dir):
      common.block(step())
  return {"first_call_s": first_s, "first_loss": float(np.asarray(loss)), "runs_s": runs,
          "loadavg_1m": os.getloadavg()[0],
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def spawn(args, *extra: str) -> dict:
  """Runs this script as a worker; its last stdout line is its JSON result."""
  cmd = [sys.executable, __file__, "--model", args.model, "--seqs", str(args.seqs),
         "--length", str(args.length), "--prompt", str(args.prompt), "--micro_batch",
         str(args.micro_batch), "--runs", str(args.runs), "--torch_threads",
         str(args.torch_threads), "--seed", str(args.seed), "--remat", args.remat, *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"worker {extra} exited {proc.returncode}: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2", choices=loading.PACKAGED,
                  help="packaged GGUF model (transformers reads the same file)")
  ap.add_argument("--seqs", type=int, default=8)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--prompt", type=int, default=64, help="tokens outside the loss mask")
  ap.add_argument("--micro_batch", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=2, help="worker pairs, order alternating")
  ap.add_argument("--runs", type=int, default=1, help="timed updates per worker")
  ap.add_argument("--torch_threads", type=int, default=2)
  ap.add_argument("--profile_dir", default="", help="jax.profiler trace of one JAX update")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"],
                  help="JAX remat policy (PyTorch keeps every activation, as 'none')")
  ap.add_argument("--breakdown", action="store_true", help="also time the JAX update's parts")
  ap.add_argument("--worker", choices=["batch", "jax", "torch", "breakdown"], default=None)
  ap.add_argument("--batch", default="", help="(worker) the batch .npz")
  args = ap.parse_args()
  jax.config.update("jax_compilation_cache_dir", str(common.REPO / ".jax_cache"))
  if args.worker == "batch":
    model = loading.load_model(args.model)
    graphdef, params = nnx.split(model)
    np.savez(args.batch, **make_batch(graphdef, params, model.cfg, args.seqs, args.length,
                                      args.prompt, args.seed))
    print(json.dumps({"cfg": dataclasses.asdict(model.cfg)}))
    return
  if args.worker == "breakdown":
    print(json.dumps(breakdown(args)))
    return
  if args.worker:
    print(json.dumps(run_worker(args)))
    return

  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    batch = str(pathlib.Path(tmp) / "batch.npz")
    cfg = ModelConfig(**spawn(args, "--worker", "batch", "--batch", batch)["cfg"])
    probe = common.matmul_probe(torch_threads=args.torch_threads)
    print(f"matmul probe: {probe}", flush=True)
    workers: dict[str, list[dict]] = {"jax": [], "torch": []}
    for r in range(args.rounds):
      for name in (["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]):
        extra = ["--profile_dir", args.profile_dir] if name == "jax" and args.profile_dir else []
        workers[name].append(spawn(args, "--worker", name, "--batch", batch, *extra))
        print(f"{name}: {workers[name][-1]}", flush=True)
    split = spawn(args, "--worker", "breakdown", "--batch", batch) if args.breakdown else None
    probe_after = common.matmul_probe(torch_threads=args.torch_threads)
  tokens = args.seqs * args.length
  flops = update_flops(cfg, args.seqs, args.length)
  best_matmul = max(probe["best_flops"], probe_after["best_flops"])
  first_loss = {n: w[0]["first_loss"] for n, w in workers.items()}
  out = {"benchmark": "train_step", "remat": args.remat, "model": f"{args.model} (GGUF, f32)",
         "sequences": args.seqs, "length": args.length, "loss_tokens_per_seq":
         args.length - args.prompt, "micro_batch": args.micro_batch,
         "machine": {**common.machine(), "loadavg_before": load_before,
                     "loadavg_after": os.getloadavg()},
         "matmul_probe": {"before": probe, "after": probe_after, "best_flops": best_matmul},
         "update_gflop": flops / 1e9, "first_loss": first_loss,
         "loss_rel_diff": abs(first_loss["jax"] - first_loss["torch"]) /
                          max(abs(first_loss["torch"]), 1e-12)}
  for name, ws in workers.items():
    runs = [x for w in ws for x in w["runs_s"]]
    best, median = min(runs), statistics.median(runs)
    out[name] = {"tokens_per_s": tokens / best, "median_tokens_per_s": tokens / median,
                 "runs_s": runs, "first_call_s": [w["first_call_s"] for w in ws],
                 "loadavg_1m_after_each": [w["loadavg_1m"] for w in ws],
                 "peak_rss_gb": max(w["peak_rss_gb"] for w in ws),
                 "achieved_flops": flops / best, "fraction_of_matmul": flops / best / best_matmul}
  if split:
    out["jax_breakdown"] = split
  out["jax_over_torch"] = out["jax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
  out["aim_met"] = out["jax_over_torch"] > 1
  common.emit(out)


if __name__ == "__main__":
  main()
