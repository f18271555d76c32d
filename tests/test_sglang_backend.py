"""Contract: the SGLang policy backend against a stub serving SGLang's native API shapes.

The bodies follow SGLang's /generate reply ({"text", "output_ids", "meta_info":
{"output_token_logprobs": [[logprob, id, text]], "finish_reason": {"type", "matched"}, ...}})
and /update_weights_from_disk's {"success", "message"} (see sampling/sglang_backend.py for the
sources). The stub runs on uvicorn on 127.0.0.1, as tests/test_sglang_contract.py's does.
"""
import asyncio
import collections
import pathlib

import fastapi
import numpy as np
import pytest

from test_rollout import make_task, right_call, world
from trustee_jax import config_files, rollout, train
from trustee_jax.chat import ChatFormat
from trustee_jax.default_config import default_config
from trustee_jax.models import weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.tokenizer import load_tokenizer
from trustee_jax.models.transformer import create_model
from trustee_jax.sampling.engine import SamplingParams
from trustee_jax.sampling.engine import Engine
from trustee_jax.sampling.sglang_backend import (SGLangConfig, SGLangError, SGLangPolicy,
                                                 WeightPushError, build_policy_backend,
                                                 logprob_gap)
from trustee_jax.serving.server import ServerThread

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = [151644, 872, 198, 9707]


def generate_reply(ids=(40, 1079, 151645), lps=(-0.25, -1.5, -0.125), finish="stop",
                   matched=151645):
  """A /generate reply in SGLang's shape for input_ids with return_logprob."""
  return {"text": "I am", "output_ids": list(ids),
          "meta_info": {"id": "3c9e", "prompt_tokens": len(PROMPT), "completion_tokens": len(ids),
                        "cached_tokens": 2, "weight_version": "default",
                        "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)],
                        "finish_reason": {"type": finish, "matched": matched}}}


class Stub:
  """Scripted replies per path; records every request body."""

  def __init__(self):
    self.script = collections.defaultdict(collections.deque)
    self.requests = collections.defaultdict(list)
    app = fastapi.FastAPI()

    for path in ("/generate", "/update_weights_from_disk"):
      app.post(path)(self._answer(path))
    self.server = ServerThread(app)

  def _answer(self, path: str):
    async def answer(request: fastapi.Request) -> fastapi.responses.JSONResponse:
      self.requests[path].append(await request.json())
      status, body = self.script[path].popleft()
      return fastapi.responses.JSONResponse(body, status_code=status)
    return answer

  def then(self, path, status, body):
    self.script[path].append((status, body))
    return self


@pytest.fixture(scope="module")
def server():
  stub = Stub()
  with stub.server:
    yield stub


@pytest.fixture
def stub(server):
  server.script.clear()
  server.requests.clear()
  return server


def _policy(stub, **kw):
  return SGLangPolicy(SGLangConfig(url=stub.server.url, timeout_s=5.0, weights_timeout_s=5.0,
                                   max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02),
                      **kw)


def _generate(stub, params=SamplingParams()):
  """Runs one agenerate; returns (Completion or the error, the policy's counters)."""
  async def main():
    policy = _policy(stub)
    try:
      return await policy.agenerate(PROMPT, params), dict(policy.stats)
    except SGLangError as e:
      return e, dict(policy.stats)
    finally:
      await policy.aclose()
  return asyncio.run(main())


@pytest.mark.timeout(30)
def test_generate_returns_the_servers_ids_and_logprobs(stub):
  stub.then("/generate", 200, generate_reply())
  comp, stats = _generate(stub, SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9,
                                               top_k=0, frequency_penalty=0.5, seed=1234,
                                               stop_token_ids=(151645, 151643)))
  assert comp.tokens == [40, 1079, 151645] and comp.logprobs == [-0.25, -1.5, -0.125]
  assert (comp.finish_reason, comp.stop, comp.cached_tokens) == ("stop", 151645, 2)
  assert comp.prompt_ids == PROMPT
  assert stats["requests"] == 1 and stats["generated_tokens"] == 3 and stats["retries"] == 0
  sent = stub.requests["/generate"][0]
  assert sent["input_ids"] == PROMPT and sent["return_logprob"] is True
  assert sent["sampling_params"] == {
      "max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": -1,
      "frequency_penalty": 0.5, "stop_token_ids": [151645, 151643], "sampling_seed": 1234}


@pytest.mark.timeout(30)
def test_length_finish_is_kept(stub):
  stub.then("/generate", 200, generate_reply(ids=(5, 6), lps=(-1.0, -2.0), finish="length",
                                             matched=None))
  comp, _ = _generate(stub)
  assert comp.finish_reason == "length" and comp.tokens == [5, 6] and comp.stop is None


@pytest.mark.parametrize("broken,field", [
    (lambda r: r.pop("output_ids"), "output_ids"),
    (lambda r: r["meta_info"].pop("output_token_logprobs"), "output_token_logprobs"),
    (lambda r: r["meta_info"]["output_token_logprobs"].pop(), "3 output_ids"),
    (lambda r: r["meta_info"]["output_token_logprobs"][0].__setitem__(1, 41), "differ"),
])
@pytest.mark.timeout(30)
def test_malformed_reply_is_an_error_naming_the_field(stub, broken, field):
  reply = generate_reply()
  broken(reply)
  stub.then("/generate", 200, reply)
  error, stats = _generate(stub)
  assert isinstance(error, SGLangError) and field in str(error)
  assert stats["failures"] == 1 and stats["retries"] == 0
  assert len(stub.requests["/generate"]) == 1  # not retried: the server's shape is wrong


@pytest.mark.timeout(30)
def test_503_then_200_is_retried_and_counted(stub):
  stub.then("/generate", 503, {"object": "error", "message": "busy"})
  stub.then("/generate", 200, {**generate_reply(), "meta_info": {
      **generate_reply()["meta_info"], "finish_reason": {"type": "abort", "message": "x"}}})
  stub.then("/generate", 200, generate_reply())
  comp, stats = _generate(stub)
  assert comp.tokens == [40, 1079, 151645]
  assert stats["retries"] == 2 and stats["failures"] == 0 and stats["requests"] == 1


@pytest.mark.timeout(30)
def test_persistent_503_fails_after_bounded_retries(stub):
  for _ in range(3):
    stub.then("/generate", 503, {"object": "error", "message": "queue timed out"})
  error, stats = _generate(stub)
  assert isinstance(error, SGLangError) and "queue timed out" in str(error)
  assert stats["retries"] == 2 and stats["failures"] == 1


@pytest.mark.timeout(30)
def test_400_is_not_retried(stub):
  stub.then("/generate", 400, {"object": "error", "message": "input too long"})
  error, stats = _generate(stub)
  assert "400" in str(error) and "input too long" in str(error)
  assert stats["retries"] == 0 and len(stub.requests["/generate"]) == 1


@pytest.mark.timeout(30)
def test_refused_connection_is_retried_then_fails():
  policy = SGLangPolicy(SGLangConfig(url="http://127.0.0.1:9", max_retries=1,
                                     backoff_base_s=0.01, backoff_max_s=0.01))
  async def main():
    with pytest.raises(SGLangError, match="ConnectError"):
      await policy.agenerate(PROMPT)
    await policy.aclose()
  asyncio.run(main())
  assert policy.stats["retries"] == 1 and policy.stats["failures"] == 1


@pytest.mark.timeout(30)
def test_push_weights_sends_the_path_and_raises_on_failure(stub, tmp_path):
  policy = _policy(stub)
  stub.then("/update_weights_from_disk", 503, {"message": "busy"})
  stub.then("/update_weights_from_disk", 200, {"success": True, "message": "Succeeded."})
  stub.then("/update_weights_from_disk", 400,  # SGLang's answer to a load that failed
            {"success": False, "message": "Failed to get weights iterator: no safetensors",
             "num_paused_requests": 0})
  assert policy.push_weights(tmp_path / "v1")["success"] is True
  assert stub.requests["/update_weights_from_disk"][-1] == {"model_path": str(tmp_path / "v1")}
  with pytest.raises(WeightPushError, match="no safetensors"):
    policy.push_weights(tmp_path / "v2")
  stub.then("/update_weights_from_disk", 200, {"success": False, "message": "version mismatch"})
  with pytest.raises(WeightPushError, match="version mismatch"):
    policy.push_weights(tmp_path / "v3")
  assert (policy.stats["weight_pushes"], policy.stats["weight_push_retries"],
          policy.stats["weight_push_failures"]) == (1, 1, 2)
  policy.close()


@pytest.mark.timeout(60)
def test_update_params_writes_a_snapshot_and_keeps_only_the_pushed_one(stub, tmp_path):
  model = create_model(get_model_config("tiny-llama", vocab_size=256))
  policy = _policy(stub, weights_dir=tmp_path)
  for _ in range(2):
    stub.then("/update_weights_from_disk", 200, {"success": True, "message": "Succeeded."})
  policy.update_params(model)
  policy.update_params(model)
  paths = [r["model_path"] for r in stub.requests["/update_weights_from_disk"]]
  assert paths == [str(tmp_path / "policy_v000001"), str(tmp_path / "policy_v000002")]
  assert [p.name for p in tmp_path.iterdir()] == ["policy_v000002"]
  assert (tmp_path / "policy_v000002" / "config.json").exists()
  assert list((tmp_path / "policy_v000002").glob("*.safetensors"))
  policy.close()


@pytest.mark.timeout(60)
def test_an_episode_trains_on_exactly_what_the_server_sampled(stub):
  tokenizer = load_tokenizer("smollm2")
  chat = ChatFormat(tokenizer)
  task, eot = make_task(), chat.end_of_turn_id
  turns = [tokenizer.encode(right_call(task)) + [eot],
           tokenizer.encode("Done, the setting is applied.") + [eot]]
  lps = [[-0.001 * (i + 1) - t for i in range(len(ids))] for t, ids in enumerate(turns)]
  for ids, lp in zip(turns, lps):
    stub.then("/generate", 200, generate_reply(ids=ids, lps=lp, matched=eot))

  async def main():
    policy = _policy(stub)
    try:
      return await rollout.run_episode(task, 0, 0, engine=policy, chat=chat, tokenizer=tokenizer,
                                       world=world(), cfg=rollout.RolloutConfig(group_size=1),
                                       seed=1)
    finally:
      policy.close()  # as Trainer.close, from inside the loop
  ep = asyncio.run(main())
  assert ep.termination == "user_ended" and ep.judge_score == 1
  sampled = ep.loss_mask == 1
  assert ep.tokens[sampled].tolist() == turns[0] + turns[1]
  assert ep.logprobs[sampled].tolist() == pytest.approx(lps[0] + lps[1], abs=1e-7)
  sent = stub.requests["/generate"]
  assert ep.tokens.tolist()[:len(sent[1]["input_ids"])] == sent[1]["input_ids"]
  assert sent[0]["sampling_params"]["stop_token_ids"] == list(chat.stop_ids)


def test_backend_switch(tmp_path):
  cfg = default_config()
  assert cfg.engine.get("backend", "jax") == "jax"  # the in-process engine stays the default
  cfg.engine.update(num_slots=1, cache_len=64)
  engine = build_policy_backend(
      cfg, model_fn=lambda: create_model(get_model_config("tiny-llama", vocab_size=256)),
      decode_fn=str)
  assert isinstance(engine, Engine)
  engine.close()
  sglang = {"backend": "sglang", "sglang_url": "http://127.0.0.1:30000", "weights_dir": tmp_path}
  train = {"recompute_old_logprobs": True}
  policy = build_policy_backend({"engine": sglang, "train": train},
                                model_fn=lambda: pytest.fail("no model for SGLang"), decode_fn=str)
  assert isinstance(policy, SGLangPolicy) and policy.weights_dir == tmp_path
  policy.close()
  for engine_cfg, train_cfg, error in [
      ({**sglang, "weights_dir": ""}, train, "weights_dir"),
      (sglang, {"recompute_old_logprobs": False}, "recompute_old_logprobs"),
      ({"backend": "vllm"}, train, "'jax' or 'sglang'")]:
    with pytest.raises(ValueError, match=error):
      build_policy_backend({"engine": engine_cfg, "train": train_cfg}, model_fn=None,
                           decode_fn=str)


def fake_sglang() -> fastapi.FastAPI:
  """SGLang's /generate and /update_weights_from_disk in its shapes, over the JAX Engine of the
  weights last pushed: what it samples is the pushed policy, so the trainer's gap is ~0."""
  app, held = fastapi.FastAPI(), {}

  @app.post("/update_weights_from_disk")
  async def update(request: fastapi.Request):
    model = weights.load_hf((await request.json())["model_path"])
    if "engine" in held:
      held["engine"].update_params(model)
    else:
      held["engine"] = Engine(model, num_slots=8, cache_len=1536, decode_chunk=4)
    return {"success": True, "message": "Succeeded.", "num_paused_requests": 0}

  @app.post("/generate")
  async def generate(request: fastapi.Request):
    body = await request.json()
    sp = body["sampling_params"]
    c = await held["engine"].agenerate(body["input_ids"], SamplingParams(
        max_new_tokens=sp["max_new_tokens"], temperature=sp["temperature"], top_p=sp["top_p"],
        top_k=max(sp["top_k"], 0), seed=sp.get("sampling_seed"),
        stop_token_ids=tuple(sp["stop_token_ids"])))
    return {"text": "", "output_ids": c.tokens, "meta_info": {
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.tokens)],
        "finish_reason": {"type": c.finish_reason, "matched": c.stop},
        "cached_tokens": c.cached_tokens}}
  app.state.held = held
  return app


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif("backend" not in default_config().engine,
                    reason="the Trainer does not offer engine.backend yet")
def test_a_train_step_on_the_sglang_backend_measures_a_zero_gap(tmp_path):
  cfg = config_files.get_config(str(ROOT / "configs" / "test.py"))
  app = fake_sglang()
  with ServerThread(app) as server:
    cfg.engine.update(backend="sglang", sglang_url=server.url, weights_dir=str(tmp_path / "w"))
    cfg.train.recompute_old_logprobs = True
    cfg.validation.every = 0

    async def main():
      world = await train.build_world(cfg)
      trainer = train.Trainer(cfg, tmp_path / "run", world=world)
      try:
        return (await trainer.train_step(1))["scalars"], trainer.engine
      finally:
        trainer.close()
        await world.aclose()
    scalars, policy = asyncio.run(main())
    app.state.held["engine"].close()
  assert scalars["episodes/count"] == 8
  assert 0 <= scalars["rollout/logprob_gap_max"] < 1e-4
  assert policy.stats["weight_pushes"] == 2 and policy.stats["failures"] == 0  # start + update
  assert [p.name for p in (tmp_path / "w").iterdir()] == ["policy_v000002"]


def test_logprob_gap_on_hand_computed_values():
  sampled = np.array([[-1.0, -0.5, -2.0, 0.0], [-0.1, -3.0, 0.0, 0.0]])
  recomputed = np.array([[-1.25, -0.5, -1.0, 9.0], [-0.1, -2.5, 7.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  gap = {k: float(v) for k, v in logprob_gap(sampled, recomputed, mask).items()}
  # masked gaps: 0.25, 0, 1.0 | 0, 0.5 -> max 1.0, mean 1.75 / 5 (the 9.0 and 7.0 are masked off)
  assert gap == pytest.approx({"rollout/logprob_gap_max": 1.0,
                               "rollout/logprob_gap_mean": 0.35})
  none = logprob_gap(sampled, recomputed, np.zeros_like(mask))
  assert float(none["rollout/logprob_gap_max"]) == 0.0
  assert float(none["rollout/logprob_gap_mean"]) == 0.0
