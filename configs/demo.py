"""The README's demo: a few GRPO steps on a 2-core CPU in minutes.

SmolLM2-135M is the policy and, through the embedded server the launcher starts and stops,
the frozen simulator (task generator, user, tools, judge), with the shipped tool pool.
"""
from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  c.engine.update(num_slots=8, cache_len=1024)
  c.simulator.update(num_slots=8, cache_len=2048, max_concurrency=8, timeout_s=300.0)
  c.world.task.update(max_tokens=320, hidden_facts=False, initial_state=False)
  # Short simulator replies: the JSON limits fit max_tokens, so replies are not cut and re-asked.
  c.world.user.update(max_tokens=160, max_thought_chars=120, max_response_chars=200)
  c.world.tools.update(max_tokens=160, max_result_chars=256, max_notes_chars=120)
  c.world.judge.update(max_tokens=160, max_criteria=2, max_reason_chars=160)
  # At most 2 tools offered (soft draws included): their schemas keep the prompt near 550 of the
  # 1024 tokens an episode may use on CPU (10 tools, the curriculum's top, take ~1650).
  c.curriculum.update(caps={"num_tools": 2})
  c.rollout.update(group_size=4, max_turn_tokens=64, max_episode_tokens=1024)
  c.train.update(steps=3, tasks_per_step=2, updates_per_step=1, micro_batch=4,
                 length_buckets=(256, 512, 1024))
  c.train.optimizer.update(learning_rate=1e-6)
  c.validation.update(every=0)  # on CPU every simulated episode counts; see configs/test.py
  c.checkpoint.update(every=1, keep=2)
  return c
