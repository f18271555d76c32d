"""Jitted prefill and decode steps with per-row sampling settings.

Pure functions of (params, cache, arrays): the engine owns the scheduling. Each row
samples with its own key, `fold_in(key(seed), tokens generated so far)`, so the same
seed gives the same tokens whatever else shares the batch.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from trustee_jax.models.transformer import KVCache

Array = jax.Array
NEG_INF = float("-inf")


@flax.struct.dataclass
class RowSampling:
  """Per-row sampling settings; temperature 0 is greedy, top_k 0 and top_p 1 are off."""
  temperature: Array  # [B] f32
  top_p: Array  # [B] f32
  top_k: Array  # [B] i32
  frequency_penalty: Array  # [B] f32
  seed: Array  # [B] u32
  gen_index: Array  # [B] i32, tokens this row has generated so far


def unpack_bitmask(bitmask: Array, vocab: int) -> Array:
  """llguidance's int32 bitmask [B, ceil(V/32)] -> bool [B, V] (bit i%32 of word i//32)."""
  bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
  return bits.reshape(bitmask.shape[0], -1)[:, :vocab].astype(bool)


def _filter_top_k_top_p(scaled: Array, top_k: Array, top_p: Array) -> Array:
  """Masks scaled logits [B,V] outside each row's top-k and nucleus top-p to -inf."""
  vocab = scaled.shape[-1]
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
  keep_sorted = before < top_p[:, None]
  n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
  pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
  thresh = jnp.maximum(kth, pth)
  return jnp.where(scaled >= thresh, scaled, NEG_INF)


def sample_rows(logits: Array, rows: RowSampling, counts: Array | None, bitmask: Array | None,
                *, use_filter: bool, n_top: int, draw: bool = True):
  """Samples one token per row. Returns (tokens, logprobs, top_ids, top_logprobs).

  The logprob is that of the distribution sampled from: after frequency penalty, the
  grammar mask and temperature, before top-k/top-p truncation (greedy rows: temperature 1).
  draw=False (every row greedy) skips the random draw over the vocabulary.
  """
  logits = logits.astype(jnp.float32)
  if counts is not None:
    logits = logits - rows.frequency_penalty[:, None] * counts.astype(jnp.float32)
  if bitmask is not None:
    logits = jnp.where(unpack_bitmask(bitmask, logits.shape[-1]), logits, NEG_INF)
  greedy = rows.temperature <= 0
  temp = jnp.where(greedy, 1.0, rows.temperature)
  scaled = logits / temp[:, None]
  logp_all = jax.nn.log_softmax(scaled, axis=-1)
  tokens = jnp.argmax(scaled, axis=-1)
  if draw:
    filtered = _filter_top_k_top_p(scaled, rows.top_k, rows.top_p) if use_filter else scaled

    def draw_row(seed, index, row_logits):
      key = jax.random.fold_in(jax.random.key(seed), index)
      return jax.random.categorical(key, row_logits)

    tokens = jnp.where(greedy, tokens, jax.vmap(draw_row)(rows.seed, rows.gen_index, filtered))
  tokens = tokens.astype(jnp.int32)
  logprobs = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
  if n_top:
    top_lp, top_ids = jax.lax.top_k(logp_all, n_top)
  else:
    top_lp = jnp.zeros((logits.shape[0], 0), jnp.float32)
    top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
  return tokens, logprobs, top_ids, top_lp


def _add_counts(counts: Array, rows: Array, tokens: Array, active: Array) -> Array:
  return counts.at[rows, tokens].add(active.astype(counts.dtype))


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_len", "use_filter", "n_top"),
                   donate_argnames=("cache", "counts"))
def prefill(graphdef, state, cache: KVCache, counts: Array, tokens: Array, positions: Array,
            rows: Array, last_index: Array, sampling: RowSampling, bitmask: Array | None, *,
            attend_len: int, use_filter: bool, n_top: int):
  """Prefills `tokens` [n, T] into cache rows `rows` [n] and samples each row's next token.

  Padding has position -1. `last_index` [n] is each row's last real column. Rows padded
  onto the batch for shape bucketing carry row index -1 (no writes, no count updates).
  """
  model = nnx.merge(graphdef, state)
  real = rows >= 0
  safe_rows = jnp.where(real, rows, 0)
  positions = jnp.where(real[:, None], positions, -1)
  hidden, cache = model.hidden_states(tokens, positions, cache, cache_rows=safe_rows,
                                      attend_len=attend_len)
  last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
  logits = model.logits(last)
  # New requests start with zero counts; padding rows index past the end and are dropped.
  counts = counts.at[jnp.where(real, rows, counts.shape[0])].set(0, mode="drop")
  out = sample_rows(logits, sampling, None, bitmask, use_filter=use_filter, n_top=n_top)
  counts = _add_counts(counts, safe_rows, out[0], real)
  return cache, counts, out


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_len"), donate_argnames=("cache",))
def fill_cache(graphdef, state, cache: KVCache, tokens: Array, positions: Array, rows: Array, *,
               attend_len: int) -> KVCache:
  """Writes a leading chunk of long prompts [n, T] into cache rows `rows`; nothing sampled.

  Chunked prefill bounds the attention scores of a long prompt to chunk x context instead
  of context x context.
  """
  model = nnx.merge(graphdef, state)
  _, cache = model.hidden_states(tokens, positions, cache, cache_rows=rows, attend_len=attend_len)
  return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "attend_len", "use_filter",
                                             "n_top", "draw", "use_penalty"),
                   donate_argnames=("cache", "counts"))
def decode(graphdef, state, layers, cache: KVCache, counts: Array, rows: Array, tokens: Array,
           positions: Array, sampling: RowSampling, bitmask: Array | None, *, steps: int,
           attend_len: int, use_filter: bool, n_top: int, draw: bool = True,
           use_penalty: bool = True):
  """Runs `steps` decode steps for the cache rows `rows` [n]; position -1 marks padding rows.

  tokens [n] are the last sampled tokens (not yet in the cache), positions [n] theirs.
  `layers` (the model's `unstacked_layers()`, or None to scan the stacked ones) are the
  weights the steps read. Counts are read and updated only with use_penalty. Returns the
  cache, counts and per-step (tokens, logprobs, top_ids, top_logprobs), each [n, steps, ...].
  """
  model = nnx.merge(graphdef, state)
  active = positions >= 0

  def step(carry, _):
    cache, counts, tok, pos, gen_index = carry
    logits, cache = model(tok[:, None], jnp.where(active, pos, -1)[:, None], cache,
                          cache_rows=rows, attend_len=attend_len, layers=layers)
    row_sampling = sampling.replace(gen_index=gen_index)
    out = sample_rows(logits[:, 0], row_sampling, counts[rows] if use_penalty else None,
                      bitmask, use_filter=use_filter, n_top=n_top, draw=draw)
    if use_penalty:
      counts = _add_counts(counts, rows, out[0], active)
    return (cache, counts, out[0], pos + 1, gen_index + 1), out

  init = (cache, counts, tokens, positions, sampling.gen_index)
  (cache, counts, *_), outs = jax.lax.scan(step, init, None, length=steps)
  outs = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), outs)
  return cache, counts, outs


@functools.partial(jax.jit, static_argnames=("graphdef",))
def unstack_layers(graphdef, state):
  """The model's per-layer weights as separate buffers, for `decode`'s `layers`."""
  return nnx.merge(graphdef, state).unstacked_layers()
