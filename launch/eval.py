"""Evaluates an OpenAI-compatible endpoint on BFCL or τ²-bench; compares base and trained.

  # BFCL: the offline categories (or a few), BFCL's local handler reading an exported directory
  python launch/eval.py --benchmark bfcl --endpoint http://127.0.0.1:8000 \
      --local_model_path exports/step_200 --workdir runs/demo [--categories multi_turn] [--limit 5]
  # τ²-bench: airline, retail, telecom (or mock); the user simulator at a second endpoint
  python launch/eval.py --benchmark tau2 --endpoint http://127.0.0.1:8000 \
      --user_endpoint http://127.0.0.1:30000 --workdir runs/demo --step 200 [--num_trials 4]

Each benchmark runs from its own virtualenv, built on first use under $TRUSTEE_EVAL_VENVS
(default ~/.cache/trustee-jax/eval-venvs). Results go to WORKDIR/eval/<benchmark>-<label>.json
(label: base for step 0, step_N, or --label) and to TensorBoard (WORKDIR/tb, eval/<benchmark>/*)
at the checkpoint's step. The step comes from --step, or from the trustee_export.json of
--local_model_path. --base_endpoint also evaluates the base model first (as step 0). At the end
a table compares every result of the benchmark in the workdir, base first.
"""
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

_BENCH = flags.DEFINE_enum("benchmark", None, ["bfcl", "tau2"], "Which benchmark.",
                           required=True)
_ENDPOINT = flags.DEFINE_string("endpoint", None, "Base URL of the model under test.",
                                required=True)
_MODEL = flags.DEFINE_string("model", None, "Model name to request (default: the endpoint's).")
_API_KEY = flags.DEFINE_string("api_key", None, "Bearer key (or $TRUSTEE_EVAL_API_KEY).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for results and TensorBoard.",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step served (0: the base model).")
_LABEL = flags.DEFINE_string("label", None, "Name of this result (default: base or step_N).")
_CATEGORIES = flags.DEFINE_list("categories", [], "BFCL categories or groups (non_live, live, "
                                "multi_turn, single_turn, all); τ²: domains (airline, retail, "
                                "telecom, mock).")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N cases / tasks of each.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Cap on each model call's reply.")
_BASE_ENDPOINT = flags.DEFINE_string("base_endpoint", None, "Also evaluate the base model here.")
_VENVS = flags.DEFINE_string("venv_dir", None, "Where the benchmark virtualenvs live.")
# BFCL
_LOCAL = flags.DEFINE_string("local_model_path", None, "BFCL: exported HF dir of the served model.")
_BASE_LOCAL = flags.DEFINE_string("base_local_model_path", None, "BFCL: the base model's dir "
                                  "(default: --local_model_path).")
_HANDLER = flags.DEFINE_string("handler", "trustee-chat-FC", "BFCL model/handler name, e.g. "
                               "Qwen/Qwen3-8B-FC for the reference's.")
_THREADS = flags.DEFINE_integer("threads", 8, "BFCL: concurrent cases.")
_UNTAGGED = flags.DEFINE_bool("accept_untagged_calls", False, "BFCL: also read calls written as "
                              "JSON objects without <tool_call> tags, as a run with "
                              "rollout.accept_untagged_calls=True trained the policy to.")
# τ²-bench
_USER_ENDPOINT = flags.DEFINE_string("user_endpoint", None, "τ²: the user simulator's server "
                                     "(default: --endpoint, which makes the model its own user).")
_USER_MODEL = flags.DEFINE_string("user_model", None, "τ²: user simulator model name.")
_USER_KEY = flags.DEFINE_string("user_api_key", None, "τ²: the user endpoint's key.")
_TRIALS = flags.DEFINE_integer("num_trials", 1, "τ²: trials per task (pass^k up to this).")
_CONCURRENCY = flags.DEFINE_integer("max_concurrency", 3, "τ²: simulations in flight.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 200, "τ²: steps per simulation.")


def _export_step(path: str | None) -> int | None:
  """The checkpoint step recorded by launch/export_hf.py in the served directory."""
  record = pathlib.Path(path) / "trustee_export.json" if path else None
  if record is None or not record.is_file():
    return None
  return json.loads(record.read_text()).get("step")


@dataclasses.dataclass(frozen=True)
class Target:
  """One model to evaluate: its endpoint, checkpoint step, label and (BFCL) local directory."""
  endpoint: Any
  step: int | None
  label: str | None
  local_path: str | None

  @property
  def name(self) -> str:
    from trustee_jax.eval.common import run_label  # noqa: PLC0415
    if self.step is None and not self.label:
      return "unknown"  # common.evaluate refuses it before anything runs
    return run_label(self.step, self.label)


def runner(benchmark: str, target: Target, workdir: pathlib.Path, venvs):
  """A zero-argument function running the benchmark on `target`, and its settings as a dict."""
  from trustee_jax.eval import bfcl, common, tau2  # noqa: PLC0415
  out_dir = common.results_dir(workdir) / f"{benchmark}-{target.name}"
  if benchmark == "bfcl":
    settings = bfcl.BFCLSettings(
        categories=tuple(bfcl.resolve_categories(_CATEGORIES.value)), limit=_LIMIT.value,
        handler=_HANDLER.value, local_model_path=target.local_path, threads=_THREADS.value,
        max_tokens=_MAX_TOKENS.value, accept_untagged_calls=_UNTAGGED.value)
    settings.check()
    fn = lambda: bfcl.run(target.endpoint, settings, out_dir, venv_root=venvs)
  else:
    user = common.resolve_endpoint(_USER_ENDPOINT.value or _ENDPOINT.value, _USER_MODEL.value,
                                   _USER_KEY.value or target.endpoint.api_key)
    settings = tau2.Tau2Settings(
        domains=tuple(tau2.resolve_domains(_CATEGORIES.value)), num_trials=_TRIALS.value,
        limit=_LIMIT.value, max_steps=_MAX_STEPS.value, max_concurrency=_CONCURRENCY.value,
        max_tokens=_MAX_TOKENS.value, accept_untagged_calls=_UNTAGGED.value)
    settings.check()
    fn = lambda: tau2.run(target.endpoint, user, settings, out_dir, venv_root=venvs)
  return fn, dataclasses.asdict(settings)


def main(argv):
  del argv
  from trustee_jax.eval import common  # noqa: PLC0415
  key = _API_KEY.value or os.environ.get("TRUSTEE_EVAL_API_KEY")
  venvs = pathlib.Path(_VENVS.value) if _VENVS.value else None
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    targets = []
    if _BASE_ENDPOINT.value:
      targets.append(Target(common.resolve_endpoint(_BASE_ENDPOINT.value, None, key), 0, None,
                            _BASE_LOCAL.value or _LOCAL.value))
    step = _STEP.value if _STEP.value is not None else _export_step(_LOCAL.value)
    if step is None and not _LABEL.value:
      raise common.EvalError("the served model's step is unknown: pass --step (0 for the base "
                             "model) or --label, or a --local_model_path written by export_hf.py")
    targets.append(Target(common.resolve_endpoint(_ENDPOINT.value, _MODEL.value, key), step,
                          _LABEL.value, _LOCAL.value))
    runs = [(t, *runner(_BENCH.value, t, workdir, venvs)) for t in targets]  # check all first
    for target, fn, settings in runs:
      common.evaluate(workdir, _BENCH.value, target.endpoint, fn, step=target.step,
                      label=target.label, settings=settings)
    results = common.load_results(workdir, _BENCH.value)
  except common.EvalError as e:
    raise SystemExit(f"eval failed: {e}") from e
  print(f"\n== {_BENCH.value}: {len(results)} result(s) in {common.results_dir(workdir)} "
        f"(scores in %) ==")
  print(common.comparison_table(results))


if __name__ == "__main__":
  app.run(main)
