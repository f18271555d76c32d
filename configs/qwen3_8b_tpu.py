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


def _paper():
  """configs/trustee_paper.py (configs are files, not a package)."""
  path = pathlib.Path(__file__).with_name("trustee_paper.py")
  spec = importlib.util.spec_from_file_location("trustee_paper", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _paper().on_hardware("TPU v5p-32 (16 chips)", 95.74, "tpu", (1, 4, 4),
                           param_dtype="float32", tpu_topology="v5p:2x2x4")
  c.distributed.update(mode="auto", timeout_s=600)  # every worker of the TPU VM slice
  c.rollout.update(max_episode_tokens=24576)
  c.engine.update(num_slots=128, cache_len=24576, decode_chunk=8)
  c.train.update(micro_batch=4, logprob_chunk=8192)
  return c
