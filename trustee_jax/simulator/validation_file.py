"""A fixed validation set read from a file, as the reference's `valid.parquet`.

Rows carry the reference's fields: `query` (the first user message), `tools` (a list, or a JSON
string of one), and optionally `expected_tool_calls`, `user_intent`, `user_persona`,
`num_criteria`, `category`. As the reference's validation, the policy gets the bare system prompt
("You are a helpful assistant.") and the turn limits its run script sets (3 user, 6 assistant,
3 tool turns). JSON (a list of rows) and JSON Lines are read directly; Parquet through pyarrow
when it is installed (`pip install pyarrow`), which this project does not pin.
"""
import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from trustee_jax.simulator import system_prompts, tools_pool
from trustee_jax.simulator.tasks import KNOB_FIELDS, Task

REFERENCE_TURNS = {"max_user_turns": 3, "max_assistant_turns": 6, "max_tool_turns": 3}


class ValidationFileError(ValueError):
  """A validation file that cannot be read, or a row without what a task needs."""


def _rows(path: epath.Path) -> list[Mapping[str, Any]]:
  """The file's rows, by its suffix."""
  if path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise ValidationFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                                "or convert it to JSON Lines first") from e
    with path.open("rb") as f:
      return pq.read_table(f).to_pylist()
  text = path.read_text()
  if path.suffix == ".jsonl":
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  rows = json.loads(text)
  if not isinstance(rows, list):
    raise ValidationFileError(f"{path}: a JSON validation file holds a list of rows")
  return rows


def _list(value: Any, what: str) -> list:
  value = json.loads(value) if isinstance(value, str) else value
  if not isinstance(value, list):
    raise ValidationFileError(f"{what} is not a list")
  return list(value)


def row_task(row: Mapping[str, Any], index: int, source: str) -> Task:
  """The Task a row stands for, knobs as the reference validates (bare system prompt)."""
  where = f"{source} row {index}"
  query = row.get("query")
  if not isinstance(query, str) or not query.strip():
    raise ValidationFileError(f"{where}: no `query` (the first user message)")
  raw_tools = _list(row.get("tools", []), f"{where}: tools")
  problems = [p for t in raw_tools for p in tools_pool.tool_problems(t, strict=False)]
  if problems:
    raise ValidationFileError(f"{where}: bad tools: {'; '.join(problems[:5])}")
  tools = [tools_pool.tool_spec(t) for t in raw_tools]
  expected = [c if isinstance(c, str) else str(c.get("name", c))
              for c in _list(row.get("expected_tool_calls") or [], f"{where}: expected_tool_calls")]
  knobs = dict.fromkeys(KNOB_FIELDS, 0)
  knobs.update(num_tools=len(tools), num_expected_calls=len(expected), system_prompt_level=3,
               num_criteria=int(row.get("num_criteria") or 5), **REFERENCE_TURNS)
  return Task(task_id=f"valid-{index}", category=str(row.get("category") or "validation"),
              tools=tools, expected_tool_calls=expected,
              user_intent=str(row.get("user_intent") or ""),
              user_persona=str(row.get("user_persona") or ""), first_user_query=query.strip(),
              hidden_facts=[], initial_state=[], knobs=knobs,
              system_prompt=system_prompts.system_prompt(3))


def load_tasks(path: str | os.PathLike) -> list[Task]:
  """Every row of the file as a Task; a missing file or a bad row is an error naming it."""
  p = epath.Path(path)
  if not p.exists():
    raise ValidationFileError(f"validation.file {p} does not exist")
  try:
    rows = _rows(p)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValidationFileError(f"{p}: not valid JSON: {e}") from e
  if not rows:
    raise ValidationFileError(f"{p} holds no rows")
  return [row_task(r, i, str(p)) for i, r in enumerate(rows)]
