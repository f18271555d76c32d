"""The README's demo: GRPO steps on a 2-core CPU in the paper's shape, one model for every role.

Qwen2.5-Coder-0.5B-Instruct (Qwen's GGUF from the hash-checked part packages) is the policy,
trained with LoRA over its frozen f32 weights, and, through two llama.cpp server processes the
launcher starts and stops, the frozen simulator: task generator (with expected calls and their
arguments), user, tools and judge. The judge runs in `blend` mode: a rule check of the calls
against the task's expected calls decides tool use, the LM only the conversation criteria (a
0.5B judge alone scores every episode 1; see benchmarks/README.md, world fidelity).
"""
import ml_collections

from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  c.model.update(name="qwen2.5-coder-0.5b")  # remat "full" (the default): 10 GB, not 17
  c.lora = ml_collections.ConfigDict(dict(enabled=True, rank=16, alpha=32.0,
                                          sampler_weights="merged"))
  c.engine.update(num_slots=8, cache_len=768)
  c.simulator.update(mode="embedded", backend="llamacpp", processes=2,
                     model="qwen2.5-coder-0.5b", cache_len=2048, max_concurrency=8,
                     timeout_s=300.0)
  c.world.task.update(max_tokens=384, hidden_facts=True, initial_state=False,
                      expected_arguments=True, unsaid_values="facts")
  # Short simulator replies: the JSON limits fit max_tokens, so replies are not cut and re-asked.
  c.world.user.update(max_tokens=160, max_thought_chars=120, max_response_chars=200)
  c.world.tools.update(max_tokens=160, max_result_chars=256, max_notes_chars=120)
  c.world.judge.update(mode="blend", max_tokens=160, max_criteria=2, max_reason_chars=160)
  # At most 2 tools offered and 1 expected call (soft draws included): the schemas keep the
  # prompt well inside the 768 tokens an episode may use on CPU, and 3-call tasks (which the
  # 0.5B fails in every episode, so its group carries no signal) stay out of 3 short steps.
  c.curriculum.update(caps={"num_tools": 2, "num_expected_calls": 1})
  # The 0.5B writes most calls as bare JSON: taken as calls when they name an offered tool
  # (counted apart from tagged ones in episodes/untagged_tool_calls).
  c.rollout.update(group_size=4, max_turn_tokens=96, max_episode_tokens=768,
                   accept_untagged_calls=True)
  c.train.update(steps=3, tasks_per_step=2, updates_per_step=1, micro_batch=2,
                 length_buckets=(512, 768))
  c.train.optimizer.update(learning_rate=5e-5)
  c.grpo.kl_beta = 0.0  # no reference forward pass on 2 cores
  c.validation.update(every=0)  # on CPU every simulated episode counts; see configs/learning.py
  c.checkpoint.update(every=1, keep=2)
  c.progress_bar = False
  return c
