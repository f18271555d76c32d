"""A tiny random policy in the doubles' world, judged by a coin: fast tests of the loop's
mechanics with non-zero advantages (learning itself is tests/test_learning.py's)."""
from trustee_jax.default_config import default_config


def get_config():
  c = default_config()
  c.model.update(name="tiny-llama", tokenizer="smollm2")
  c.engine.update(num_slots=8, cache_len=1536, decode_chunk=4)
  c.simulator.mode = "doubles"
  # A random policy never earns the home world's rewards; the coin judge's -1/1 give the loop's
  # mechanics tests (resume, two processes, LoRA) non-zero advantages and real gradients.
  c.simulator.doubles_judge = "coin"
  c.rollout.update(group_size=4, max_turn_tokens=24, max_episode_tokens=1536)
  c.train.update(steps=3, tasks_per_step=2, updates_per_step=1, micro_batch=4,
                 length_buckets=(512, 1024, 1536), logprob_chunk=8192)
  c.train.optimizer.update(learning_rate=1e-3)
  c.grpo.kl_beta = 0.0
  c.validation.update(every=2, num_tasks=2, samples=2)
  c.checkpoint.update(every=1, keep=2)
  c.progress_bar = False
  return c
