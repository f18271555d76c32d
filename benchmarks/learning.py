"""Does the loop learn? The real training path, a fixed budget, and two negative controls.

  python benchmarks/learning.py [--steps 12] [--policies qwen2.5-coder-0.5b,smollm2]
      [--arms run,frozen,negate_advantages,permute_rewards] [--out runs/learning]
      [--config.X=Y ...]

Each (policy, arm) is one `launch/train.py --config configs/learning.py` run in its own process
and workdir: chat template, engine rollouts, Hermes tool-call parsing, the rule-checked home world,
its judge, the curriculum, GRPO and Orbax, all as a user runs them. The arms share steps, seeds
and tasks; they differ only in what `ARMS` sets: nothing (the run), a learning rate of 0
("frozen": the untrained policy through the same loop, the baseline an improvement is measured
against), `train.control=negate_advantages` (every advantage's sign flipped) and
`train.control=permute_rewards` (the step's rewards shuffled across its episodes).
Validation is greedy on a fixed held-out set at a fixed level, before training and every
`validation.every` steps, never trained on.

`--report_only` runs nothing: it reads the arms already in `--out` (e.g. arms run as separate
invocations, side by side, each with `--arms ARM --out DIR` into the same DIR). Reads each run's
TensorBoard events back, writes a PNG of the curves (`--plot`), and prints one
JSON object last: per-step reward, success, level and zero-variance share, validation success
before and after, wall time, and whether the claims hold (held-out success up by at least 0.3,
level up by at least 3 curriculum steps, both controls within noise of their start).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from trustee_jax.train_logging import scalar_series  # noqa: E402
TAGS = ("reward/mean", "reward/success_rate", "curriculum/level", "reward/zero_variance_groups",
        "episodes/with_valid_tool_call", "episodes/untagged_tool_calls", "train/loss",
        "train/advantage_abs_mean", "train/nonzero_advantage_frac", "val/success_rate",
        "val/reward_mean", "time/rollout", "time/update", "oracle/success_rate",
        "oracle/pass_agreement", "oracle/judge_false_pass", "oracle/judge_false_fail",
        "val/oracle_success_rate", "val/oracle_pass_agreement")

ORACLE_TAGS = {"val/success_rate": "val/oracle_success_rate",
               "reward/success_rate": "oracle/success_rate"}

# What each arm changes; it comes after the invocation's own --config flags, so it wins.
ARMS = {"run": [], "frozen": ["--config.train.optimizer.learning_rate=0.0"],
        "negate_advantages": ["--config.train.control=negate_advantages"],
        "permute_rewards": ["--config.train.control=permute_rewards"]}


def label(policy: str, world: str) -> str:
  """An arm's policy label and directory: the policy, marked `@lm` in the LM world."""
  return policy if world == "rule" else f"{policy}@{world}"


def run_arm(policy: str, world: str, arm: str, steps: int, out: pathlib.Path,
            extra: list[str]) -> dict:
  """One training run of `launch/train.py` in a fresh workdir; its curves and wall time."""
  name = label(policy, world)
  workdir = out / name / arm
  if workdir.exists():
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
  cmd = [sys.executable, str(REPO / "launch" / "train.py"),
         f"--config={REPO / 'configs' / 'learning.py'}:{policy},{world}", f"--workdir={workdir}",
         f"--config.train.steps={steps}", *extra, *ARMS[arm]]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  (out / name).mkdir(parents=True, exist_ok=True)
  (out / name / f"{arm}.log").write_text(proc.stdout + proc.stderr)
  if proc.returncode != 0:
    raise RuntimeError(f"{name}/{arm} exited {proc.returncode}:\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")
  (workdir / "wall_s.txt").write_text(f"{wall:.1f}\n")
  return read_arm(workdir)


def read_arm(workdir: pathlib.Path) -> dict:
  """A finished arm's curves (its TensorBoard events) and wall time."""
  if not (workdir / "tb").is_dir():
    raise FileNotFoundError(f"no finished arm in {workdir} (no tb/): run it first")
  wall = workdir / "wall_s.txt"
  return {"wall_s": float(wall.read_text()) if wall.exists() else None,
          "curves": scalar_series(workdir / "tb", TAGS)}


def summary(arm: dict, level_step: int) -> dict:
  """The figures the claims are read from."""
  c = arm["curves"]
  val = c.get("val/success_rate", {})
  steps = sorted(c.get("reward/mean", {}))
  levels = c.get("curriculum/level", {})
  success = c.get("reward/success_rate", {})
  late = steps[len(steps) // 2:]
  zero_var = c.get("reward/zero_variance_groups", {})
  return {**oracle_summary(c, steps, late),
      "val_success_before": val.get(0), "val_success_after": val[max(val)] if val else None,
      "val_success": [val[s] for s in sorted(val)], "val_steps": sorted(val),
      "reward_mean": [round(c["reward/mean"][s], 3) for s in steps],
      "success": [round(success.get(s, float("nan")), 3) for s in steps],
      "level": [levels.get(s) for s in steps],
      "level_climb_steps": ((max(levels.values()) - 1) / level_step) if levels else 0,
      # The second half of the run, where arms that learn and arms that do not have parted.
      "success_late_mean": _mean([success.get(s) for s in late]),
      "level_late_mean": _mean([levels.get(s) for s in late]),
      "zero_variance_groups": [round(zero_var.get(s, float("nan")), 3) for s in steps],
      "steps_with_signal": sum(zero_var.get(s, 1.0) < 1.0 for s in steps), "steps": len(steps),
      "wall_s": arm["wall_s"]}


def oracle_summary(c: dict, steps: list[int], late: list[int]) -> dict:
  """Where a rule oracle scored the episodes (the LM world): its success beside the judge's, per
  step and held out, their pass/fail agreement, the judge's false passes and false fails, and
  the correlation of the judge's success with the oracle's over the steps. Else {}."""
  oracle = c.get("oracle/success_rate", {})
  if not oracle:
    return {}
  val = c.get("val/oracle_success_rate", {})
  at = lambda tag: [c.get(tag, {}).get(s) for s in steps]  # noqa: E731
  return {"oracle_success": [_round(oracle.get(s)) for s in steps],
          "pass_agreement": [_round(v) for v in at("oracle/pass_agreement")],
          "pass_agreement_mean": _mean(at("oracle/pass_agreement")),
          "judge_false_pass_mean": _mean(at("oracle/judge_false_pass")),
          "judge_false_fail_mean": _mean(at("oracle/judge_false_fail")),
          "judge_oracle_success_corr": _corr(at("reward/success_rate"), at("oracle/success_rate")),
          "val_oracle_success_before": val.get(0), "val_oracle_success_after":
              val[max(val)] if val else None,
          "val_oracle_pass_agreement": [_round(v) for _, v in
                                        sorted(c.get("val/oracle_pass_agreement", {}).items())],
          # beside summary's success_late_mean, the judge's over the same late steps
          "oracle_success_late_mean": _mean([oracle.get(s) for s in late])}


def _round(v: float | None) -> float | None:
  return None if v is None else round(v, 3)


def _corr(xs: list, ys: list) -> float | None:
  """Pearson's r over the pairs both have; None when either side does not vary."""
  pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
  if len(pairs) < 2:
    return None
  xs, ys = np.asarray(pairs, float).T
  return round(float(np.corrcoef(xs, ys)[0, 1]), 3) if xs.std() > 0 and ys.std() > 0 else None


def _mean(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return round(sum(values) / len(values), 3) if values else None


def plot(results: dict, path: pathlib.Path) -> None:
  """Validation success, training success and curriculum level, one column per policy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  policies = list(results)
  fig, axes = plt.subplots(3, len(policies), figsize=(5 * len(policies), 9), squeeze=False)
  for col, policy in enumerate(policies):
    for arm, data in results[policy].items():
      c = data["curves"]
      for row, tag in enumerate(("val/success_rate", "reward/success_rate", "curriculum/level")):
        series = c.get(tag, {})
        axes[row][col].plot(sorted(series), [series[s] for s in sorted(series)], marker="o",
                            label=arm)
        oracle = c.get(ORACLE_TAGS.get(tag, ""), {})  # the LM world: the oracle's, dashed
        if oracle:
          axes[row][col].plot(sorted(oracle), [oracle[s] for s in sorted(oracle)], marker="x",
                              linestyle="--", label=f"{arm}: rule oracle")
        axes[row][col].set_title(f"{policy}: {tag}")
        axes[row][col].set_xlabel("step")
    axes[0][col].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--policies", default="qwen2.5-coder-0.5b")
  p.add_argument("--world", default="rule", choices=("rule", "lm"),
                 help="rule: the rule-checked home world; lm: its tasks with the LM simulator "
                      "as user, tools and judge, and the rule oracle scoring beside the judge")
  p.add_argument("--arms", default="run,frozen,negate_advantages,permute_rewards")
  p.add_argument("--out", default=str(REPO / "runs" / "learning"))
  p.add_argument("--plot", default=str(REPO / "benchmarks" / "learning.png"))
  p.add_argument("--level_step", type=int, default=3, help="the curriculum's step size")
  p.add_argument("--report_only", action="store_true",
                 help="train nothing: report the arms already in --out")
  args, overrides = p.parse_known_args()  # the rest: --config.* flags for every run
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad}")
  out = pathlib.Path(args.out)
  arms = args.arms.split(",")
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    p.error(f"unknown arms {unknown}: choose from {list(ARMS)}")
  results: dict[str, dict[str, dict]] = {}
  for policy in args.policies.split(","):
    name = label(policy, args.world)
    results[name] = {}
    for arm in arms:
      if args.report_only:
        results[name][arm] = read_arm(out / name / arm)
        continue
      print(f"== {name} / {arm}: {args.steps} steps", flush=True)
      results[name][arm] = run_arm(policy, args.world, arm, args.steps, out, overrides)
      s = summary(results[name][arm], args.level_step)
      print(json.dumps({k: s[k] for k in ("val_success", "success", "level", "wall_s")}),
            flush=True)
  plot(results, pathlib.Path(args.plot))
  report = {"steps": args.steps, "plot": args.plot, "policies": {}}
  for policy, by_arm in results.items():
    rows = {arm: summary(data, args.level_step) for arm, data in by_arm.items()}
    run = rows.get("run")
    claims = {}
    if run and run["val_success_before"] is not None:
      rise = run["val_success_after"] - run["val_success_before"]
      claims["val_success_rise"] = round(rise, 3)
      claims["val_rises_0.3"] = rise >= 0.3
      claims["level_climbs_3_steps"] = run["level_climb_steps"] >= 3
      claims["signal_in_most_steps"] = run["steps_with_signal"] > run["steps"] / 2
      for arm, row in rows.items():
        if arm != "run" and row["val_success_before"] is not None:
          claims[f"{arm}_val_change"] = round(row["val_success_after"] - row["val_success_before"], 3)
          claims[f"run_minus_{arm}_val_after"] = round(
              run["val_success_after"] - row["val_success_after"], 3)
    report["policies"][policy] = {"arms": rows, "claims": claims}
  print(json.dumps(report))


if __name__ == "__main__":
  main()
