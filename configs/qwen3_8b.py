"""TRUSTEE's Qwen3-8B run (configs/trustee_paper.py) placed on hardware: `--config
configs/qwen3_8b.py:VARIANT`, each variant changing only what its machine needs. Slots, context
and micro-batch come from the compiled memory plan (benchmarks/memory_8b.py, benchmarks/README.md).

gpu: one 80 GB GPU (H100). LoRA, since full fine-tuning cannot fit: bf16 weights alone are
  16.4 GB and Adam's f32 moments another 65.5 GB, so the policy trains rank-64 adapters on every
  attention and MLP projection (175M parameters, f32, with their Adam state: 2.1 GB) over a
  frozen bf16 base that is also the KL reference. The sampling engine decodes base + adapters,
  merging a layer at a time (a merged copy would cost 16 GB). With 8192-token episodes and a
  merged engine copy the plan needed 125 GiB; with 4096-token episodes and no copy, 73.1 of 78.
  The simulator is SGLang on a second GPU (launch/serve_sglang.sh), or at a URL.
gpu8: 8 x 80 GB GPUs (one H100 node), full fine-tuning with FSDP: f32 master weights and f32
  Adam moments sharded 8 ways over `fsdp` (with gradients, 16 bytes a parameter: 16.4 GB a GPU),
  bf16 compute, per-layer rematerialisation, one episode per GPU per micro-batch. The engine
  decodes with the training params. The simulator is SGLang elsewhere (several URLs or a router).
tpu: a TPU v5p-32 slice (16 chips, 4 hosts), full fine-tuning: f32 masters and Adam moments
  sharded over `fsdp` on the hosts' ICI, heads split over `tensor` inside each host, bf16
  compute. Every host runs the same command (launch/tpu_pod.sh); jax.distributed finds the
  slice by itself. The memory plan is compiled against the real v5p topology.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python launch/train.py \
      --config configs/qwen3_8b.py:gpu8 --workdir runs/qwen3_8b_gpu8
  bash launch/tpu_pod.sh --tpu my-v5p-32 --zone us-east5-a -- \
      --config configs/qwen3_8b.py:tpu --workdir gs://my-bucket/runs/qwen3_8b_tpu
"""
import pathlib

import ml_collections

from trustee_jax import config_files

VARIANTS = ("gpu", "gpu8", "tpu")


def on_hardware(name: str, memory_gib: float, key: str, mesh_shape: tuple[int, ...], *,
                tpu_topology: str = "") -> ml_collections.ConfigDict:
  """The reference run (f32 master weights, bf16 compute) on a machine, full fine-tune."""
  paper = config_files.load_module(pathlib.Path(__file__).with_name("trustee_paper.py"))
  c = paper.get_config()
  c.hardware.update(name=name, memory_gib=memory_gib, tpu_topology=tpu_topology, key=key,
                    platform="tpu" if key == "tpu" else "gpu")
  c.mesh.shape = tuple(mesh_shape)
  c.model.update(arch="qwen3-8b", remat_policy="full")
  c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=0, alpha=0.0, targets=(),
                                          param_dtype="float32", sampler_weights="merged"))
  return c


def gpu() -> ml_collections.ConfigDict:
  c = on_hardware("1x NVIDIA H100 80GB", 78.0, "gpu", (1, 1, 1))
  # The trained weights are the adapters, f32 (lora.param_dtype); the frozen base stays bf16
  # (in f32 it would take another 16.4 GB of the 78).
  c.model.param_dtype = "bfloat16"
  c.lora = ml_collections.ConfigDict(dict(
      enabled=True, rank=64, alpha=128.0,
      targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"),
      param_dtype="float32", sampler_weights="adapters"))
  # One GPU cannot hold the paper's 24k-token episodes with this attention (see the plan).
  # 4096 tokens fit; 8192 did not (update 91.7, decode 115 GiB in the plan).
  c.rollout.update(max_turn_tokens=1024, max_episode_tokens=4096)
  c.engine.update(num_slots=16, cache_len=4096, decode_chunk=8)
  c.train.update(micro_batch=1, length_buckets=(1024, 2048, 4096), logprob_chunk=8192)
  # LoRA moves fewer weights: a learning rate about 10x the full fine-tune's.
  c.train.optimizer.update(learning_rate=1e-5, weight_decay=0.0)
  return c


def gpu8() -> ml_collections.ConfigDict:
  c = on_hardware("8x NVIDIA H100 80GB", 78.0, "gpu8", (1, 8, 1))
  c.rollout.update(max_turn_tokens=4096, max_episode_tokens=8192)
  c.engine.update(num_slots=64, cache_len=8192, decode_chunk=8)
  c.train.update(micro_batch=8, length_buckets=(1024, 2048, 4096, 8192), logprob_chunk=8192)
  return c


def tpu() -> ml_collections.ConfigDict:
  c = on_hardware("TPU v5p-32 (16 chips)", 95.74, "tpu", (1, 4, 4), tpu_topology="v5p:2x2x4")
  c.distributed.update(mode="auto", timeout_s=600)  # every worker of the TPU VM slice
  c.rollout.update(max_episode_tokens=24576)
  c.engine.update(num_slots=128, cache_len=24576, decode_chunk=8)
  c.train.update(micro_batch=4, logprob_chunk=8192)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The variant `arg` names (gpu | gpu8 | tpu); there is no default hardware."""
  if arg not in VARIANTS:
    raise ValueError(f"configs/qwen3_8b.py needs a hardware variant, one of {VARIANTS} "
                     f"(--config configs/qwen3_8b.py:gpu8); got {arg!r}")
  return {"gpu": gpu, "gpu8": gpu8, "tpu": tpu}[arg]()
