"""simulator/validation_file.py: a fixed validation set in the reference's valid.parquet fields."""
import asyncio
import json
import types

import pytest

from trustee_jax import distributed, train
from trustee_jax.default_config import default_config
from trustee_jax.simulator import validation_file as vf

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ROWS = [{"query": "Weather in Oslo?", "tools": json.dumps([TOOL]),
         "expected_tool_calls": ["get_weather"], "user_intent": "Know Oslo's weather.",
         "user_persona": "A hiker.", "num_criteria": 3},
        {"query": "  What's up?  ", "tools": [TOOL["function"]]}]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_rows_become_tasks_as_the_reference_validates(tmp_path, suffix):
  path = tmp_path / f"valid{suffix}"
  path.write_text(json.dumps(ROWS) if suffix == ".json"
                  else "\n".join(json.dumps(r) for r in ROWS) + "\n")
  first, second = vf.load_tasks(path)
  assert (first.first_user_query, first.tool_names, first.expected_tool_calls) == (
      "Weather in Oslo?", ["get_weather"], ["get_weather"])
  assert (first.user_intent, first.user_persona, first.knobs["num_criteria"]) == (
      "Know Oslo's weather.", "A hiker.", 3)
  assert first.system_prompt == "You are a helpful assistant."  # the reference's, for validation
  assert {k: first.knobs[k] for k in vf.REFERENCE_TURNS} == vf.REFERENCE_TURNS
  assert second.first_user_query == "What's up?" and second.knobs["num_criteria"] == 5
  assert second.tools == [TOOL]  # a bare function is given to the policy as an OpenAI tool
  assert first.task_id != second.task_id


@pytest.mark.parametrize("content,match", [
    ("[{\"tools\": []}]", "row 0: no `query`"),
    ("[{\"query\": \"q\", \"tools\": [{\"type\": \"function\"}]}]", "row 0: bad tools"),
    ("{\"query\": \"q\"}", "holds a list of rows"),
    ("[]", "holds no rows"),
    ("not json", "not valid JSON")])
def test_bad_files_name_the_file_and_row(tmp_path, content, match):
  path = tmp_path / "valid.json"
  path.write_text(content)
  with pytest.raises(vf.ValidationFileError, match=match):
    vf.load_tasks(path)


def test_missing_file_and_parquet_without_pyarrow_are_named(tmp_path):
  with pytest.raises(vf.ValidationFileError, match="does not exist"):
    vf.load_tasks(tmp_path / "nope.json")
  (tmp_path / "valid.parquet").write_bytes(b"PAR1")
  try:
    import pyarrow  # noqa: F401
  except ImportError:
    with pytest.raises(vf.ValidationFileError, match="pyarrow"):
      vf.load_tasks(tmp_path / "valid.parquet")


def test_the_trainer_validates_on_the_file_when_one_is_given(tmp_path):
  path = tmp_path / "valid.json"
  path.write_text(json.dumps(ROWS))
  cfg = default_config()
  cfg.validation.file = str(path)
  trainer = types.SimpleNamespace(cfg=cfg, info=distributed.process_info())
  tasks = asyncio.run(train.Trainer._validation_tasks(trainer))
  assert [t.first_user_query for t in tasks] == ["Weather in Oslo?", "What's up?"]
