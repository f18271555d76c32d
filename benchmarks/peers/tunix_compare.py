"""trustee-jax against Tunix (google-tunix 0.1.7) on the same CPU, in one run, alternating.

Two figures: (1) the GRPO update (tokens/s) on one batch of sequences, same weights, same loss
settings; (2) greedy batched sampling (decode tokens/s) at batch 1 and 16, same prompts and
lengths, as whole calls and as the decode loop alone. Prints one JSON line. Run it through
run.sh, which builds the virtualenv with Tunix in it.

Fairness (Tunix 0.1.7's llama3): its RoPE ignores rope_theta (always 1e6), so our model uses
1e6 too; its MLP weights start at zero, so every Tunix weight is overwritten with ours; its
sampler takes strings, so an id tokenizer ("12 7 9" <-> [12, 7, 9]) feeds it token ids; its KV
cache is sized to prompt + generation, and ours to the same. Parity of logits and of greedy
tokens is checked and reported, so both sides demonstrably compute the same thing.
"""
import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from trustee_jax import grpo, step_batch, update
from trustee_jax.models import model_configs
from trustee_jax.models.transformer import KVCache, Transformer, create_model
from trustee_jax.sampling import engine as engine_lib
from trustee_jax.sampling import sampler as our_sampler

from tunix.generate import sampler as tx_sampler
from tunix.models.llama3 import model as tx_llama
from tunix.rl import algo_core as tx_algo
from tunix.rl import common as tx_common
from tunix.rl.grpo import grpo_learner as tx_grpo
from tunix.sft import peft_trainer as tx_peft

TUNIX_ROPE_THETA = 1_000_000.0  # what tunix.models.llama3.apply_rope uses, whatever the config


# ---- models with the same weights -------------------------------------------------------

def our_model(seed: int, remat: str = "none") -> Transformer:
  """SmolLM2-135M's shape, random weights, RoPE theta as Tunix's llama3 hard-codes it."""
  cfg = model_configs.get_model_config("smollm2-135m", rope_theta=TUNIX_ROPE_THETA,
                                       remat_policy=remat)
  return create_model(cfg, seed=seed)


def tunix_model(ours: Transformer) -> tx_llama.Llama3:
  """Tunix's Llama3 of the same shape, every weight copied from ours (its MLP inits to 0)."""
  c = ours.cfg
  cfg = tx_llama.ModelConfig(
      num_layers=c.num_layers, vocab_size=c.vocab_size, embed_dim=c.hidden_size,
      hidden_dim=c.intermediate_size, num_heads=c.num_heads, head_dim=c.head_dim,
      num_kv_heads=c.num_kv_heads, rope_theta=int(c.rope_theta), norm_eps=c.rms_norm_eps,
      weight_tying=c.tie_embeddings)
  tm = tx_llama.Llama3(cfg, rngs=nnx.Rngs(0))
  tm.embedder.input_embedding[...] = ours.embed[...]
  tm.final_norm.w[...] = ours.final_norm[...]
  for i, layer in enumerate(tm.layers):
    pairs = [(layer.input_layernorm.w, ours.attn_norm), (layer.attn.q_proj.w, ours.wq),
             (layer.attn.k_proj.w, ours.wk), (layer.attn.v_proj.w, ours.wv),
             (layer.attn.o_proj.w, ours.wo), (layer.post_attention_layernorm.w, ours.mlp_norm),
             (layer.mlp.gate_proj.kernel, ours.w_gate), (layer.mlp.up_proj.kernel, ours.w_up),
             (layer.mlp.down_proj.kernel, ours.w_down)]
    for dst, src in pairs:
      if dst[...].shape != src[i].shape:
        raise ValueError(f"layer {i}: Tunix shape {dst[...].shape} != ours {src[i].shape}")
      dst[...] = src[i]
  return tm


def logits_gap(ours: Transformer, tm: tx_llama.Llama3, tokens: np.ndarray) -> float:
  """Max |logit difference| of the two models on the same tokens (weights and maths agree)."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  a, _ = nnx.jit(lambda m, x: m(x, pos))(ours, jnp.asarray(tokens))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  z, _ = nnx.jit(lambda m, x: m(x, pos, None, mask))(tm, jnp.asarray(tokens))
  return float(jnp.max(jnp.abs(a - z)))


class IdTokenizer:
  """What Tunix's sampler needs of a tokenizer, over decimal token ids; 0 is padding."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self) -> int:
    return 0  # falsy: Tunix prepends no BOS

  def eos_id(self) -> int:
    return -1  # never sampled: both sides generate exactly the requested length

  def pad_id(self) -> int:
    return 0


# ---- timing -----------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> tuple[float, float]:
  """(wall, process CPU) seconds of fn() with its outputs ready. CPU seconds (all threads of
  this process) are less disturbed than wall time when other jobs share the cores."""
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0, time.process_time() - c0


def alternate(contenders: dict[str, Callable[[], tuple]], reps: int) -> dict[str, list]:
  """Runs each contender `reps` times, interleaved, swapping the order every round."""
  names = list(contenders)
  out = {n: [] for n in names}
  for r in range(reps):
    for n in (names if r % 2 == 0 else names[::-1]):
      out[n].append(contenders[n]())
  return out


def rates(work: float, times: dict[str, list[tuple[float, float]]]) -> dict:
  """Median rates (work per wall second and per CPU second) per contender, and ours / Tunix's."""
  res = {}
  for n, ts in times.items():
    wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
    res[n] = {"per_s": round(work / statistics.median(wall), 2),
              "per_cpu_s": round(work / statistics.median(cpu), 2),
              "wall_s": [round(x, 2) for x in wall], "cpu_s": [round(x, 2) for x in cpu]}
  res["ratio"] = round(res["trustee"]["per_s"] / res["tunix"]["per_s"], 3)
  res["ratio_cpu"] = round(res["trustee"]["per_cpu_s"] / res["tunix"]["per_cpu_s"], 3)
  return res


# ---- (1) the GRPO update ----------------------------------------------------------------

def grpo_batch(ours: Transformer, n: int, prompt: int, completion: int, seed: int) -> dict:
  """A batch of random sequences, with old/ref log-probs near the model's own."""
  rng = np.random.default_rng(seed)
  t = prompt + completion
  tokens = rng.integers(1, ours.cfg.vocab_size, (n, t), dtype=np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy()
  graphdef, params = nnx.split(ours)
  logp = np.asarray(update.make_logprob_fn(graphdef, temperature=1.0, chunk_size=8192)(
      params, nnx.State({}), jnp.asarray(tokens), jnp.asarray(positions)))
  old = np.zeros((n, t), np.float32)
  ref = np.zeros((n, t), np.float32)
  old[:, 1:] = logp + rng.normal(0, 0.1, logp.shape)  # ratios spread round 1: some clip
  ref[:, 1:] = logp + rng.normal(0, 0.1, logp.shape)
  mask = np.zeros((n, t), np.float32)
  mask[:, prompt:] = 1.0
  return {"tokens": tokens, "positions": positions, "loss_mask": mask, "old_logprobs": old,
          "ref_logprobs": ref, "turn_rewards": np.zeros((n, t), np.float32),
          "advantages": rng.normal(0, 1, (n,)).astype(np.float32)}


def optimizer_and_cfgs(beta: float):
  """One optax chain for both; our GRPO config and Tunix's, set to the same loss."""
  opt = update.build_optimizer(ml_collections.ConfigDict(
      {"learning_rate": 1e-6, "grad_clip": 1.0, "weight_decay": 0.01}))
  ours = grpo.GRPOConfig(clip_low=0.2, clip_high=0.2, dual_clip_c=3.0, kl_beta=beta,
                         kl_type="low_var_kl", agg="token-mean", entropy_coef=0.0)
  theirs = tx_grpo.GRPOConfig(num_generations=2, beta=beta, epsilon=0.2,
                              kl_loss_mode="low_var_kl", loss_agg_mode="token-mean",
                              kl_clamp_value=10.0)
  theirs.epsilon_high, theirs.epsilon_c, theirs.temperature = 0.2, 3.0, 1.0
  return opt, ours, theirs


def our_update_runner(ours: Transformer, batch: dict, opt, cfg, micro: int) -> Callable:
  """make_update_fn's jitted step: micro-batches scanned inside, one optimizer update."""
  graphdef, params, frozen = update.split(ours)
  params = jax.tree_util.tree_map(jnp.copy, params)  # donated to the update; `ours` is reused
  fn = update.make_update_fn(graphdef, opt, cfg, micro_batch=micro,
                             temperature=1.0, chunk_size=8192)
  # our update reads the per-token arrays aligned with the targets tokens[:, 1:]
  dev = {k: jnp.asarray(v[:, 1:] if k in (*step_batch.TARGET_ALIGNED, "ref_logprobs") else v)
         for k, v in batch.items()}
  state = {"params": params, "opt": opt.init(params)}

  def run() -> tuple[float, float]:
    def step():
      state["params"], state["opt"], m = fn(state["params"], frozen, state["opt"], dev)
      return m["loss"]
    return timed(step)
  return run


def tunix_update_runner(tm, batch: dict, prompt: int, opt, cfg, micro: int) -> Callable:
  """Tunix's own jitted PeftTrainer train step with its GRPO loss, as GRPOLearner wires it:
  one call per micro-batch, optax.MultiSteps applying the update after the last."""
  n = batch["tokens"].shape[0]
  trainer = tx_peft.PeftTrainer(tm, opt, tx_peft.TrainingConfig(
      eval_every_n_steps=10**9, gradient_accumulation_steps=n // micro))
  tok = IdTokenizer()
  loss_fn = lambda model, train_example, algo_config: tx_algo.grpo_loss_fn(  # noqa: E731
      model, train_example, algo_config=cfg, pad_id=tok.pad_id(), eos_id=tok.eos_id())
  trainer.with_loss_fn(loss_fn, has_aux=True)
  trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": cfg})
  step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  mask = jnp.asarray(batch["loss_mask"][:, prompt:] > 0)
  examples = [tx_grpo.TrainExample(
      prompt_ids=jnp.asarray(batch["tokens"][i:i + micro, :prompt]),
      prompt_mask=jnp.ones((micro, prompt), bool),
      completion_ids=jnp.asarray(batch["tokens"][i:i + micro, prompt:]),
      completion_mask=mask[i:i + micro], advantages=jnp.asarray(batch["advantages"][i:i + micro]),
      ref_per_token_logps=jnp.asarray(batch["ref_logprobs"][i:i + micro, prompt:]),
      old_per_token_logps=jnp.asarray(batch["old_logprobs"][i:i + micro, prompt:]))
      for i in range(0, n, micro)]
  return lambda: timed(lambda: [step(ex)[0] for ex in examples])


# ---- (2) sampling -----------------------------------------------------------------------

def our_whole_runner(ours, prompts: np.ndarray, gen: int, chunk: int):
  """Engine.generate over len(prompts) slots; returns (runner, tokens of the last call)."""
  eng = engine_lib.Engine(ours, num_slots=len(prompts), cache_len=prompts.shape[1] + gen,
                          decode_chunk=chunk)
  params = engine_lib.SamplingParams(max_new_tokens=gen, temperature=0.0)
  last = {}

  def run() -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = eng.generate([p.tolist() for p in prompts], params)
    last["tokens"] = np.array([c.tokens for c in out])
    return time.perf_counter() - t0, time.process_time() - c0
  return run, last, eng


def tunix_whole_runner(tm, prompts: np.ndarray, gen: int):
  c = tm.config
  smp = tx_sampler.Sampler(tm, IdTokenizer(), tx_sampler.CacheConfig(
      cache_size=prompts.shape[1] + gen, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim))
  texts = [IdTokenizer().decode(p) for p in prompts]
  last = {}

  def run() -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = smp(texts, max_generation_steps=gen, max_prompt_length=prompts.shape[1],
              temperature=0.0, eos_tokens=[-1], return_logprobs=True)
    last["tokens"] = np.array([np.asarray(t) for t in out.tokens])
    return time.perf_counter() - t0, time.process_time() - c0
  return run, last, smp


def our_decode_runner(ours, prompts: np.ndarray, gen: int) -> Callable[[], float]:
  """sampler.decode alone: `gen` steps in one jitted scan after an untimed prefill."""
  graphdef, state = nnx.split(ours)
  layers = our_sampler.unstack_layers(graphdef, state)  # as the Engine decodes
  b, p = prompts.shape
  cache_len = p + gen
  rows = our_sampler.RowSampling(
      temperature=jnp.zeros((b,)), top_p=jnp.ones((b,)), top_k=jnp.zeros((b,), jnp.int32),
      frequency_penalty=jnp.zeros((b,)), seed=jnp.zeros((b,), jnp.uint32),
      gen_index=jnp.zeros((b,), jnp.int32))

  def run() -> tuple[float, float]:
    cache = KVCache.zeros(ours.cfg, b, cache_len)
    counts = jnp.zeros((b, ours.cfg.vocab_size), jnp.int32)
    cache, counts, out = our_sampler.prefill(
        graphdef, state, cache, counts, jnp.asarray(prompts),
        jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), jnp.arange(b, dtype=jnp.int32),
        jnp.full((b,), p - 1, jnp.int32), rows, None, attend_len=cache_len, use_filter=False,
        n_top=0)
    first = jax.block_until_ready(out[0])
    return timed(lambda: our_sampler.decode(
        graphdef, state, layers, cache, counts, jnp.arange(b, dtype=jnp.int32), first,
        jnp.full((b,), p, jnp.int32), rows.replace(gen_index=jnp.ones((b,), jnp.int32)), None,
        steps=gen, attend_len=cache_len, use_filter=False, n_top=0, draw=False,
        use_penalty=False)[2][0])
  return run


def tunix_decode_runner(smp, prompts: np.ndarray, gen: int) -> Callable[[], float]:
  """Tunix's jitted decode while-loop alone (gen steps) after an untimed prefill."""
  b, p = prompts.shape

  def run() -> tuple[float, float]:
    st = smp.init_sample_state(
        jnp.asarray(prompts), total_sampling_steps=p + gen, include_logits=False,
        forbidden_token_ids=None, temperature=0.0, top_p=None, top_k=None,
        seed=jax.random.PRNGKey(0), beam_size=None, include_logprobs=True)
    st = smp._compiled_prefill_fn(smp._flattened_transformer_state, st, None, echo=False)
    jax.block_until_ready(st.token_buffer)
    return timed(lambda: smp._compiled_decode_fn(smp._flattened_transformer_state,
                                                 st).token_buffer)
  return run


def sampling_figures(ours, tm, prompts: np.ndarray, gen: int, reps: int, chunk: int) -> dict:
  b = len(prompts)
  our_run, our_last, eng = our_whole_runner(ours, prompts, gen, chunk)
  tx_run, tx_last, smp = tunix_whole_runner(tm, prompts, gen)
  try:
    warm = {"trustee": our_run()[0], "tunix": tx_run()[0]}  # compiles
    whole = alternate({"trustee": our_run, "tunix": tx_run}, reps)
    same = float(np.mean(our_last["tokens"] == tx_last["tokens"][:, :gen]))
  finally:
    eng.close()
  dec = {"trustee": our_decode_runner(ours, prompts, gen),
         "tunix": tunix_decode_runner(smp, prompts, gen)}
  for run in dec.values():
    run()  # compiles
  return {"batch": b, "whole_call": rates(b * gen, whole),
          "decode_loop": rates(b * gen, alternate(dec, reps)),
          "greedy_tokens_equal_frac": same, "first_call_s": {k: round(v, 2)
                                                              for k, v in warm.items()}}


# ---- main -------------------------------------------------------------------------------

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seqs", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence")
  ap.add_argument("--completion", type=int, default=192, help="completion tokens (loss)")
  ap.add_argument("--beta", type=float, default=0.001, help="KL coefficient")
  ap.add_argument("--update-reps", type=int, default=2)
  ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch "
                  "(both sides; Tunix accumulates gradients over calls with optax.MultiSteps)")
  ap.add_argument("--remat", default="dots", help="our remat policy in the update (none, dots, "
                  "dots_no_batch, full); Tunix keeps its default RematConfig.NONE, its fastest")
  ap.add_argument("--sample-prompt", type=int, default=64)
  ap.add_argument("--gen", type=int, default=64, help="new tokens per sampled row")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--sample-reps", type=int, default=3)
  ap.add_argument("--decode-chunk", type=int, default=8, help="Engine decode_chunk")
  ap.add_argument("--only", choices=["update", "sampling"], default=None)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  t_start = time.perf_counter()
  load_before = os.getloadavg()
  # Each phase builds its own models (same seed, same weights) and drops them after: on a
  # shared 24 GB machine, two models, two optimizer states and the backward's activations at
  # 8 x 256 tokens is already ~8 GB.
  ours = our_model(args.seed)
  rng = np.random.default_rng(args.seed + 1)
  probe = rng.integers(1, ours.cfg.vocab_size, (2, 32), dtype=np.int32)
  result = {"bench": "trustee-jax vs tunix", "tunix_version": "0.1.7",
            "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "model": "smollm2-135m shape, f32, rope_theta 1e6 (as Tunix)",
            "logits_max_abs_diff": logits_gap(ours, tunix_model(ours), probe)}
  if args.only in (None, "update"):
    del ours
    trainee = our_model(args.seed, args.remat)  # same weights (same seed), remat in the backward
    batch = grpo_batch(trainee, args.seqs, args.prompt, args.completion, args.seed)
    opt, ours_cfg, tx_cfg = optimizer_and_cfgs(args.beta)
    mb = args.micro_batch
    runners = {"trustee": our_update_runner(trainee, batch, opt, ours_cfg, mb),
               "tunix": tunix_update_runner(tunix_model(trainee), batch, args.prompt, opt, tx_cfg,
                                            mb)}
    first = {n: round(r()[0], 2) for n, r in runners.items()}  # compiles
    tokens = args.seqs * (args.prompt + args.completion)
    result["update"] = {"sequences": args.seqs, "tokens_per_seq": args.prompt + args.completion,
                        "loss_tokens_per_seq": args.completion, "first_call_s": first,
                        "micro_batch": mb, "trustee_remat": args.remat, "tunix_remat": "NONE",
                        "tokens": rates(tokens, alternate(runners, args.update_reps))}
    del runners, trainee, batch
    gc.collect()
    jax.clear_caches()
  if args.only in (None, "sampling"):
    ours = our_model(args.seed)
    tm = tunix_model(ours)
    result["sampling"] = {}
    for b in (int(x) for x in args.batches.split(",")):
      prompts = rng.integers(1, ours.cfg.vocab_size, (b, args.sample_prompt), dtype=np.int32)
      result["sampling"][f"batch_{b}"] = sampling_figures(
          ours, tm, prompts, args.gen, args.sample_reps, args.decode_chunk)
  result["machine"] = {"cpus": os.cpu_count(), "loadavg_before": load_before,
                       "loadavg_after": os.getloadavg(),
                       "wall_s": round(time.perf_counter() - t_start, 1)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
