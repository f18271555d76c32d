"""Bad inputs fail with an error naming what is wrong (the file, tensor, config key or tool):
truncated checkpoints, HF configs that disagree with their tensors, a missing tokenizer, bad
config overrides and broken tool schemas. One table; each row is a case and the message."""
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import pytest
import safetensors.numpy as stn

from trustee_jax.grpo import GRPOConfig
from trustee_jax.models import loading, packaged, weights
from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import create_model
from trustee_jax.models.weights import WeightsError
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.tools_pool import ToolPoolError

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny two-layer Llama exported as an HF directory (no tokenizer)."""
  model = create_model(get_model_config("tiny-llama", vocab_size=256))
  return weights.save_hf(model, tmp_path_factory.mktemp("hf") / "tiny")


# ------------------------------------------------------------------ how each bad input is made


def _cut_gguf(size: int):
  def make(tmp: pathlib.Path, hf: pathlib.Path):
    with open(packaged.smollm2_gguf_path(), "rb") as f:
      (tmp / "cut.gguf").write_bytes(f.read(size))
    return lambda: weights.load_gguf(tmp / "cut.gguf")
  return make


def _hf_copy(tmp: pathlib.Path, hf: pathlib.Path, config=None, tensors=None) -> pathlib.Path:
  """A copy of `hf` with its config.json and/or tensors edited."""
  out = tmp / "bad"
  shutil.copytree(hf, out)
  if config:
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **config}))
  if tensors:
    stn.save_file(tensors(stn.load_file(out / "model.safetensors")), out / "model.safetensors",
                  metadata={"format": "pt"})
  return out


def _hf_config(**change):
  return lambda tmp, hf: lambda: weights.load_hf(_hf_copy(tmp, hf, config=change))


def _hf_without(name: str):
  drop = lambda t: {k: v for k, v in t.items() if k != name}
  return lambda tmp, hf: lambda: weights.load_hf(_hf_copy(tmp, hf, tensors=drop))


def _cut_safetensors(tmp, hf):
  out = _hf_copy(tmp, hf)
  data = (out / "model.safetensors").read_bytes()
  (out / "model.safetensors").write_bytes(data[:-100])
  return lambda: weights.load_hf(out)


def _no_tokenizer(tmp, hf):
  return lambda: loading.load_model_and_tokenizer(str(hf))


def _train_flags(*flags: str):
  """launch/train.py with config overrides; a non-zero exit raises with its stderr."""
  def run():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"),
                           "--config=configs/test.py", "--workdir=/nonexistent", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
      assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # one line, not a traceback
      raise RuntimeError(proc.stderr[-2000:])
  return lambda tmp, hf: run


def _grpo(**block):
  return lambda tmp, hf: lambda: GRPOConfig.from_dict(block)


def _fn(name="get_x", **parameters):
  params = {"type": "object", "properties": {"x": {"type": "string"}}, **parameters}
  return {"type": "function", "function": {"name": name, "description": "Gets x.",
                                           "parameters": params}}


def _pool_file(pool, lenient=False):
  def make(tmp, hf):
    path = tmp / "pool.json"
    path.write_text(pool if isinstance(pool, str) else json.dumps(pool))
    return lambda: tools_pool.load_pool(path, lenient=lenient)
  return make


_OK_TOOL = _fn("get_y")
_BAD_TYPE = _fn(properties={"x": {"type": "int"}})
_BAD_REQUIRED = _fn(required="x")

# case id -> (how it is made, the error, the message: {tmp} is the test's tmp_path)
CASES = {
    # (a cut inside the tensor data: test_weights.test_truncated_gguf_is_a_clear_error)
    "gguf-truncated-header": (_cut_gguf(4000), WeightsError,
                              r"{tmp}/cut\.gguf: unreadable GGUF file \(truncated or corrupt\?\)"),
    "safetensors-truncated": (_cut_safetensors, WeightsError,
                              r"{tmp}/bad/model\.safetensors: unreadable safetensors file"),
    "hf-wrong-hidden-size": (
        _hf_config(hidden_size=128), WeightsError,
        r"{tmp}/bad/config\.json: hidden_size=128 does not match the checkpoint: "
        r"{tmp}/bad/model\.safetensors: tensor 'model\.embed_tokens\.weight' has shape "
        r"\(256, 64\), expected \(256, 128\)"),
    "hf-wrong-layer-count": (
        _hf_config(num_hidden_layers=3), WeightsError,
        r"{tmp}/bad/config\.json: num_hidden_layers=3 does not match the checkpoint, which has "
        r"layers 0\.\.1"),
    "hf-wrong-kv-heads": (
        _hf_config(num_key_value_heads=1), WeightsError,
        r"config\.json: num_key_value_heads\*head_dim=16 does not match the checkpoint: .*"
        r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 64\)"),
    "hf-missing-tensor": (
        _hf_without("model.layers.1.mlp.up_proj.weight"), WeightsError,
        r"{tmp}/bad/model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "tokenizer-missing": (_no_tokenizer, FileNotFoundError,
                          r"/tiny/tokenizer\.json is missing \(a fast tokenizer is required\)"),
    "flag-unknown-block": (_train_flags("--config.trian.steps=3"), RuntimeError,
                           r"a --config override names no config field: 'trian' Did you mean "
                           r"\"train\" instead of \"trian\""),
    "flag-unknown-key": (_train_flags("--config.train.stepz=3"), RuntimeError,
                         r"a --config override names no config field: 'stepz' Did you mean "
                         r"\"steps\" instead of \"stepz\""),
    "flag-mistyped": (_train_flags("--config.train.steps=abc"), RuntimeError,
                      r"flag --config\.train\.steps=abc: invalid literal for int\(\)"),
    "block-unknown-key": (_grpo(clip_lwo=0.1), ValueError,
                          r"unknown GRPO config keys \['clip_lwo'\]; known: \["),
    "block-mistyped": (_grpo(clip_low="0.2"), ValueError,
                       r"GRPO config: clip_low must be float, got '0\.2' \(str\)"),
    "block-out-of-range": (_grpo(clip_low=1.5), ValueError,
                           r"invalid GRPO config field clip_low/clip_high"),
    "pool-not-json": (_pool_file("{\"c\": "), ToolPoolError,
                      r"cannot read tool pool {tmp}/pool\.json: Expecting value"),
    "pool-bad-type-strict": (
        _pool_file({"c": {"s": [_BAD_TYPE, _OK_TOOL]}}), ToolPoolError,
        r"1 problem\(s\) in tool pool:\n  c/s/get_x: parameters invalid at properties/x/type: "
        r"'int' is not valid"),
    "pool-bad-required-strict": (
        _pool_file({"c": {"s": [_BAD_REQUIRED, _OK_TOOL]}}), ToolPoolError,
        r"c/s/get_x: parameters invalid at required: 'x' is not of type 'array'"),
    "pool-nothing-valid-lenient": (
        _pool_file({"c": {"s": [_BAD_REQUIRED]}}, lenient=True), ToolPoolError,
        r"no valid tools left in pool \(1 dropped\)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, hf_dir, tmp_path):
  make, error, message = CASES[case]
  call = make(tmp_path, hf_dir)
  with pytest.raises(error, match=message.format(tmp=tmp_path)):
    call()


def test_lenient_pool_repairs_types_drops_the_rest_and_counts(tmp_path, caplog):
  path = tmp_path / "pool.json"
  path.write_text(json.dumps({"c": {"s": [_BAD_TYPE, _BAD_REQUIRED, _OK_TOOL]}}))
  with caplog.at_level(logging.INFO):
    pool = tools_pool.load_pool(path, lenient=True)
  assert [tools_pool.tool_name(t) for t in pool["c"]["s"]] == ["get_x", "get_y"]
  assert tools_pool.function_of(pool["c"]["s"][0])["parameters"]["properties"]["x"] == {
      "type": "integer"}
  assert "1 parameter types repaired, 1 tools dropped" in caplog.text
