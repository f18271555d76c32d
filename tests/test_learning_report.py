"""benchmarks/learning.py's arms and report: what each arm changes, and the figures the claims
are read from, on hand-made curves (no training)."""
import importlib.util
import pathlib

from trustee_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _learning():
  spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_arms_change_one_thing_each():
  arms = _learning().ARMS
  assert arms["run"] == []
  assert arms["frozen"] == ["--config.train.optimizer.learning_rate=0.0"]
  for control in ("negate_advantages", "permute_rewards"):
    assert arms[control] == [f"--config.train.control={control}"]
    assert control in train.CONTROLS


def test_summary_reads_the_claims_figures():
  curves = {"reward/mean": {1: -1.0, 2: 0.0, 3: 1.0, 4: 0.5},
            "reward/success_rate": {1: 0.0, 2: 0.5, 3: 1.0, 4: 0.5},
            "curriculum/level": {1: 1.0, 2: 4.0, 3: 7.0, 4: 10.0},
            "reward/zero_variance_groups": {1: 1.0, 2: 0.5, 3: 1.0, 4: 0.0},
            "val/success_rate": {0: 0.25, 4: 0.5}}
  s = _learning().summary({"curves": curves, "wall_s": 12.0}, level_step=3)
  assert (s["val_success_before"], s["val_success_after"]) == (0.25, 0.5)
  assert s["level_climb_steps"] == 3.0  # from level 1 to 10 in steps of 3
  assert s["success_late_mean"] == 0.75  # steps 3 and 4
  assert s["level_late_mean"] == 8.5
  assert (s["steps_with_signal"], s["steps"]) == (2, 4)  # steps 2 and 4 had a group with signal
