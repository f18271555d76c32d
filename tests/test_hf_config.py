"""HF config.json -> ModelConfig: both rope layouts, Qwen2's biases, and a clear error for what
the model cannot run."""
import pytest

from trustee_jax.models import hf_config
from trustee_jax.models.hf_config import WeightsError


def test_config_from_hf_reads_both_rope_layouts():
  base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4}
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  legacy = hf_config.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": rope})
  new = hf_config.config_from_hf({**base, "rope_parameters": {**rope, "rope_theta": 5e5}})
  assert legacy.replace(name="x") == new.replace(name="x")
  assert new.rope_theta == 5e5 and new.rope_scaling.original_max_position_embeddings == 8192
  assert new.head_dim == 16 and new.num_kv_heads == 4 and not new.tie_embeddings
  plain = hf_config.config_from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                               "rope_theta": 1e4}})
  assert plain.rope_scaling is None


def test_config_from_hf_qwen2_has_qkv_biases_whatever_attention_bias_says():
  base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 64,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
          "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21}
  for extra in ({}, {"attention_bias": False}, {"attention_bias": True}):
    cfg = hf_config.config_from_hf({**base, **extra})
    assert cfg.qkv_bias and not cfg.qk_norm and cfg.architecture == "qwen2"
  assert hf_config.config_from_hf({**base, "architectures": None, "model_type": "qwen2"}).qkv_bias
  with pytest.raises(WeightsError, match="use_sliding_window=True"):
    hf_config.config_from_hf({**base, "use_sliding_window": True})


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture 'MistralForCausalLM'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
])
def test_config_from_hf_rejects_what_the_model_cannot_run(change, message):
  base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
  with pytest.raises(WeightsError, match="my/config.json: .*" + message.replace("(", r"\(")):
    hf_config.config_from_hf({**base, **change}, source="my/config.json")
