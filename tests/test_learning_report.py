"""benchmarks/learning.py's arms and report: what each arm changes, and the figures the claims
are read from, on hand-made curves (no training)."""
import importlib.util
import pathlib

from trustee_jax import controls

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
    assert control in controls.CONTROLS


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
  assert "oracle_success" not in s  # the rule world: no oracle beside the judge


def test_the_lm_worlds_summary_sets_the_judge_beside_the_oracle():
  curves = {"reward/mean": {1: 0.0, 2: 0.0, 3: 0.0},
            "reward/success_rate": {1: 0.5, 2: 0.75, 3: 1.0},  # the LM judge's
            "oracle/success_rate": {1: 0.25, 2: 0.25, 3: 0.5},
            "oracle/pass_agreement": {1: 0.75, 2: 0.5, 3: 0.5},
            "oracle/judge_false_pass": {1: 0.25, 2: 0.5, 3: 0.5},
            "oracle/judge_false_fail": {1: 0.0, 2: 0.0, 3: 0.0},
            "val/oracle_success_rate": {0: 0.25, 3: 0.5}}
  s = _learning().summary({"curves": curves, "wall_s": 1.0}, level_step=3)
  assert s["oracle_success"] == [0.25, 0.25, 0.5]
  assert s["pass_agreement_mean"] == 0.583 and s["judge_false_pass_mean"] == 0.417
  assert s["judge_false_fail_mean"] == 0.0
  # judge 0.5, 0.75, 1 against oracle 0.25, 0.25, 0.5: r = 0.0625 / sqrt(0.125 * 0.041667)
  assert s["judge_oracle_success_corr"] == 0.866
  assert (s["val_oracle_success_before"], s["val_oracle_success_after"]) == (0.25, 0.5)
  assert (s["success_late_mean"], s["oracle_success_late_mean"]) == (0.875, 0.375)
  assert _learning().label("qwen2.5-coder-0.5b", "lm") == "qwen2.5-coder-0.5b@lm"
