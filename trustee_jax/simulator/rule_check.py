"""A verifiable check of an episode's tool calls against a task's expected calls.

Arguments compare after normalisation (`arguments_match`): strings strip + casefold, numbers by
value (1 == 1.0), but types otherwise matter: "21" != 21 and True != 1, since expected arguments are
validated against the tool's schema and a call with the wrong type violates it. Dicts need the same
keys (an argument the user never asked for is a mismatch), lists the same items in order, each
compared recursively.

Matching is multiset matching: every made call matches at most one expected call with equal name and
arguments. Expected calls left over then pair, again one to one, with left-over made calls of the
same tool (`name_only`, a call with wrong arguments); those that find none are `missing`. Made calls
neither matched nor paired are `extra`, except calls of tools in `allowed_extra` (reads). Calls made
in one assistant turn are parallel, a set: with `ordered=True` the matched calls' turns must not
decrease in expected order.
"""
import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from trustee_jax.tool_calls import ToolCall

EXTRA_PENALTY = 0.1  # score lost per extra call
FAILED_FACTOR = 0.5  # score kept when the order or state check fails


@dataclasses.dataclass(frozen=True)
class CallCheck:
  """Counts of how an episode's tool calls met the expected ones."""
  expected: int  # number of expected calls
  made: int  # number of calls the agent made (valid or not)
  matched: int  # expected calls matched by a made call with equal name and arguments
  name_only: int  # expected calls paired only with a call of the same tool, wrong arguments
  missing: tuple[str, ...]  # names of expected calls with no call of their tool left to pair
  extra: int  # made calls neither matched nor paired, outside `allowed_extra`
  order_ok: bool  # matched calls appear in expected order (True when not checked)
  state_ok: bool | None  # final state agrees with the expected state, None when not checked

  @property
  def passed(self) -> bool:
    """Every expected call matched, and order and state ok where checked."""
    return self.matched == self.expected and self.order_ok and self.state_ok is not False

  @property
  def score(self) -> float:
    """Matched fraction (1 with nothing expected) minus EXTRA_PENALTY per extra call, times
    FAILED_FACTOR when the order or state check fails, clipped to [0, 1]."""
    s = self.matched / self.expected if self.expected else 1.0
    s -= EXTRA_PENALTY * self.extra
    if not self.order_ok or self.state_ok is False:
      s *= FAILED_FACTOR
    return min(1.0, max(0.0, s))

  def parts(self) -> dict[str, float]:
    """Flat numbers for logging (`state_ok` only when checked)."""
    out = {"expected": float(self.expected), "made": float(self.made),
           "matched": float(self.matched), "name_only": float(self.name_only),
           "missing": float(len(self.missing)), "extra": float(self.extra),
           "order_ok": float(self.order_ok), "passed": float(self.passed), "score": self.score}
    if self.state_ok is not None:
      out["state_ok"] = float(self.state_ok)
    return out


def _norm(value: Any) -> Any:
  return value.strip().casefold() if isinstance(value, str) else value


def values_match(expected: Any, actual: Any) -> bool:
  """Normalised, recursive equality of two JSON values (see the module docstring)."""
  if isinstance(expected, bool) or isinstance(actual, bool):
    return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
  if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
    return expected == actual
  if isinstance(expected, Mapping) and isinstance(actual, Mapping):
    return arguments_match(expected, actual)
  if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
    return len(expected) == len(actual) and all(map(values_match, expected, actual))
  if type(_norm(expected)) is not type(_norm(actual)):
    return False
  return _norm(expected) == _norm(actual)


def arguments_match(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
  """Same keys, and every value matching by `values_match`."""
  return set(expected) == set(actual) and all(values_match(v, actual[k])
                                              for k, v in expected.items())


ERROR_PREFIX = "Error"  # how the tool simulator and the doubles answer a call that failed


def made_turns(messages: Sequence[Mapping[str, Any]], *, succeeded_only: bool = False
               ) -> list[list[ToolCall]]:
  """The assistant's tool calls per turn that made any, arguments decoded (undecodable as {});
  with `succeeded_only`, without the calls whose tool result is an error (a call the backend
  refused did not happen, however right its arguments look)."""
  failed = {str(m.get("tool_call_id")) for m in messages if m.get("role") == "tool"
            and str(m.get("content") or "").startswith(ERROR_PREFIX)} if succeeded_only else set()
  turns = []
  for m in messages:
    calls = []
    for c in (m.get("tool_calls") or []) if m.get("role") == "assistant" else []:
      if str(c.get("id", "")) in failed:
        continue
      fn = c.get("function", {})
      args = fn.get("arguments", {})
      try:
        args = json.loads(args) if isinstance(args, str) else args
      except json.JSONDecodeError:
        args = {}
      calls.append(ToolCall(str(fn.get("name", "")), args if isinstance(args, dict) else {},
                            str(c.get("id", ""))))
    if calls:
      turns.append(calls)
  return turns


def made_calls(messages: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
  """Every tool call the assistant made, in order, arguments decoded (undecodable ones as {})."""
  return [c for turn in made_turns(messages) for c in turn]


def _flatten(made: Sequence[ToolCall | Sequence[ToolCall]]) -> list[tuple[int, ToolCall]]:
  """(turn, call) pairs: a ToolCall is a turn of its own, a sequence of them one parallel turn."""
  out = []
  for turn, item in enumerate(made):
    out.extend((turn, c) for c in ([item] if isinstance(item, ToolCall) else item))
  return out


def check_calls(expected: Sequence[Mapping[str, Any]],
                made: Sequence[ToolCall | Sequence[ToolCall]], *, ordered: bool = False,
                allowed_extra: Collection[str] = (), final_state: Mapping[str, Any] | None = None,
                expected_state: Mapping[str, Any] | None = None) -> CallCheck:
  """Checks `made` (calls, or per-turn lists of parallel calls, e.g. `made_turns(messages)`)
  against `expected` ({"name", "arguments"} items). The state is checked when both states are
  given: every key of `expected_state` must be in `final_state` with a matching value."""
  calls = _flatten(made)
  used = [False] * len(calls)
  unmatched, turns = [], []
  for e in expected:  # the match relation is an equivalence, so first-fit is a maximum matching
    j = next((j for j, (_, c) in enumerate(calls) if not used[j] and c.name == e["name"]
              and arguments_match(e.get("arguments") or {}, c.arguments)), None)
    if j is None:
      unmatched.append(e)
    else:
      used[j] = True
      turns.append(calls[j][0])
  missing = []
  for e in unmatched:
    j = next((j for j, (_, c) in enumerate(calls) if not used[j] and c.name == e["name"]), None)
    if j is None:
      missing.append(str(e["name"]))
    else:
      used[j] = True
  extra = sum(not u and c.name not in allowed_extra for u, (_, c) in zip(used, calls))
  state_ok = None
  if final_state is not None and expected_state is not None:
    state_ok = all(k in final_state and values_match(v, final_state[k])
                   for k, v in expected_state.items())
  return CallCheck(expected=len(expected), made=len(calls), matched=len(turns),
                   name_only=len(unmatched) - len(missing), missing=tuple(missing), extra=extra,
                   order_ok=not ordered or all(a <= b for a, b in zip(turns, turns[1:])),
                   state_ok=state_ok)
