"""SGLang as the policy's rollout backend, reached over HTTP only (sglang is never imported).

`SGLangPolicy` offers the engine's rollout-facing interface (`agenerate`, `metrics`, `close`),
so rollout.run_episode does not care which it talks to, plus `push_weights(model_dir)` (and
`update_params(model)`, which writes the safetensors snapshot first) for the weight sync after
each update. The ids and logprobs are the server's, unchanged: what it sampled is what the
trainer trains on, and `logprob_gap` measures how far the trainer's recomputed log-probs are
from them (logged as rollout/logprob_gap_*), so that guarantee is checked, not assumed.

The wire format relied on (SGLang's native API; sgl-project/sglang
docs/basic_usage/sampling_params.md and python/sglang/srt/managers/io_struct.py):
- `POST /generate` {"input_ids", "sampling_params": {max_new_tokens, temperature, top_p, top_k
  (-1: off), frequency_penalty, stop_token_ids, stop, json_schema, sampling_seed},
  "return_logprob": true, "top_logprobs_num"} -> {"text", "output_ids", "meta_info":
  {"output_token_logprobs": [[logprob, token_id, text|null], ...], "output_top_logprobs",
  "finish_reason": {"type": "stop"|"length"|"abort", "matched": id|str|null},
  "prompt_tokens", "completion_tokens", "cached_tokens"}}.
- `sampling_seed` is a field of SGLang's SamplingParams (srt/sampling/sampling_params.py), its
  per-request seed; sent whenever the request has one. Whether the server's sampler makes a
  seeded turn reproducible (which may need --enable-deterministic-inference) was not checked
  against a real server here; an older server without the field refuses it with a 400, loudly.
- the reply's top-level "output_ids" as srt/managers/tokenizer_manager.py builds it
  ({"text", "output_ids", "meta_info"}).
- `POST /update_weights_from_disk` {"model_path", "load_format"?, "weight_version"?} ->
  {"success": bool, "message": str} (UpdateWeightFromDiskReqInput); `GET /health`: 200 when up.
"""
import asyncio
import collections
import dataclasses
import json
import logging
import pathlib
import random
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import jax
import jax.numpy as jnp

from trustee_jax.models import weights
from trustee_jax.models.transformer import Transformer
from trustee_jax.sampling.engine import Engine
from trustee_jax.sampling.requests import Completion, EngineError, RequestError, SamplingParams

_log = logging.getLogger(__name__)
_STATS = ("requests", "retries", "failures", "generated_tokens", "weight_pushes",
          "weight_push_retries", "weight_push_failures")
_SNIPPET = 300


class SGLangError(EngineError):
  """A generate call that failed for good (rollout counts the episode as an engine drop)."""


class WeightPushError(RuntimeError):
  """The server did not take the new weights: training must not go on sampling stale ones."""


class _Retryable(Exception):
  """One failed attempt worth another (connect error, timeout, 5xx, 429, an aborted request)."""


@dataclasses.dataclass(frozen=True)
class SGLangConfig:
  """Where the policy server lives and how hard to try; a call takes at most
  (max_retries + 1) * timeout_s plus its backoff waits (each at most backoff_max_s)."""
  url: str
  timeout_s: float = 600.0
  weights_timeout_s: float = 1800.0
  max_retries: int = 3
  backoff_base_s: float = 0.5
  backoff_max_s: float = 8.0
  max_concurrency: int = 256
  load_format: str | None = None
  weights_dtype: str | None = None  # the snapshot's safetensors dtype (None: the params')

  def __post_init__(self):
    if not self.url.startswith(("http://", "https://")):
      raise ValueError(f"engine.sglang_url must start with http:// or https://, got {self.url!r}")
    if self.timeout_s <= 0 or self.weights_timeout_s <= 0 or self.max_retries < 0:
      raise ValueError("SGLang timeouts must be > 0 and max_retries >= 0")


def _snippet(text: str) -> str:
  return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _aborted(reply: Any) -> bool:
  """Whether a /generate reply is SGLang's finish_reason {"type": "abort"}."""
  meta = reply.get("meta_info") if isinstance(reply, dict) else None
  finish = meta.get("finish_reason") if isinstance(meta, dict) else None
  return isinstance(finish, dict) and finish.get("type") == "abort"


def generate_body(prompt_ids: Sequence[int], params: SamplingParams) -> dict[str, Any]:
  """The /generate request for one turn: token ids in, logprobs of the sampled tokens out."""
  if params.grammar is not None:
    raise RequestError("the SGLang backend takes json_schema, not a ready llguidance grammar")
  sp: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                        "temperature": params.temperature, "top_p": params.top_p,
                        "top_k": params.top_k or -1,  # ours: 0 is off; SGLang's: -1
                        "frequency_penalty": params.frequency_penalty,
                        "stop_token_ids": list(params.stop_token_ids)}
  if params.stop_strings:
    sp["stop"] = list(params.stop_strings)
  if params.seed is not None:
    sp["sampling_seed"] = int(params.seed)
  if params.json_schema is not None:
    sp["json_schema"] = (params.json_schema if isinstance(params.json_schema, str)
                         else json.dumps(params.json_schema))
  body = {"input_ids": [int(t) for t in prompt_ids], "sampling_params": sp,
          "return_logprob": True}
  if params.top_logprobs:
    body["top_logprobs_num"] = params.top_logprobs
  return body


def parse_generate(reply: Any, prompt_ids: Sequence[int]) -> Completion:
  """A /generate reply as a Completion; ValueError naming the field when it is malformed."""
  meta = reply.get("meta_info") if isinstance(reply, dict) else None
  if not isinstance(meta, dict):
    raise ValueError(f"reply has no meta_info: {_snippet(json.dumps(reply))}")
  ids = reply.get("output_ids")
  if not isinstance(ids, list) or not ids:
    raise ValueError(f"reply has no output_ids (got {_snippet(json.dumps(ids))})")
  rows = meta.get("output_token_logprobs")
  if not isinstance(rows, list) or not rows:
    raise ValueError("meta_info has no output_token_logprobs: was return_logprob dropped?")
  if len(rows) != len(ids):
    raise ValueError(f"meta_info.output_token_logprobs has {len(rows)} entries for "
                     f"{len(ids)} output_ids")
  if any(not isinstance(r, list) or len(r) < 2 or r[0] is None for r in rows):
    raise ValueError("meta_info.output_token_logprobs entries must be [logprob, token_id, ...]")
  tokens = [int(t) for t in ids]
  if [int(r[1]) for r in rows] != tokens:
    raise ValueError("meta_info.output_token_logprobs token ids differ from output_ids")
  finish = meta.get("finish_reason") or {}
  kind = finish.get("type") if isinstance(finish, dict) else None
  if kind not in ("stop", "length"):
    raise ValueError(f"meta_info.finish_reason is {_snippet(json.dumps(finish))}")
  top = meta.get("output_top_logprobs")
  top_lps = None if not isinstance(top, list) else [
      [(int(e[1]), float(e[0])) for e in (pos or [])] for pos in top]
  return Completion(prompt_ids=list(prompt_ids), tokens=tokens,
                    logprobs=[float(r[0]) for r in rows], top_logprobs=top_lps,
                    finish_reason=kind, stop=finish.get("matched"),
                    cached_tokens=int(meta.get("cached_tokens") or 0))


class SGLangPolicy:
  """The policy served by an SGLang server: generation with bounded, counted retries and the
  weight push after each update. One instance's async calls belong to one event loop."""

  def __init__(self, config: SGLangConfig, weights_dir: str | pathlib.Path | None = None):
    """weights_dir: shared storage (seen by the server at the same path) for the snapshots
    that update_params writes."""
    self.config = config
    self.weights_dir = None if weights_dir is None else pathlib.Path(weights_dir)
    self._http = httpx.AsyncClient(
        base_url=config.url, timeout=httpx.Timeout(config.timeout_s),
        limits=httpx.Limits(max_connections=config.max_concurrency,
                            max_keepalive_connections=config.max_concurrency))
    self._sync = httpx.Client(base_url=config.url, timeout=httpx.Timeout(config.weights_timeout_s))
    self.stats = collections.Counter(dict.fromkeys(_STATS, 0))
    self._rng = random.Random()
    self._version = 0
    self._snapshot: pathlib.Path | None = None
    self._closing: asyncio.Task | None = None  # close() scheduled on the running loop (kept alive)
    self._closed = False

  def _backoff(self, attempt: int) -> float:
    """Jittered exponential wait before attempt + 1."""
    cfg = self.config
    return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt) * self._rng.uniform(0.5, 1)

  @staticmethod
  def _check_status(resp: httpx.Response) -> None:
    """Raises _Retryable on 429/5xx, ValueError on another non-200."""
    if resp.status_code == 429 or resp.status_code >= 500:
      raise _Retryable(f"{resp.status_code}: {_snippet(resp.text)}")
    if resp.status_code != 200:
      raise ValueError(f"{resp.status_code}: {_snippet(resp.text)}")

  async def agenerate(self, prompt_ids: Sequence[int],
                      params: SamplingParams = SamplingParams()) -> Completion:
    """One turn: the server's sampled ids and logprobs; raises SGLangError on failure."""
    if self._closed:
      raise SGLangError("the SGLang policy client is closed")
    body = generate_body(prompt_ids, params)
    self.stats["requests"] += 1
    for attempt in range(self.config.max_retries + 1):
      try:
        resp = await self._http.post("/generate", json=body)
        self._check_status(resp)
        reply = resp.json()
        if _aborted(reply):  # e.g. a weight update with abort_all_requests; the seed repeats it
          raise _Retryable(f"the server aborted the request: {_snippet(resp.text)}")
        comp = parse_generate(reply, prompt_ids)
        self.stats["generated_tokens"] += len(comp.tokens)
        return comp
      except (_Retryable, httpx.TransportError) as e:
        if attempt == self.config.max_retries:
          self.stats["failures"] += 1
          raise SGLangError(f"SGLang {self.config.url}/generate failed after "
                            f"{attempt + 1} attempts: {type(e).__name__}: {e}") from e
        self.stats["retries"] += 1
        wait = self._backoff(attempt)
        _log.warning("SGLang /generate attempt %d failed (%s); retrying in %.2fs",
                     attempt + 1, e, wait)
        await asyncio.sleep(wait)
      except (ValueError, TypeError, IndexError) as e:  # a 4xx, or a reply not in SGLang's shape
        self.stats["failures"] += 1
        raise SGLangError(f"SGLang {self.config.url}/generate: {e}") from e
    raise AssertionError("unreachable")

  def push_weights(self, model_dir: str | pathlib.Path, weight_version: str | None = None
                   ) -> dict[str, Any]:
    """Has the server reload its weights from `model_dir` (an HF directory on storage it sees);
    retried on connect errors and 5xx, counted; raises WeightPushError naming the cause."""
    body: dict[str, Any] = {"model_path": str(model_dir)}
    if self.config.load_format:
      body["load_format"] = self.config.load_format
    if weight_version is not None:
      body["weight_version"] = weight_version
    for attempt in range(self.config.max_retries + 1):
      try:
        resp = self._sync.post("/update_weights_from_disk", json=body)
        if resp.status_code == 429 or resp.status_code >= 500:
          raise _Retryable(f"{resp.status_code}: {_snippet(resp.text)}")
        break
      except (_Retryable, httpx.TransportError) as e:
        if attempt == self.config.max_retries:
          self.stats["weight_push_failures"] += 1
          raise WeightPushError(f"SGLang {self.config.url}/update_weights_from_disk failed after "
                                f"{attempt + 1} attempts: {type(e).__name__}: {e}") from e
        self.stats["weight_push_retries"] += 1
        _log.warning("SGLang weight push attempt %d failed (%s)", attempt + 1, e)
        time.sleep(self._backoff(attempt))  # between updates: no rollout is waiting
    try:  # SGLang answers a failed load with 400 {"success": false, "message": ...}
      reply = resp.json()
    except ValueError:
      reply = None
    if resp.status_code != 200 or not isinstance(reply, dict) or reply.get("success") is not True:
      self.stats["weight_push_failures"] += 1
      message = reply.get("message") if isinstance(reply, dict) else _snippet(resp.text)
      raise WeightPushError(f"SGLang did not load the weights from {model_dir} "
                            f"({resp.status_code}): {message}")
    self.stats["weight_pushes"] += 1
    return reply

  def update_params(self, model: Transformer) -> None:
    """Writes `model` as a safetensors snapshot under weights_dir, pushes it, then removes the
    previous snapshot (a failed push keeps both and raises)."""
    if self.weights_dir is None:
      raise WeightPushError("engine.weights_dir is not set: the SGLang backend has nowhere to "
                            "write the weights it pushes")
    if not isinstance(model, Transformer):
      raise TypeError(f"update_params needs a plain Transformer (merge LoRA first), got "
                      f"{type(model).__name__}")
    self._version += 1
    snapshot = self.weights_dir / f"policy_v{self._version:06d}"
    weights.save_hf(model, snapshot, dtype=self.config.weights_dtype)
    self.push_weights(snapshot, weight_version=str(self._version))
    if self._snapshot is not None:
      shutil.rmtree(self._snapshot)
    self._snapshot = snapshot

  def metrics(self) -> dict[str, int | bool]:
    """Counters to log, as Engine.metrics gives them."""
    return {"running": not self._closed, **self.stats}

  async def aclose(self) -> None:
    """Closes both HTTP clients (from the event loop that made the requests)."""
    self._closed = True
    self._sync.close()
    await self._http.aclose()

  def close(self) -> None:
    """Refuses further requests and closes the clients; from inside the running loop the async
    client's close is scheduled on it (Trainer.close is synchronous)."""
    self._closed = True
    self._sync.close()
    try:
      loop = asyncio.get_running_loop()
    except RuntimeError:
      asyncio.run(self._http.aclose())
      return
    self._closing = loop.create_task(self._http.aclose())


def logprob_gap(sampled, recomputed, mask) -> dict[str, Any]:
  """Max and mean |sampled - recomputed| over the masked tokens (0 when none): how far the
  server's logprobs are from the trainer's for the same tokens, logged as rollout/logprob_gap_*."""
  gap = jnp.abs(jnp.asarray(sampled, jnp.float32) - jnp.asarray(recomputed, jnp.float32))
  m = jnp.asarray(mask, jnp.float32)
  return {"rollout/logprob_gap_max": jnp.max(gap * m, initial=0.0),
          "rollout/logprob_gap_mean": jnp.sum(gap * m) / jnp.maximum(jnp.sum(m), 1.0)}


def build_policy_backend(cfg: Any, model_fn: Callable[[], Transformer],
                         decode_fn: Callable[[list[int]], str]) -> "Engine | SGLangPolicy":
  """The rollout backend the run config's `engine.backend` names: "jax" (the in-process Engine
  over model_fn()) or "sglang" (the server at engine.sglang_url; model_fn is not called)."""
  e = cfg["engine"]
  backend = e.get("backend", "jax")
  if backend == "sglang":
    if not e.get("sglang_url") or not e.get("weights_dir"):
      raise ValueError("engine.backend='sglang' needs engine.sglang_url and engine.weights_dir "
                       "(shared storage the server reads the pushed weights from)")
    if not cfg["train"].get("recompute_old_logprobs"):
      raise ValueError("engine.backend='sglang' needs train.recompute_old_logprobs=True: the "
                       "server's logprobs are checked against the trainer's "
                       "(rollout/logprob_gap_*)")
    if jax.process_count() > 1:
      raise ValueError("engine.backend='sglang' runs with one trainer process so far")
    return SGLangPolicy(SGLangConfig(url=e["sglang_url"]), weights_dir=e["weights_dir"])
  if backend != "jax":
    raise ValueError(f"engine.backend must be 'jax' or 'sglang', got {backend!r}")
  return Engine(model_fn(), num_slots=e["num_slots"], cache_len=e["cache_len"],
                decode_chunk=e["decode_chunk"], unstack_layers=e.get("unstack_layers", True),
                kv_layout=e["kv_layout"], block_size=e["block_size"],
                num_blocks=e["num_blocks"] or None, decode_fn=decode_fn)
