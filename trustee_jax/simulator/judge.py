"""The judge: scores a finished episode -1/0/1 against the first `num_criteria` criteria.

Modes (`JudgeConfig.mode`); an episode with no tool call scores -1 without an LM call in all:
  lm        the LM grades the whole rubric at once (the reference's judge; the default).
  rule      the rule check of the calls against `task.expected_calls` alone, no LM call: 1 when
            it passes, 0 when every expected tool was called (some with wrong arguments, or out
            of order), -1 otherwise.
  blend     the check decides criteria 2 (tool use: passed) and 4 (no redundant calls: no extra
            call); the LM judges only the conversation criteria among the first `num_criteria`
            (1 told in words, 3, 5), and only when the check passed:
              nothing matched and an expected tool never called -1  (no LM call)
              partway (some call matched, or every expected
              tool called with wrong arguments), or an extra
              call when criterion 4 applies                   0  (no LM call)
              check passed, LM says a criterion fails         0
              check passed, LM says the criteria hold         1
  questions one short yes/no question per criterion, each with only the excerpt it needs; the
            answers give the score by `criteria_score`. With `logprob_threshold` set and a client
            with `chat` (SimulatorClient), an answer is P(yes) / (P(yes) + P(no)) >= threshold.
Judgements carry the rule check's parts (`check`) whenever the task has expected calls.

The trajectory is rendered as data, one JSON object per message between <trajectory> lines, with
'<', '>' and '&' escaped as JSON unicode escapes inside it, so no text the policy writes can close
the block, open a chat-template turn or pass for the judge's own answer.
"""
import asyncio
import collections
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trustee_jax.config_dataclass import from_config
from trustee_jax.simulator import system_prompts
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.rule_check import CallCheck, check_calls, made_turns
from trustee_jax.seeding import retry_seed
from trustee_jax.simulator.tasks import Task, sampling_kwargs

CRITERIA = (
    "Meets the user's intent: the assistant achieved what the user ultimately wanted, using the tools.",
    "Uses the expected tools correctly: the right tools, with correct arguments, in a sensible order.",
    "No hallucination: it states no facts, identifiers, results or tool outputs that the conversation does not support.",
    "No redundant or wrong attempts: no unnecessary, repeated or erroneous tool calls or steps.",
    "Concise and efficient: replies and tool use are to the point.",
)
# blend: what the LM judges in place of criteria 1, 3 and 5 (criteria 2 and 4 are the check's).
CONVERSATION = {
    0: "Tells the user the outcome: the replies say truthfully what was done, or what is still needed.",
    2: CRITERIA[2],
    4: "Concise: the assistant's replies are to the point.",
}
MODES = ("lm", "rule", "blend", "questions")
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
  top_k: int | None = None  # SGLang's and vLLM's extension; None: the server's default
  chat_template_kwargs: dict[str, Any] | None = None
  mode: str = "lm"  # lm | rule | blend | questions (see the module docstring)
  ordered: bool = False  # the rule check wants the expected calls in order
  allowed_extra: tuple[str, ...] = ()  # tools (reads) whose extra calls the rule check allows
  max_excerpt_chars: int = 3000  # questions: each excerpt cut to this many characters
  logprob_threshold: float | None = None  # questions: answers from P(yes) vs P(no) (see above)
  top_logprobs: int = 5
  # per-criterion verdicts before the score; with score_rule "model" in lm mode they can be left
  # out (the reference asks for the score and a reason only)
  extra_fields: bool = True

  @property
  def asks_criteria(self) -> bool:
    """Whether the judge's answer carries `criteria_met` (a score from it needs them)."""
    return self.extra_fields or self.score_rule == "criteria" or self.mode == "blend"


@dataclasses.dataclass(frozen=True)
class Judgement:
  score: int
  reason: str
  votes: tuple[int, ...]
  check: dict[str, float] | None = None  # the rule check's parts, when the task has expected calls


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


def trajectory_rows(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per message but system ones: turn, role, content (and the policy's reasoning where
  the messages carry it), tool calls or the tool's name."""
  names: dict[str, str] = {}
  rows = []
  turn = 0
  for m in messages:
    role = m.get("role")
    if role == "system":
      continue
    turn += 1
    obj: dict[str, Any] = {"turn": turn, "role": role, "content": _text(m.get("content"))}
    if role == "assistant" and m.get("reasoning_content"):  # shown only when the rollout keeps it
      obj["reasoning"] = _text(m["reasoning_content"])
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
  return rows


def render_trajectory(messages: list[dict[str, Any]]) -> str:
  """The conversation (system messages left out) as escaped JSON lines between delimiters.
  Tool-call arguments stay JSON strings, so their quotes are escaped like any other text."""
  return render_data(TAG, trajectory_rows(messages))


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


def judge_schema(num_criteria: int, max_reason_chars: int,
                 criteria_met: bool = True) -> dict[str, Any]:
  """Reason first, then per-criterion verdicts (unless left out), then the score (llguidance
  keeps this order)."""
  props = {"reason": {"type": "string", "maxLength": max_reason_chars},
           "criteria_met": {"type": "array", "items": {"type": "boolean"},
                            "minItems": num_criteria, "maxItems": num_criteria},
           "score": {"type": "integer", "enum": [-1, 0, 1]}}
  if not criteria_met:
    del props["criteria_met"]
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


def rule_score(check: CallCheck) -> int:
  """rule mode: 1 when the check passed, 0 when every expected tool was called, else -1."""
  return 1 if check.passed else 0 if not check.missing else -1


def blend_gate(check: CallCheck, num_criteria: int) -> int | None:
  """blend mode's score when the check alone decides it (see the table), else None."""
  if check.matched == 0 and check.missing:
    return -1
  if not check.passed or (num_criteria >= 4 and check.extra):
    return 0
  return None


def describe(check: CallCheck) -> str:
  return (f"rule check: {check.matched}/{check.expected} expected calls matched, "
          f"{check.name_only} with wrong arguments, missing {list(check.missing)}, "
          f"{check.extra} extra, order {'ok' if check.order_ok else 'wrong'}")


def question_schema() -> dict[str, Any]:
  return {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}


def answer_probs(logprobs: Mapping[str, Any] | None) -> tuple[float, float]:
  """P(yes), P(no) at the first token of the value of a `{"answer": ...}` reply, from an OpenAI
  `logprobs` object (its top alternatives when given); (0, 0) when there is no such token."""
  tokens = (logprobs or {}).get("content") or []
  found = re.search(r'"answer"\s*:\s*"', "".join(t.get("token", "") for t in tokens))
  off = 0
  for t in tokens if found else []:
    tok = t.get("token", "")
    if off + len(tok) > found.end():
      p = {"yes": 0.0, "no": 0.0}
      for alt in t.get("top_logprobs") or [t]:
        word = alt.get("token", "")[found.end() - off:].strip().casefold()
        for w in p:
          p[w] += math.exp(alt["logprob"]) if word and w.startswith(word) else 0.0
      return p["yes"], p["no"]
    off += len(tok)
  return 0.0, 0.0


def verdict_from_logprobs(p_yes: float, p_no: float, threshold: float) -> bool | None:
  """Yes iff P(yes) / (P(yes) + P(no)) >= threshold; None when both are 0."""
  total = p_yes + p_no
  return None if total <= 0 else p_yes / total >= threshold


def calibrate_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
  """The threshold on P(yes) / (P(yes) + P(no)) that gets most labelled answers right (the
  middle one of ties), so that an LM leaning to "yes" on everything is read against its bias."""
  if not scores or len(scores) != len(labels):
    raise ValueError("need as many labels as scores, at least one")
  cuts = sorted(set(scores))
  candidates = [0.0, *((a + b) / 2 for a, b in zip(cuts, cuts[1:])), math.nextafter(cuts[-1], 2.0)]
  right = [sum((s >= t) == bool(y) for s, y in zip(scores, labels)) for t in candidates]
  best = [t for t, r in zip(candidates, right) if r == max(right)]
  return best[len(best) // 2]


def excerpt_rows(rows: list[dict[str, Any]], criterion: int) -> list[dict[str, Any]]:
  """The rows question `criterion` needs: calls and results (+ the last reply for the intent),
  the calls alone, what the user and tools said against the replies, or the replies alone."""
  replies = [{k: r[k] for k in ("turn", "role", "content")} for r in rows
             if r["role"] == "assistant" and r["content"]]
  calls = [r for r in rows if r["role"] == "tool" or "tool_calls" in r]
  picked = {0: calls + replies[-1:],
            1: [{k: r[k] for k in ("turn", "role", "tool_calls")} for r in calls if r["role"] != "tool"],
            2: [r for r in rows if r["role"] in ("user", "tool")] + replies,
            3: calls, 4: replies}[criterion]
  return sorted({r["turn"]: r for r in picked}.values(), key=lambda r: r["turn"])


QUESTIONS = (
    "The user wanted: {intent}\nJudging by the assistant's tool calls, their results and its last "
    "reply above, did the assistant get this done for the user?",
    "A good assistant would make these tool calls: {expected}\nDid the assistant make them above, "
    "with correct arguments, in a sensible order?",
    "Is everything the assistant told the user above supported by what the user said and what the "
    "tools returned?",
    "Were all of the assistant's tool calls above needed, with none repeated, failed or wrong?",
    "Are the assistant's replies above to the point?",
)


class Judge:
  """Scores an episode by `cfg.mode`; no tool call at all scores -1 without any LM call."""

  def __init__(self, client: Any, cfg: Any = None):
    self.client = client
    self.cfg: JudgeConfig = from_config(JudgeConfig, cfg, block="world.judge")
    if self.cfg.score_rule not in ("criteria", "model"):
      raise ValueError(f"score_rule must be 'criteria' or 'model', got {self.cfg.score_rule!r}")
    if self.cfg.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.cfg.mode!r}")
    if self.cfg.num_votes < 1:
      raise ValueError(f"num_votes must be >= 1, got {self.cfg.num_votes}")
    self._template = system_prompts.load_template("judge.jinja")
    self._question = system_prompts.load_template("judge_question.jinja")

  def prompt(self, task: Task, messages: list[dict[str, Any]], num_criteria: int,
             criteria: Sequence[str] | None = None) -> str:
    return self._template.render(
        task=task, tools_json=tools_pool.tools_text(task.tools),
        trajectory=render_trajectory(messages),
        criteria=CRITERIA[:num_criteria] if criteria is None else list(criteria),
        criteria_met=self.cfg.asks_criteria)

  def check(self, task: Task, messages: list[dict[str, Any]]) -> CallCheck | None:
    """The rule check of the episode's calls, None when the task has no expected calls."""
    if not task.expected_calls:
      return None
    return check_calls(task.expected_calls, made_turns(messages, succeeded_only=True),
                       ordered=self.cfg.ordered,
                       allowed_extra=self.cfg.allowed_extra)

  def question_prompts(self, task: Task, messages: list[dict[str, Any]],
                       num_criteria: int) -> dict[int, str]:
    """criterion -> its question's prompt; a criterion with an empty excerpt (no reply to
    judge for conciseness, say) is left out, and counts as met."""
    expected = ("; ".join(json.dumps(c, ensure_ascii=False) for c in task.expected_calls)
                or ", ".join(task.expected_tool_calls))
    rows = trajectory_rows(messages)
    out = {}
    for i in range(num_criteria):
      picked = excerpt_rows(rows, i)
      while len(picked) > 1 and len(render_data("excerpt", picked)) > self.cfg.max_excerpt_chars:
        picked = picked[1:]
      if picked:
        question = QUESTIONS[i].format(intent=task.user_intent, expected=expected)
        out[i] = self._question.render(excerpt=render_data("excerpt", picked), question=question)
    return out

  async def _ask(self, prompt: str, seed: int, affinity: str) -> bool:
    """One yes/no answer: sampled, or from the answer token's log-probs (logprob_threshold)."""
    messages = [{"role": "user", "content": prompt}]
    if self.cfg.logprob_threshold is None:
      raw = await self.client.chat_json(messages, question_schema(), role="judge", seed=seed,
                                        affinity=affinity, **sampling_kwargs(self.cfg))
      return raw["answer"] == "yes"
    fmt = {"type": "json_schema",
           "json_schema": {"name": "judge", "schema": question_schema(), "strict": True}}
    result = await self.client.chat(messages, role="judge", response_format=fmt, logprobs=True,
                                    top_logprobs=self.cfg.top_logprobs, seed=seed,
                                    affinity=affinity, **sampling_kwargs(self.cfg))
    choice = (result.raw.get("choices") or [{}])[0]
    verdict = verdict_from_logprobs(*answer_probs(choice.get("logprobs")),
                                    self.cfg.logprob_threshold)
    return '"yes"' in result.content if verdict is None else verdict

  async def _questions_vote(self, prompts: dict[int, str], n: int, seed: int,
                            affinity: str) -> tuple[int, str]:
    answers = await asyncio.gather(*(self._ask(p, retry_seed(seed, i), affinity)
                                     for i, p in prompts.items()))
    met = dict(zip(prompts, answers))
    yes = [i + 1 for i in range(n) if met.get(i, True)]
    return criteria_score([met.get(i, True) for i in range(n)]), f"questions met: {yes} of {n}"

  async def _vote(self, prompt: str, schema: dict, seed: int, affinity: str) -> tuple[int, str]:
    raw = await self.client.chat_json([{"role": "user", "content": prompt}], schema, role="judge",
                                      seed=seed, affinity=affinity, **sampling_kwargs(self.cfg))
    if self.cfg.mode == "blend":
      return (1 if all(raw["criteria_met"]) else 0), str(raw["reason"])
    score = criteria_score(raw["criteria_met"]) if self.cfg.score_rule == "criteria" else raw["score"]
    return int(score), str(raw["reason"])

  async def score(self, task: Task, messages: list[dict[str, Any]], num_criteria: int,
                  seed: int) -> Judgement:
    if not has_tool_call(messages):
      return Judgement(-1, "no tool call in the episode", ())
    n = min(max(1, int(num_criteria)), self.cfg.max_criteria, len(CRITERIA))
    check = self.check(task, messages)
    parts = None if check is None else check.parts()
    if self.cfg.mode in ("rule", "blend"):
      if check is None:
        raise ValueError(f"judge mode {self.cfg.mode!r} needs tasks with expected_calls "
                         "(task generator expected_arguments=True)")
      decided = rule_score(check) if self.cfg.mode == "rule" else blend_gate(check, n)
      if decided is not None:
        return Judgement(decided, describe(check), (decided,), parts)
    if self.cfg.mode == "questions":
      prompts = self.question_prompts(task, messages, n)
      votes_at = lambda s: self._questions_vote(prompts, n, s, task.affinity)
    else:
      blend = self.cfg.mode == "blend"
      criteria = [CONVERSATION[i] for i in range(n) if i in CONVERSATION] if blend else None
      prompt = self.prompt(task, messages, n, criteria)
      schema = judge_schema(n if criteria is None else len(criteria), self.cfg.max_reason_chars,
                            criteria_met=self.cfg.asks_criteria)
      votes_at = lambda s: self._vote(prompt, schema, s, task.affinity)
    results = await asyncio.gather(*(votes_at(retry_seed(seed, k))
                                     for k in range(self.cfg.num_votes)))
    votes = [s for s, _ in results]
    final = majority(votes)
    reason = next(r for s, r in results if s == final)
    return Judgement(final, reason, tuple(votes), parts)
