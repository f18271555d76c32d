"""Evaluation plumbing with stubbed benchmark runs (results JSON, TensorBoard at the step,
comparison table, the BFCL/τ² commands and score parsing, virtualenv reuse), and, marked slow
and eval, both benchmarks end to end against the embedded SmolLM2 server."""
import dataclasses
import http.server
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from trustee_jax.eval import bfcl, common, tau2
from trustee_jax.eval import venv as venv_lib
from trustee_jax.train_logging import scalar_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- a stub server


class _Models(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # noqa: N802
    if self.path != "/v1/models":
      self.send_error(404)
      return
    body = json.dumps({"object": "list", "data": [{"id": "stub-model", "max_model_len": 512}]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(body.encode())

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def stub_url():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


# ---------------------------------------------------------------------------- common


def test_endpoint_resolution(stub_url):
  ep = common.resolve_endpoint(stub_url + "/v1/")
  assert (ep.url, ep.model, ep.v1) == (stub_url, "stub-model", stub_url + "/v1")
  assert common.resolve_endpoint(stub_url, "named").model == "named"
  with pytest.raises(common.EvalError, match="is not an http"):
    common.resolve_endpoint("127.0.0.1:1")
  with pytest.raises(common.EvalError, match="GET /v1/models failed"):
    common.resolve_endpoint("http://127.0.0.1:9", timeout_s=2)


def _stub_run(scores):
  calls = []

  def fn():
    calls.append(1)
    return scores, {"cases": 3}
  return fn, calls


def test_evaluate_writes_results_tensorboard_and_a_comparison(tmp_path):
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  fn, calls = _stub_run({"simple_python": 0.25, "mean/all": 0.25})
  base, base_path = common.evaluate(tmp_path, "bfcl", ep, fn, step=0, settings={"limit": 2},
                                    log=lambda *_: None)
  fn, _ = _stub_run({"simple_python": 0.75, "mean/all": 0.5, "multi_turn_base": 0.1})
  trained, path = common.evaluate(tmp_path, "bfcl", ep, fn, step=40, log=lambda *_: None)
  assert calls == [1]
  assert base_path.name == "bfcl-base.json" and path.name == "bfcl-step_40.json"
  on_disk = json.loads(path.read_text())
  assert on_disk["scores"]["simple_python"] == 0.75 and on_disk["step"] == 40
  assert json.loads(base_path.read_text())["settings"] == {"limit": 2}
  assert scalar_steps(tmp_path / "tb", "eval/bfcl/simple_python") == [0, 40]
  assert scalar_steps(tmp_path / "tb", "eval/bfcl/multi_turn_base") == [40]
  results = common.load_results(tmp_path, "bfcl")
  assert [r.label for r in results] == ["base", "step_40"]
  table = common.comparison_table(results).splitlines()
  assert table[0].split() == ["metric", "base", "step_40", "delta"]
  rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
  assert rows["simple_python"] == ["25.0", "75.0", "+50.0"]
  assert rows["multi_turn_base"] == ["-", "10.0", "-"]


def test_results_are_checked(tmp_path):
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  with pytest.raises(common.EvalError, match="step is unknown"):
    common.evaluate(tmp_path, "bfcl", ep, _stub_run({})[0], step=None)
  with pytest.raises(common.EvalError, match="not a finite number"):
    common.evaluate(tmp_path, "bfcl", ep, _stub_run({"x": float("nan")})[0], step=1,
                    log=lambda *_: None)
  labelled, _ = common.evaluate(tmp_path, "tau2", ep, _stub_run({"x": 1.0})[0], step=None,
                                label="sglang-qwen3", log=lambda *_: None)
  assert labelled.label == "sglang-qwen3" and not (tmp_path / "tb").exists()
  with pytest.raises(common.EvalError, match="may only use"):
    common.run_label(3, "../x")
  (tmp_path / "eval" / "tau2-broken.json").write_text("{")
  with pytest.raises(common.EvalError, match="not a results file"):
    common.load_results(tmp_path, "tau2")
  assert common.comparison_table([]) == "(no results)"


# ---------------------------------------------------------------------------- BFCL


def test_bfcl_categories():
  assert bfcl.resolve_categories([]) == list(bfcl.GROUPS["all"])
  assert bfcl.resolve_categories(["multi_turn", "multi_turn_base", "simple_python"]) == [
      *bfcl.GROUPS["multi_turn"], "simple_python"]
  assert "web_search_base" not in bfcl.GROUPS["all"] and "memory_kv" not in bfcl.GROUPS["all"]
  with pytest.raises(common.EvalError, match="web search"):
    bfcl.resolve_categories(["web_search_base"])
  with pytest.raises(common.EvalError, match="embedding model"):
    bfcl.resolve_categories(["memory_kv"])
  with pytest.raises(common.EvalError, match="unknown BFCL category"):
    bfcl.resolve_categories(["simple_cobol"])


def test_bfcl_settings_command_and_environment(tmp_path):
  with pytest.raises(common.EvalError, match="--local_model_path"):
    bfcl.BFCLSettings().check()
  with pytest.raises(common.EvalError, match="has no config.json"):
    bfcl.BFCLSettings(local_model_path=str(tmp_path)).check()
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "tokenizer_config.json").write_text("{}")
  settings = bfcl.BFCLSettings(categories=("simple_python",), limit=2, max_tokens=64,
                               local_model_path=str(tmp_path))
  settings.check()
  bfcl.BFCLSettings(handler="gpt-4o-2024-11-20-FC").check()  # API handlers need no local dir
  cmd = bfcl.command(pathlib.Path("/venv/bin/python"), settings, tmp_path / "run",
                     tmp_path / "s.json")
  assert cmd[1] == str(bfcl.RUNNER) and bfcl.RUNNER.is_file()
  for flag in ("--model=trustee-chat-FC", "--categories=simple_python", "--limit=2",
               "--max-tokens=64", f"--local-model-path={tmp_path}"):
    assert flag in cmd
  env = bfcl.environment(common.Endpoint("http://127.0.0.1:8123", "served", "k"))
  assert (env["LOCAL_SERVER_ENDPOINT"], env["LOCAL_SERVER_PORT"]) == ("127.0.0.1", "8123")
  assert env["REMOTE_OPENAI_BASE_URL"] == env["OPENAI_BASE_URL"] == "http://127.0.0.1:8123/v1"
  assert env["OPENAI_API_KEY"] == "k" and env["HF_HUB_OFFLINE"] == "1"
  assert "--accept-untagged-calls" not in cmd
  untagged = dataclasses.replace(settings, accept_untagged_calls=True)
  assert "--accept-untagged-calls" in bfcl.command(pathlib.Path("/p"), untagged, tmp_path, tmp_path)
  with pytest.raises(common.EvalError, match="trustee-chat-FC handler"):
    bfcl.BFCLSettings(handler="gpt-4o-2024-11-20-FC", accept_untagged_calls=True).check()


def test_the_bfcl_runner_reads_untagged_calls_as_the_projects_parser_does():
  """Bare, fenced or in-prose call objects are calls, read by the project's parser (a missing
  "arguments" is {}); other JSON is not."""
  spec = importlib.util.spec_from_file_location("bfcl_runner", bfcl.RUNNER)
  runner = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(runner)  # stdlib only at import: BFCL is imported inside functions
  text = ('Sure.\n```json\n{"name": "area", "arguments": {"base": 10, "h": {"x": 1}}}\n```\n'
          'and {"name": "f", "arguments": {}} {"name": "g"} {"k": 1} {"name": 3, "arguments": {}}'
          ' {broken')
  assert runner.untagged_calls(text) == [
      {"name": "area", "arguments": {"base": 10, "h": {"x": 1}}}, {"name": "f", "arguments": {}},
      {"name": "g", "arguments": {}}]
  assert runner.untagged_calls("no calls here") == []


def test_bfcl_scores():
  summary = {"categories": {
      "simple_python": {"accuracy": 0.5, "correct_count": 1, "total_count": 2},
      "live_simple": {"accuracy": 0.0, "correct_count": 0, "total_count": 2},
      "multi_turn_base": {"accuracy": 1.0, "correct_count": 2, "total_count": 2},
      "multiple": {"accuracy": 0.0, "correct_count": 0, "total_count": 2}},
      "missing": [], "partial": True}
  scores, details = bfcl.scores_of(summary)
  assert scores["mean/non_live"] == 0.25 and scores["mean/live"] == 0.0
  assert scores["mean/multi_turn"] == 1.0 and scores["mean/all"] == 0.375
  assert details["cases"] == 8 and details["partial"]
  with pytest.raises(common.EvalError, match="no score files"):
    bfcl.scores_of({"categories": {}})


# ---------------------------------------------------------------------------- τ²-bench


def test_tau2_command_points_agent_and_user_at_their_endpoints(tmp_path):
  agent = common.Endpoint("http://127.0.0.1:1", "policy", "sk-a")
  user = common.Endpoint("http://127.0.0.1:2", "simulator")
  settings = tau2.Tau2Settings(domains=("mock",), num_trials=2, limit=3, max_tokens=99)
  settings.check()
  cmd = tau2.command(pathlib.Path("/v/bin/tau2"), agent, user, "mock", settings, tmp_path, "mock")
  args = {name: cmd[cmd.index(name) + 1] for name in cmd if name.startswith("--")
          and cmd.index(name) + 1 < len(cmd)}
  assert cmd[1:4] == ["run", "--domain", "mock"] and "--skip-failed-samples" in cmd
  assert args["--agent-llm"] == "openai/policy" and args["--user-llm"] == "openai/simulator"
  assert json.loads(args["--agent-llm-args"]) == {"base_url": "http://127.0.0.1:1/v1",
                                                  "temperature": 0.0, "max_tokens": 99}
  assert json.loads(args["--user-llm-args"])["base_url"] == "http://127.0.0.1:2/v1"
  assert (args["--num-trials"], args["--num-tasks"]) == ("2", "3")
  env = tau2.environment(agent, user)
  assert env[args["--agent-api-key"]] == "sk-a" and env[args["--user-api-key"]] == "EMPTY"
  with pytest.raises(common.EvalError, match="unknown"):
    tau2.resolve_domains(["banking"])
  with pytest.raises(common.EvalError, match="num_trials"):
    tau2.Tau2Settings(num_trials=0).check()


def test_tau2_scores_from_its_metrics_files(tmp_path):
  (tmp_path / "mock_results.json").write_text(json.dumps({
      "domain": "mock", "num_tasks": 3, "num_trials": 2, "num_simulations": 6,
      "metrics": {"avg_reward": 0.5, "avg_agent_cost": 0.0,
                  "pass_at_k": {"1": 0.5, "2": 1 / 3}}}))
  (tmp_path / "mock_termination_summary.json").write_text(json.dumps(
      {"total_simulations": 6, "skipped_samples": 1, "termination_reasons": {"user_stop": 5}}))
  summary = tau2.read_domain(tmp_path, "mock")
  assert summary["termination"]["skipped_samples"] == 1
  assert tau2.scores_of({"mock": summary}) == {"mock/pass_hat_1": 0.5, "mock/pass_hat_2": 1 / 3,
                                               "mock/avg_reward": 0.5}
  with pytest.raises(common.EvalError, match="wrote no"):
    tau2.read_domain(tmp_path, "airline")


# ---------------------------------------------------------------------------- virtualenvs


def test_venv_is_built_once_per_requirement_set(tmp_path, monkeypatch):
  built = []

  def fake_run(cmd, log, **_):
    built.append([str(c) for c in cmd])
    if cmd[1:3] == ["-m", "venv"]:
      pathlib.Path(cmd[3]).mkdir(parents=True)

  monkeypatch.setattr(venv_lib, "run_logged", fake_run)
  monkeypatch.setenv("TRUSTEE_EVAL_INSTALLER", "pip")
  spec = venv_lib.VenvSpec("x", ("pkg==1",))
  path = venv_lib.ensure_venv(spec, tmp_path, log=lambda *_: None)
  assert venv_lib.is_ready(spec, tmp_path) and len(built) == 2
  assert built[1][-1] == "pkg==1" and built[1][0] == str(path / "bin" / "python")
  assert venv_lib.ensure_venv(spec, tmp_path, log=lambda *_: None) == path and len(built) == 2
  other = venv_lib.ensure_venv(venv_lib.VenvSpec("x", ("pkg==2",)), tmp_path,
                               log=lambda *_: None)
  assert other != path and len(built) == 4
  (path / "trustee_ready.json").unlink()  # an interrupted build is rebuilt from scratch
  (path / "junk").write_text("")
  venv_lib.ensure_venv(spec, tmp_path, log=lambda *_: None)
  assert len(built) == 6 and not (path / "junk").exists()


def test_uv_builds_the_venv_where_it_is_on_path_and_keeps_pips_local_wheels(tmp_path,
                                                                            monkeypatch):
  uv = tmp_path / "bin" / "uv"
  uv.parent.mkdir()
  uv.write_text("#!/bin/sh\n")
  uv.chmod(0o755)
  monkeypatch.setenv("PATH", str(uv.parent))
  monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels /more")
  monkeypatch.delenv("TRUSTEE_EVAL_INSTALLER", raising=False)
  assert venv_lib.installer() == str(uv)
  spec = venv_lib.VenvSpec("x", ("pkg==1",))
  create, install = venv_lib.build_commands(spec, tmp_path / "v", venv_lib.installer())
  assert create == [str(uv), "venv", "--python", sys.executable, str(tmp_path / "v")]
  assert install == [str(uv), "pip", "install", "--python", str(tmp_path / "v/bin/python"),
                     "--find-links", "/opt/wheels", "--find-links", "/more", "pkg==1"]
  monkeypatch.setenv("TRUSTEE_EVAL_INSTALLER", "pip")
  assert venv_lib.installer() is None
  monkeypatch.setenv("TRUSTEE_EVAL_INSTALLER", "uv")
  monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no uv on PATH"):
    venv_lib.installer()


def test_run_logged_reports_failures_and_timeouts(tmp_path):
  log = tmp_path / "run.log"
  venv_lib.run_logged([sys.executable, "-c", "print('hello')"], log)
  assert "hello" in log.read_text()
  with pytest.raises(common.EvalError, match="exited with 3") as e:
    venv_lib.run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log)
  assert "boom" in str(e.value)
  with pytest.raises(common.EvalError, match="ran past"):
    venv_lib.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log,
                        timeout_s=0.5)


# ---------------------------------------------------------------------------- failed runs
# A fake benchmark "venv" whose bin/ scripts write what a real run would leave behind and then
# exit with a chosen code (or hang past the timeout), run through the real run_logged.

_SUMMARY = {"categories": {"simple_python": {"accuracy": 0.5, "correct_count": 1,
                                              "total_count": 2}}, "missing": ["live_simple"]}


def _fake_venv(tmp_path, monkeypatch, name: str, body: str) -> None:
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  script = venv / "bin" / name
  script.write_text("#!/bin/sh\n" + body)
  script.chmod(0o755)
  monkeypatch.setattr(venv_lib, "ensure_venv", lambda *a, **k: venv)


_BFCL_BODY = """for a in "$@"; do case "$a" in --summary=*) S="${a#--summary=}";; esac; done
echo "generating"
[ -n "$FAKE_SUMMARY" ] && printf '%s' "$FAKE_SUMMARY" > "$S"
echo "Traceback: boom in live_simple"
[ -n "$FAKE_SLEEP" ] && sleep "$FAKE_SLEEP"
exit "$FAKE_RC"
"""


@pytest.mark.parametrize("rc, summary, sleep, status, exit_code, partial", [
    (0, True, "", "ok", None, False),
    (3, True, "", "failed", 3, True),
    (0, True, "30", "failed", None, True),  # killed at the timeout after writing a summary
    (3, False, "", "failed", 3, False),
], ids=["ok", "exit-3-with-summary", "timeout-with-summary", "exit-3-no-summary"])
def test_bfcl_failed_runs_are_recorded_as_failed(tmp_path, monkeypatch, rc, summary, sleep,
                                                 status, exit_code, partial):
  _fake_venv(tmp_path, monkeypatch, "python", _BFCL_BODY)
  monkeypatch.setenv("FAKE_RC", str(rc))
  monkeypatch.setenv("FAKE_SLEEP", sleep)
  monkeypatch.setenv("FAKE_SUMMARY", json.dumps(_SUMMARY) if summary else "")
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  settings = bfcl.BFCLSettings(categories=("simple_python", "live_simple"),
                               handler="gpt-4o-2024-11-20-FC", timeout_s=2)
  fn = lambda: bfcl.run(ep, settings, tmp_path / "out", log=lambda *_: None)
  if status == "ok":
    common.evaluate(tmp_path, "bfcl", ep, fn, step=7, log=lambda *_: None)
  else:
    with pytest.raises(common.EvalError, match="bfcl run failed") as e:
      common.evaluate(tmp_path, "bfcl", ep, fn, step=7, log=lambda *_: None)
    assert ("partial scores kept" in str(e.value)) == partial
  on_disk = json.loads(common.result_path(tmp_path, "bfcl", "step_7").read_text())
  assert (on_disk["status"], on_disk["partial"]) == (status, partial)
  assert on_disk["scores"] == ({"simple_python": 0.5, "mean/non_live": 0.5, "mean/all": 0.5}
                               if summary else {})
  if status == "ok":
    assert on_disk["failure"] is None and (tmp_path / "tb").is_dir()
    return
  failure = on_disk["failure"]
  assert (failure["exit_code"], failure["timed_out"]) == (exit_code, exit_code is None)
  assert "boom in live_simple" in failure["log_tail"] and failure["log"].endswith("bfcl.log")
  assert not (tmp_path / "tb").exists()  # a failed run's scores never reach TensorBoard
  [result] = common.load_results(tmp_path, "bfcl")
  header = common.comparison_table([result]).splitlines()[0]
  assert header.split(None, 1)[1].strip() == (f"step_7 (failed{', partial' if partial else ''})")


def test_a_failed_venv_build_is_not_a_failed_run(tmp_path, monkeypatch):
  def broken_pip(*a, **k):
    raise common.CommandFailed("pip install exited with 1", exit_code=1, log="install.log",
                               log_tail="No matching distribution")
  monkeypatch.setattr(venv_lib, "ensure_venv", broken_pip)
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  settings = bfcl.BFCLSettings(handler="gpt-4o-2024-11-20-FC")
  with pytest.raises(common.CommandFailed, match="pip install"):
    common.evaluate(tmp_path, "bfcl", ep, lambda: bfcl.run(ep, settings, tmp_path / "out"),
                    step=7, log=lambda *_: None)
  assert not common.result_path(tmp_path, "bfcl", "step_7").exists()


_TAU2_BODY = """while [ $# -gt 0 ]; do case "$1" in --domain) D="$2";; --results-dir) R="$2";; esac; shift; done
if [ "$D" = airline ]; then echo "airline: litellm APIConnectionError"; exit 2; fi
printf '%s' '{"metrics": {"avg_reward": 1.0, "pass_at_k": {"1": 1.0}}}' > "$R/${D}_results.json"
"""


def test_tau2_a_failed_domain_fails_the_run_keeping_the_others_as_partial(tmp_path, monkeypatch):
  _fake_venv(tmp_path, monkeypatch, "tau2", _TAU2_BODY)
  ep = common.Endpoint("http://127.0.0.1:1", "m")
  settings = tau2.Tau2Settings(domains=("mock", "airline"), timeout_s=10)
  with pytest.raises(common.EvalError, match=r"failed on \['airline'\]"):
    common.evaluate(tmp_path, "tau2", ep, lambda: tau2.run(ep, ep, settings, tmp_path / "out",
                                                           log=lambda *_: None),
                    step=1, log=lambda *_: None)
  on_disk = json.loads(common.result_path(tmp_path, "tau2", "step_1").read_text())
  assert (on_disk["status"], on_disk["partial"]) == ("failed", True)
  assert on_disk["scores"] == {"mock/pass_hat_1": 1.0, "mock/avg_reward": 1.0}
  assert on_disk["failure"]["exit_code"] == 2
  assert "APIConnectionError" in on_disk["failure"]["log_tail"]


# ---------------------------------------------------------------------------- the launcher


def _launch(*args, timeout=120):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), *args],
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_launcher_refuses_what_cannot_run(stub_url, tmp_path):
  proc = _launch("--benchmark=bfcl", f"--endpoint={stub_url}", f"--workdir={tmp_path}",
                 "--step=3")
  assert proc.returncode != 0 and "--local_model_path" in proc.stderr
  proc = _launch("--benchmark=bfcl", f"--endpoint={stub_url}", f"--workdir={tmp_path}",
                 "--categories=web_search_base", "--step=3")
  assert proc.returncode != 0 and "cannot run here" in proc.stderr
  proc = _launch("--benchmark=tau2", "--endpoint=http://127.0.0.1:9", f"--workdir={tmp_path}",
                 "--step=1")
  assert proc.returncode != 0 and "GET /v1/models failed" in proc.stderr
  proc = _launch("--benchmark=tau2", f"--endpoint={stub_url}", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "step is unknown" in proc.stderr
  assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------- end to end
# Both benchmarks against the embedded server serving SmolLM2 exported as an HF directory.
# A 135M model scores ~0: the pipeline is what is tested. The first run builds each
# virtualenv (about 6 minutes each here); they are reused from $TRUSTEE_EVAL_VENVS after.


def _needs_venv(spec):
  if not venv_lib.is_ready(spec):
    ok, why = venv_lib.index_reachable(spec.requirements[0])
    if not ok:
      pytest.skip(f"package index unreachable, cannot build the {spec.name} virtualenv: {why}")


@pytest.fixture(scope="module")
def smollm2_endpoint(tmp_path_factory):
  from trustee_jax import export
  from trustee_jax.serving.server import ServerThread, load_simulator
  out = export.export_base("smollm2", tmp_path_factory.mktemp("smollm2") / "hf")
  sim = load_simulator(str(out), num_slots=2, cache_len=8192)
  server = ServerThread(sim.app(), "127.0.0.1", 0).start()
  try:
    yield common.resolve_endpoint(server.url), out
  finally:
    server.stop()
    sim.close()


@pytest.mark.slow
@pytest.mark.eval
def test_bfcl_end_to_end_on_smollm2(smollm2_endpoint, tmp_path):
  _needs_venv(bfcl.SPEC)
  endpoint, local = smollm2_endpoint
  settings = bfcl.BFCLSettings(categories=("simple_python", "live_simple", "multi_turn_base"),
                               limit=1, local_model_path=str(local), threads=2, max_tokens=64)
  out_dir = common.results_dir(tmp_path) / "bfcl-base"
  result, path = common.evaluate(
      tmp_path, "bfcl", endpoint, lambda: bfcl.run(endpoint, settings, out_dir),
      step=0, settings={"limit": 1})
  per_category = result.details["per_category"]
  assert set(per_category) == set(settings.categories)
  assert all(v["total_count"] == 1 and 0 <= v["accuracy"] <= 1 for v in per_category.values())
  for result_file in (out_dir / "result").rglob("*_result.json"):
    for line in result_file.read_text().splitlines():
      answer = json.loads(line)["result"]
      assert not (isinstance(answer, str) and answer.startswith("Error during inference")), line
  assert json.loads(path.read_text())["scores"]["mean/all"] == result.scores["mean/all"]
  assert scalar_steps(tmp_path / "tb", "eval/bfcl/multi_turn_base") == [0]


@pytest.mark.slow
@pytest.mark.eval
def test_tau2_mock_end_to_end_on_smollm2(smollm2_endpoint, tmp_path):
  _needs_venv(tau2.SPEC)
  endpoint, _ = smollm2_endpoint
  settings = tau2.Tau2Settings(domains=("mock",), limit=1, max_steps=6, max_tokens=48,
                               max_concurrency=1)
  out_dir = common.results_dir(tmp_path) / "tau2-step_5"
  result, path = common.evaluate(
      tmp_path, "tau2", endpoint, lambda: tau2.run(endpoint, endpoint, settings, out_dir),
      step=5)
  assert set(result.scores) == {"mock/pass_hat_1", "mock/avg_reward"}
  mock = result.details["per_domain"]["mock"]
  assert mock["num_tasks"] == 1 and mock["termination"]["total_simulations"] == 1
  assert (out_dir / "mock.json").is_file() and path.is_file()
  assert scalar_steps(tmp_path / "tb", "eval/tau2/mock/pass_hat_1") == [5]
