"""Pydantic request and response models of the embedded server's OpenAI-compatible API.

A request's unknown top-level fields (another server's extensions) are kept for the server to
warn about and ignore, as vLLM and SGLang do; nested objects such as response_format refuse
unknown keys (a 400); messages and tools ignore extra fields so a client can echo back a reply
it received. Responses follow
OpenAI's shapes, with SGLang's `reasoning_content` (and newer vLLM's `reasoning`) beside
`content`.
"""
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_LOGPROBS = 20
MAX_N = 64


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
  model_config = ConfigDict(extra="ignore")


class _Open(BaseModel):
  """A request's top level: fields this server does not know are kept (`model_extra`) for the
  server to warn about and ignore, as vLLM and SGLang do with each other's extensions."""
  model_config = ConfigDict(extra="allow")


# ---- requests -----------------------------------------------------------------------------


class TextPart(_Lenient):
  type: Literal["text"]
  text: str


class FunctionCallIn(_Lenient):
  name: str = Field(min_length=1)
  arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
  id: str | None = None
  type: Literal["function"] = "function"
  function: FunctionCallIn


class ChatMessage(_Lenient):
  """One conversation message; `developer` is rendered as `system`."""
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[TextPart] | None = None
  name: str | None = None
  tool_calls: list[ToolCallIn] | None = None
  tool_call_id: str | None = None
  reasoning_content: str | None = None
  reasoning: str | None = None  # newer vLLM's name for reasoning_content

  @model_validator(mode="after")
  def _needs_content(self) -> "ChatMessage":
    if self.reasoning_content is None:
      self.reasoning_content = self.reasoning
    if self.content is None and not (self.role == "assistant" and self.tool_calls):
      raise ValueError(f"a {self.role} message needs content")
    if self.tool_calls and self.role != "assistant":
      raise ValueError("only assistant messages carry tool_calls")
    return self

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(p.text for p in self.content)
    return self.content or ""


class FunctionDef(_Lenient):
  name: str = Field(min_length=1, max_length=64)
  description: str | None = None
  parameters: dict[str, Any] = Field(
      default_factory=lambda: {"type": "object", "properties": {}})
  strict: bool | None = None


class Tool(_Lenient):
  type: Literal["function"]
  function: FunctionDef


class _FunctionName(_Lenient):
  name: str


class NamedToolChoice(_Lenient):
  type: Literal["function"]
  function: _FunctionName


class JsonSchemaFormat(_Lenient):
  model_config = ConfigDict(extra="ignore", populate_by_name=True)
  name: str = "output"
  description: str | None = None
  schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
  strict: bool | None = None


class ResponseFormat(_Strict):
  type: Literal["text", "json_object", "json_schema"]
  json_schema: JsonSchemaFormat | None = None

  @model_validator(mode="after")
  def _schema_given(self) -> "ResponseFormat":
    if self.type == "json_schema" and self.json_schema is None:
      raise ValueError("response_format of type json_schema needs a json_schema")
    return self


class StreamOptions(_Lenient):
  include_usage: bool = False


class SamplingFields(_Open):
  """Parameters shared by chat and raw completions (None: the OpenAI default)."""
  model: str | None = None
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=-1)  # SGLang's extension; -1 or 0 = off
  frequency_penalty: float | None = Field(None, ge=-2, le=2)
  presence_penalty: float | None = Field(None, ge=-2, le=2)
  seed: int | None = Field(None, ge=0, lt=2**31)
  stop: str | list[str] | None = None
  n: int | None = Field(None, ge=1, le=MAX_N)
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  logit_bias: dict[str, float] | None = None
  user: str | None = None

  @model_validator(mode="after")
  def _supported(self) -> "SamplingFields":
    if self.presence_penalty:
      raise ValueError("presence_penalty is not supported (use frequency_penalty)")
    if self.logit_bias:
      raise ValueError("logit_bias is not supported")
    if any(s == "" for s in self.stop_list()):
      raise ValueError("stop strings must not be empty")
    return self

  def stop_list(self) -> tuple[str, ...]:
    if self.stop is None:
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  tools: list[Tool] | None = None
  tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
  parallel_tool_calls: bool | None = True
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool | None = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  response_format: ResponseFormat | None = None
  chat_template_kwargs: dict[str, Any] | None = None
  metadata: dict[str, Any] | None = None
  store: bool | None = None
  service_tier: str | None = None

  @model_validator(mode="after")
  def _consistent(self) -> "ChatCompletionRequest":
    if self.top_logprobs and not self.logprobs:
      raise ValueError("top_logprobs needs logprobs: true")
    if self.tool_choice not in (None, "none", "auto") and not self.tools:
      raise ValueError("tool_choice needs tools")
    if isinstance(self.tool_choice, NamedToolChoice):
      names = [t.function.name for t in self.tools]
      if self.tool_choice.function.name not in names:
        raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, "
                         f"which is not among the tools {names}")
    return self


class CompletionRequest(SamplingFields):
  prompt: str | list[int] | list[str] | list[list[int]]
  max_tokens: int | None = Field(16, ge=1)
  logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  echo: bool | None = False
  suffix: str | None = None
  best_of: int | None = None

  @model_validator(mode="after")
  def _supported_here(self) -> "CompletionRequest":
    if self.echo:
      raise ValueError("echo is not supported")
    if self.suffix:
      raise ValueError("suffix is not supported")
    if self.best_of not in (None, 1, self.n or 1):
      raise ValueError("best_of other than n is not supported")
    if not self.prompt:
      raise ValueError("prompt must not be empty")
    return self

  def prompts(self) -> list[str | list[int]]:
    """The prompts of a (possibly batched) request: each a string or token ids."""
    p = self.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
      return [p]
    return list(p)


# ---- responses ----------------------------------------------------------------------------


def now() -> int:
  return int(time.time())


class FunctionCallOut(BaseModel):
  name: str
  arguments: str  # JSON text, as OpenAI returns it


class ToolCallOut(BaseModel):
  id: str
  type: Literal["function"] = "function"
  function: FunctionCallOut


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int]


class TokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
  content: list[TokenLogprob]


class _BothReasoningNames(BaseModel):
  """Reasoning under SGLang's (and older vLLM's) `reasoning_content` and newer vLLM's
  `reasoning`, so a client of either finds it."""
  reasoning_content: str | None = None
  reasoning: str | None = None

  @model_validator(mode="after")
  def _mirror(self) -> "_BothReasoningNames":
    self.reasoning = self.reasoning_content
    return self


class ResponseMessage(_BothReasoningNames):
  role: Literal["assistant"] = "assistant"
  content: str | None
  tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
  index: int
  message: ResponseMessage
  logprobs: ChoiceLogprobs | None = None
  finish_reason: str


class PromptTokensDetails(BaseModel):
  cached_tokens: int = 0


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int
  prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionResponse(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int = Field(default_factory=now)
  model: str
  choices: list[ChatChoice]
  usage: Usage


class ToolCallDelta(BaseModel):
  index: int
  id: str
  type: Literal["function"] = "function"
  function: FunctionCallOut


class Delta(_BothReasoningNames):
  role: Literal["assistant"] | None = None
  content: str | None = None
  tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
  index: int
  delta: Delta
  logprobs: ChoiceLogprobs | None = None
  finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int = Field(default_factory=now)
  model: str
  choices: list[ChunkChoice]
  usage: Usage | None = None


class CompletionLogprobs(BaseModel):
  tokens: list[str]
  token_logprobs: list[float]
  top_logprobs: list[dict[str, float]] | None
  text_offset: list[int]


class CompletionChoice(BaseModel):
  index: int
  text: str
  logprobs: CompletionLogprobs | None = None
  finish_reason: str | None


class CompletionResponse(BaseModel):
  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int = Field(default_factory=now)
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int = Field(default_factory=now)
  owned_by: str = "trustee-jax"
  max_model_len: int


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorBody(BaseModel):
  message: str
  type: str = "invalid_request_error"
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorBody
