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


def _paper():
  """configs/trustee_paper.py (configs are files, not a package)."""
  path = pathlib.Path(__file__).with_name("trustee_paper.py")
  spec = importlib.util.spec_from_file_location("trustee_paper", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _paper().on_hardware("8x NVIDIA H100 80GB", 78.0, "gpu8", (1, 8, 1),
                           param_dtype="float32")  # the reference run, fitted below
  c.rollout.update(max_turn_tokens=4096, max_episode_tokens=8192)
  c.engine.update(num_slots=64, cache_len=8192, decode_chunk=8)
  c.train.update(micro_batch=8, length_buckets=(1024, 2048, 4096, 8192), logprob_chunk=8192)
  return c
