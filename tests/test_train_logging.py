"""train_logging.py: a run's files in a remote (gs://) workdir, its one line a step, when the bar
shows, and whose INFO lines reach the terminal."""
import asyncio
import importlib
import io
import json
import logging
import os
import types

import fsspec
import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX import record_writer

from trustee_jax import rollout, runtime, train, train_logging
from trustee_jax.checkpoint import Checkpointer
from trustee_jax.simulator.tasks import Task


class FakeGCS(MemoryFileSystem):
  """gs:// in memory, through fsspec as gcsfs would be: nothing touches the local disk."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(fsspec.utils.stringify_path(path).removeprefix("gs://"))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs:// served by FakeGCS for epath, tensorboardX and tensorboard's reader; cwd an empty
  directory, so that a path turned local (<cwd>/gs:/...) would show."""
  monkeypatch.chdir(tmp_path)
  registry = importlib.import_module("fsspec.registry")._registry  # restored at teardown
  for name in FakeGCS.protocol:
    monkeypatch.setitem(registry, name, FakeGCS)
  monkeypatch.setattr(record_writer, "REGISTERED_FACTORIES",
                      dict(record_writer.REGISTERED_FACTORIES))
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  yield FakeGCS
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not list(tmp_path.iterdir()), "a gs:// path was written locally"


def _task(i: int) -> Task:
  return Task(task_id=f"t{i}", category="home", tools=[], expected_tool_calls=[],
              user_intent="", user_persona="", first_user_query="hi", hidden_facts=[],
              initial_state=[], knobs={"k": i}, system_prompt="")


def _episode() -> rollout.Episode:
  n = 4
  return rollout.Episode(task_index=0, episode_index=0, tokens=np.arange(n, dtype=np.int32),
                         loss_mask=np.array([0, 1, 1, 0], np.int32),
                         logprobs=np.zeros(n, np.float32),
                         turn_rewards=np.ones(n, np.float32), reward=1.0, judge_score=1,
                         messages=[{"role": "user", "content": "hi"}])


def test_the_logger_writes_scalars_and_episodes_to_a_gs_workdir(gcs):
  log = train_logging.RunLogger("gs://bucket/run")
  assert os.fspath(log.workdir) == "gs://bucket/run"
  log.scalars(1, {"reward/mean": 0.5, "curriculum/level": 1.0})
  log.episodes(1, [_episode()], [_task(0)], level=1.0)
  log.close()
  lines = epath.Path("gs://bucket/run/episodes/step_1.jsonl").read_text().splitlines()
  assert [json.loads(l)["reward"] for l in lines] == [1.0]
  assert any(k.startswith("/bucket/run/tb/events.out.tfevents") for k in gcs.store)
  assert train_logging.scalar_series("gs://bucket/run/tb", ["reward/mean"]) == \
      {"reward/mean": {1: 0.5}}


def test_validation_tasks_are_saved_to_and_reloaded_from_a_gs_workdir(gcs):
  made = []

  async def make_tasks(*args, **kwargs):
    made.append(1)
    return [_task(0), _task(1)]
  trainer = types.SimpleNamespace(  # what _validation_tasks reads of a Trainer
      log=types.SimpleNamespace(workdir=runtime.run_path("gs://bucket/run")), _tasks=make_tasks,
      info=types.SimpleNamespace(count=1, index=0),
      cfg=ml_collections.ConfigDict(dict(seed=0, validation=dict(num_tasks=2, level=0))))
  first = asyncio.run(train.Trainer._validation_tasks(trainer))
  again = asyncio.run(train.Trainer._validation_tasks(trainer))
  assert first == again == [_task(0), _task(1)] and made == [1]  # the second read the file
  assert "/bucket/run/validation_tasks.json" in gcs.store


def test_step_line_says_reward_success_level_throughput_times_and_memory():
  scalars = {"reward/mean": 0.25, "reward/success_rate": 0.125, "curriculum/level": 2.0,
             "episodes/count": 8.0, "episodes/response_tokens": 50.0, "time/tasks": 0.5,
             "time/rollout": 4.0, "time/update": 2.25, "val/success_rate": 0.5}
  memory = {"in_use": 12.34, "peak": 20.0, "limit": 80.0}
  assert train_logging.step_line(3, 200, scalars, memory) == (
      "step 3/200 | reward 0.250 | success 0.125 | level 2.0 | tok/s 100 | val success 0.500"
      " | time tasks 0.5s rollout 4.0s update 2.2s | mem 12.3/80.0 GiB (peak 20.0)")
  bare = train_logging.step_line(1, 2, {"reward/mean": 0.0}, None)
  assert bare.endswith("tok/s nan | time -") and "mem" not in bare
  judged = train_logging.step_line(1, 2, {"oracle/success_rate": 0.25,
                                          "oracle/pass_agreement": 0.75}, None)
  assert "| oracle success 0.250 agrees 0.750 |" in judged


class _Stream(io.StringIO):
  def __init__(self, tty: bool):
    super().__init__()
    self.tty = tty

  def isatty(self) -> bool:
    return self.tty


@pytest.mark.parametrize("enabled,primary,tty,shown", [
    (True, True, True, True), (True, True, False, False), (True, False, True, False),
    (False, True, True, False)])
def test_the_bar_shows_only_on_the_primary_at_a_terminal(enabled, primary, tty, shown):
  assert train_logging.show_progress_bar(enabled, primary, _Stream(tty)) is shown


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "msg", None, None)


def test_other_libraries_info_is_dropped_their_warnings_kept(tmp_path):
  own = tmp_path / "trustee_jax"
  keep = train_logging.OwnInfoOnly((own,))
  assert keep.filter(_record(str(own / "train.py"), logging.INFO))
  assert not keep.filter(_record("/site-packages/orbax/checkpoint/manager.py", logging.INFO))
  assert not keep.filter(_record(str(tmp_path / "trustee_jax_other" / "x.py"), logging.INFO))
  assert keep.filter(_record("/site-packages/orbax/checkpoint/manager.py", logging.WARNING))


def test_the_checkpointer_keeps_a_gs_directory(gcs, monkeypatch):
  # Orbax asks the GCS API itself (google-cloud-storage, requirements-tpu.txt) about the bucket.
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  ckpt = Checkpointer("gs://bucket/run/checkpoints", keep=1)
  try:
    assert os.fspath(ckpt.directory) == "gs://bucket/run/checkpoints"
    assert ckpt.latest_step() is None
  finally:
    ckpt.close()
  assert "/bucket/run/checkpoints" in gcs.pseudo_dirs  # made there by Orbax, through epath


def test_oracle_scalars_say_how_the_judge_tracks_the_oracle():
  def ep(judge, oracle):
    return types.SimpleNamespace(judge_score=judge, oracle_score=oracle)
  eps = [ep(1, 1), ep(1, 0), ep(0, 0), ep(-1, 1), ep(1, None)]  # the last: not scored
  assert train_logging.oracle_scalars(eps, "oracle/") == {
      "oracle/success_rate": 0.5, "oracle/score_mean": 0.5, "oracle/pass_agreement": 0.5,
      "oracle/score_agreement": 0.5, "oracle/judge_false_pass": 0.25,
      "oracle/judge_false_fail": 0.25}
  assert train_logging.oracle_scalars([ep(1, None)], "oracle/") == {}
