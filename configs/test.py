"""A tiny random policy in the rule-based world: fast tests of the whole loop."""
from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  c.model.update(name="tiny-llama", tokenizer="smollm2")
  c.engine.update(num_slots=8, cache_len=512, decode_chunk=4)
  c.simulator.mode = "doubles"
  c.rollout.update(group_size=4, max_turn_tokens=16, max_episode_tokens=384)
  c.train.update(steps=3, tasks_per_step=2, updates_per_step=1, micro_batch=4,
                 length_buckets=(128, 256, 384), logprob_chunk=8192)
  c.train.optimizer.update(learning_rate=1e-3)
  c.grpo.kl_beta = 0.0
  c.checkpoint.update(every=1, keep=2)
  c.progress_bar = False
  return c
