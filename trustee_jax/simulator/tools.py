"""The tool simulator: checks each call by schema, then has the frozen LM answer it consistently.

An invalid call (unknown tool, arguments that break the tool's JSON schema) gets an error result
and reward -1 without any LM call. Valid calls are answered from the tools, the intent, the
task's initial state and the episode's ledger of earlier calls, one after the other, so a second
call sees the first one's effect. Pre-check and ledger are switches (off = the reference).
"""
import asyncio
import dataclasses
from typing import Any

import jsonschema

from trustee_jax.config_dataclass import from_config
from trustee_jax.simulator import system_prompts
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.judge import render_data, render_trajectory
from trustee_jax.seeding import retry_seed
from trustee_jax.simulator.tasks import Task, sampling_kwargs
from trustee_jax.tool_calls import ToolCall

TRUNCATED = "...(truncated)"
TRUNCATE_SIDES = ("head", "tail", "middle")


@dataclasses.dataclass(frozen=True)
class ToolSimConfig:
  # reference: only "does the tool exist" before the LM, whose prompt then carries the checklist
  schema_check: bool = True
  use_ledger: bool = True  # reference: no ledger; parallel calls answered independently
  show_conversation: bool = False  # reference: the LM sees the whole conversation
  reject_unknown_arguments: bool = True
  max_result_chars: int = 512
  truncate_side: str = "middle"  # "head" keeps the start, "tail" the end, "middle" both ends
  max_parallel_calls: int = 3
  max_notes_chars: int = 240
  temperature: float | None = None
  top_p: float | None = None
  max_tokens: int | None = 512
  frequency_penalty: float | None = None
  extra_fields: bool = True  # `notes` on the state before the result (the reference has none)
  top_k: int | None = None  # SGLang's and vLLM's extension; None: the server's default
  chat_template_kwargs: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ToolResult:
  content: str
  reward: int
  valid: bool
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
  call: ToolCall
  result: str
  valid: bool


@dataclasses.dataclass
class ToolLedger:
  """One episode's world: the initial state and every call so far with its result."""
  initial_state: list[str] = dataclasses.field(default_factory=list)
  entries: list[LedgerEntry] = dataclasses.field(default_factory=list)

  @classmethod
  def for_task(cls, task: Task) -> "ToolLedger":
    return cls(initial_state=list(task.initial_state))

  def record(self, call: ToolCall, result: str, valid: bool) -> None:
    self.entries.append(LedgerEntry(call, result, valid))

  def render(self) -> str:
    return render_data("ledger", [
        {"step": i + 1, "call": {"name": e.call.name, "arguments": e.call.arguments},
         "result": e.result if e.valid else f"(rejected) {e.result}"}
        for i, e in enumerate(self.entries)])


def _tool_index(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  return {tools_pool.tool_name(t): tools_pool.function_of(t) for t in tools}


def _describe(err: jsonschema.ValidationError, tool: str) -> str:
  if err.validator == "required":
    missing = err.message.split("'")[1] if "'" in err.message else err.message
    return f"missing required argument {missing!r} for tool {tool!r}"
  if err.validator == "additionalProperties":
    return f"tool {tool!r}: {err.message}"
  where = ".".join(str(p) for p in err.absolute_path)
  return f"argument {where!r} of tool {tool!r}: {err.message[:160]}"


def check_call(call: ToolCall, tools: list[dict[str, Any]], *,
               reject_unknown_arguments: bool = True) -> str | None:
  """An error message for a call a real API would reject before running it, else None: the
  tool must exist and the arguments must satisfy its `parameters` schema."""
  index = _tool_index(tools)
  fn = index.get(call.name)
  if fn is None:
    return f"Error: tool {call.name!r} does not exist. Available tools: {', '.join(index)}."
  if not isinstance(call.arguments, dict):
    return f"Error: the arguments of tool {call.name!r} must be a JSON object."
  params = fn.get("parameters") or {"type": "object"}
  problems = []
  if reject_unknown_arguments:
    known = set((params.get("properties") or {}))
    problems += [f"tool {call.name!r} has no argument {k!r}" for k in call.arguments
                 if k not in known]
  try:
    errors = sorted(jsonschema.Draft202012Validator(params).iter_errors(call.arguments),
                    key=lambda e: (list(map(str, e.absolute_path)), e.validator))
  except (jsonschema.SchemaError, jsonschema.exceptions.UnknownType) as e:
    raise ValueError(f"tool {call.name!r} has an unusable parameters schema: {e}") from e
  problems += [_describe(e, call.name) for e in errors]
  if problems:
    return "Error: " + "; ".join(problems[:3]) + "."
  return None


def truncate(text: str, limit: int, side: str = "middle") -> str:
  """`text` cut to `limit` characters (plus a marker), as the reference cuts tool results."""
  if side not in TRUNCATE_SIDES:
    raise ValueError(f"truncate side must be one of {TRUNCATE_SIDES}, got {side!r}")
  if len(text) <= limit:
    return text
  if side == "head":
    return text[:limit] + TRUNCATED
  if side == "tail":
    return TRUNCATED + text[-limit:]
  half = limit // 2
  return text[:half] + TRUNCATED + text[len(text) - (limit - half):]


def tool_schema(cfg: ToolSimConfig) -> dict[str, Any]:
  """Notes on the state first (extra_fields), then the result, then the call's reward."""
  props = {"notes": {"type": "string", "maxLength": cfg.max_notes_chars},
           "result": {"type": "string", "minLength": 1, "maxLength": 4 * cfg.max_result_chars},
           "reward": {"type": "integer", "enum": [-1, 0, 1]}}
  if not cfg.extra_fields:
    del props["notes"]
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


class ToolSimulator:
  """Executes an assistant turn's tool calls against the simulated world."""

  def __init__(self, client: Any, cfg: Any = None):
    self.client = client
    self.cfg: ToolSimConfig = from_config(ToolSimConfig, cfg, block="world.tools")
    truncate("", 0, self.cfg.truncate_side)  # fail at construction on a bad side
    self._template = system_prompts.load_template("tool.jinja")
    self._schema = tool_schema(self.cfg)

  def precheck(self, call: ToolCall, task: Task) -> str | None:
    if self.cfg.schema_check:
      return check_call(call, task.tools,
                        reject_unknown_arguments=self.cfg.reject_unknown_arguments)
    if call.name not in task.tool_names:
      return f"Error: tool {call.name!r} does not exist."
    return None

  def prompt(self, task: Task, ledger: ToolLedger, call: ToolCall,
             messages: list[dict[str, Any]] | None) -> str:
    if self.cfg.show_conversation and messages is None:
      raise ValueError("show_conversation is on but execute() got no messages")
    return self._template.render(
        task=task, tools_json=tools_pool.tools_text(task.tools),
        ledger=ledger.render() if self.cfg.use_ledger and ledger.entries else "",
        conversation=render_trajectory(messages) if self.cfg.show_conversation else "",
        call=render_data("call", [{"name": call.name, "arguments": call.arguments}]),
        check_arguments=not self.cfg.schema_check, extra_fields=self.cfg.extra_fields)

  async def _answer(self, task: Task, ledger: ToolLedger, call: ToolCall, seed: int,
                    messages: list[dict[str, Any]] | None) -> ToolResult:
    raw = await self.client.chat_json(
        [{"role": "user", "content": self.prompt(task, ledger, call, messages)}], self._schema,
        role="tool", seed=seed, affinity=task.affinity, **sampling_kwargs(self.cfg))
    content = truncate(str(raw["result"]), self.cfg.max_result_chars, self.cfg.truncate_side)
    return ToolResult(content=content, reward=int(raw["reward"]), valid=True)

  async def execute(self, task: Task, ledger: ToolLedger, calls: list[ToolCall], seed: int,
                    messages: list[dict[str, Any]] | None = None) -> list[ToolResult]:
    """One result per call, in order. Calls past `max_parallel_calls` are not executed and get
    an error result (reward -1). With the ledger on, calls run one after the other, each seeing
    the results before it; off, valid calls are answered concurrently (the reference)."""
    results: list[ToolResult | None] = [None] * len(calls)
    lm_jobs = []
    for i, call in enumerate(calls):
      if i >= self.cfg.max_parallel_calls:
        err = (f"Error: not executed; at most {self.cfg.max_parallel_calls} tool calls are "
               "run per turn.")
      else:
        err = self.precheck(call, task)
      if err is not None:
        results[i] = ToolResult(content=err, reward=-1, valid=False, error=err)
        if self.cfg.use_ledger:
          ledger.record(call, err, valid=False)
      elif self.cfg.use_ledger:
        results[i] = await self._answer(task, ledger, call, retry_seed(seed, i), messages)
        ledger.record(call, results[i].content, valid=True)
      else:
        lm_jobs.append(i)
    answers = await asyncio.gather(*(self._answer(task, ledger, calls[i], retry_seed(seed, i),
                                                  messages) for i in lm_jobs))
    for i, answer in zip(lm_jobs, answers):
      results[i] = answer
    if not self.cfg.use_ledger:
      for call, res in zip(calls, results):
        ledger.record(call, res.content, res.valid)
    return results
