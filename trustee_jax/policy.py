"""The policy a run trains: how it is loaded, what of it is trained, and its log-probs.

One `Policy` for a full fine-tune and for LoRA: a graphdef, the frozen state (the base under
LoRA, the empty rest of a full fine-tune) and the functions over the trainable state that the
Trainer, the sampler and export need. The trainable state itself lives in the Trainer's state
(checkpointed, donated to every update), never here.
"""
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from trustee_jax import lora, sharding, update
from trustee_jax.models import loading
from trustee_jax.models.tokenizer import Tokenizer


def load_policy(cfg, mesh=None) -> tuple[Any, Tokenizer]:
  """(model, tokenizer) from `cfg.model.name` (see `models.loading`: a packaged GGUF, a Hugging
  Face directory, or a named random config, whose tokenizer `cfg.model.tokenizer` names), the
  weights in `cfg.model.param_dtype` (the master copy: f32 however the checkpoint was saved)
  computing in `cfg.model.dtype`; with a mesh they load straight into their shardings, by the
  logical-axis rules with `cfg.mesh.rules`' overrides."""
  m = cfg.model
  tokenizer = loading.policy_tokenizer(m.name, m.get("tokenizer", ""))
  return loading.load_model_and_tokenizer(
      m.name, tokenizer, mesh=mesh, param_dtype=m.get("param_dtype"), dtype=m.get("dtype"),
      seed=cfg.seed, remat_policy=m.get("remat_policy"), attention_impl=m.get("attention_impl"),
      rules=sharding.rules_from_config(cfg.get("mesh", {}).get("rules", {})))


def config_meta(mcfg) -> dict[str, Any]:
  """A ModelConfig's shape as a checkpoint records it (export rebuilds the model from it)."""
  return {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
          for k, v in dataclasses.asdict(mcfg).items()
          if k not in ("dtype", "remat_policy", "attention_impl", "name")}


def model_meta(model) -> dict[str, Any]:
  """The model's shape as a checkpoint records it."""
  return config_meta(model.cfg)


def lora_config(cfg) -> lora.LoraConfig | None:
  """The run's LoRA settings, or None for a full fine-tune (no `lora` block or not enabled)."""
  block = cfg.get("lora")
  if block is None or not block.get("enabled", False):
    return None
  if block.get("sampler_weights", "merged") not in ("merged", "adapters"):
    raise ValueError(f"lora.sampler_weights must be 'merged' or 'adapters', got "
                     f"{block.sampler_weights!r}")
  return lora.LoraConfig.from_dict(block)


class LowPrecisionMastersError(ValueError):
  """Full fine-tuning bf16/f16 weights in place: most small updates would round to nothing."""


def check_master_dtype(trainable: nnx.State, cfg) -> None:
  """Refuses trainable weights below f32 unless `model.allow_low_precision_masters`: at lr 1e-6
  an AdamW update of a weight near 0.02 is ~100x below bf16's resolution there."""
  low = {str(x.dtype) for x in jax.tree_util.tree_leaves(trainable)
         if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32}
  if low and not cfg.model.get("allow_low_precision_masters", False):
    raise LowPrecisionMastersError(
        f"the trainable weights are {sorted(low)}: set model.param_dtype='float32' (f32 master "
        f"weights, model.dtype='bfloat16' computes in bf16) or, knowingly, "
        f"model.allow_low_precision_masters=True")


@dataclasses.dataclass
class Policy:
  """The policy's structure and frozen weights, and jitted functions of its trainable state."""
  graphdef: nnx.GraphDef
  frozen: nnx.State
  lora_cfg: lora.LoraConfig | None
  sampler_weights: str  # LoRA: "merged" (folded once per update) or "adapters" (per layer)
  meta: dict[str, Any]
  logprobs: Any  # (trainable, tokens, positions) -> logp [N, T-1]
  reference_logprobs: Any  # (tokens, positions) -> logp [N, T-1] of the initial policy

  def model(self, trainable: nnx.State):
    """The policy as a module (base + adapters under LoRA)."""
    return nnx.merge(self.graphdef, trainable, self.frozen)

  def sampler_model(self, trainable: nnx.State):
    """The policy as the engine samples it: the model, or under LoRA base + adapters merged once
    (`sampler_weights="merged"`) or merged a layer at a time as it runs."""
    model = self.model(trainable)
    return lora.merge(model) if self.lora_cfg and self.sampler_weights == "merged" else model


def build(cfg, model, *, temperature: float, chunk_size: int, with_reference: bool
          ) -> tuple[Policy, nnx.State]:
  """(Policy, initial trainable state) of a loaded model: adapters added under LoRA (the base
  frozen, and with adapters off the KL reference for free), else every parameter trainable (the
  reference a copy in the compute dtype, since the trainable state is donated to each update)."""
  lcfg = lora_config(cfg)
  meta = {"model_config": model_meta(model), "config": cfg.to_json_best_effort()}
  kw = dict(temperature=temperature, chunk_size=chunk_size)
  if lcfg is not None:  # adapters of another rank or targets are refused on restore
    meta["lora"] = json.loads(json.dumps(dataclasses.asdict(lcfg)))
    model = lora.add_lora(model, lcfg, seed=cfg.seed)
  graphdef, trainable, frozen = update.split(model)
  if lcfg is None:
    check_master_dtype(trainable, cfg)
  logprob_fn = update.make_logprob_fn(graphdef, **kw)
  reference = None
  if with_reference and lcfg is not None:
    base_graphdef = lora.base_graphdef(model)
    base_fn = update.make_logprob_fn(base_graphdef, **kw)
    empty = nnx.State({})
    reference = lambda tokens, positions: base_fn(frozen, empty, tokens, positions)  # noqa: E731
  elif with_reference:  # the initial policy, kept in the compute dtype (bf16 over f32 masters)
    compute = jnp.dtype(model.cfg.dtype)
    ref = jax.tree_util.tree_map(lambda x: jnp.array(
        x, dtype=compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, copy=True),
        trainable)
    reference = lambda tokens, positions: logprob_fn(ref, frozen, tokens, positions)  # noqa: E731
  policy = Policy(graphdef, frozen, lcfg, str(cfg.get("lora", {}).get("sampler_weights", "merged")),
                  meta, logprobs=lambda trainable, tokens, positions: logprob_fn(
                      trainable, frozen, tokens, positions),
                  reference_logprobs=reference)
  return policy, trainable
