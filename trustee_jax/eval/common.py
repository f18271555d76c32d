"""What every benchmark adapter shares: the endpoint, the results file, TensorBoard, the table.

A result is one benchmark run against one model (`label`: "base" or "step_N"): flat scores in
[0, 1] (what TensorBoard and the comparison table show) and the details behind them. Results
live in workdir/eval/<benchmark>-<label>.json; scalars go to workdir/tb as eval/<benchmark>/<metric>
at the checkpoint's step (the base model at step 0), beside the training curves.
"""
import dataclasses
import json
import math
import os
import pathlib
import re
import tempfile
import time
from typing import Any

import httpx


class EvalError(RuntimeError):
  """An evaluation that cannot run or finish: names the endpoint, file or command and why."""


class CommandFailed(EvalError):
  """A command that exited non-zero (exit_code) or was killed at its timeout (exit_code None)."""

  def __init__(self, message: str, *, exit_code: int | None, log: str, log_tail: str):
    super().__init__(message)
    self.exit_code, self.log, self.log_tail = exit_code, log, log_tail

  def record(self) -> dict[str, Any]:
    """What a results file keeps of the failure."""
    return {"exit_code": self.exit_code, "timed_out": self.exit_code is None, "log": self.log,
            "log_tail": self.log_tail, "message": str(self)}


class RunFailed(EvalError):
  """A benchmark run whose command failed, with what it scored before failing (maybe nothing):
  `evaluate` records it as failed, never as finished."""

  def __init__(self, message: str, failure: dict[str, Any], scores: dict[str, float],
               details: dict[str, Any]):
    super().__init__(message)
    self.failure, self.scores, self.details = failure, dict(scores), dict(details)


# ---------------------------------------------------------------------------- endpoint


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """An OpenAI-compatible server: base URL (no /v1), the model name to request, its key."""
  url: str
  model: str
  api_key: str | None = None

  @property
  def v1(self) -> str:
    return self.url + "/v1"


def normalize_url(url: str) -> str:
  url = url.strip().rstrip("/")
  if not re.match(r"^https?://", url):
    raise EvalError(f"endpoint {url!r} is not an http(s) URL")
  return url.removesuffix("/v1")


def resolve_endpoint(url: str, model: str | None = None, api_key: str | None = None,
                     timeout_s: float = 10.0) -> Endpoint:
  """Checks the server answers GET /v1/models; the model defaults to the first it lists."""
  base = normalize_url(url)
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  try:
    reply = httpx.get(base + "/v1/models", headers=headers, timeout=timeout_s)
    reply.raise_for_status()
    listed = [m["id"] for m in reply.json().get("data", [])]
  except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
    raise EvalError(f"endpoint {base}: GET /v1/models failed ({e}); is the server up?") from e
  if model is None:
    if not listed:
      raise EvalError(f"endpoint {base} lists no model; pass the model name")
    model = listed[0]
  return Endpoint(base, model, api_key)


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass
class EvalResult:
  """One benchmark run against one model."""
  benchmark: str
  label: str
  step: int | None
  endpoint: str
  model: str
  scores: dict[str, float]
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0
  status: str = "ok"  # "failed": the command exited non-zero or timed out (see `failure`)
  partial: bool = False  # the scores cover only what a failed run finished
  failure: dict[str, Any] | None = None  # CommandFailed.record() of the failed command

  def __post_init__(self):
    if self.status not in ("ok", "failed"):
      raise EvalError(f"{self.benchmark} status {self.status!r} is not 'ok' or 'failed'")
    for k, v in self.scores.items():
      if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise EvalError(f"{self.benchmark} score {k!r} is {v!r}, not a finite number")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
    names = {f.name for f in dataclasses.fields(cls)}
    missing = {"benchmark", "label", "scores"} - set(d)
    if missing:
      raise EvalError(f"results record lacks {sorted(missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})


def run_label(step: int | None, label: str | None = None) -> str:
  """"base" for the untrained model, "step_N" for a checkpoint, or the caller's own label."""
  if label:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
      raise EvalError(f"label {label!r} may only use letters, digits, '_', '.', '-'")
    return label
  return "base" if not step else f"step_{step}"


def results_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / "eval"


def result_path(workdir, benchmark: str, label: str) -> pathlib.Path:
  return results_dir(workdir) / f"{benchmark}-{label}.json"


def write_result(workdir, result: EvalResult) -> pathlib.Path:
  """Atomically writes the result JSON (a crash never leaves half a file)."""
  path = result_path(workdir, result.benchmark, result.label)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
    json.dump(result.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(f.name, path)
  return path


def load_results(workdir, benchmark: str) -> list[EvalResult]:
  """All results of `benchmark` in the workdir: base first, then by step, then by label."""
  out = []
  for path in sorted(results_dir(workdir).glob(f"{benchmark}-*.json")):
    try:
      out.append(EvalResult.from_dict(json.loads(path.read_text())))
    except (json.JSONDecodeError, EvalError, TypeError) as e:
      raise EvalError(f"{path}: not a results file ({e})") from e
  return sorted(out, key=lambda r: (r.label != "base", r.step if r.step is not None else -1,
                                    r.label))


def log_scalars(workdir, result: EvalResult) -> pathlib.Path:
  """Scores as eval/<benchmark>/<metric> in workdir/tb at the result's step (base: 0)."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  tb = pathlib.Path(workdir) / "tb"
  writer = SummaryWriter(str(tb), filename_suffix=f".eval-{result.benchmark}-{result.label}")
  try:
    for metric, value in sorted(result.scores.items()):
      writer.add_scalar(f"eval/{result.benchmark}/{metric}", float(value), result.step or 0)
  finally:
    writer.close()
  return tb


def comparison_table(results: list[EvalResult]) -> str:
  """Metrics down, runs across (base first), and the last run minus the first when there are two
  or more; scores as percentages. A run without a metric shows '-'; a failed run is labelled so."""
  if not results:
    return "(no results)"
  labels = [r.label + (" (failed, partial)" if r.partial else " (failed)")
            if r.status == "failed" else r.label for r in results]
  metrics = sorted({m for r in results for m in r.scores})
  header = ["metric"] + labels + (["delta"] if len(results) > 1 else [])
  rows = []
  for m in metrics:
    values = [r.scores.get(m) for r in results]
    row = [m] + ["-" if v is None else f"{100 * v:.1f}" for v in values]
    if len(results) > 1:
      first, last = values[0], values[-1]
      row.append("-" if first is None or last is None else f"{100 * (last - first):+.1f}")
    rows.append(row)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda row: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                              for i, (x, w) in enumerate(zip(row, widths)))
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


def evaluate(workdir, benchmark: str, endpoint: Endpoint, run_fn, *, step: int | None,
             label: str | None = None, settings: dict[str, Any] | None = None,
             log=print) -> tuple[EvalResult, pathlib.Path]:
  """Runs `run_fn() -> (scores, details)`, then writes the results JSON and, when the step is
  known, the TensorBoard scalars at that step. Returns the result and its file.

  A run whose command failed (RunFailed) is written as status "failed" with its exit code
  and log tail, its partial scores kept and marked partial, no TensorBoard scalars, and then
  raised again: a failed run is never scored as a finished one."""
  if step is None and not label:
    raise EvalError("the model's step is unknown: pass --step (the checkpoint served; 0 for "
                    "the base model) or a --label")
  t0 = time.monotonic()
  failure = None
  try:
    scores, details = run_fn()
  except RunFailed as e:
    failure, scores, details = e, e.scores, e.details
  result = EvalResult(benchmark=benchmark, label=run_label(step, label), step=step,
                      endpoint=endpoint.url, model=endpoint.model, scores=dict(scores),
                      details=details, settings=dict(settings or {}),
                      seconds=round(time.monotonic() - t0, 1),
                      status="failed" if failure else "ok", partial=bool(failure and scores),
                      failure=failure.failure if failure else None)
  path = write_result(workdir, result)
  if failure:
    kept = f"partial scores kept in {path}" if scores else f"failure recorded in {path}"
    raise EvalError(f"{benchmark} run failed ({kept}): {failure}") from failure
  log(f"{benchmark} results: {path}")
  if step is not None:
    log(f"TensorBoard scalars eval/{benchmark}/* at step {step}: {log_scalars(workdir, result)}")
  return result, path
