"""The GRPO optimizer update on padded episode arrays: micro-batched, jitted, NaN-safe.

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

from trustee_jax import grpo

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


def token_logprobs(graphdef, params, tokens: jax.Array, positions: jax.Array, *,
                   temperature: float, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(logp, entropy) [N, T-1] of tokens[:, 1:] given their prefixes, in vocabulary chunks."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(tokens, positions)
  return grpo.chunked_token_logprobs(hidden[:, :-1], model.unembed_matrix(), tokens[:, 1:],
                                     temperature, chunk_size)


def make_logprob_fn(graphdef, *, temperature: float, chunk_size: int) -> Callable:
  """Jitted log-probs of a padded batch under some params (old-logprob recompute, reference)."""
  @jax.jit
  def fn(params, tokens, positions):
    return token_logprobs(graphdef, params, tokens, positions, temperature=temperature,
                          chunk_size=chunk_size)[0]
  return fn


def _micro_loss(params, graphdef, mb: Batch, normaliser, cfg: grpo.GRPOConfig,
                temperature: float, chunk_size: int):
  logp, entropy = token_logprobs(graphdef, params, mb["tokens"], mb["positions"],
                                 temperature=temperature, chunk_size=chunk_size)
  mask = mb["loss_mask"][:, 1:]
  adv_tok = grpo.token_advantages(mb["advantages"], mb["turn_rewards"][:, 1:], mask,
                                  cfg.turn_mode)
  ref = mb.get("ref_logprobs")
  return grpo.policy_loss(logp, mb["old_logprobs"][:, 1:], adv_tok, mask, cfg,
                          logp_ref=None if ref is None else ref[:, 1:], entropy=entropy,
                          normaliser=normaliser)


def make_update_fn(graphdef, optimizer: optax.GradientTransformation, cfg: grpo.GRPOConfig, *,
                   micro_batch: int, temperature: float = 1.0, chunk_size: int = 8192
                   ) -> Callable:
  """Returns jitted `update(params, opt_state, batch) -> (params, opt_state, metrics)`.

  batch arrays are [N, T] (N a multiple of micro_batch): tokens, positions (-1 on padding),
  loss_mask, old_logprobs, turn_rewards (all aligned with tokens), advantages [N], and
  optionally ref_logprobs [N, T] (aligned the same way, column 0 unused).
  """
  grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

  @jax.jit
  def update(params, opt_state, batch: Batch):
    n = batch["tokens"].shape[0]
    if n % micro_batch:
      raise ValueError(f"batch of {n} is not a multiple of micro_batch {micro_batch}")
    normaliser = grpo.loss_normaliser(batch["loss_mask"][:, 1:], cfg)
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((n // micro_batch, micro_batch) + x.shape[1:]), batch)

    def accumulate(carry, mb):
      grads, metrics = carry
      (_, m), g = grad_fn(params, graphdef, mb, normaliser, cfg, temperature, chunk_size)
      return (jax.tree_util.tree_map(jnp.add, grads, g),
              jax.tree_util.tree_map(jnp.add, metrics, m)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    metric_zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(lambda: _micro_loss(
            params, graphdef, first, normaliser, cfg, temperature, chunk_size)[1]))
    (grads, summed), _ = jax.lax.scan(accumulate, (zeros, metric_zeros), micro)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(summed["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = grpo.finalize_metrics(summed)
    metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return keep(new_params, params), keep(new_opt, opt_state), metrics

  return update
