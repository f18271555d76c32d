"""What a run writes for people: TensorBoard scalars (tensorboardX) and readable episodes, in a
local or remote (gs://, through etils.epath) workdir, and its one log line a step."""
import dataclasses
import io
import json
import logging
import os
from collections.abc import Mapping
from typing import TextIO

import jax.numpy as jnp
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter
from tensorboardX import record_writer

from trustee_jax import grpo, runtime


def oracle_scalars(episodes, prefix: str) -> dict[str, float]:
  """How the judge's scores track the oracle's on the episodes the oracle scored (none: {}):
  the oracle's success and mean score, the share of episodes whose pass/fail (score 1 or not)
  and whose exact score agree, and the judge's false passes and false fails among them."""
  pairs = [(e.judge_score, e.oracle_score) for e in episodes if e.oracle_score is not None]
  if not pairs:
    return {}
  judge, oracle = (np.asarray(x) for x in zip(*pairs))
  return {f"{prefix}success_rate": _mean(oracle == 1), f"{prefix}score_mean": _mean(oracle),
          f"{prefix}pass_agreement": _mean((judge == 1) == (oracle == 1)),
          f"{prefix}score_agreement": _mean(judge == oracle),
          f"{prefix}judge_false_pass": _mean((judge == 1) & (oracle != 1)),
          f"{prefix}judge_false_fail": _mean((judge != 1) & (oracle == 1))}


def _mean(xs) -> float:
  return float(np.mean(xs)) if len(xs) else 0.0


class _RemoteEventFile:
  """A TensorBoard event file at a URI, written whole from memory at each flush (object stores
  have no append), through etils.epath: the same filesystem (gcsfs) as the rest of the run."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteEventFiles:
  """tensorboardX's writer factory for a URI scheme (it looks them up by prefix)."""

  def open(self, path: str) -> _RemoteEventFile:
    return _RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


class RunLogger:
  """TensorBoard under workdir/tb; whole episodes under workdir/episodes/step_N.jsonl.

  A resumed run passes purge_step (the first step it will write) so the curves of steps
  after the checkpoint, written by the killed run, are purged rather than doubled.
  """

  def __init__(self, workdir: str | os.PathLike, purge_step: int | None = None):
    self.workdir = runtime.run_path(workdir)
    (self.workdir / "episodes").mkdir(parents=True, exist_ok=True)
    if runtime.is_uri(self.workdir):
      record_writer.register_writer_factory(os.fspath(self.workdir).partition(":")[0],
                                            _RemoteEventFiles())
    self.writer = SummaryWriter(os.fspath(self.workdir / "tb"), purge_step=purge_step)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for k, v in values.items():
      if v is not None and np.isfinite(v):
        self.writer.add_scalar(k, float(v), step)

  @staticmethod
  def episode_scalars(result, rewards: np.ndarray, tasks, grpo_cfg: grpo.GRPOConfig
                      ) -> dict[str, float]:
    """Reward, success, lengths, turns, tool calls, drops and the mean knobs of the batch."""
    eps = result.episodes
    out = {"reward/mean": _mean(rewards), "reward/std": float(np.std(rewards)) if len(eps) else 0.0,
           "reward/success_rate": _mean([e.judge_score == 1 for e in eps]),
           "episodes/count": float(len(eps)),
           "episodes/response_tokens": _mean([e.loss_mask.sum() for e in eps]),
           "episodes/sequence_tokens": _mean([len(e.tokens) for e in eps]),
           "episodes/turns": _mean([e.num_turns for e in eps]),
           "episodes/tool_calls": _mean([e.num_tool_calls for e in eps]),
           "episodes/invalid_tool_calls": _mean([e.num_invalid_calls for e in eps]),
           "episodes/with_valid_tool_call": _mean([e.num_valid_calls > 0 for e in eps]),
           "episodes/untagged_tool_calls": _mean([e.num_untagged_calls for e in eps]),
           "episodes/near_miss_tool_calls": _mean([e.num_near_misses for e in eps]),
           "episodes/turns_without_thinking": _mean([e.num_turns_without_thinking for e in eps]),
           "episodes/dropped_groups": float(result.dropped_groups),
           "episodes/dropped": float(sum(result.dropped_episodes.values()))}
    out.update(oracle_scalars(eps, "oracle/"))
    checks = [e.judge_check for e in eps if e.judge_check]
    for key in sorted({k for c in checks for k in c}):
      out[f"judge_check/{key}"] = _mean([c[key] for c in checks if key in c])
    for cause, n in result.dropped_episodes.items():
      out[f"episodes/dropped_{cause}"] = float(n)
    for term in ("user_ended", "budget_turns", "budget_tokens"):
      out[f"episodes/end_{term}"] = _mean([e.termination == term for e in eps])
    if eps:  # the std the advantages divide by: grpo's one definition
      ids = {t: i for i, t in enumerate(dict.fromkeys(e.task_index for e in eps))}
      m = grpo.group_metrics(jnp.asarray([e.reward for e in eps], jnp.float32),
                             jnp.asarray([ids[e.task_index] for e in eps]),
                             jnp.ones(len(eps), bool), grpo_cfg, num_groups=len(ids))
      out["reward/group_std"] = float(m["reward/group_std"])
      out["reward/zero_variance_groups"] = float(m["reward/zero_variance_frac"])
    for key in (tasks[0].knobs if tasks else {}):
      out[f"knobs/{key}"] = _mean([t.knobs[key] for t in tasks])
    return out

  def episodes(self, step: int, episodes, tasks, level: float, kind: str = "step") -> None:
    """Whole episodes (task, conversation, rewards, the judge's reason) as JSONL and text, under
    `episodes/{kind}_{step}.jsonl`: "step" for training, "validation" for the held-out set."""
    path = self.workdir / "episodes" / f"{kind}_{step}.jsonl"
    lines = []
    for e in episodes:
      task = tasks[e.task_index]
      rec = {"step": step, "difficulty_level": level, "task": dataclasses.asdict(task),
             "episode": e.episode_index, "messages": e.messages, "reward": e.reward,
             "judge_score": e.judge_score, "judge_reason": e.judge_reason,
             "judge_check": e.judge_check, "oracle_score": e.oracle_score,
             "termination": e.termination, "tool_calls": e.num_tool_calls,
             "invalid_tool_calls": e.num_invalid_calls,
             "untagged_tool_calls": e.num_untagged_calls, "near_misses": e.num_near_misses,
             "turns_without_thinking": e.num_turns_without_thinking,
             "turn_rewards": sorted(set(float(r) for r in e.turn_rewards[e.loss_mask > 0]))}
      lines.append(json.dumps(rec, default=str))
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    if lines:
      text = "\n\n".join("```json\n" + json.dumps(json.loads(l), indent=1, default=str)[:6000]
                         + "\n```" for l in lines[:2])
      self.writer.add_text("episodes" if kind == "step" else f"episodes/{kind}", text, step)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def scalar_series(tb_dir: str | os.PathLike, tags) -> dict[str, dict[int, float]]:
  """step -> value of each of `tags` that was written (read back with tensorboard's reader,
  which reads URIs through fsspec)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.fspath(tb_dir), size_guidance={"scalars": 0})
  acc.Reload()
  have = set(acc.Tags()["scalars"])
  return {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags if t in have}


def scalar_steps(tb_dir: str | os.PathLike, tag: str) -> list[int]:
  """Steps at which `tag` was written."""
  return sorted(scalar_series(tb_dir, [tag]).get(tag, {}))


SUMMARY_COLUMNS = (("reward/mean", "reward"), ("reward/success_rate", "success"),
                   ("episodes/with_valid_tool_call", "valid call"),
                   ("reward/zero_variance_groups", "groups w/ signal"),
                   ("train/nonzero_advantage_frac", "A != 0"), ("curriculum/level", "level"))


def step_table(tb_dir: str | os.PathLike) -> str:
  """One line per step for the terminal: reward, success, share of episodes with a valid tool
  call, share of groups whose rewards differ (so GRPO has a signal), non-zero advantages, level."""
  series = scalar_series(tb_dir, [t for t, _ in SUMMARY_COLUMNS])
  steps = sorted(series.get("reward/mean", {}))
  lines = ["  step " + " ".join(f"{name:>16s}" for _, name in SUMMARY_COLUMNS)]
  for step in steps:
    cells = []
    for tag, _ in SUMMARY_COLUMNS:
      v = series.get(tag, {}).get(step)
      v = 1.0 - v if v is not None and tag == "reward/zero_variance_groups" else v
      cells.append(f"{v:16.3f}" if v is not None else f"{'-':>16s}")
    lines.append(f"  {step:4d} " + " ".join(cells))
  return "\n".join(lines)


def step_line(step: int, total_steps: int, scalars: Mapping[str, float],
              memory: Mapping[str, float] | None) -> str:
  """The terminal's line for a step: reward, success, level, sampled tokens a second of
  rollout, the oracle's success and agreement where one scores, the time split (tasks,
  rollout, update) and device memory where it is known."""
  def num(key: str) -> float:
    return float(scalars.get(key, float("nan")))
  sampled = num("episodes/count") * num("episodes/response_tokens")
  rollout_s = num("time/rollout")
  parts = [f"step {step}/{total_steps}", f"reward {num('reward/mean'):.3f}",
           f"success {num('reward/success_rate'):.3f}", f"level {num('curriculum/level'):.1f}",
           f"tok/s {sampled / rollout_s if rollout_s > 0 else float('nan'):.0f}"]
  if "oracle/success_rate" in scalars:  # a world with an oracle: does the judge track it?
    parts.append(f"oracle success {num('oracle/success_rate'):.3f} "
                 f"agrees {num('oracle/pass_agreement'):.3f}")
  if "val/success_rate" in scalars:
    parts.append(f"val success {num('val/success_rate'):.3f}")
  times = " ".join(f"{k.partition('/')[2]} {v:.1f}s" for k, v in scalars.items()
                   if k.startswith("time/"))
  parts.append(f"time {times}" if times else "time -")
  if memory is not None:
    parts.append(f"mem {memory['in_use']:.1f}/{memory['limit']:.1f} GiB "
                 f"(peak {memory['peak']:.1f})")
  return " | ".join(parts)


def show_progress_bar(enabled: bool, is_primary: bool, stream: TextIO) -> bool:
  """The tqdm bar only where a person watches it: the primary process, a terminal's stderr
  (a log file or a CI pipe would fill with carriage-return redraws)."""
  return enabled and is_primary and stream.isatty()


class OwnInfoOnly(logging.Filter):
  """Lets through warnings and worse from anyone, INFO and below only from files under `roots`
  (this project): orbax, jax, absl and httpx log a line per call at INFO."""

  def __init__(self, roots: tuple[str | os.PathLike, ...]):
    super().__init__()
    self.roots = tuple(os.path.join(os.path.abspath(r), "") for r in roots)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or \
        os.path.abspath(record.pathname).startswith(self.roots)
