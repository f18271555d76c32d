"""Named decoder shapes: SmolLM2-135M, Qwen2.5-Coder-0.5B/1.5B, Qwen3-0.6B..8B, Llama-3.1-8B,
and tiny test models."""
from trustee_jax.models.transformer import ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)


def _qwen3(name, d, f, layers, heads, tied):
  return ModelConfig(name=name, vocab_size=151936, hidden_size=d, intermediate_size=f,
                     num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=tied,
                     qk_norm=True, max_position_embeddings=40960)


def _qwen25_coder(name, d, f, layers, heads):
  """Qwen2.5-Coder-Instruct (HF config; its GGUF files store a separate output head)."""
  return ModelConfig(name=name, vocab_size=151936, hidden_size=d, intermediate_size=f,
                     num_layers=layers, num_heads=heads, num_kv_heads=2, head_dim=d // heads,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                     qkv_bias=True, max_position_embeddings=32768)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-coder-0.5b": _qwen25_coder("qwen2.5-coder-0.5b", 896, 4864, 24, 14),
    "qwen2.5-coder-1.5b": _qwen25_coder("qwen2.5-coder-1.5b", 1536, 8960, 28, 12),
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3("qwen3-4b", 2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3("qwen3-8b", 4096, 12288, 36, 32, False),
    "llama3.1-8b": ModelConfig(
        name="llama3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072),
    # Tiny random models for fast tests (SmolLM2's vocabulary so its tokenizer fits).
    "tiny-llama": ModelConfig(
        name="tiny-llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=4096),
    "tiny-qwen3": ModelConfig(
        name="tiny-qwen3", vocab_size=151936, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True, max_position_embeddings=4096),
    "tiny-qwen2": ModelConfig(
        name="tiny-qwen2", vocab_size=151936, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True, max_position_embeddings=4096),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """A named config, with field overrides (e.g. dtype='bfloat16')."""
  if name not in MODEL_CONFIGS:
    raise KeyError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
  return MODEL_CONFIGS[name].replace(**overrides)
