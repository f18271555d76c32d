"""OpenAI requests to engine jobs and engine completions back to OpenAI replies.

Pure translation for the embedded server: chat rendering, sampling settings, the llguidance
grammar of a constrained reply (JSON schema or forced tool call, after a free `<think>`
block on a thinking model), and the reply shapes (text with stops stripped, reasoning,
tool calls, logprobs, usage, stream chunks).
"""
import dataclasses
import functools
import json
import logging
import uuid
from typing import Any

import jinja2
import jsonschema

from trustee_jax.chat import ChatFormat
from trustee_jax.models.tokenizer import Tokenizer
from trustee_jax.sampling.constrained import COMPACT_JSON, lark_grammar
from trustee_jax.sampling.engine import Completion, SamplingParams
from trustee_jax.serving import schema as sm

_log = logging.getLogger(__name__)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_TEMPLATE_KWARGS = frozenset({"enable_thinking"})



MASKED_LOGPROB = -9999.0  # what OpenAI reports for a token that could not be sampled

class APIError(Exception):
  """A request the server refuses, with its HTTP status and OpenAI error fields."""

  def __init__(self, status: int, message: str, *,
               type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type
    self.param, self.code, self.headers = param, code, headers


# ---- grammars -----------------------------------------------------------------------------


def lark_literal(tokenizer: Tokenizer, text: str) -> str:
  """`text` in Lark: `<[id]>` when it is one added token (llguidance marks those), else a string."""
  ids = tokenizer.encode(text)
  if len(ids) == 1 and ids[0] in tokenizer.hf.added_tokens_decoder:
    return f"<[{ids[0]}]>"
  return json.dumps(text)


def compact(schema: dict[str, Any]) -> dict[str, Any]:
  """The schema with compact JSON unless its own x-guidance says otherwise (DESIGN.md §5)."""
  return {**schema, "x-guidance": {**COMPACT_JSON, **schema.get("x-guidance", {})}}


def tool_call_schema(tools: list[sm.Tool]) -> dict[str, Any]:
  """JSON of one call to any of `tools`: {"name": <its name>, "arguments": <its parameters>}."""
  variants = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                "arguments": t.function.parameters},
               "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
  return variants[0] if len(variants) == 1 else {"anyOf": variants}


def body_rules(tokenizer: Tokenizer, *, schema: dict[str, Any] | None = None,
               call_schema: dict[str, Any] | None = None, parallel: bool = True) -> str:
  """Lark rules for `body`: a JSON document, or <tool_call> blocks (one, or one or more)."""
  if schema is not None:
    return f"body: %json {json.dumps(compact(schema))}\n"
  open_, close = lark_literal(tokenizer, CALL_OPEN), lark_literal(tokenizer, CALL_CLOSE)
  repeat = ' ("\\n" call)*' if parallel else ""
  return (f"body: call{repeat}\ncall: {open_} \"\\n\" args \"\\n\" {close}\n"
          f"args: %json {json.dumps(compact(call_schema))}\n")


def with_reasoning(body: str, think: tuple[str, str] | None, opened: bool) -> str:
  """A grammar: `body` alone, or after a free reasoning block closed by the think token."""
  if think is None:
    return "start: body\n" + body
  head = "" if opened else think[0] + " "
  return (f"start: {head}THINK {think[1]} GAP body\n"
          "THINK: /(.|\\n)*/\nGAP: /[ \\n]{0,4}/\n" + body)


def check_schema(schema: Any, param: str) -> None:
  """400 for a schema that is not a valid JSON schema."""
  try:
    jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator
                                        ).check_schema(schema)
  except jsonschema.SchemaError as e:
    raise APIError(400, f"invalid JSON schema: {e.message}", param=param,
                   code="invalid_schema") from e


def split_reasoning(text: str) -> tuple[str | None, str]:
  """(reasoning, content); a lone </think>: the prompt opened the block; a lone <think>: a cut."""
  if THINK_CLOSE in text:
    before, after = text.split(THINK_CLOSE, 1)
    return before.replace(THINK_OPEN, "", 1).strip(), after.strip()
  if THINK_OPEN in text:
    before, after = text.split(THINK_OPEN, 1)
    return after.strip(), before.strip()
  return None, text


# ---- plans --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatPlan:
  """A chat request ready for the engine: one job per choice."""
  prompt: list[int]
  jobs: list[tuple[list[int], SamplingParams]]
  tools_active: bool
  logprobs: bool


@dataclasses.dataclass(frozen=True)
class CompletionPlan:
  """A raw-completion request: n jobs per prompt, prompt-major."""
  prompts: list[list[int]]
  jobs: list[tuple[list[int], SamplingParams]]
  logprobs: int | None


def _messages(req: sm.ChatCompletionRequest) -> list[dict[str, Any]]:
  """Template-ready message dicts; tool-call arguments must be JSON."""
  out = []
  for i, m in enumerate(req.messages):
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()}
    for key in ("name", "tool_call_id", "reasoning_content"):
      if getattr(m, key) is not None:
        d[key] = getattr(m, key)
    calls = []
    for j, c in enumerate(m.tool_calls or []):
      args = c.function.arguments
      if isinstance(args, str):
        try:
          args = json.loads(args)
        except json.JSONDecodeError as e:
          raise APIError(400, f"tool call arguments are not JSON: {e}",
                         param=f"messages.{i}.tool_calls.{j}.function.arguments") from e
      calls.append({"id": c.id or "", "type": "function",
                    "function": {"name": c.function.name, "arguments": args}})
    if calls:
      d["tool_calls"] = calls
    out.append(d)
  return out


class Protocol:
  """Per-model translation state: stop ids, think tokens, the token-string table."""

  def __init__(self, chat_format: ChatFormat, tokenizer: Tokenizer, model_name: str,
               context_len: int, *, default_max_tokens: int | None = None,
               enable_thinking_default: bool = True):
    self.chat_format, self.tokenizer, self.model_name = chat_format, tokenizer, model_name
    self.context_len = context_len
    self.default_max_tokens = default_max_tokens
    self.enable_thinking_default = enable_thinking_default
    self.stop_ids = chat_format.stop_ids
    self.think = self._think_tokens()

  def _think_tokens(self) -> tuple[str, str] | None:
    """Lark refs of <think>, </think> when the template can think and both are single tokens."""
    if "enable_thinking" not in self.chat_format.template:
      return None
    think = lark_literal(self.tokenizer, THINK_OPEN), lark_literal(self.tokenizer, THINK_CLOSE)
    return think if all(t.startswith("<[") for t in think) else None

  @functools.cached_property
  def token_bytes(self) -> list[bytes]:
    try:
      return self.tokenizer.token_bytes()
    except NotImplementedError:
      return [self.tokenizer.decode([i]).encode() for i in range(self.tokenizer.vocab_size)]

  def _sampling(self, req: sm.SamplingFields, max_tokens: int, i: int, top_logprobs: int,
                grammar: str | None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed + i, stop_token_ids=self.stop_ids,
        stop_strings=req.stop_list(), top_logprobs=top_logprobs, grammar=grammar)

  # ---- chat ---------------------------------------------------------------------------------

  def plan_chat(self, req: sm.ChatCompletionRequest) -> ChatPlan:
    kwargs = req.chat_template_kwargs or {}
    unknown = sorted(set(kwargs) - _TEMPLATE_KWARGS)
    if unknown:
      raise APIError(400, f"unsupported chat_template_kwargs {unknown}; supported: "
                     f"{sorted(_TEMPLATE_KWARGS)}", param="chat_template_kwargs")
    thinking = self.think is not None and bool(
        kwargs.get("enable_thinking", self.enable_thinking_default))
    tools_active = bool(req.tools) and req.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if tools_active else None
    try:
      prompt = self.chat_format.render(_messages(req), tools, add_generation_prompt=True,
                                       enable_thinking=thinking)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
      raise APIError(400, f"cannot render the conversation: {e}", param="messages") from e
    max_tokens = req.max_completion_tokens or req.max_tokens
    room = self.context_len - len(prompt)
    if room < 1 or (max_tokens is not None and max_tokens > room):
      raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}; "
                     f"the context holds {self.context_len}", param="messages",
                     code="context_length_exceeded")
    if max_tokens is None:
      max_tokens = min(room, self.default_max_tokens or room)
    opened = thinking and self.tokenizer.decode(prompt[-4:]).rstrip().endswith(THINK_OPEN)
    grammar = self._chat_grammar(req, tools_active, thinking, opened)
    top = (req.top_logprobs or 0) if req.logprobs else 0
    jobs = [(prompt, self._sampling(req, max_tokens, i, top, grammar))
            for i in range(req.n or 1)]
    return ChatPlan(prompt, jobs, tools_active, bool(req.logprobs))

  def _chat_grammar(self, req: sm.ChatCompletionRequest, tools_active: bool, thinking: bool,
                    opened: bool) -> str | None:
    think = self.think if thinking else None
    forced = req.tool_choice if tools_active and req.tool_choice not in (None, "auto") else None
    if forced is not None:
      tools = (req.tools if forced == "required" else
               [t for t in req.tools if t.function.name == forced.function.name])
      for t in tools:
        check_schema(t.function.parameters, f"tools.{t.function.name}.parameters")
      body = body_rules(self.tokenizer, call_schema=tool_call_schema(tools),
                        parallel=forced == "required" and req.parallel_tool_calls is not False)
      return lark_grammar(with_reasoning(body, think, opened))
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
      return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
    check_schema(schema, "response_format.json_schema.schema")
    return lark_grammar(with_reasoning(body_rules(self.tokenizer, schema=schema), think, opened))

  def _output(self, comp: Completion) -> tuple[list[int], str]:
    """Reply ids and text: the stop token dropped, the text cut before a stop string."""
    ids = comp.tokens[:-1] if isinstance(comp.stop, int) else comp.tokens
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    if isinstance(comp.stop, str) and comp.stop in text:
      text = text[:text.index(comp.stop)]
    return ids, text

  def _token(self, token_id: int, logprob: float) -> sm.TopLogprob:
    raw = self.token_bytes[token_id] if token_id < len(self.token_bytes) else b""
    # A token the grammar masked has logprob -inf, which JSON cannot carry: OpenAI's -9999.
    logprob = max(float(logprob), MASKED_LOGPROB)
    return sm.TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob,
                         bytes=list(raw))

  def _chat_logprobs(self, comp: Completion, n_ids: int) -> sm.ChoiceLogprobs:
    content = []
    for k in range(n_ids):
      tok = self._token(comp.tokens[k], comp.logprobs[k])
      top = [self._token(t, lp) for t, lp in (comp.top_logprobs[k] if comp.top_logprobs else [])]
      content.append(sm.TokenLogprob(**tok.model_dump(), top_logprobs=top))
    return sm.ChoiceLogprobs(content=content)

  def chat_choice(self, index: int, plan: ChatPlan, comp: Completion) -> sm.ChatChoice:
    ids, text = self._output(comp)
    calls: list[sm.ToolCallOut] = []
    if plan.tools_active:
      parsed = self.chat_format.parse_output(text)
      reasoning, content = parsed.reasoning, parsed.content
      if parsed.errors:
        _log.warning("malformed tool calls returned as content: %s",
                     [e.reason for e in parsed.errors])
        content = "\n".join([content] + [e.raw for e in parsed.errors]).strip()
      calls = [sm.ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=sm.FunctionCallOut(
          name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
               for c in parsed.tool_calls]
    elif self.think is not None:
      reasoning, content = split_reasoning(text)
    else:
      reasoning, content = None, text
    finish = "tool_calls" if calls and comp.finish_reason == "stop" else comp.finish_reason
    message = sm.ResponseMessage(content=content if content or not calls else None,
                                 reasoning_content=reasoning, tool_calls=calls or None)
    return sm.ChatChoice(index=index, message=message, finish_reason=finish,
                         logprobs=self._chat_logprobs(comp, len(ids)) if plan.logprobs else None)

  def _usage(self, prompt_tokens: int, comps: list[Completion]) -> sm.Usage:
    out = sum(len(c.tokens) for c in comps)
    return sm.Usage(prompt_tokens=prompt_tokens, completion_tokens=out,
                    total_tokens=prompt_tokens + out,
                    prompt_tokens_details=sm.PromptTokensDetails(
                        cached_tokens=min(c.cached_tokens for c in comps)))

  def chat_response(self, rid: str, plan: ChatPlan, comps: list[Completion]
                    ) -> sm.ChatCompletionResponse:
    return sm.ChatCompletionResponse(
        id=rid, model=self.model_name, usage=self._usage(len(plan.prompt), comps),
        choices=[self.chat_choice(i, plan, c) for i, c in enumerate(comps)])

  def _chunk(self, rid: str, index: int, delta: sm.Delta, finish: str | None = None,
             logprobs: sm.ChoiceLogprobs | None = None) -> sm.ChatCompletionChunk:
    return sm.ChatCompletionChunk(id=rid, model=self.model_name, choices=[sm.ChunkChoice(
        index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])

  def chat_opening_chunks(self, rid: str, plan: ChatPlan) -> list[sm.ChatCompletionChunk]:
    return [self._chunk(rid, i, sm.Delta(role="assistant", content=""))
            for i in range(len(plan.jobs))]

  def chat_chunks(self, rid: str, plan: ChatPlan, comps: list[Completion],
                  include_usage: bool) -> list[sm.ChatCompletionChunk]:
    """The finished choices as deltas: reasoning, content (+ logprobs), tool calls, finish."""
    chunks = []
    for i, comp in enumerate(comps):
      choice = self.chat_choice(i, plan, comp)
      msg, logprobs = choice.message, choice.logprobs
      if msg.reasoning_content:
        chunks.append(self._chunk(rid, i, sm.Delta(reasoning_content=msg.reasoning_content)))
      if msg.content:
        chunks.append(self._chunk(rid, i, sm.Delta(content=msg.content), logprobs=logprobs))
        logprobs = None
      if msg.tool_calls:
        chunks.append(self._chunk(rid, i, sm.Delta(tool_calls=[
            sm.ToolCallDelta(index=k, id=c.id, function=c.function)
            for k, c in enumerate(msg.tool_calls)])))
      chunks.append(self._chunk(rid, i, sm.Delta(), choice.finish_reason, logprobs))
    if include_usage:
      chunks.append(sm.ChatCompletionChunk(id=rid, model=self.model_name, choices=[],
                                           usage=self._usage(len(plan.prompt), comps)))
    return chunks

  # ---- raw completions ----------------------------------------------------------------------

  def plan_completion(self, req: sm.CompletionRequest) -> CompletionPlan:
    prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p)
               for p in req.prompts()]
    top = req.logprobs or 0
    jobs = [(p, self._sampling(req, req.max_tokens or 16, i, top, None))
            for p in prompts for i in range(req.n or 1)]
    return CompletionPlan(prompts, jobs, req.logprobs)

  def _completion_choice(self, index: int, plan: CompletionPlan, comp: Completion
                         ) -> sm.CompletionChoice:
    ids, text = self._output(comp)
    logprobs = None
    if plan.logprobs is not None:
      toks = [self._token(t, lp) for t, lp in zip(ids, comp.logprobs)]
      offsets, at = [], 0
      for t in toks:
        offsets.append(at)
        at += len(t.token)
      top = None
      if plan.logprobs:
        top = [{self._token(t, lp).token: lp for t, lp in comp.top_logprobs[k]}
               for k in range(len(ids))]
      logprobs = sm.CompletionLogprobs(tokens=[t.token for t in toks],
                                       token_logprobs=[t.logprob for t in toks],
                                       top_logprobs=top, text_offset=offsets)
    return sm.CompletionChoice(index=index, text=text, logprobs=logprobs,
                               finish_reason=comp.finish_reason)

  def _completion_usage(self, plan: CompletionPlan, comps: list[Completion]) -> sm.Usage:
    return self._usage(sum(len(p) for p in plan.prompts), comps)

  def completion_response(self, rid: str, plan: CompletionPlan, comps: list[Completion]
                          ) -> sm.CompletionResponse:
    return sm.CompletionResponse(
        id=rid, model=self.model_name, usage=self._completion_usage(plan, comps),
        choices=[self._completion_choice(i, plan, c) for i, c in enumerate(comps)])

  def completion_chunks(self, rid: str, plan: CompletionPlan, comps: list[Completion],
                        include_usage: bool) -> list[sm.CompletionResponse]:
    chunks = []
    for i, comp in enumerate(comps):
      choice = self._completion_choice(i, plan, comp)
      finish, choice.finish_reason = choice.finish_reason, None
      chunks.append(sm.CompletionResponse(id=rid, model=self.model_name, choices=[choice]))
      chunks.append(sm.CompletionResponse(id=rid, model=self.model_name, choices=[
          sm.CompletionChoice(index=i, text="", finish_reason=finish)]))
    if include_usage:
      chunks.append(sm.CompletionResponse(id=rid, model=self.model_name, choices=[],
                                          usage=self._completion_usage(plan, comps)))
    return chunks
