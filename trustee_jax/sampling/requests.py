"""One generation request: its settings, its checks, and the record of what it sampled.

The engine (engine.py) schedules requests over decode slots; everything about a single
request that does not depend on the slots lives here.
"""
import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from trustee_jax.sampling import sampler

MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
  """A request the engine cannot serve (empty or too long prompt, bad settings, bad schema)."""


class QueueFullError(RuntimeError):
  """More requests waiting than the engine's queue holds."""


class EngineError(RuntimeError):
  """The engine failed or shut down while the request was in flight."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request settings (OpenAI semantics). temperature 0 is greedy."""
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  frequency_penalty: float = 0.0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  top_logprobs: int = 0
  json_schema: Any = None  # dict or JSON string; constrained by llguidance
  grammar: str | None = None  # a ready llguidance grammar (overrides json_schema)


@dataclasses.dataclass
class Completion:
  """What a request produced: sampled ids exactly as sampled, and their logprobs."""
  prompt_ids: list[int]
  tokens: list[int]
  logprobs: list[float]
  top_logprobs: list[list[tuple[int, float]]] | None
  finish_reason: str  # "stop" | "length"
  stop: int | str | None  # the stop token id or stop string that ended it
  cached_tokens: int  # prompt tokens reused from a resident cache (not prefilled)


def check_request(prompt: list[int], p: SamplingParams, *, vocab_size: int, context: int,
                  can_stop_on_strings: bool) -> None:
  """Raises RequestError for a request no engine of this vocabulary and context can serve."""
  if not prompt:
    raise RequestError("empty prompt")
  if min(prompt) < 0 or max(prompt) >= vocab_size:
    raise RequestError(f"token ids must lie in [0, {vocab_size})")
  if p.max_new_tokens < 1:
    raise RequestError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
  if len(prompt) + p.max_new_tokens > context:
    raise RequestError(
        f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
        f"context of {context} tokens")
  if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
    raise RequestError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
  if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
    raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
  if p.stop_strings and not can_stop_on_strings:
    raise RequestError("stop strings need an engine built with decode_fn")


def resolve(future: concurrent.futures.Future, result=None, error=None) -> None:
  """Sets a request's outcome unless its caller cancelled it (a client that went away)."""
  if future.cancelled():
    return
  try:
    future.set_exception(error) if error is not None else future.set_result(result)
  except concurrent.futures.InvalidStateError:  # cancelled in between: nobody is waiting
    pass


@dataclasses.dataclass
class Request:
  """A queued or running request and the tokens it has sampled so far."""
  prompt: list[int]
  params: SamplingParams
  seed: int
  future: concurrent.futures.Future
  matcher: Any = None  # llguidance matcher of a constrained request
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  cached: int = 0  # prompt tokens reused from a resident cache

  def append(self, token: int, logprob: float, top_ids, top_lps,
             decode_fn: Callable[[list[int]], str] | None) -> tuple[str, int | str | None] | None:
    """Records one sampled token; returns (finish_reason, stop) once the request is done."""
    p = self.params
    self.tokens.append(token)
    self.logprobs.append(logprob)
    if p.top_logprobs:
      self.top.append([(int(t), float(v)) for t, v in
                       zip(top_ids[:p.top_logprobs], top_lps[:p.top_logprobs])])
    if self.matcher is not None:
      if not self.matcher.consume_token(token):
        raise EngineError(f"grammar rejected sampled token {token}: {self.matcher.get_error()}")
    if token in p.stop_token_ids:
      return "stop", token
    if p.stop_strings:
      text = decode_fn(self.tokens)
      hit = next((s for s in p.stop_strings if s in text), None)
      if hit is not None:
        return "stop", hit
    if self.matcher is not None and self.matcher.is_stopped():
      return "stop", None
    if len(self.tokens) >= p.max_new_tokens:
      return "length", None
    return None

  def completion(self, finish_reason: str, stop: int | str | None) -> Completion:
    """The finished request as its caller receives it."""
    return Completion(prompt_ids=self.prompt, tokens=self.tokens, logprobs=self.logprobs,
                      top_logprobs=self.top if self.params.top_logprobs else None,
                      finish_reason=finish_reason, stop=stop, cached_tokens=self.cached)


def row_sampling(reqs: list[Request | None], gen_index: list[int]) -> sampler.RowSampling:
  """Per-row sampling settings of a step's batch (padding rows greedy, unfiltered)."""
  def arr(f, dtype, pad=0):
    return jnp.asarray(np.array([f(r) if r else pad for r in reqs], dtype))
  return sampler.RowSampling(
      temperature=arr(lambda r: r.params.temperature, np.float32),
      top_p=arr(lambda r: r.params.top_p, np.float32, pad=1.0),
      top_k=arr(lambda r: r.params.top_k, np.int32),
      frequency_penalty=arr(lambda r: r.params.frequency_penalty, np.float32),
      seed=arr(lambda r: r.seed, np.uint32),
      gen_index=jnp.asarray(np.array(gen_index, np.int32)))


def step_options(reqs: list[Request | None]) -> tuple[bool, int]:
  """(use_filter, n_top): top-k/top-p filtering and top-logprobs only when a row asks."""
  live = [r for r in reqs if r]
  use_filter = any(r.params.top_k > 0 or r.params.top_p < 1 for r in live)
  n_top = MAX_TOP_LOGPROBS if any(r.params.top_logprobs for r in live) else 0
  return use_filter, n_top


def decode_options(live: list[Request]) -> dict[str, bool]:
  """Static decode options: skip the random draw when all are greedy, counts when no penalty."""
  return {"draw": any(r.params.temperature > 0 for r in live),
          "use_penalty": any(r.params.frequency_penalty != 0 for r in live)}
