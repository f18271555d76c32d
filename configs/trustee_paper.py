"""TRUSTEE's released run (shared/DESIGN.md §7): Qwen3-8B policy, Qwen3-8B simulator on SGLang,
every extension of this project switched off. Needs GPUs (see README: GPU with SGLang)."""
import ml_collections

from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  # A local Hugging Face directory of Qwen3-8B (nothing is downloaded at run time).
  c.model.update(name="/models/Qwen3-8B", tokenizer="qwen3", dtype="bfloat16",
                 param_dtype="bfloat16", remat_policy="dots_no_batch")
  # Decode scans the stacked weights: a per-layer copy (faster decode, measured on CPU only,
  # benchmarks/README.md) would hold another 16 GB of bf16 weights.
  c.engine.update(num_slots=128, cache_len=24576, decode_chunk=8, unstack_layers=False)
  c.simulator.update(mode="url", urls=("http://127.0.0.1:30000",), timeout_s=120.0,
                     max_retries=3, max_concurrency=128)
  thinking = {"enable_thinking": True}
  c.world.task.update(hidden_facts=False, initial_state=False, expected_arguments=False,
                      max_tokens=2048, chat_template_kwargs=thinking)
  c.world.user.update(max_tokens=2048, frequency_penalty=0.1, chat_template_kwargs=thinking)
  c.world.tools.update(schema_check=False, use_ledger=False, show_conversation=True,
                       max_result_chars=512,
                       max_parallel_calls=3, max_tokens=2048, frequency_penalty=0.1,
                       chat_template_kwargs=thinking)
  c.world.judge.update(mode="lm", max_criteria=2, num_votes=1, score_rule="model", max_tokens=2048,
                       chat_template_kwargs=thinking)
  c.world.tool_pool = "/data/toolbench_tools.json"  # TRUSTEE's pool, given its path
  c.world.lenient_pool = True  # its "credentials"/"select" parameter types are repaired
  c.curriculum.update(mode="level")  # reference multipliers, thresholds 0.5/0.0, step 3
  c.grpo.update(single_survivor="reward", turn_mode="uniform", clip_low=0.2, clip_high=0.2,
                dual_clip_c=3.0, kl_beta=0.001, kl_type="low_var_kl", agg="token-mean")
  c.rollout.update(group_size=8, max_turn_tokens=16384, max_episode_tokens=24576,
                   temperature=1.0, top_p=1.0, max_parallel_calls=3)
  c.train.update(steps=200, tasks_per_step=16, updates_per_step=4, micro_batch=4)
  c.train.optimizer.update(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0)
  c.checkpoint.update(every=10, keep=3)
  return c


def on_hardware(name: str, memory_gib: float, key: str, mesh_shape: tuple[int, ...], *,
                param_dtype: str, tpu_topology: str = ""):
  """The reference run placed on a machine: what the qwen3_8b_* configs share. They change
  only what that hardware needs (LoRA, episode length, slots, micro-batch)."""
  c = get_config()
  c.hardware = ml_collections.ConfigDict(dict(
      name=name, memory_gib=memory_gib, tpu_topology=tpu_topology, key=key))
  c.mesh.shape = tuple(mesh_shape)
  c.model.update(arch="qwen3-8b", param_dtype=param_dtype, remat_policy="full")
  c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=0, alpha=0.0, targets=(),
                                          param_dtype="float32", sampler_weights="merged"))
  return c
