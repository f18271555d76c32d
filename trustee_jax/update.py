"""The GRPO optimizer update on padded episode arrays: micro-batched, jitted, NaN-safe, one
function for full fine-tuning and LoRA (the trainable state and the frozen rest, nnx filters).

The loss of a mini-batch is the sum of its micro-batches' shares (grpo.policy_loss with the
mini-batch's normaliser), so the result does not depend on how it is split. A step whose
loss or gradients are not finite leaves the parameters and optimizer state as they were.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trustee_jax import grpo, lora

Batch = dict[str, jax.Array]


def build_optimizer(cfg: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup then a constant or cosine schedule, after global-norm clipping."""
  warmup = int(cfg.get("warmup_steps", 0))
  total = max(int(cfg.get("total_updates", 1)), warmup + 1)
  lr = float(cfg.learning_rate)
  if cfg.get("schedule", "constant") == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), total,
                                                  end_value=lr * cfg.get("final_lr_frac", 0.0))
  elif warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  else:
    schedule = optax.constant_schedule(lr)
  return optax.chain(
      optax.clip_by_global_norm(float(cfg.get("grad_clip", 1.0))),
      optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                  eps=cfg.get("eps", 1e-8), weight_decay=float(cfg.get("weight_decay", 0.01))))


def split(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable, frozen): LoRA adapters over the frozen base, or every parameter of a
  full fine-tune over whatever else the model holds (nothing today)."""
  trainable = lora.LoraParam if isinstance(model, lora.LoraTransformer) else nnx.Param
  return nnx.split(model, trainable, ...)


def token_logprobs(graphdef, trainable, frozen, tokens: jax.Array, positions: jax.Array, *,
                   temperature: float, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(logp, entropy) [N, T-1] of the targets tokens[:, 1:] given their prefixes, in vocabulary
  chunks, under the model `graphdef` with `trainable` and `frozen` state."""
  model = nnx.merge(graphdef, trainable, frozen)
  hidden, _ = model.hidden_states(tokens, positions)
  return grpo.chunked_token_logprobs(hidden[:, :-1], model.unembed_matrix(), tokens[:, 1:],
                                     temperature, chunk_size)


def make_logprob_fn(graphdef, *, temperature: float, chunk_size: int) -> Callable:
  """Jitted `fn(trainable, frozen, tokens, positions) -> logp [N, T-1]` (old-logprob recompute,
  the KL reference)."""
  @jax.jit
  def fn(trainable, frozen, tokens, positions):
    return token_logprobs(graphdef, trainable, frozen, tokens, positions,
                          temperature=temperature, chunk_size=chunk_size)[0]
  return fn


def micro_loss(trainable, frozen, graphdef, mb: Batch, normaliser, cfg: grpo.GRPOConfig,
               temperature: float, chunk_size: int):
  """(loss share, metrics) of one micro-batch; the gradient is taken in `trainable` only."""
  logp, entropy = token_logprobs(graphdef, trainable, frozen, mb["tokens"], mb["positions"],
                                 temperature=temperature, chunk_size=chunk_size)
  mask = mb["loss_mask"]
  adv_tok = grpo.token_advantages(mb["advantages"], mb["turn_rewards"], mask, cfg.turn_mode)
  return grpo.policy_loss(logp, mb["old_logprobs"], adv_tok, mask, cfg,
                          logp_ref=mb.get("ref_logprobs"), entropy=entropy,
                          normaliser=normaliser)


def make_update_fn(graphdef, optimizer: optax.GradientTransformation, cfg: grpo.GRPOConfig, *,
                   micro_batch: int, temperature: float = 1.0, chunk_size: int = 8192,
                   out_shardings=None) -> Callable:
  """Returns jitted `update(trainable, frozen, opt_state, batch) -> (trainable, opt_state,
  metrics)`, the one update of full fine-tuning (frozen: the empty rest) and LoRA (trainable:
  the adapters, frozen: the base, an argument on every call, never a constant).

  `trainable` and `opt_state` are donated: the new ones take their buffers, so the old ones
  must not be used after the call. batch: tokens and positions (-1 on padding) [N, T] (N a
  multiple of micro_batch); loss_mask, old_logprobs, turn_rewards and optionally ref_logprobs
  [N, T-1], aligned with the targets tokens[:, 1:]; advantages [N]. `out_shardings`, on a mesh:
  (trainable's, opt_state's) shardings, so the outputs keep the inputs' layout.
  """
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def update(trainable, frozen, opt_state, batch: Batch):
    n = batch["tokens"].shape[0]
    if n % micro_batch:
      raise ValueError(f"batch of {n} is not a multiple of micro_batch {micro_batch}")
    normaliser = grpo.loss_normaliser(batch["loss_mask"], cfg)
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((n // micro_batch, micro_batch) + x.shape[1:]), batch)
    args = (graphdef, normaliser, cfg, temperature, chunk_size)

    def accumulate(carry, mb):
      grads, metrics = carry
      (_, m), g = grad_fn(trainable, frozen, *args[:1], mb, *args[1:])
      return (jax.tree_util.tree_map(jnp.add, grads, g),
              jax.tree_util.tree_map(jnp.add, metrics, m)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    metric_zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        lambda: micro_loss(trainable, frozen, graphdef, first, *args[1:])[1]))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (grads, summed), _ = jax.lax.scan(accumulate, (zeros, metric_zeros), micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(summed["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = grpo.finalize_metrics(summed)
    metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

  kw = {} if out_shardings is None else {"out_shardings": (*out_shardings, None)}
  return jax.jit(update, donate_argnums=(0, 2), **kw)
