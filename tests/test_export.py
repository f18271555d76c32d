"""Export: a checkpoint written as the Trainer writes it -> an HF directory that transformers
loads unchanged, with the JAX policy's logits and the chat format it was trained with."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from trustee_jax import curriculum as cur
from trustee_jax import export, update
from trustee_jax import policy as policy_lib
from trustee_jax.chat import ChatFormat
from trustee_jax.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEP = 3
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "{\"temp\": 21}"},
]
PLAIN_CONVERSATION = [{"role": "user", "content": "Hello there!"}]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_checkpoint(workdir: pathlib.Path, cfg, steps=(STEP,)):
  """The Trainer's checkpoint layout and meta, params moved off their init so a restore that
  silently re-initialised would be caught. Returns the saved (trained) model."""
  model, _ = policy_lib.load_policy(cfg)
  graphdef, params = nnx.split(model)
  key = jax.random.key(1)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  opt = update.build_optimizer(cfg.train.optimizer)
  state = {"params": params, "opt_state": opt.init(params),
           "curriculum": cur.init_state(cur.CurriculumConfig.from_dict(cfg.curriculum)),
           "step": jnp.asarray(STEP, jnp.int32)}
  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  meta = {"model_config": policy_lib.model_meta(model), "config": cfg.to_json_best_effort()}
  for s in steps:
    ckpt.save(s, state, meta)
  ckpt.close()
  return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg = load_config("test")
  saved = write_checkpoint(workdir, cfg, steps=(1, STEP))
  out = export.export_hf(workdir, workdir / "hf")
  return {"workdir": workdir, "out": out, "model": saved, "cfg": cfg}


def test_transformers_loads_export_with_the_jax_logits(run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForCausalLM.from_pretrained(run["out"], dtype=torch.float32)
  hf.eval()
  tokens = np.random.default_rng(0).integers(0, 49152, size=(2, 11))
  with torch.no_grad():
    ref = hf(torch.as_tensor(tokens)).logits.numpy()
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  ours, _ = run["model"](jnp.asarray(tokens), positions)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=2e-4)
  # The restored (not re-initialised) weights: a fresh init gives other logits.
  fresh, _ = policy_lib.load_policy(run["cfg"])[0](jnp.asarray(tokens), positions)
  assert np.abs(np.asarray(fresh) - ref).max() > 1e-2


def test_export_has_the_files_serving_stacks_read(run):
  out = run["out"]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json", "trustee_export.json"):
    assert (out / name).is_file(), name
  record = json.loads((out / "trustee_export.json").read_text())
  assert record["step"] == STEP and record["model"] == "tiny-llama"
  gen = json.loads((out / "generation_config.json").read_text())
  chat = ChatFormat(export.restore_policy(run["workdir"]).tokenizer)
  assert gen["eos_token_id"][0] == chat.end_of_turn_id
  assert gen["temperature"] == run["cfg"].rollout.temperature


@pytest.mark.parametrize("messages,tools", [(TOOL_CONVERSATION, TOOLS),
                                            (PLAIN_CONVERSATION, None),
                                            (TOOL_CONVERSATION[:2], TOOLS)])
def test_exported_chat_template_renders_as_training_did(run, messages, tools):
  transformers = pytest.importorskip("transformers")
  hf_tok = transformers.AutoTokenizer.from_pretrained(run["out"])
  policy = export.restore_policy(run["workdir"])
  trained = ChatFormat(policy.tokenizer)
  want = trained.render_text(messages, tools)
  got = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=True)
  assert got == want
  assert hf_tok.encode(got, add_special_tokens=False) == policy.tokenizer.encode(want)


def test_export_takes_the_named_step(run, tmp_path):
  out = export.export_hf(run["workdir"], tmp_path / "s1", step=1)
  assert json.loads((out / "trustee_export.json").read_text())["step"] == 1


def test_export_refuses_a_missing_step_a_bad_workdir_and_a_used_out(run, tmp_path):
  with pytest.raises(export.ExportError, match="no checkpoint for step 7"):
    export.export_hf(run["workdir"], tmp_path / "a", step=7)
  with pytest.raises(export.ExportError, match="training workdir"):
    export.export_hf(tmp_path / "nowhere", tmp_path / "b")
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "x").write_text("x")
  with pytest.raises(export.ExportError, match="not empty"):
    export.export_hf(run["workdir"], tmp_path / "c")


def test_model_config_mismatch_is_named():
  cfg = load_config("test")
  meta = policy_lib.model_meta(policy_lib.load_policy(cfg)[0])
  mcfg = export.model_config_from_meta(meta, cfg)
  export.check_model_config(mcfg, meta)  # round trip
  with pytest.raises(export.ExportError, match="hidden_size"):
    export.check_model_config(mcfg.replace(hidden_size=32), meta)
  with pytest.raises(export.ExportError, match="lacks"):
    export.model_config_from_meta(dict(meta, moe_experts=8), cfg)


def test_rope_scaling_survives_the_meta():
  from trustee_jax.models import model_configs
  mcfg = model_configs.get_model_config("llama3.1-8b")
  meta = policy_lib.model_meta(type("M", (), {"cfg": mcfg})())
  rebuilt = export.model_config_from_meta(meta, load_config("test"))
  assert rebuilt.rope_scaling == mcfg.rope_scaling
  export.check_model_config(rebuilt, meta)


def test_base_export_is_step_zero_of_the_same_model(run, tmp_path):
  out = export.export_base("tiny-llama", tmp_path / "base", tokenizer="smollm2")
  assert json.loads((out / "trustee_export.json").read_text())["step"] == 0
  assert (json.loads((out / "config.json").read_text())
          == json.loads((run["out"] / "config.json").read_text()))
  assert ((out / "chat_template.jinja").read_text()
          == (run["out"] / "chat_template.jinja").read_text())


def test_base_export_by_packaged_name_uses_its_gguf_and_tokenizer(monkeypatch, tmp_path):
  """A packaged name routes to its GGUF file and that file's tokenizer (both stubbed: a tiny
  Qwen2 stands in for the 0.5B), and a Qwen2 comes out as Qwen2ForCausalLM."""
  from trustee_jax.models import loading, model_configs
  from trustee_jax.models.transformer import create_model
  calls, load_tokenizer = [], loading.tok_lib.load_tokenizer

  def gguf_path(name):
    calls.append(("file", name))
    return tmp_path / f"{name}.gguf"

  def load_gguf(path, **kw):
    calls.append(("gguf", path.name, kw["param_dtype"]))
    return create_model(model_configs.get_model_config("tiny-qwen2"))

  def tokenizer(source):
    calls.append(("tokenizer", source))
    return load_tokenizer("qwen3")

  monkeypatch.setattr(loading, "gguf_path", gguf_path)
  monkeypatch.setattr(loading.weights, "load_gguf", load_gguf)
  monkeypatch.setattr(loading.tok_lib, "load_tokenizer", tokenizer)
  out = export.export_base("qwen2.5-coder-0.5b", tmp_path / "base")
  assert calls == [("file", "qwen2.5-coder-0.5b"), ("gguf", "qwen2.5-coder-0.5b.gguf", "float32"),
                   ("tokenizer", "qwen2.5-coder-0.5b")]
  assert json.loads((out / "trustee_export.json").read_text()) == {
      "workdir": None, "step": 0, "model": "qwen2.5-coder-0.5b", "tokenizer": "qwen2.5-coder-0.5b"}
  assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_tokenizer_source_follows_load_policy():
  source = lambda **model: export.tokenizer_source(ConfigDict({"model": model}))  # noqa: E731
  assert source(name="qwen2.5-coder-1.5b", tokenizer="smollm2") == "qwen2.5-coder-1.5b"
  assert source(name="tiny-qwen3") == "qwen3"
  assert source(name="tiny-llama", tokenizer="qwen3") == "qwen3"
  assert source(name="tiny-llama") == "smollm2"


@pytest.mark.slow
def test_launcher_exports(run, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export_hf.py"),
                         f"--workdir={run['workdir']}", f"--out={out}", "--step=1"],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((out / "trustee_export.json").read_text())["step"] == 1
