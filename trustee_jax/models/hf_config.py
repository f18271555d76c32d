"""HF config.json <-> ModelConfig for Llama, Qwen2 and Qwen3: what a checkpoint's config says the
model is, and the config.json an export writes for transformers, vLLM and SGLang."""
from trustee_jax.models.transformer import ModelConfig, RopeScaling


class WeightsError(ValueError):
  """A checkpoint that cannot become this model: names the file and the tensor."""


_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3"}
_HF_CLASS = {kind: cls for cls, kind in _ARCHITECTURES.items()}


def config_from_hf(config_json: dict, *, source: str = "config.json",
                   name: str = "hf") -> ModelConfig:
  """ModelConfig of an HF Llama/Qwen2/Qwen3ForCausalLM config.json dict (Qwen2: q/k/v biases
  always, as in transformers' Qwen2Attention; its `attention_bias` key is ignored)."""
  archs = config_json.get("architectures") or [config_json.get("model_type")]
  kind = _ARCHITECTURES.get(archs[0]) or {k: k for k in _HF_CLASS}.get(archs[0])
  if kind is None:
    raise WeightsError(f"{source}: unsupported architecture {archs[0]!r}; "
                       f"supported: {sorted(_ARCHITECTURES)}")

  def need(key):
    if config_json.get(key) is None:
      raise WeightsError(f"{source}: missing required field {key!r}")
    return config_json[key]

  for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                  ("use_sliding_window", False)):
    if config_json.get(key, ok) != ok and not (kind == "qwen2" and key == "attention_bias"):
      raise WeightsError(f"{source}: {key}={config_json[key]!r} is not supported (need {ok!r})")
  rope = dict(config_json.get("rope_parameters") or {})
  rope.update(config_json.get("rope_scaling") or {})
  theta = rope.get("rope_theta", config_json.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                          float(rope["high_freq_factor"]),
                          int(rope["original_max_position_embeddings"]))
  elif rope_type == "default":
    scaling = None
  else:
    raise WeightsError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
  heads, hidden = need("num_attention_heads"), need("hidden_size")
  dtype = config_json.get("dtype") or config_json.get("torch_dtype") or "float32"
  return ModelConfig(
      name=name, vocab_size=need("vocab_size"), hidden_size=hidden,
      intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
      num_heads=heads, num_kv_heads=config_json.get("num_key_value_heads") or heads,
      head_dim=config_json.get("head_dim") or hidden // heads, rope_theta=float(theta),
      rope_scaling=scaling, rms_norm_eps=float(config_json.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
      qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2",
      max_position_embeddings=config_json.get("max_position_embeddings", 8192),
      initializer_range=config_json.get("initializer_range", 0.02),
      param_dtype=dtype, dtype=dtype)


def config_to_hf(cfg: ModelConfig, dtype: str, bos_token_id=None, eos_token_id=None) -> dict:
  """config.json for transformers 4.x/5.x, vLLM and SGLang (legacy and new rope keys)."""
  s = cfg.rope_scaling
  scaling = None if s is None else {
      "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings}
  out = {
      "architectures": [_HF_CLASS[cfg.architecture]],
      "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
      "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
      "attention_dropout": 0.0, "initializer_range": cfg.initializer_range,
      "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
  }
  if cfg.architecture in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
               layer_types=["full_attention"] * cfg.num_layers)
  else:
    out.update(mlp_bias=False, pretraining_tp=1)
  return out
