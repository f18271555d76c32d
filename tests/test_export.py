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
from trustee_jax import export, lora, update
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


def perturbed(params, scale: float = 0.05):
  """Every leaf moved off its init (LoRA's B off zero), so a restore that silently
  re-initialised would be caught."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def save_trainer_state(workdir: pathlib.Path, cfg, params, meta, steps=(STEP,)) -> None:
  """The Trainer's checkpoint layout: trainable params, optimizer, curriculum, step; meta."""
  opt = update.build_optimizer(cfg.train.optimizer)
  state = {"params": params, "opt_state": opt.init(params),
           "curriculum": cur.init_state(cur.CurriculumConfig.from_dict(cfg.curriculum)),
           "step": jnp.asarray(STEP, jnp.int32)}
  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  for s in steps:
    ckpt.save(s, state, meta)
  ckpt.close()


def write_checkpoint(workdir: pathlib.Path, cfg, steps=(STEP,)):
  """A full fine-tune's checkpoint, params perturbed. Returns the saved (trained) model."""
  model, _ = policy_lib.load_policy(cfg)
  graphdef, params = nnx.split(model)
  params = perturbed(params)
  meta = {"model_config": policy_lib.model_meta(model), "config": cfg.to_json_best_effort()}
  save_trainer_state(workdir, cfg, params, meta, steps)
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


# ---------------------------------------------------------------------------- PEFT adapter


def write_lora_checkpoint(workdir: pathlib.Path, cfg) -> lora.LoraTransformer:
  """A LoRA run's checkpoint as the Trainer writes it (policy.build's meta and trainable
  adapters), A and B perturbed. Returns the saved adapted model."""
  base, _ = policy_lib.load_policy(cfg)
  policy, adapters = policy_lib.build(cfg, base, temperature=1.0, chunk_size=64,
                                      with_reference=False)
  adapters = perturbed(adapters, scale=0.2)
  save_trainer_state(workdir, cfg, adapters, policy.meta)
  return policy.model(adapters)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A tiny Qwen2 (q/k/v biases) LoRA run on every target, exported as base, merged, adapter."""
  workdir = tmp_path_factory.mktemp("lora_run")
  cfg = load_config("test")
  cfg.model.update(name="tiny-qwen2", tokenizer="qwen3")
  cfg.lora = {"enabled": True, "rank": 4, "alpha": 8.0, "targets": lora.ALL_TARGETS}
  model = write_lora_checkpoint(workdir, cfg)
  base = export.export_base("tiny-qwen2", workdir / "base", tokenizer="qwen3", seed=cfg.seed)
  return {"workdir": workdir, "model": model, "base": base,
          "merged": export.export_hf(workdir, workdir / "merged"),
          "adapter": export.export_adapter(workdir, workdir / "adapter", base_dir=base)}


def test_peft_loads_the_adapter_onto_the_base_with_the_jax_and_merged_logits(lora_run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
      path, dtype=torch.float32).eval()
  adapted = peft.PeftModel.from_pretrained(load(lora_run["base"]), lora_run["adapter"]).eval()
  tokens = np.random.default_rng(0).integers(0, 151936, size=(2, 9))
  with torch.no_grad():
    theirs = adapted(torch.as_tensor(tokens)).logits.numpy()
    merged = load(lora_run["merged"])(torch.as_tensor(tokens)).logits.numpy()
    base = load(lora_run["base"])(torch.as_tensor(tokens)).logits.numpy()
  positions = np.broadcast_to(np.arange(9), tokens.shape)
  ours = np.asarray(lora_run["model"](jnp.asarray(tokens), positions)[0])
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(theirs, merged, atol=2e-4, rtol=2e-4)
  assert np.abs(theirs - base).max() > 1e-2  # the adapters change the model


def safetensors_layout(path: pathlib.Path) -> tuple[dict, dict[str, list[int]]]:
  """A safetensors file's metadata and its tensors' names and shapes."""
  from safetensors import safe_open
  with safe_open(path, "np") as f:
    return f.metadata(), {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_adapter_files_are_what_peft_writes(lora_run, tmp_path):
  """Same tensor names, shapes and config values as peft's own save_pretrained of this LoRA."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  out = lora_run["adapter"]
  ours = json.loads((out / "adapter_config.json").read_text())
  assert ours["base_model_name_or_path"] == str(lora_run["base"].absolute())
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32)
  peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ours["target_modules"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")
  peft.get_peft_model(base, peft_cfg).save_pretrained(tmp_path / "peft")
  theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert set(ours["target_modules"]) == set(theirs["target_modules"]) == {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  assert theirs["base_model_name_or_path"] == ours["base_model_name_or_path"]
  fixed = set(ours) - {"target_modules"}
  assert {k: ours[k] for k in fixed} == {k: theirs[k] for k in fixed}
  assert (safetensors_layout(out / "adapter_model.safetensors")
          == safetensors_layout(tmp_path / "peft" / "adapter_model.safetensors"))
  record = json.loads((out / "trustee_export.json").read_text())
  assert record["format"] == "adapter" and record["step"] == STEP
  assert (out / "chat_template.jinja").read_text() == (lora_run["merged"]
                                                        / "chat_template.jinja").read_text()


def test_adapter_export_refuses_a_full_fine_tune_and_another_base(run, lora_run, tmp_path):
  with pytest.raises(export.ExportError, match="full fine-tune"):
    export.export_adapter(run["workdir"], tmp_path / "a")
  with pytest.raises(export.ExportError, match="not the base the adapters were trained on"):
    export.export_adapter(lora_run["workdir"], tmp_path / "b", base_dir=run["out"])
  with pytest.raises(export.ExportError, match="config.json does not exist"):
    export.export_adapter(lora_run["workdir"], tmp_path / "c", base_dir=tmp_path / "nowhere")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_peft_modules_cover_every_lora_target():
  assert set(export.PEFT_MODULES) == set(lora.ALL_TARGETS)
  config = export.peft_config(lora.LoraConfig(rank=8, alpha=12.0, targets=("wo", "wq")), "b")
  assert config["target_modules"] == ["o_proj", "q_proj"]
  assert config["lora_alpha"] / config["r"] == lora.LoraConfig(rank=8, alpha=12.0).scale
  assert export.peft_config(lora.LoraConfig(rank=3, alpha=2.5), "b")["lora_alpha"] == 2.5


@pytest.mark.slow
def test_launcher_exports_both_formats_of_a_lora_run(lora_run, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export_hf.py"),
                         f"--workdir={lora_run['workdir']}", f"--out={out}", "--format=both",
                         f"--base_dir={lora_run['base']}"],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / "merged" / "model.safetensors").is_file()
  assert (out / "adapter" / "adapter_model.safetensors").is_file()
  assert "--enable-lora --max-lora-rank 4" in proc.stdout
