"""BFCL (the bfcl-eval package) against an OpenAI-compatible endpoint, from its own virtualenv.

The categories are those that run offline, as the reference reports them: single-turn non-live
and live, and multi-turn. Web search needs a search API and memory downloads an embedding model,
so both are refused by name. BFCL's local handlers read the tokenizer and config from
--local-model-path (an exported directory: launch/export_hf.py) instead of a hub, and query the
endpoint's /v1/completions with prompts they render themselves. The default handler,
`trustee-chat-FC` (bfcl_runner.py), renders them with the exported chat template, so the model
sees the tool format it was trained with; `Qwen/Qwen3-8B-FC` is the reference's handler.
"""
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any
from urllib.parse import urlparse

from trustee_jax.eval import venv as venv_lib
from trustee_jax.eval.common import CommandFailed, Endpoint, EvalError, RunFailed

BFCL_VERSION = "2026.3.23"
# torch pinned so pip takes the CPU build this machine has (and no CUDA wheels elsewhere);
# soundfile because qwen-agent (a bfcl-eval dependency) imports it without declaring it;
# jsonschema because the runner reads untagged calls with trustee_jax.tool_calls.
SPEC = venv_lib.VenvSpec("bfcl", (f"bfcl-eval=={BFCL_VERSION}", "torch==2.13.0", "soundfile",
                                  "jsonschema"))
RUNNER = pathlib.Path(__file__).with_name("bfcl_runner.py")
DEFAULT_HANDLER = "trustee-chat-FC"

GROUPS: dict[str, tuple[str, ...]] = {
    "non_live": ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel",
                 "parallel_multiple", "irrelevance"),
    "live": ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
             "live_irrelevance", "live_relevance"),
    "multi_turn": ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                   "multi_turn_long_context"),
}
GROUPS["single_turn"] = GROUPS["non_live"] + GROUPS["live"]
GROUPS["all"] = GROUPS["single_turn"] + GROUPS["multi_turn"]
ONLINE = {"web_search_base": "needs a web search API", "web_search_no_snippet":
          "needs a web search API", "memory_kv": "downloads an embedding model",
          "memory_vector": "downloads an embedding model", "memory_rec_sum":
          "downloads an embedding model", "format_sensitivity": "is not scored (prompt models only)"}


def resolve_categories(names: list[str] | tuple[str, ...]) -> list[str]:
  """Category and group names (GROUPS) to BFCL categories, in order, without repeats."""
  out: list[str] = []
  for name in names or ["all"]:
    if name in GROUPS:
      out += GROUPS[name]
    elif name in GROUPS["all"]:
      out.append(name)
    elif name in ONLINE or name in ("web_search", "memory", "agentic"):
      raise EvalError(f"BFCL category {name!r} cannot run here: "
                      f"{ONLINE.get(name, 'needs the internet')}")
    else:
      raise EvalError(f"unknown BFCL category {name!r}; known: {sorted(GROUPS)} and "
                      f"{list(GROUPS['all'])}")
  return list(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class BFCLSettings:
  """What one BFCL run does. handler: a BFCL model name (its table) or trustee-chat-FC."""
  categories: tuple[str, ...] = GROUPS["all"]
  limit: int | None = None
  handler: str = DEFAULT_HANDLER
  local_model_path: str | None = None
  threads: int = 8
  temperature: float = 0.001
  max_tokens: int | None = None  # None: BFCL's own (up to 4096 a completion)
  timeout_s: float = 6 * 3600
  accept_untagged_calls: bool = False  # as rollout.accept_untagged_calls (trustee-chat-FC only)

  def check(self) -> None:
    if self.limit is not None and self.limit < 1:
      raise EvalError(f"--limit must be >= 1, got {self.limit}")
    if self.accept_untagged_calls and self.handler != DEFAULT_HANDLER:
      raise EvalError(f"--accept_untagged_calls is for the {DEFAULT_HANDLER} handler, not "
                      f"{self.handler!r}")
    if self.local_model_path is not None:
      path = pathlib.Path(self.local_model_path)
      for name in ("config.json", "tokenizer_config.json"):
        if not (path / name).is_file():
          raise EvalError(f"--local_model_path {path} has no {name}; export one with "
                          "launch/export_hf.py")
    elif self.handler == DEFAULT_HANDLER or "/" in self.handler:
      raise EvalError(f"BFCL handler {self.handler!r} reads the tokenizer and config from a "
                      "local model directory: pass --local_model_path (launch/export_hf.py "
                      "writes one)")


def environment(endpoint: Endpoint) -> dict[str, str]:
  """Points BFCL's local handlers and its OpenAI handlers at the endpoint; no hub access."""
  parsed = urlparse(endpoint.url)
  key = endpoint.api_key or "EMPTY"
  return {**os.environ,
          "LOCAL_SERVER_ENDPOINT": parsed.hostname or "127.0.0.1",
          "LOCAL_SERVER_PORT": str(parsed.port or (443 if parsed.scheme == "https" else 80)),
          "REMOTE_OPENAI_BASE_URL": endpoint.v1, "REMOTE_OPENAI_API_KEY": key,
          "OPENAI_BASE_URL": endpoint.v1, "OPENAI_API_KEY": key,
          "TRUSTEE_SERVED_MODEL": endpoint.model,
          "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(python: pathlib.Path, settings: BFCLSettings, project_root: pathlib.Path,
            summary: pathlib.Path) -> list[str]:
  cmd = [str(python), str(RUNNER), f"--model={settings.handler}",
         f"--categories={','.join(settings.categories)}", f"--project-root={project_root}",
         f"--summary={summary}", f"--threads={settings.threads}",
         f"--temperature={settings.temperature}"]
  if settings.limit:
    cmd.append(f"--limit={settings.limit}")
  if settings.max_tokens:
    cmd.append(f"--max-tokens={settings.max_tokens}")
  if settings.local_model_path:
    cmd.append(f"--local-model-path={settings.local_model_path}")
  if settings.accept_untagged_calls:
    cmd.append("--accept-untagged-calls")
  return cmd


def scores_of(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
  """Per-category accuracy, plus unweighted means per group and over all categories run
  (named mean/*: BFCL's official overall weighs categories otherwise)."""
  cats = summary.get("categories") or {}
  if not cats:
    raise EvalError("BFCL produced no score files; see the run log")
  scores = {c: float(v["accuracy"]) for c, v in cats.items()}
  for group in ("non_live", "live", "multi_turn"):
    got = [scores[c] for c in GROUPS[group] if c in scores]
    if got:
      scores[f"mean/{group}"] = sum(got) / len(got)
  scores["mean/all"] = sum(float(v["accuracy"]) for v in cats.values()) / len(cats)
  details = {"per_category": cats, "missing": summary.get("missing", []),
             "partial": summary.get("partial", False),
             "bfcl_eval_version": summary.get("bfcl_eval_version"),
             "accept_untagged_calls": summary.get("accept_untagged_calls", False),
             "cases": sum(int(v["total_count"]) for v in cats.values())}
  return scores, details


def run(endpoint: Endpoint, settings: BFCLSettings, out_dir: pathlib.Path, *,
        venv_root: pathlib.Path | None = None, log=print) -> tuple[dict[str, float], dict]:
  """Builds the venv if needed, runs BFCL into out_dir (its result/ and score/ trees, the
  log), and returns (scores, details). A runner that exits non-zero or times out raises
  RunFailed carrying whatever its summary scored (common.evaluate records it as failed)."""
  settings.check()
  venv = venv_lib.ensure_venv(SPEC, venv_root, log=log)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary_path = out_dir / "summary.json"
  summary_path.unlink(missing_ok=True)
  run_log = out_dir / "bfcl.log"
  log(f"BFCL {len(settings.categories)} categories"
      f"{f', {settings.limit} cases each' if settings.limit else ''} against {endpoint.v1} "
      f"(handler {settings.handler}); log: {run_log}")
  t0 = time.monotonic()
  try:
    venv_lib.run_logged(command(venv_lib.bin_path(venv, "python"), settings, out_dir,
                                summary_path), run_log, env=environment(endpoint),
                        cwd=out_dir, timeout_s=settings.timeout_s)
  except CommandFailed as e:
    raise RunFailed(str(e), e.record(), *partial_scores(summary_path)) from e
  scores, details = scores_of(read_summary(summary_path))
  details.update(seconds=round(time.monotonic() - t0, 1), log=str(run_log),
                 python=sys.version.split()[0])
  return scores, details


def read_summary(path: pathlib.Path) -> dict[str, Any]:
  """The runner's summary.json, or an EvalError naming the file."""
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise EvalError(f"BFCL runner left no readable summary {path}: {e}") from e


def partial_scores(path: pathlib.Path) -> tuple[dict[str, float], dict[str, Any]]:
  """What a failed run scored before it stopped (empty when it left no usable summary)."""
  try:
    return scores_of(read_summary(path))
  except EvalError:
    return {}, {}
