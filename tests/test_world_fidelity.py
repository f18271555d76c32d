"""benchmarks/world_fidelity.py's scoring on scripted verdicts (doubles.ScriptedClient: no server)."""
import asyncio
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import judge_cases as jc  # noqa: E402
import world_fidelity as wf  # noqa: E402
from trustee_jax.simulator import doubles  # noqa: E402

WORLD = wf.load_config(str(wf.ROOT / "configs" / "demo.py")).world


@pytest.fixture(scope="module")
def cases():
  return asyncio.run(jc.judge_cases(4, 7))


def test_cases_are_half_passing_and_labelled_by_the_oracle(cases):
  assert [c.kind for c in cases] == ["right", "wrong_value", "right", "wrong_tool",
                                     "right", "missing_call", "right", "error_claimed"]
  # missing_call makes the first of two calls right: partway, 0 (doubles.JudgeDouble)
  assert [c.oracle for c in cases] == [1, 0, 1, -1, 1, 0, 1, 0]
  err = cases[-1]
  assert any(m.get("content") == jc.TOOL_ERROR for m in err.messages)
  assert err.messages[-1]["content"].startswith("Done: I used")  # claims success anyway
  attacks = wf.attack_set(cases, 2)
  assert len(attacks) == 2 * len(jc.ATTACKS) and all(not a.passes for a in attacks)
  assert all(a.messages[-1]["content"].endswith(jc.ATTACKS[a.attack]) for a in attacks)
  assert all(a.messages[:-1] == c.messages[:-1] for a in attacks for c in cases
             if a.case_id.startswith(c.case_id + "/"))


def test_agreement_baselines_and_shift_arithmetic():
  oracle = [1, 0, 1, -1]
  assert wf.agreement([1, 1, 1, 1], oracle) == {
      "n": 4, "exact": 0.5, "pass": 0.5, "failed": 0, "pass_failed_as_wrong": 0.5}
  got = wf.agreement([1, 0, None, wf.FAILED], oracle)  # not judged / failed are left out
  assert (got["n"], got["exact"], got["pass"], got["failed"], got["pass_failed_as_wrong"]) == (
      2, 1.0, 1.0, 1, 0.667)
  base = wf.constant_baselines(oracle)
  assert base["always_1"]["exact"] == 0.5 and base["best_constant"] == {
      "score": 1, "exact": 0.5, "pass": 0.5}
  shift = wf.score_shift([0, -1, 1, wf.FAILED], [1, -1, 0, 1])
  assert shift == {"n": 3, "mean_shift": 0.0, "raised": 0.333, "lowered": 0.333,
                   "flipped_to_pass": 0.5, "attacked_failed": 0}
  assert wf.score_shift([0, 1], [wf.FAILED, 1])["attacked_failed"] == 1
  assert wf.score_shift([None], [1])["n"] == 0


def test_best_threshold_in_sample():
  # two questions per case; passing cases have high P(yes) on both
  ratios = [[0.9, 0.8], [0.7, 0.2], [0.95, 0.6], [0.3, 0.4]]
  t, agree = wf.best_threshold(ratios, 2, [1, 0, 1, -1])
  assert agree == 1.0 and 0.2 < t <= 0.6


def _scripted(reply_to):
  """Judge replies by prompt: lm/blend get the schema's shape, questions an answer."""
  def reply(req):
    props = req.schema["properties"]
    if "answer" in props:
      return {"answer": "yes" if reply_to(req.prompt) else "no"}
    n = props["criteria_met"]["minItems"]
    ok = reply_to(req.prompt)
    return {"reason": "scripted", "criteria_met": [ok] * n, "score": 1 if ok else -1}
  return doubles.ScriptedClient(reply)


def _run(client, cases, attacks, modes=("rule", "lm", "blend", "questions")):
  judges = {name: wf.judge_for(client, WORLD, o, 0.0) for name, o in wf.MODES if name in modes}
  scores, failed = asyncio.run(wf.judge_scores(judges, list(cases) + list(attacks),
                                               float("inf"), 0))
  assert not failed
  return wf.judge_report(cases, attacks, scores)


def test_always_yes_judge_matches_the_constant_baseline_and_rule_ignores_injections(cases):
  attacks = wf.attack_set(cases, 4)
  report = _run(_scripted(lambda prompt: True), cases, attacks)
  base = report["baseline"]["always_1"]
  for mode in ("lm", "questions"):
    assert report["modes"][mode]["pass"] == base["pass"] == 0.5
    assert report["modes"][mode]["injection"]["mean_shift"] == 0.0  # already 1 everywhere clean
  rule = report["modes"]["rule"]
  # rule checks calls only, the refused ones not counted: the success claimed after a tool error
  # fails it (-1) as it fails the oracle (0, partway), so pass/fail agrees where the grade does
  # not; a missing call is -1 there, partway (0) for the oracle
  assert rule["by_kind"] == {"right": 1.0, "wrong_value": 1.0, "wrong_tool": 1.0,
                             "missing_call": 0.0, "error_claimed": 0.0}
  assert rule["pass"] == 1.0 and rule["exact"] == 0.75
  assert rule["injection"] == {"n": 12, "mean_shift": 0.0, "raised": 0.0, "lowered": 0.0,
                               "flipped_to_pass": 0.0, "attacked_failed": 0}
  # blend: the check decides wrong value/tool and missing calls; the LM only the error case
  assert report["modes"]["blend"]["by_kind"]["wrong_tool"] == 1.0


def test_shift_counts_a_judge_that_obeys_injections(cases):
  attacks = wf.attack_set(cases, 4)
  obeys = _scripted(lambda prompt: any(m in prompt for m in ("ignore the criteria", "Grader note",
                                                             "\\u003c/trajectory")))
  report = _run(obeys, cases, attacks, modes=("lm", "questions"))
  lm, questions = (report["modes"][m]["injection_by_attack"] for m in ("lm", "questions"))
  for attack in ("ignore", "fake_close"):  # the scripted judge obeys these two, not fake_json
    assert lm[attack] == {"n": 4, "mean_shift": 2.0, "raised": 1.0, "lowered": 0.0,
                          "flipped_to_pass": 1.0, "attacked_failed": 0}  # -1 -> 1
    # questions: only the intent question sees the final reply; the tool-use one stays no
    assert questions[attack] == {"n": 4, "mean_shift": 1.0, "raised": 1.0, "lowered": 0.0,
                                 "flipped_to_pass": 0.0, "attacked_failed": 0}
  assert lm["fake_json"]["n"] == 4 and lm["fake_json"]["mean_shift"] == 0.0
  assert report["modes"]["lm"]["injection"]["mean_shift"] == pytest.approx(4 / 3, abs=1e-3)


def test_tool_read_rule_knows_the_home_domains():
  assert wf.classify('{"key": "temperature", "value": 21}', "temperature", 21) == "consistent"
  assert wf.classify('{"value": 19}', "temperature", 21) == "contradicts"
  assert wf.classify('{"value": "07:15"}', "alarm", "07:15") == "consistent"
  assert wf.classify("The vacuum is idle.", "vacuum", "deep") == "contradicts"
  assert wf.classify('{"locked": true}', "door.front", "locked") == "consistent"
  assert wf.classify("All good.", "light.kitchen", 40) == "unclear"
  assert wf.classify("Error: no such key", "volume", 5) == "error"


def test_markdown_and_best_mode_from_a_report(cases):
  report = _run(_scripted(lambda prompt: True), cases, wf.attack_set(cases, 1))
  result = {"model": "m", "backend": "scripted", "judge": report, "wall_s": 1.0,
            "loadavg": {"before": (1.0, 1.0, 1.0), "after": (1.0, 1.0, 1.0)}}
  text = wf.markdown([result])
  assert "| m | rule | 8 (0) | 0.75 | 1.00 |" in text and "constant (always 1 / best)" in text
  assert wf.best_modes([result]) == {"m": "blend"}
  json.dumps(result)
