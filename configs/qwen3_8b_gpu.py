"""TRUSTEE's Qwen3-8B run on one 80 GB GPU (H100): LoRA, since full fine-tuning cannot fit.

bf16 weights alone are 16.4 GB and Adam's f32 moments another 65.5 GB, so the policy trains
rank-64 adapters on every attention and MLP projection (175M parameters, f32, with their
Adam state: 2.1 GB) over a frozen bf16 base that is also the KL reference. The sampling
engine decodes base + adapters, merging a layer at a time (a merged copy would cost 16 GB).
Slots, context and micro-batch come from the compiled memory plan (benchmarks/memory_8b.py,
benchmarks/README.md): with 8192-token episodes and a merged engine copy the plan needed
125 GiB; with 4096-token episodes and no copy it needs 73.1 GiB of the 78.
The simulator is SGLang on a second GPU (launch/serve_sglang.sh), or at a URL.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python launch/train.py \
      --config configs/qwen3_8b_gpu.py --workdir runs/qwen3_8b_gpu
"""
import importlib.util
import pathlib

import ml_collections


def _paper():
  path = pathlib.Path(__file__).with_name("trustee_paper.py")
  spec = importlib.util.spec_from_file_location("trustee_paper", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _paper()  # the reference run's RL and world settings; what follows fits the hardware
  c.hardware = ml_collections.ConfigDict(dict(
      name="1x NVIDIA H100 80GB", memory_gib=78.0, tpu_topology="", key="gpu"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, 1, 1)))
  c.distributed = ml_collections.ConfigDict(dict(
      mode="env", coordinator_address="", num_processes=-1, process_id=-1, timeout_s=300))
  c.model.update(name="/models/Qwen3-8B", arch="qwen3-8b", tokenizer="qwen3",
                 dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
  c.lora = ml_collections.ConfigDict(dict(
      enabled=True, rank=64, alpha=128.0,
      targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"),
      param_dtype="float32", sampler_weights="adapters"))
  # One GPU cannot hold the paper's 24k-token episodes with this attention (see the plan).
  # 4096 tokens fit; 8192 did not (update 91.7, decode 115 GiB in the plan).
  c.rollout.update(max_turn_tokens=1024, max_episode_tokens=4096)
  # Decode scans the stacked weights: a per-layer copy (faster decode, measured on CPU only,
  # benchmarks/README.md) would hold another 16 GB of bf16 weights.
  c.engine.update(num_slots=16, cache_len=4096, decode_chunk=8, unstack_layers=False)
  c.train.update(micro_batch=1, length_buckets=(1024, 2048, 4096), logprob_chunk=8192)
  # LoRA moves fewer weights: a learning rate about 10x the full fine-tune's.
  c.train.optimizer.update(learning_rate=1e-5, weight_decay=0.0)
  return c
