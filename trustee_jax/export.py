"""A run's trained policy as a Hugging Face directory that transformers, vLLM and SGLang load.

The model is rebuilt from the checkpoint alone: its `meta` holds the model shape (as the
Trainer wrote it) and the run config, so export needs neither the original weights nor
the config file. Only the parameters are read (an Orbax partial restore), onto the CPU,
then `weights.save_hf` writes config.json, safetensors, the tokenizer, the chat template
the policy was trained with, and generation_config.json. A LoRA run can instead be written as
a PEFT adapter (`export_adapter`: adapter_config.json + adapter_model.safetensors, as `peft`
writes them), which vLLM and SGLang serve onto one base with `--enable-lora`.
"""
import dataclasses
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

from trustee_jax import lora
from trustee_jax.chat import ChatFormat
from trustee_jax.models import hf_config, loading, weights
from trustee_jax.models import tokenizer as tok_lib
from trustee_jax.models.transformer import ModelConfig, RopeScaling, Transformer
from trustee_jax.policy import config_meta, load_policy, model_meta


class ExportError(ValueError):
  """A workdir whose checkpoint cannot become an HF directory: names the path and the cause."""


@dataclasses.dataclass(frozen=True)
class RestoredPolicy:
  """The policy of one checkpoint: the model (params on CPU), its tokenizer, the run config."""
  model: Transformer
  tokenizer: tok_lib.Tokenizer
  config: ml_collections.ConfigDict
  step: int


# ---------------------------------------------------------------------------- checkpoint


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


def _manager(workdir) -> ocp.CheckpointManager:
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise ExportError(f"{directory} does not exist: is {workdir} a training workdir?")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step` if it was saved, else the newest complete step; loud when there is none."""
  steps = manager.all_steps()
  if not steps:
    raise ExportError(f"{manager.directory} has no complete checkpoint")
  if step is None:
    return int(max(steps))
  if step not in steps:
    raise ExportError(f"{manager.directory} has no checkpoint for step {step}; "
                      f"saved steps: {sorted(steps)}")
  return int(step)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  for key in ("model_config", "config"):
    if key not in meta:
      raise ExportError(f"{manager.directory}/{step}/meta has no {key!r} (written by another "
                        "version of the trainer?)")
  return meta


def run_config(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run's ml_collections config from the JSON string the Trainer stored."""
  raw = meta["config"]
  return ml_collections.ConfigDict(json.loads(raw) if isinstance(raw, str) else raw)


# ---------------------------------------------------------------------------- model shape


_ROPE_FIELD = re.compile(r"'?(\w+)'?\s*[=:]\s*([-+0-9.eE]+)")


def _rope_scaling(value: Any) -> RopeScaling | None:
  """RopeScaling from the meta: a dict, the str() of one or of the dataclass, or None."""
  if value is None or value == "None":
    return None
  fields = dict(value) if isinstance(value, dict) else {
      k: v for k, v in _ROPE_FIELD.findall(str(value))}
  try:
    return RopeScaling(float(fields["factor"]), float(fields["low_freq_factor"]),
                       float(fields["high_freq_factor"]),
                       int(float(fields["original_max_position_embeddings"])))
  except KeyError as e:
    raise ExportError(f"cannot read rope_scaling {value!r} from the checkpoint meta") from e


def model_config_from_meta(meta_model: dict[str, Any], cfg: ml_collections.ConfigDict
                           ) -> ModelConfig:
  """The ModelConfig the run trained: shapes from the checkpoint, compute dtype from the run."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(meta_model) - names
  if unknown:
    raise ExportError(f"checkpoint model_config has fields this ModelConfig lacks: "
                      f"{sorted(unknown)}")
  fields = dict(meta_model, rope_scaling=_rope_scaling(meta_model.get("rope_scaling")))
  model_cfg = cfg.get("model", {})
  name = pathlib.Path(str(model_cfg.get("name", "policy"))).name or "policy"
  try:
    return ModelConfig(name=name, dtype=str(model_cfg.get("dtype", "float32")), **fields)
  except TypeError as e:
    raise ExportError(f"checkpoint model_config is incomplete: {e}") from e


def check_model_config(mcfg: ModelConfig, meta_model: dict[str, Any]) -> None:
  """The rebuilt config must give back exactly the meta it was read from (policy.config_meta)."""
  rebuilt = config_meta(mcfg)
  diff = {k: (meta_model.get(k), rebuilt.get(k)) for k in set(meta_model) | set(rebuilt)
          if meta_model.get(k) != rebuilt.get(k)}
  if diff:
    raise ExportError(f"rebuilt model config differs from the checkpoint's: {diff} "
                      "(saved, rebuilt)")


# ---------------------------------------------------------------------------- restore


def restore_saved_params(manager: ocp.CheckpointManager, step: int, like: Any, what: str):
  """Only `state.params` of the checkpoint, shaped as `like`, onto the CPU (a partial restore);
  `what` names the expected params in the error."""
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  target = {"params": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), like)}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except (ValueError, KeyError, TypeError) as e:
    raise ExportError(f"{manager.directory}/{step}: the saved params do not fit {what}: "
                      f"{e}") from e
  return restored["state"]["params"]


def restore_params(manager: ocp.CheckpointManager, step: int, mcfg: ModelConfig
                   ) -> Transformer:
  """A full fine-tune's policy: `state.params` merged into a Transformer of the saved shape."""
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, restore_saved_params(
      manager, step, abs_state, f"a {mcfg.architecture} model of this shape"))


def restore_lora_model(manager: ocp.CheckpointManager, step: int, meta: dict[str, Any],
                       cfg: ml_collections.ConfigDict) -> lora.LoraTransformer:
  """A LoRA run's policy: its base loaded as the run loaded it (`cfg.model.name`; the
  checkpoint holds only the adapters) with the saved adapters, not merged."""
  base_model, _ = load_policy(cfg)
  if model_meta(base_model) != meta["model_config"]:
    raise ExportError(f"the base model {cfg.model.name!r} is not the one the adapters of "
                      f"{manager.directory}/{step} were trained on")
  adapted = lora.add_lora(base_model, lora.LoraConfig.from_dict(meta["lora"]))
  graphdef, adapters, base = lora.split(adapted)
  saved = restore_saved_params(manager, step, adapters, f"adapters {meta['lora']}")
  return nnx.merge(graphdef, saved, base)


def tokenizer_source(cfg: ml_collections.ConfigDict) -> str:
  """The tokenizer the run used (`models.loading.policy_tokenizer`)."""
  return loading.policy_tokenizer(str(cfg.model.name), cfg.model.get("tokenizer", ""))


def restore_policy(workdir: str | pathlib.Path, step: int | None = None, *,
                   merge: bool = True) -> RestoredPolicy:
  """The policy of `workdir`'s checkpoint at `step` (default: the newest); merge=False keeps a
  LoRA run's adapters apart (a LoraTransformer) and refuses a full fine-tune."""
  manager = _manager(workdir)
  try:
    step = resolve_step(manager, step)
    meta = read_meta(manager, step)
    if not merge and "lora" not in meta:
      raise ExportError(f"{manager.directory}/{step} is a full fine-tune checkpoint (its meta "
                        "has no 'lora'): it has no adapters to export; export it merged")
    cfg = run_config(meta)
    mcfg = model_config_from_meta(meta["model_config"], cfg)
    check_model_config(mcfg, meta["model_config"])
    if "lora" in meta:
      model = restore_lora_model(manager, step, meta, cfg)
      model = lora.merge(model) if merge else model
    else:
      model = restore_params(manager, step, mcfg)
  finally:
    manager.close()
  return RestoredPolicy(model, tok_lib.load_tokenizer(tokenizer_source(cfg)), cfg, step)


# ---------------------------------------------------------------------------- templates


def training_chat_template(chat: ChatFormat) -> str:
  """One jinja template that renders as ChatFormat did in training.

  ChatFormat uses the model's template, or HERMES_TEMPLATE for conversations with tools
  when the model's template has none (SmolLM2). Exported alone, the model's template would
  show the policy a tool format it never saw; this template picks between the two exactly
  as ChatFormat._template_for does. HF renders with trim_blocks and lstrip_blocks, so the
  branches are joined with tags that strip nothing.
  """
  if chat.tool_template == chat.template:
    return chat.template
  return ("{%- set ns_trustee = namespace(tool_turns=false) -%}"
          "{%- for m in messages -%}{%- if m.role == 'tool' or m.tool_calls -%}"
          "{%- set ns_trustee.tool_turns = true -%}{%- endif -%}{%- endfor -%}"
          "{% if tools or ns_trustee.tool_turns %}" + chat.tool_template
          + "{% else %}" + chat.template + "{% endif %}")


def generation_config(cfg: ml_collections.ConfigDict, chat: ChatFormat) -> dict[str, Any]:
  """Stop ids (end of turn first) and the rollout's sampling, as serving defaults."""
  rollout = cfg.get("rollout", {})
  gen: dict[str, Any] = {"eos_token_id": list(chat.stop_ids)}
  if chat.tokenizer.bos_token_id is not None:
    gen["bos_token_id"] = chat.tokenizer.bos_token_id
  if chat.tokenizer.pad_token_id is not None:
    gen["pad_token_id"] = chat.tokenizer.pad_token_id
  temperature = float(rollout.get("temperature", 1.0))
  gen.update(do_sample=temperature > 0, temperature=temperature,
             top_p=float(rollout.get("top_p", 1.0)))
  if int(rollout.get("top_k", 0) or 0) > 0:
    gen["top_k"] = int(rollout.top_k)
  return gen


# ---------------------------------------------------------------------------- export


def _write(model: Transformer, tokenizer: tok_lib.Tokenizer, cfg: ml_collections.ConfigDict,
           out: pathlib.Path, dtype: str | None, record: dict[str, Any]) -> pathlib.Path:
  chat = ChatFormat(tokenizer)
  tokenizer.hf.chat_template = training_chat_template(chat)
  weights.save_hf(model, out, tokenizer, dtype=dtype,
                  generation_config=generation_config(cfg, chat))
  (out / "trustee_export.json").write_text(json.dumps(record, indent=2) + "\n")
  return out


def _fresh_out(out_dir) -> pathlib.Path:
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ExportError(f"{out} exists and is not empty; choose a new --out")
  return out


def export_hf(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None,
              *, dtype: str | None = None) -> pathlib.Path:
  """Writes the policy of `workdir` (checkpoint `step`, default newest) to `out_dir`.

  dtype: the safetensors dtype (default: the trained param dtype). Also writes
  trustee_export.json (workdir, step, model) so an evaluation can name its source.
  """
  out = _fresh_out(out_dir)
  policy = restore_policy(workdir, step)
  record = {"workdir": str(pathlib.Path(workdir).absolute()), "step": policy.step,
            "model": str(policy.config.model.get("name")),
            "tokenizer": tokenizer_source(policy.config)}
  return _write(policy.model, policy.tokenizer, policy.config, out, dtype, record)


def export_base(model: str, out_dir: str | pathlib.Path, *, tokenizer: str = "",
                dtype: str | None = None, seed: int = 0) -> pathlib.Path:
  """The untrained policy a run starts from (named as `models.loading` names it; `tokenizer`
  only for a named random shape, default the implied one) in the same layout, with step 0:
  the base side of a comparison."""
  out = _fresh_out(out_dir)
  cfg = ml_collections.ConfigDict({"seed": seed, "model": {"name": model, "tokenizer": tokenizer}})
  net, tok = load_policy(cfg)
  record = {"workdir": None, "step": 0, "model": model, "tokenizer": tokenizer_source(cfg)}
  return _write(net, tok, cfg, out, dtype, record)


# ---------------------------------------------------------------------------- PEFT adapter


# Target -> the HF module it adapts (weights.save_hf's names, less "model.layers.N.").
PEFT_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}


def peft_tensors(model: lora.LoraTransformer, dtype: str | None = None
                 ) -> dict[str, np.ndarray]:
  """The adapters under PEFT's names, per layer lora_A [r, in] and lora_B [out, r]: HF's
  [out, in] linears, so (alpha / r) * B @ A is the transpose of our scale * A @ B. Our head
  dims flatten row-major, as weights.save_hf flattens W."""
  lcfg, tensors = model.lora_cfg, {}
  for name in lcfg.targets:
    a = np.asarray(getattr(model.lora, f"{name}_a")[...])  # [L, in.., r]
    b = np.asarray(getattr(model.lora, f"{name}_b")[...])  # [L, r, out..]
    np_dtype = jnp.dtype(dtype or a.dtype)
    for layer in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{layer}.{PEFT_MODULES[name]}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
          a[layer].reshape(-1, lcfg.rank).T.astype(np_dtype))
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
          b[layer].reshape(lcfg.rank, -1).T.astype(np_dtype))
  return tensors


def peft_config(lcfg: lora.LoraConfig, base_model: str) -> dict[str, Any]:
  """adapter_config.json as peft's LoraConfig.save_pretrained writes it (the fields that
  differ from peft's defaults, and the ones vLLM and SGLang read): plain LoRA, scale alpha/r."""
  alpha = float(lcfg.alpha)
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": lcfg.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
          "target_modules": sorted(PEFT_MODULES[t].rsplit(".", 1)[1] for t in lcfg.targets),
          "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
          "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
          "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
          "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def checked_base_dir(base_dir: str | pathlib.Path, model: Transformer) -> str:
  """The absolute path of an HF base directory (e.g. export_base's), after checking that its
  config.json is the shape the adapters were trained on."""
  path = pathlib.Path(base_dir).absolute()
  config = path / "config.json"
  if not config.is_file():
    raise ExportError(f"{config} does not exist: the base must be an HF directory "
                      "(export it with --base_model NAME --out DIR)")
  try:
    config_json = json.loads(config.read_text())
    shape = config_meta(hf_config.config_from_hf(config_json, source=str(config)))
  except (ValueError, KeyError) as e:
    raise ExportError(f"{config} is not a base this project can adapt: {e}") from e
  want = config_meta(model.cfg)
  diff = {k: (shape.get(k), want.get(k)) for k in set(shape) | set(want)
          if shape.get(k) != want.get(k)}
  if diff:
    raise ExportError(f"{config} is not the base the adapters were trained on: {diff} "
                      "(base, adapters)")
  return str(path)


def default_base_name(cfg: ml_collections.ConfigDict) -> str:
  """The run's `model.name`: absolute when it is a directory (an HF base), else as named."""
  name = pathlib.Path(str(cfg.model.name))
  return str(name.absolute()) if name.is_dir() else str(cfg.model.name)


def export_adapter(workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                   step: int | None = None, *, base_dir: str | pathlib.Path | None = None,
                   dtype: str | None = None) -> pathlib.Path:
  """Writes the LoRA adapters of `workdir` (checkpoint `step`, default newest) to `out_dir` as
  peft does (adapter_config.json, adapter_model.safetensors), with the tokenizer and its
  training chat template and trustee_export.json. base_dir: the base's HF directory, recorded
  as base_model_name_or_path (default: the run's model name). A full fine-tune is refused."""
  out = _fresh_out(out_dir)
  policy = restore_policy(workdir, step, merge=False)
  base = (checked_base_dir(base_dir, policy.model) if base_dir is not None
          else default_base_name(policy.config))
  out.mkdir(parents=True, exist_ok=True)
  save_file(peft_tensors(policy.model, dtype), str(out / "adapter_model.safetensors"),
            metadata={"format": "pt"})
  config = peft_config(policy.model.lora_cfg, base)
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
  policy.tokenizer.hf.chat_template = training_chat_template(ChatFormat(policy.tokenizer))
  policy.tokenizer.save_pretrained(out)
  record = {"workdir": str(pathlib.Path(workdir).absolute()), "step": policy.step,
            "model": str(policy.config.model.get("name")),
            "tokenizer": tokenizer_source(policy.config), "format": "adapter", "base": base}
  (out / "trustee_export.json").write_text(json.dumps(record, indent=2) + "\n")
  return out
