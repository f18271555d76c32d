"""The judge: scores a finished episode -1/0/1 against the first `num_criteria` criteria.

The trajectory is rendered as data, one JSON object per message between <trajectory> lines, with
'<', '>' and '&' escaped as JSON unicode escapes inside it, so no text the policy writes can close
the block, open a chat-template turn or pass for the judge's own answer.
"""
import asyncio
import collections
import dataclasses
import json
from typing import Any

from trustee_jax.simulator import system_prompts
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.tasks import Task, config_from, derive_seed, sampling_kwargs

CRITERIA = (
    "Meets the user's intent: the assistant achieved what the user ultimately wanted, using the tools.",
    "Uses the expected tools correctly: the right tools, with correct arguments, in a sensible order.",
    "No hallucination: it states no facts, identifiers, results or tool outputs that the conversation does not support.",
    "No redundant or wrong attempts: no unnecessary, repeated or erroneous tool calls or steps.",
    "Concise and efficient: replies and tool use are to the point.",
)
TAG = "trajectory"
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  num_votes: int = 1  # k samples, majority vote (ties go to the lower score)
  max_criteria: int = 5  # the reference caps this at 2 with an 8B simulator
  score_rule: str = "criteria"  # "criteria": from criteria_met; "model": the LM's own score
  max_reason_chars: int = 400
  temperature: float | None = None
  top_p: float | None = None
  max_tokens: int | None = 512
  frequency_penalty: float | None = None
  chat_template_kwargs: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Judgement:
  score: int
  reason: str
  votes: tuple[int, ...]


def _text(content: Any) -> str:
  if content is None:
    return ""
  if isinstance(content, list):  # OpenAI content parts
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
  return str(content)


def escaped_line(obj: Any) -> str:
  """`obj` as one line of JSON in which '<', '>', '&' and line separators are unicode escapes:
  still valid JSON that decodes to the same text, but no tag or chat-template token survives."""
  line = json.dumps(obj, ensure_ascii=False)
  for raw, esc in _ESCAPES.items():
    line = line.replace(raw, esc)
  return line


def render_data(tag: str, rows: list[Any]) -> str:
  """Rows as escaped JSON lines between `<tag>` and `</tag>` lines."""
  return "\n".join([f"<{tag}>", *map(escaped_line, rows), f"</{tag}>"])


def render_trajectory(messages: list[dict[str, Any]]) -> str:
  """The conversation (system messages left out) as escaped JSON lines between delimiters.
  Tool-call arguments stay JSON strings, so their quotes are escaped like any other text."""
  names: dict[str, str] = {}
  rows = []
  turn = 0
  for m in messages:
    role = m.get("role")
    if role == "system":
      continue
    turn += 1
    obj: dict[str, Any] = {"turn": turn, "role": role, "content": _text(m.get("content"))}
    if role == "assistant" and m.get("tool_calls"):
      calls = []
      for c in m["tool_calls"]:
        fn = c.get("function", {})
        args = fn.get("arguments", "")
        calls.append({"name": str(fn.get("name", "")),
                      "arguments": args if isinstance(args, str) else json.dumps(args)})
        names[str(c.get("id", ""))] = str(fn.get("name", ""))
      obj["tool_calls"] = calls
    if role == "tool":
      obj = {"turn": turn, "role": role, "name": names.get(str(m.get("tool_call_id", "")),
                                                          str(m.get("name", ""))),
             "content": obj["content"]}
    rows.append(obj)
  return render_data(TAG, rows)


def has_tool_call(messages: list[dict[str, Any]]) -> bool:
  return any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages)


def criteria_score(met: list[bool]) -> int:
  """1 when all criteria are met, 0 when at least half are, -1 otherwise."""
  if not met:
    raise ValueError("no criteria verdicts")
  n = sum(bool(x) for x in met)
  return 1 if n == len(met) else 0 if 2 * n >= len(met) else -1


def majority(votes: list[int]) -> int:
  """The most common vote; a tie goes to the lowest tied score (conservative)."""
  counts = collections.Counter(votes)
  best = max(counts.values())
  return min(v for v, c in counts.items() if c == best)


def judge_schema(num_criteria: int, max_reason_chars: int) -> dict[str, Any]:
  """Reason first, then per-criterion verdicts, then the score (llguidance keeps this order)."""
  return {"type": "object",
          "properties": {
              "reason": {"type": "string", "maxLength": max_reason_chars},
              "criteria_met": {"type": "array", "items": {"type": "boolean"},
                               "minItems": num_criteria, "maxItems": num_criteria},
              "score": {"type": "integer", "enum": [-1, 0, 1]}},
          "required": ["reason", "criteria_met", "score"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}


class Judge:
  """Scores an episode with the frozen LM; no tool call at all scores -1 without any LM call."""

  def __init__(self, client: Any, cfg: Any = None):
    self.client = client
    self.cfg: JudgeConfig = config_from(JudgeConfig, cfg)
    if self.cfg.score_rule not in ("criteria", "model"):
      raise ValueError(f"score_rule must be 'criteria' or 'model', got {self.cfg.score_rule!r}")
    if self.cfg.num_votes < 1:
      raise ValueError(f"num_votes must be >= 1, got {self.cfg.num_votes}")
    self._template = system_prompts.load_template("judge.jinja")

  def prompt(self, task: Task, messages: list[dict[str, Any]], num_criteria: int) -> str:
    return self._template.render(
        task=task, tools_json=tools_pool.tools_text(task.tools),
        trajectory=render_trajectory(messages), criteria=CRITERIA[:num_criteria])

  async def _vote(self, prompt: str, schema: dict, seed: int) -> tuple[int, str]:
    raw = await self.client.chat_json([{"role": "user", "content": prompt}], schema, role="judge",
                                      seed=seed, **sampling_kwargs(self.cfg))
    score = criteria_score(raw["criteria_met"]) if self.cfg.score_rule == "criteria" else raw["score"]
    return int(score), str(raw["reason"])

  async def score(self, task: Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement:
    if not has_tool_call(messages):
      return Judgement(-1, "no tool call in the episode", ())
    n = min(max(1, int(num_criteria)), self.cfg.max_criteria, len(CRITERIA))
    prompt = self.prompt(task, messages, n)
    schema = judge_schema(n, self.cfg.max_reason_chars)
    results = await asyncio.gather(*(self._vote(prompt, schema, derive_seed(seed, k))
                                     for k in range(self.cfg.num_votes)))
    votes = [s for s, _ in results]
    final = majority(votes)
    reason = next(r for s, r in results if s == final)
    return Judgement(final, reason, tuple(votes))
