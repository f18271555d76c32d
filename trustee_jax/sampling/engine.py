"""Continuous-batching engine: decode slots, prefix reuse, thread- and asyncio-safe submits.

A background thread owns the device. Each step it prefills waiting requests into free
slots (several at once, bucketed by length) and runs a short chunk of decode steps for
every busy slot. A finished request frees its slot at once but leaves its KV cache
behind: a later request whose prompt starts with those tokens (the next turn of the same
conversation) is placed in that slot and only its new tokens are prefilled. A slot's
cache is lost when another request takes the slot; the next turn is then re-prefilled.

With kv_layout="paged" the slots share one pool of fixed-size KV blocks instead
(paged_slots.py): a request is admitted while blocks for its prompt and max_new_tokens are
free (it queues otherwise), and shares the full prompt blocks already computed, by any
request, the last turn of its conversation or its task's other episodes.
"""
import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from trustee_jax.models.transformer import KVCache, Transformer
from trustee_jax.sampling import constrained, paged_slots, sampler, slots
from trustee_jax.sampling.requests import (Completion, EngineError, QueueFullError, Request,
                                           RequestError, SamplingParams, check_request,
                                           decode_options, resolve, row_sampling, step_options)

_log = logging.getLogger(__name__)
# Every counter exists from the start, so metrics() can copy them while the engine counts.
_STATS = ("prefill_tokens", "reused_tokens", "decode_steps", "requests_done",
          "requests_cancelled", "rejected_queue_full", "engine_errors")


def _bucket(n: int, smallest: int, cap: int) -> int:
  b = smallest
  while b < n:
    b *= 2
  return min(b, cap)


class Engine:
  """Serves generation requests over `num_slots` decode slots of one model."""

  def __init__(self, model: Transformer, *, num_slots: int = 16, cache_len: int = 2048,
               decode_chunk: int = 8, prefill_chunk: int = 512, max_queue: int = 4096,
               decode_fn: Callable[[list[int]], str] | None = None,
               grammar_compiler: constrained.GrammarCompiler | None = None,
               static_batching: bool = False, unstack_layers: bool = True, seed: int = 0,
               kv_layout: str = "dense", block_size: int = 16, num_blocks: int | None = None):
    """kv_layout "dense" gives each slot a cache_len row; "paged" a share of `num_blocks`
    blocks of `block_size` tokens (default: the dense cache's memory)."""
    cfg = model.cfg
    if cache_len > cfg.max_position_embeddings:
      raise ValueError(f"cache_len {cache_len} > model context {cfg.max_position_embeddings}")
    if kv_layout not in ("dense", "paged"):
      raise ValueError(f"kv_layout must be 'dense' or 'paged', got {kv_layout!r}")
    if kv_layout == "paged" and model.mesh is not None:
      raise ValueError("kv_layout 'paged' runs on one device so far; use 'dense' on a mesh")
    self._paged = None if kv_layout == "dense" else paged_slots.PagedSlots(
        cfg, num_slots=num_slots, cache_len=cache_len, block_size=block_size,
        num_blocks=num_slots * cache_len // block_size if num_blocks is None else num_blocks)
    self.cfg = cfg
    self.graphdef, self.state = nnx.split(model)
    # Decode reads each layer's weights as its own buffer (one extra copy of the layer
    # weights): scanning the stacked ones copies every slice per step (benchmarks/README.md).
    self.unstack_layers = unstack_layers
    self.layers = sampler.unstack_layers(self.graphdef, self.state) if unstack_layers else None
    self.num_slots, self.cache_len = num_slots, cache_len
    self.decode_chunk, self.max_queue = decode_chunk, max_queue
    self.prefill_chunk = prefill_chunk
    self.decode_fn, self.grammar = decode_fn, grammar_compiler
    self.static_batching = static_batching
    self._mesh, self._rules = model.mesh, model.rules
    self.slots = [slots.Slot() for _ in range(num_slots)]
    self._reset_device_state()
    self.stats = collections.Counter(dict.fromkeys(_STATS, 0))
    self.busy_seconds = 0.0  # wall time the engine thread spent in device steps
    self._pending: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._clock = 0
    self._rng = np.random.default_rng(seed)
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name="trustee-engine", daemon=True)
    self._thread.start()

  # ---- public API ---------------------------------------------------------------------

  def submit(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams()
             ) -> concurrent.futures.Future:
    """Queues one request; the future resolves to a Completion (or raises its error)."""
    prompt = [int(t) for t in prompt_ids]
    self._check(prompt, params)
    matcher = None
    if params.grammar is not None or params.json_schema is not None:
      if self.grammar is None:
        raise RequestError("constrained decoding needs an engine built with a grammar compiler")
      try:
        matcher = self.grammar.matcher(
            params.grammar or constrained.json_schema_grammar(params.json_schema))
      except constrained.GrammarError as e:
        raise RequestError(str(e)) from e
    seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
    req = Request(prompt, params, seed, concurrent.futures.Future(), matcher)
    with self._cv:
      if self._closed:
        raise EngineError("engine is shut down")
      if len(self._pending) >= self.max_queue:
        self.stats["rejected_queue_full"] += 1
        raise QueueFullError(f"engine queue is full ({self.max_queue} waiting)")
      self._pending.append(req)
      self._cv.notify()
    return req.future

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
               ) -> list[Completion]:
    """Submits all prompts at once and waits for every result."""
    if isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    futures = [self.submit(p, sp) for p, sp in zip(prompts, params)]
    return [f.result() for f in futures]

  async def agenerate(self, prompt_ids: Sequence[int],
                      params: SamplingParams = SamplingParams()) -> Completion:
    return await asyncio.wrap_future(self.submit(prompt_ids, params))

  def update_params(self, model_or_state) -> None:
    """Swaps in new weights (same shapes), e.g. the policy after an optimizer step."""
    state = model_or_state if not isinstance(model_or_state, nnx.Module) else nnx.state(
        model_or_state)
    layers = sampler.unstack_layers(self.graphdef, state) if self.unstack_layers else None
    with self._cv:
      self.state, self.layers = state, layers
      for slot in self.slots:  # caches were computed with the old weights
        slot.cached_ids, slot.stale = [], slot.request is not None
      if self._paged is not None:
        self._paged.drop_prefixes_later()

  def metrics(self) -> dict[str, int | float | bool]:
    """Load and counters for a server's metrics endpoint: busy slots, waiting requests, stats."""
    with self._cv:
      blocks = {} if self._paged is None else {
          f"kv_blocks_{k}": v for k, v in dataclasses.asdict(self._paged.usage()).items()}
      return {"num_slots": self.num_slots, "busy_slots": sum(s.request is not None
                                                              for s in self.slots),
              "pending": len(self._pending), "running": self.running,
              "busy_seconds": self.busy_seconds, **blocks, **self.stats}

  @property
  def running(self) -> bool:
    """Whether the engine thread is alive (False once closed or if it died)."""
    return self._thread.is_alive()

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---- scheduling ---------------------------------------------------------------------

  def _check(self, prompt: list[int], p: SamplingParams) -> None:
    check_request(prompt, p, vocab_size=self.cfg.vocab_size, context=self.cache_len,
                  can_stop_on_strings=self.decode_fn is not None)
    if self._paged is not None and (self._paged.blocks_for(len(prompt) + p.max_new_tokens)
                                    > self._paged.num_blocks):
      raise RequestError(f"prompt + max_new_tokens need more than the {self._paged.num_blocks} "
                         f"KV blocks of the pool")

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._closed and not self._pending and not self._busy():
          self._cv.wait()
        if self._closed:
          self._fail_all(EngineError("engine shut down"))
          return
        admitted = self._take_admissions()
      t0 = time.perf_counter()
      try:
        if admitted:
          self._prefill(admitted)
        if self._busy():
          self._decode()
      except Exception as e:  # noqa: BLE001 - every in-flight request must learn of it
        _log.exception("engine step failed; failing the in-flight requests")
        with self._cv:
          self.stats["engine_errors"] += 1
          self._fail_all(EngineError(f"engine step failed: {type(e).__name__}: {e}"),
                         pending=False)
          self._reset_device_state()
      finally:
        self.busy_seconds += time.perf_counter() - t0

  def _reset_device_state(self) -> None:
    """Zeroed KV cache and token counts, no resident prefixes: at start, and after a failed
    step (it may have consumed the donated buffers or left them half written)."""
    if self._paged is None:
      self.cache = KVCache.zeros(self.cfg, self.num_slots, self.cache_len, mesh=self._mesh,
                                 rules=self._rules)
    else:
      self._paged.reset()
      self.cache = self._paged.new_cache()
    self.counts = jnp.zeros((self.num_slots, self.cfg.vocab_size), jnp.int32)
    for slot in self.slots:
      slot.cached_ids = []

  def _busy(self) -> bool:
    return any(s.request is not None for s in self.slots)

  def _fail_all(self, error: Exception, pending: bool = True) -> None:
    for slot_id, slot in enumerate(self.slots):
      if slot.request is not None:
        resolve(slot.request.future, error=error)
        slot.request, slot.cached_ids = None, []
        self._release(slot_id)
    while pending and self._pending:
      resolve(self._pending.popleft().future, error=error)

  def _take_admissions(self) -> list[tuple[int, Request, int]]:
    if self.static_batching and self._busy():
      return []
    if self._paged is not None:
      return self._take_paged_admissions()
    admitted = []
    while self._pending:
      free = [i for i, s in enumerate(self.slots) if s.request is None]
      if not free:
        break
      req = self._pending.popleft()
      slot_id, reuse = slots.pick_dense_slot(self.slots, free, req.prompt)
      self.slots[slot_id].request = req
      admitted.append((slot_id, req, reuse))
    return admitted

  def _take_paged_admissions(self) -> list[tuple[int, Request, int]]:
    """Admits waiting requests in order into free slots while the block pool has room."""
    admitted, computing = [], set()
    free = [i for i, s in enumerate(self.slots) if s.request is None]
    while self._pending and free:
      req = self._pending[0]
      reuse = self._paged.admit(free[0], req.prompt, len(req.prompt) + req.params.max_new_tokens,
                                computing)
      if reuse is None:
        break
      slot_id = free.pop(0)
      self.slots[slot_id].request = self._pending.popleft()
      admitted.append((slot_id, req, reuse))
    return admitted

  def _release(self, slot_id: int) -> None:
    """Returns a slot's KV blocks to the pool (paged layout; a dense slot keeps its row)."""
    if self._paged is not None:
      self._paged.release(slot_id)

  def _device_cache(self):
    """The cache to pass to a step: the paged one carries the slots' current block tables."""
    return self.cache if self._paged is None else self._paged.with_tables(self.cache)

  def _bitmask(self, reqs) -> np.ndarray | None:
    if not any(r and r.matcher is not None for r in reqs):
      return None
    mask = self.grammar.allocate(len(reqs))
    for i, r in enumerate(reqs):
      if r and r.matcher is not None:
        constrained.fill_mask(r.matcher, mask, i)
    return mask

  def _fill_leading_chunks(self, slot_id: int, req: Request, start: int) -> int:
    """Prefills all but the last `prefill_chunk` new tokens of a long prompt; returns where
    the sampled prefill starts."""
    while len(req.prompt) - start > self.prefill_chunk:
      end = start + self.prefill_chunk
      self.cache = sampler.fill_cache(
          self.graphdef, self.state, self._device_cache(),
          jnp.asarray([req.prompt[start:end]], jnp.int32),
          jnp.arange(start, end, dtype=jnp.int32)[None], jnp.asarray([slot_id], jnp.int32),
          attend_len=_bucket(end, 128, self.cache_len))
      self.stats["prefill_tokens"] += end - start
      start = end
    return start

  def _prefill(self, admitted: list[tuple[int, Request, int]]) -> None:
    for i, (slot_id, req, reuse) in enumerate(admitted):
      req.cached = reuse
      admitted[i] = (slot_id, req, self._fill_leading_chunks(slot_id, req, reuse))
    admitted.sort(key=lambda a: len(a[1].prompt) - a[2])
    groups: dict[int, list] = collections.defaultdict(list)
    for slot_id, req, reuse in admitted:
      groups[_bucket(len(req.prompt) - reuse, 16, self.cache_len)].append((slot_id, req, reuse))
    for width, group in groups.items():
      n = _bucket(len(group), 1, self.num_slots)
      tokens = np.zeros((n, width), np.int32)
      positions = np.full((n, width), -1, np.int32)
      rows = np.full((n,), -1, np.int32)
      last = np.zeros((n,), np.int32)
      reqs: list[Request | None] = [None] * n
      for i, (slot_id, req, start) in enumerate(group):
        new = req.prompt[start:]
        tokens[i, :len(new)] = new
        positions[i, :len(new)] = np.arange(start, len(req.prompt))
        rows[i], last[i], reqs[i] = slot_id, len(new) - 1, req
        self.stats["prefill_tokens"] += len(new)
        self.stats["reused_tokens"] += req.cached
      attend = _bucket(max(len(r.prompt) for r in reqs if r), 128, self.cache_len)
      use_filter, n_top = step_options(reqs)
      self.cache, self.counts, out = sampler.prefill(
          self.graphdef, self.state, self._device_cache(), self.counts, jnp.asarray(tokens),
          jnp.asarray(positions), jnp.asarray(rows), jnp.asarray(last),
          row_sampling(reqs, [0] * n), self._bitmask(reqs),
          attend_len=attend, use_filter=use_filter, n_top=n_top)
      toks, lps, top_ids, top_lps = (np.asarray(x) for x in out)
      for i, (slot_id, req, _) in enumerate(group):
        slot = self.slots[slot_id]
        if self._paged is not None:
          self._paged.commit(slot_id, req.prompt[req.cached:])
        slot.cached_ids = list(req.prompt)
        slot.position = len(req.prompt)
        self._record(slot, int(toks[i]), float(lps[i]), top_ids[i], top_lps[i])

  def _drop_cancelled(self) -> None:
    """Frees the slots of requests whose callers cancelled them (e.g. a client disconnect)."""
    for slot_id, slot in enumerate(self.slots):
      if slot.request is not None and slot.request.future.cancelled():
        self.stats["requests_cancelled"] += 1
        slot.request, slot.cached_ids = None, []
        self._release(slot_id)

  def _decode(self) -> None:
    self._drop_cancelled()
    if not self._busy():
      return
    reqs = [s.request for s in self.slots]
    live = [(i, r) for i, r in enumerate(reqs) if r]
    steps = 1 if any(r.matcher is not None for _, r in live) else self.decode_chunk
    if self._pending:  # free slots soon for those waiting
      left = min(r.params.max_new_tokens - len(r.tokens) for _, r in live)
      while steps > 1 and steps > left:
        steps //= 2
    # Only the busy slots decode, padded to a power of two (padding: position -1, no writes).
    n = _bucket(len(live), 1, self.num_slots)
    rows = np.zeros((n,), np.int32)
    positions = np.full((n,), -1, np.int32)
    last_tok = np.zeros((n,), np.int32)
    batch: list[Request | None] = [None] * n
    for j, (i, r) in enumerate(live):
      rows[j], positions[j], last_tok[j], batch[j] = i, self.slots[i].position, r.tokens[-1], r
    attend = _bucket(int(positions.max()) + steps, 128, self.cache_len)
    use_filter, n_top = step_options(batch)
    self.cache, self.counts, out = sampler.decode(
        self.graphdef, self.state, self.layers, self._device_cache(), self.counts,
        jnp.asarray(rows), jnp.asarray(last_tok), jnp.asarray(positions),
        row_sampling(batch, [len(r.tokens) if r else 0 for r in batch]),
        self._bitmask(batch), steps=steps, attend_len=attend, use_filter=use_filter,
        n_top=n_top, **decode_options([r for _, r in live]))
    toks, lps, top_ids, top_lps = (np.asarray(x) for x in out)
    self.stats["decode_steps"] += steps
    for j, (i, _) in enumerate(live):
      slot = self.slots[i]
      for k in range(steps):
        slot.cached_ids.append(slot.request.tokens[-1])
        if self._paged is not None:
          self._paged.commit(i, slot.request.tokens[-1:])
        slot.position += 1
        if self._record(slot, int(toks[j, k]), float(lps[j, k]), top_ids[j, k], top_lps[j, k]):
          break

  def _record(self, slot: slots.Slot, token: int, logprob: float, top_ids, top_lps) -> bool:
    """Appends a sampled token to the slot's request; finishes it when done. True if done."""
    req = slot.request
    done = req.append(token, logprob, top_ids, top_lps, self.decode_fn)
    if done is None:
      return False
    self._clock += 1
    slot.last_used = self._clock
    slot.request = None
    if slot.stale:  # positions written before the weight swap hold the old weights' keys
      slot.cached_ids, slot.stale = [], False
    self._release(self.slots.index(slot))
    self.stats["requests_done"] += 1
    resolve(req.future, req.completion(*done))
    return True
