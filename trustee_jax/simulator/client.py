"""Resilient async client for the frozen simulator LM behind any OpenAI-compatible server.

Talks to SGLang, vLLM or this project's embedded server over `POST /v1/chat/completions`.
Every failure is loud and bounded: each attempt is cut at `timeout_s`, transient failures
(timeouts and 408, refused or dropped connections, 429, 5xx, malformed replies) are retried with
jittered exponential backoff on the next endpoint, and JSON roles are validated against
their schema and re-asked a bounded number of times. Every retry, failure and re-ask is
counted for TensorBoard.

One client belongs to one event loop (its semaphore and connection pool are bound to it).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import itertools
import json
import logging
import random
import re
import time
import zlib
from typing import Any

import httpx
import jsonschema

from trustee_jax.simulator import json_replies
from trustee_jax.simulator.json_replies import snippet

_log = logging.getLogger(__name__)

CAUSES = ("timeout", "connect", "http_5xx", "http_429", "http_4xx", "bad_response",
          "invalid_output")
REASK_REASONS = ("invalid_json", "schema", "length")


class SimulatorError(RuntimeError):
  """A simulator call that failed for good; `cause` is one of CAUSES."""

  def __init__(self, endpoint: str, cause: str, message: str):
    if cause not in CAUSES:
      raise ValueError(f"unknown SimulatorError cause {cause!r}")
    super().__init__(f"simulator {endpoint} failed ({cause}): {message}")
    self.endpoint = endpoint
    self.cause = cause
    self.message = message


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Where the simulator lives and how hard to try.

  A call takes at most (max_retries + 1) * timeout_s plus its waits between attempts,
  each at most max(backoff_max_s, retry_after_max_s); waiting for a concurrency slot
  is not counted.
  """
  urls: tuple[str, ...]
  api_key: str | None = None
  model: str = "default"
  timeout_s: float = 120.0
  max_retries: int = 3
  backoff_base_s: float = 0.5
  backoff_max_s: float = 8.0
  retry_after_max_s: float = 30.0
  max_concurrency: int = 16
  max_reasks: int = 2
  # "constrained": JSON replies forced by the server's grammar (response_format json_schema).
  # "prompted": the reference's way: the schema asked for in the prompt, the JSON parsed out of
  # free text and a truncated object repaired (counted as repairs/ROLE), then validated.
  json_mode: str = "constrained"

  def __post_init__(self):
    if self.json_mode not in ("constrained", "prompted"):
      raise ValueError(f"json_mode must be 'constrained' or 'prompted', got {self.json_mode!r}")
    if isinstance(self.urls, str) or not self.urls:
      raise ValueError(f"ClientConfig.urls must be a non-empty tuple of URLs, got {self.urls!r}")
    for url in self.urls:
      if not url.startswith(("http://", "https://")):
        raise ValueError(f"simulator URL must start with http:// or https://, got {url!r}")
    if self.timeout_s <= 0 or self.max_concurrency < 1:
      raise ValueError("timeout_s must be > 0 and max_concurrency >= 1")
    if self.max_retries < 0 or self.max_reasks < 0:
      raise ValueError("max_retries and max_reasks must be >= 0")


@dataclasses.dataclass(frozen=True)
class ChatResult:
  """The first choice of a chat completion, in OpenAI shape; `raw` is the whole reply."""
  content: str
  reasoning_content: str | None
  tool_calls: list[dict[str, Any]]
  finish_reason: str | None
  usage: dict[str, Any]
  raw: dict[str, Any]
  endpoint: str


class _AttemptError(Exception):
  """One failed attempt: its cause, message, whether to retry and the server's wait hint."""

  def __init__(self, cause: str, message: str, retry: bool = True,
               retry_after: float | None = None):
    super().__init__(message)
    self.cause, self.message, self.retry, self.retry_after = cause, message, retry, retry_after


def error_message(body: str) -> str:
  """The server's own error text from an error body (SGLang, OpenAI/vLLM, FastAPI or plain)."""
  try:
    data = json.loads(body)
  except ValueError:
    return snippet(body.strip()) or "(empty body)"
  if isinstance(data, dict):
    err = data.get("error")
    if isinstance(err, dict) and "message" in err:  # OpenAI / vLLM
      return snippet(str(err["message"]))
    if "message" in data:  # SGLang ErrorResponse {"object": "error", "message": ...}
      return snippet(str(data["message"]))
    if isinstance(err, str):  # SGLang's API-key middleware {"error": "Unauthorized"}
      return err
    if "detail" in data:  # FastAPI HTTPException / validation error
      return snippet(json.dumps(data["detail"]) if not isinstance(data["detail"], str)
                   else data["detail"])
  return snippet(body.strip())


def retry_after_seconds(value: str | None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def _normalise_tool_call(call: Any) -> dict[str, Any]:
  """A tool call as OpenAI shapes it: id, type, function {name, arguments as a JSON string}."""
  fn = call.get("function") if isinstance(call, dict) else None
  if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
    raise ValueError(f"malformed tool call {snippet(json.dumps(call))}")
  args = fn.get("arguments")
  if args is None:
    args = "{}"
  elif not isinstance(args, str):  # SGLang's protocol allows a dict here.
    args = json.dumps(args)
  return {"id": call.get("id"), "type": "function",
          "function": {"name": fn["name"], "arguments": args}}


def parse_choice(raw: Any, endpoint: str, index: int = 0) -> ChatResult:
  """Reads choice `index` of a chat-completion body; raises ValueError when it is malformed."""
  choices = raw.get("choices") if isinstance(raw, dict) else None
  if not isinstance(choices, list) or len(choices) <= index:
    raise ValueError(f"reply has no choices[{index}]: {snippet(json.dumps(raw))}")
  choice = choices[index]
  message = choice.get("message") if isinstance(choice, dict) else None
  if not isinstance(message, dict):
    raise ValueError(f"choice has no message: {snippet(json.dumps(choice))}")
  finish = choice.get("finish_reason")
  if finish == "abort":
    raise ValueError("the server aborted the generation (finish_reason 'abort')")
  content = message.get("content") or ""
  reasoning = message.get("reasoning_content")  # SGLang and older vLLM; newer vLLM: "reasoning"
  if reasoning is None:
    reasoning = message.get("reasoning")
  if not isinstance(content, str) or not (reasoning is None or isinstance(reasoning, str)):
    raise ValueError("content or reasoning_content is not a string")
  calls = message.get("tool_calls") or []
  if not isinstance(calls, list):
    raise ValueError("tool_calls is not a list")
  usage = raw.get("usage") if isinstance(raw.get("usage"), dict) else {}
  return ChatResult(content=content, reasoning_content=reasoning,
                    tool_calls=[_normalise_tool_call(c) for c in calls],
                    finish_reason=finish, usage=usage, raw=raw, endpoint=endpoint)


def _schema_name(role: str) -> str:
  """OpenAI restricts json_schema names to [a-zA-Z0-9_-]{1,64}."""
  return re.sub(r"[^a-zA-Z0-9_-]", "_", role)[:64] or "output"


class SimulatorClient:
  """Async chat client with retries, endpoint round-robin, bounded concurrency and counters."""

  def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None):
    self.config = config
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    self._http = httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(config.timeout_s), transport=transport,
        limits=httpx.Limits(max_connections=config.max_concurrency,
                            max_keepalive_connections=config.max_concurrency))
    self._slots = asyncio.Semaphore(config.max_concurrency)
    self._turn = itertools.count()
    self._rng = random.Random()
    self._counts: collections.Counter[str] = collections.Counter()

  async def __aenter__(self) -> "SimulatorClient":
    return self

  async def __aexit__(self, *exc_info) -> None:
    await self.aclose()

  async def aclose(self) -> None:
    await self._http.aclose()

  def stats(self) -> dict[str, int]:
    """Counters as TensorBoard-ready scalars; every retry/failure/re-ask key is present."""
    zeros = {f"{kind}/{c}": 0 for kind in ("retries", "failures") for c in CAUSES}
    zeros.update({f"reasks/{r}": 0 for r in REASK_REASONS})
    zeros.update(self._counts)
    return dict(sorted(zeros.items()))

  def _backoff(self, attempt: int, retry_after: float | None) -> float:
    """Jittered exponential wait before attempt+1; at least the server's Retry-After, capped."""
    cfg = self.config
    wait = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt) * self._rng.uniform(0.5, 1.0)
    if retry_after is not None:
      wait = max(wait, min(retry_after, cfg.retry_after_max_s))
    return wait

  async def _attempt(self, url: str, body: dict[str, Any]) -> ChatResult:
    """One POST, cut at timeout_s whatever the server does; classifies every failure."""
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    try:
      async with self._slots:
        async with asyncio.timeout(self.config.timeout_s):
          resp = await self._http.post(endpoint, json=body)
    except (TimeoutError, httpx.TimeoutException) as e:
      raise _AttemptError("timeout", f"no reply within {self.config.timeout_s}s "
                          f"({type(e).__name__})") from e
    except httpx.TransportError as e:  # refused, reset, or closed without a reply
      raise _AttemptError("connect", f"{type(e).__name__}: {e}") from e
    except httpx.RequestError as e:  # an undecodable body, a redirect loop
      raise _AttemptError("bad_response", f"{type(e).__name__}: {e}") from e
    status = resp.status_code
    if status == 429:
      raise _AttemptError("http_429", f"429: {error_message(resp.text)}",
                          retry_after=retry_after_seconds(resp.headers.get("retry-after")))
    if status >= 500:
      raise _AttemptError("http_5xx", f"{status}: {error_message(resp.text)}",
                          retry_after=retry_after_seconds(resp.headers.get("retry-after")))
    if status == 408:  # SGLang's router gives up on a request that waited too long in its queue.
      raise _AttemptError("timeout", f"408: {error_message(resp.text)}")
    if 400 <= status < 500:
      raise _AttemptError("http_4xx", f"{status}: {error_message(resp.text)}", retry=False)
    if status != 200:
      raise _AttemptError("bad_response", f"unexpected status {status}: {snippet(resp.text)}")
    try:
      raw = resp.json()
    except ValueError as e:
      raise _AttemptError("bad_response", f"reply is not JSON: {snippet(resp.text)!r}") from e
    try:
      return parse_choice(raw, url)
    except ValueError as e:
      raise _AttemptError("bad_response", str(e)) from e

  async def chat(self, messages: list[dict[str, Any]], *, role: str = "default",
                 tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                 response_format: dict[str, Any] | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_tokens: int | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, frequency_penalty: float | None = None,
                 n: int | None = None, logprobs: bool | None = None,
                 top_logprobs: int | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 affinity: str | None = None) -> ChatResult:
    """One chat completion, retried on transient failures; raises SimulatorError. Calls with
    the same `affinity` (an episode's task id) go to the same URL first, so the server's prefix
    cache keeps the conversation; retries move on to the next URL."""
    body: dict[str, Any] = {"model": self.config.model, "messages": messages}
    optional = dict(tools=tools, tool_choice=tool_choice, response_format=response_format,
                    temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                    seed=seed, stop=stop, frequency_penalty=frequency_penalty, n=n,
                    logprobs=logprobs, top_logprobs=top_logprobs,
                    chat_template_kwargs=chat_template_kwargs)
    body.update({k: v for k, v in optional.items() if v is not None})
    self._counts[f"calls/{role}"] += 1
    urls = self.config.urls
    start = zlib.crc32(affinity.encode()) if affinity else next(self._turn)
    for attempt in range(self.config.max_retries + 1):
      url = urls[(start + attempt) % len(urls)]
      try:
        return await self._attempt(url, body)
      except _AttemptError as e:
        last_try = not e.retry or attempt == self.config.max_retries
        if last_try:
          self._counts[f"failures/{e.cause}"] += 1
          raise SimulatorError(url, e.cause, f"[{role}] {e.message}") from e
        self._counts[f"retries/{e.cause}"] += 1
        wait = self._backoff(attempt, e.retry_after)
        _log.warning("simulator %s [%s] attempt %d failed (%s): %s; retrying in %.2fs",
                     url, role, attempt + 1, e.cause, e.message, wait)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")

  async def chat_json(self, messages: list[dict[str, Any]], schema: dict[str, Any], *,
                      role: str, **sampling: Any) -> dict[str, Any]:
    """A schema-constrained reply, validated; re-asked up to max_reasks times.

    A reply cut by max_tokens (finish_reason "length") is re-asked, never parsed. A re-ask
    with a seed uses seed + k. Raises SimulatorError(cause="invalid_output") at the end.
    """
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)  # A bad schema is our bug: fail before any request.
    validator = validator_cls(schema)
    prompted = self.config.json_mode == "prompted"
    response_format = None if prompted else {
        "type": "json_schema",
        "json_schema": {"name": _schema_name(role), "schema": schema, "strict": True}}
    if prompted:
      last = dict(messages[-1], content=str(messages[-1]["content"])
                  + json_replies.schema_instruction(schema))
      messages = [*messages[:-1], last]
    seed = sampling.pop("seed", None)
    problem, endpoint = "", self.config.urls[0]
    for ask in range(self.config.max_reasks + 1):
      if ask:
        self._counts[f"reasks/{reason}"] += 1
        _log.warning("simulator [%s] re-ask %d: %s", role, ask, problem)
      result = await self.chat(messages, role=role, response_format=response_format,
                               seed=None if seed is None else seed + ask, **sampling)
      endpoint = result.endpoint
      if result.finish_reason == "length" and not prompted:
        reason, problem = "length", "the reply was cut by max_tokens"
        continue
      try:
        value = json_replies.extract_json(result.content, result.reasoning_content)
      except ValueError as e:
        value = (json_replies.repair_json(json_replies.after_thinking(result.content))
                 if prompted else None)
        if value is None:
          reason, problem = "invalid_json", str(e)
          continue
        self._counts[f"repairs/{role}"] += 1
      error = jsonschema.exceptions.best_match(validator.iter_errors(value))
      if error is None:
        return value
      reason = "schema"
      problem = f"does not match the schema at {list(error.absolute_path)}: {error.message}"
    self._counts["failures/invalid_output"] += 1
    raise SimulatorError(endpoint, "invalid_output",
                         f"[{role}] no valid output after {self.config.max_reasks} re-asks; "
                         f"last: {problem}")
