"""TRUSTEE's Qwen3-8B run on a TPU v5p-32 slice (16 chips, 4 hosts): full fine-tuning.

f32 master weights and f32 Adam moments sharded over `fsdp` on the hosts' ICI, heads split
over `tensor` inside each host, bf16 compute, per-layer rematerialisation. Every host runs
the same command (launch/tpu_pod.sh); jax.distributed finds the slice by itself. Sizes come
from the memory plan compiled against the real v5p topology (benchmarks/memory_8b.py).
The simulator is SGLang on GPUs elsewhere (several URLs, or its router in front).

  bash launch/tpu_pod.sh --tpu my-v5p-32 --zone us-east5-a -- \
      --config configs/qwen3_8b_tpu.py --workdir gs://my-bucket/runs/qwen3_8b_tpu
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
      name="TPU v5p-32 (16 chips)", memory_gib=95.74, tpu_topology="v5p:2x2x4", key="tpu"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, 4, 4)))
  c.distributed = ml_collections.ConfigDict(dict(
      mode="auto", coordinator_address="", num_processes=-1, process_id=-1, timeout_s=600))
  c.model.update(name="/models/Qwen3-8B", arch="qwen3-8b", tokenizer="qwen3",
                 dtype="bfloat16", param_dtype="float32", remat_policy="full")
  c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=0, alpha=0.0, targets=(),
                                          param_dtype="float32", sampler_weights="merged"))
  c.rollout.update(max_episode_tokens=24576)
  # Decode scans the stacked weights: a per-layer copy (faster decode, measured on CPU only,
  # benchmarks/README.md) would hold another 16 GB of bf16 weights.
  c.engine.update(num_slots=128, cache_len=24576, decode_chunk=8, unstack_layers=False)
  c.train.update(micro_batch=4, logprob_chunk=8192)
  return c
