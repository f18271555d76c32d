"""Both notebooks run top to bottom (nbclient) on a workdir the test makes, and draw figures."""
import json
import os
import pathlib

import numpy as np
import pytest

from trustee_jax.eval import common
from trustee_jax.train_logging import RunLogger

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (test extra)")
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (test extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (test extra)")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, env: dict[str, str], timeout: int) -> list[dict]:
  """Executes notebooks/<name> in a fresh kernel with `env`; returns every cell output."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def text_of(outputs) -> str:
  return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def images(outputs) -> list[str]:
  return [o["data"]["image/png"] for o in outputs
          if o.get("output_type") in ("display_data", "execute_result")
          and "image/png" in o.get("data", {})]


def make_workdir(path: pathlib.Path, reward_slope: float) -> pathlib.Path:
  """TensorBoard scalars as a run logs them, one episode file and one eval result."""
  log = RunLogger(path)
  for step in range(1, 4):
    log.scalars(step, {"reward/mean": reward_slope * step, "reward/success_rate": 0.1 * step,
                       "curriculum/level": 1 + 3 * step, "knobs/num_tools": step,
                       "knobs/persona": 0, "train/kl_mean": 0.01 * step,
                       "episodes/response_tokens": 40 + step, "episodes/dropped": 0,
                       "simulator/failures/timeout": step % 2, "train/loss": -0.1})
  log.close()
  episode = {"step": 3, "difficulty_level": 10.0, "episode": 0, "reward": 1.0,
             "judge_score": 1, "judge_reason": "met the intent", "termination": "user_ended",
             "task": {"user_intent": "book a table for two"},
             "messages": [{"role": "user", "content": "A table for two, please."},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"id": "c0", "type": "function",
                               "function": {"name": "book", "arguments": "{}"}}]}]}
  (path / "episodes" / "step_3.jsonl").write_text(json.dumps(episode) + "\n")
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  for step, score in ((0, 0.1), (3, 0.4)):
    common.evaluate(path, "bfcl", ep, lambda s=score: ({"simple_python": s}, {}), step=step,
                    log=lambda *_: None)
  return path


def test_analysis_notebook_plots_compares_and_shows_episodes(tmp_path):
  runs = [make_workdir(tmp_path / "run_a", 0.2), make_workdir(tmp_path / "run_b", -0.1)]
  outputs = run_notebook("analysis.ipynb", {
      "TRUSTEE_WORKDIRS": ",".join(map(str, runs)), "JAX_PLATFORMS": "cpu",
      "MPLBACKEND": "module://matplotlib_inline.backend_inline"}, timeout=300)
  assert len(images(outputs)) == 1
  text = text_of(outputs)
  # 10 training tags and eval/bfcl/simple_python (the base at step 0)
  assert "run_a: 11 tags, steps 0..3" in text and "run_b: 11 tags, steps 0..3" in text
  assert "book a table for two" in text and "calls ['book']" in text
  assert "simple_python" in text and "+30.0" in text  # base vs step_3 of each run
  last_rewards = [line for line in text.splitlines() if line.startswith("reward/mean")]
  assert last_rewards and last_rewards[0].split()[1:] == ["0.6000", "-0.3000"]


def test_analysis_notebook_names_a_missing_workdir(tmp_path):
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="no TensorBoard logs"):
    run_notebook("analysis.ipynb", {"TRUSTEE_WORKDIRS": str(tmp_path / "none")}, timeout=120)


@pytest.mark.slow
def test_quickstart_notebook_trains_and_plots(tmp_path):
  outputs = run_notebook("quickstart.ipynb", {
      "TRUSTEE_QUICKSTART_CONFIG": "test.py", "TRUSTEE_QUICKSTART_STEPS": "1",
      "TRUSTEE_QUICKSTART_WORKDIR": str(tmp_path / "qs"),
      "JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
      timeout=900)
  assert len(images(outputs)) == 1
  assert "done in" in text_of(outputs)
  assert (tmp_path / "qs" / "checkpoints" / "1").is_dir()
  assert np.isfinite(len(list((tmp_path / "qs" / "tb").iterdir())))
