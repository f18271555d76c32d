"""TRUSTEE's Qwen3-8B run on 8 x 80 GB GPUs (one H100 node): full fine-tuning with FSDP.

f32 master weights and f32 Adam moments, sharded 8 ways over `fsdp` (with gradients,
16 bytes a parameter: 16.4 GB a GPU), bf16 compute, per-layer rematerialisation, one
episode per GPU per micro-batch. The sampling engine decodes with the training params.
Slots, context and micro-batch come from the compiled memory plan (benchmarks/memory_8b.py).
The simulator is SGLang elsewhere (other GPUs or hosts; several URLs or its router).

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python launch/train.py \
      --config configs/qwen3_8b_gpu8.py --workdir runs/qwen3_8b_gpu8
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
      name="8x NVIDIA H100 80GB", memory_gib=78.0, tpu_topology="", key="gpu8"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, 8, 1)))
  c.distributed = ml_collections.ConfigDict(dict(
      mode="env", coordinator_address="", num_processes=-1, process_id=-1, timeout_s=300))
  c.model.update(name="/models/Qwen3-8B", arch="qwen3-8b", tokenizer="qwen3",
                 dtype="bfloat16", param_dtype="float32", remat_policy="full")
  c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=0, alpha=0.0, targets=(),
                                          param_dtype="float32", sampler_weights="merged"))
  c.rollout.update(max_turn_tokens=4096, max_episode_tokens=8192)
  # Decode scans the stacked weights: a per-layer copy (faster decode, measured on CPU only,
  # benchmarks/README.md) would hold another 16 GB of bf16 weights.
  c.engine.update(num_slots=64, cache_len=8192, decode_chunk=8, unstack_layers=False)
  c.train.update(micro_batch=8, length_buckets=(1024, 2048, 4096, 8192), logprob_chunk=8192)
  return c
