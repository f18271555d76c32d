"""TRUSTEE's released run (shared/DESIGN.md §7): Qwen3-8B policy, Qwen3-8B simulator on SGLang,
every extension of this project switched off. Needs GPUs (see README: GPU with SGLang)."""
from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  c.hardware.update(name="NVIDIA GPUs", platform="gpu")  # a CPU backend only with allow_cpu
  # A local Hugging Face directory of Qwen3-8B (nothing is downloaded at run time).
  # f32 master weights, bf16 compute. AdamW at lr 1e-6 on bf16 weights would round most updates
  # away: bf16 keeps 8 significant bits, so a step under ~0.2% of a weight is lost, and Adam's
  # steps (~lr = 1e-6) are far below that for weights ~1e-2. verl's actor keeps f32 masters.
  c.model.update(name="/models/Qwen3-8B", tokenizer="qwen3", dtype="bfloat16",
                 param_dtype="float32", remat_policy="dots_no_batch")
  # Decode scans the stacked weights: a per-layer copy (faster decode, measured on CPU only,
  # benchmarks/README.md) would hold another 16 GB of bf16 weights.
  c.engine.update(num_slots=128, cache_len=24576, decode_chunk=8, unstack_layers=False)
  # JSON as the reference asks for it: in the prompt, parsed and repaired, no grammar; and no
  # fields beyond the ones it reads (no user thought, tool notes or per-criterion verdicts).
  c.simulator.update(mode="url", urls=("http://127.0.0.1:30000",), timeout_s=120.0,
                     max_retries=3, max_concurrency=128, json_mode="prompted")
  for role in ("user", "tools", "judge"):
    c.world[role].extra_fields = False
  # Every simulator role thinks. The reference sends no temperature, top_p or top_k, so vLLM
  # applies Qwen3-8B's generation_config.json (0.6 / 0.95 / 20); here they are sent explicitly,
  # so SGLang (which may not read that file) samples the same. Task generation gets 8192 tokens,
  # the other roles 2048.
  for role in ("task", "user", "tools", "judge"):
    c.world[role].update(max_tokens=2048, temperature=0.6, top_p=0.95, top_k=20,
                         chat_template_kwargs={"enable_thinking": True})
  c.world.task.update(max_tokens=8192, frequency_penalty=0.0)
  c.world.judge.frequency_penalty = 0.1
  c.world.task.update(hidden_facts=False, initial_state=False, expected_arguments=False)
  c.world.user.update(frequency_penalty=0.1)
  c.world.tools.update(schema_check=False, use_ledger=False, show_conversation=True,
                       max_result_chars=512, max_parallel_calls=3, frequency_penalty=0.1)
  c.world.judge.update(mode="lm", max_criteria=2, num_votes=1, score_rule="model")
  c.world.tool_pool = "/data/toolbench_tools.json"  # TRUSTEE's pool, given its path
  c.world.lenient_pool = True  # its "credentials"/"select" parameter types are repaired
  c.curriculum.update(mode="level")  # reference multipliers, thresholds 0.5/0.0, step 3
  # verl's token-mean over a micro-batch of one sequence a GPU, scaled by 1/accumulation, is a
  # per-sequence token-mean averaged over the mini-batch's sequences: seq-mean-token-mean.
  c.grpo.update(single_survivor="reward", turn_mode="uniform", clip_low=0.2, clip_high=0.2,
                dual_clip_c=3.0, kl_beta=0.001, kl_type="low_var_kl", agg="seq-mean-token-mean")
  # The policy thinks (Qwen3's default; its detailed and medium system prompts ask for a <think>
  # block), and the simulators see its reasoning (the reference's strip_thinking=false).
  c.rollout.update(group_size=8, max_turn_tokens=16384, max_episode_tokens=24576,
                   temperature=1.0, top_p=1.0, max_parallel_calls=3, enable_thinking=True,
                   show_reasoning=True, turn_limits="reference")
  c.world.task.thinking_prompt = True
  # Old log-probs recomputed by the trainer before the first update, as verl's actor does (the
  # sampler's, the default elsewhere, differ by the engine's numerics; the gap is logged).
  c.train.update(steps=200, tasks_per_step=16, updates_per_step=4, micro_batch=4,
                 recompute_old_logprobs=True)
  c.train.optimizer.update(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0)
  # Validation as the reference's (trainer.test_freq=200, val_kwargs n=4 at 0.6 / 0.95 / 20, 16
  # tasks), plus one before training as the baseline; checkpoints every 50 steps (save_freq=50).
  c.validation.update(every=200, num_tasks=16, samples=4, temperature=0.6, top_p=0.95, top_k=20)
  c.checkpoint.update(every=50, keep=3)
  return c

