"""The GRPO update end to end on a synthetic task that a tiny policy must learn to read.

The prompt names one of 8 tools and one of 8 values; the policy must answer with the same
pair (two tokens), scored by rule: 1 both right, 0 one right, -1 neither. Chance is 1/1024
for a full answer. GRPO must lift success above 0.8, with the curriculum level rising;
negated advantages and a loss mask shifted by one token must not learn.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from trustee_jax import curriculum as cur
from trustee_jax import grpo, update
from trustee_jax.models.transformer import ModelConfig, create_model
from trustee_jax.sampling.engine import Engine, SamplingParams

VOCAB, BOS, SEP = 32, 1, 18
TOOLS, VALUES = np.arange(2, 10), np.arange(10, 18)
TOY = ModelConfig(name="toy", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=64, tie_embeddings=False)
TASKS, GROUP = 16, 8


def rule_reward(prompt, answer) -> float:
  hits = int(answer[0] == prompt[1]) + int(answer[1] == prompt[2])
  return {2: 1.0, 1: 0.0, 0: -1.0}[hits]


def train_toy(steps: int, *, negate: bool = False, shift_mask: bool = False, seed: int = 0,
              lr: float = 2e-3, tasks: int = TASKS):
  model = create_model(TOY, seed=seed)
  graphdef, params, frozen = update.split(model)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  opt_state = opt.init(params)
  gcfg = grpo.GRPOConfig(kl_beta=0.0, dual_clip_c=None)
  step_fn = update.make_update_fn(graphdef, opt, gcfg, micro_batch=32, chunk_size=16)
  ccfg = cur.CurriculumConfig(threshold_up=0.3, threshold_down=-0.5)
  cstate = cur.init_state(ccfg)
  rng = np.random.default_rng(seed)
  success = []
  with Engine(model, num_slots=tasks * GROUP, cache_len=16, decode_chunk=2) as engine:
    for step in range(steps):
      prompts = [[BOS, int(rng.choice(TOOLS)), int(rng.choice(VALUES)), SEP]
                 for _ in range(tasks)]
      reqs = [p for p in prompts for _ in range(GROUP)]
      outs = engine.generate(reqs, [SamplingParams(max_new_tokens=2, temperature=1.0,
                                                   seed=step * 1000 + i)
                                    for i in range(len(reqs))])
      rewards = np.array([rule_reward(p, o.tokens) for p, o in zip(reqs, outs)], np.float32)
      success.append(float(np.mean(rewards == 1.0)))
      tokens = np.array([p + o.tokens for p, o in zip(reqs, outs)], np.int32)
      mask = np.zeros((len(reqs), 5), np.float32)  # aligned with the targets tokens[:, 1:]
      mask[:, 3:] = 1.0
      if shift_mask:
        mask = np.roll(mask, -1, axis=1)
      old = np.zeros_like(mask)
      old[:, 3:] = [o.logprobs for o in outs]
      adv = grpo.group_advantages(jnp.asarray(rewards), jnp.repeat(jnp.arange(tasks), GROUP),
                                  jnp.ones(len(reqs), bool), gcfg, num_groups=tasks)
      batch = {"tokens": tokens, "positions": np.tile(np.arange(6, dtype=np.int32), (len(reqs), 1)),
               "loss_mask": mask, "old_logprobs": old, "turn_rewards": np.zeros_like(mask),
               "advantages": -adv if negate else adv}
      params, opt_state, metrics = step_fn(params, frozen, opt_state,
                                           {k: jnp.asarray(v) for k, v in batch.items()})
      assert float(metrics["skipped"]) == 0.0
      engine.update_params(params)
      cstate = cur.update(ccfg, cstate, jnp.asarray(rewards))
    fresh = [[BOS, int(rng.choice(TOOLS)), int(rng.choice(VALUES)), SEP] for _ in range(128)]
    greedy = engine.generate(fresh, SamplingParams(max_new_tokens=2, temperature=0.0))
    final = float(np.mean([rule_reward(p, o.tokens) == 1.0 for p, o in zip(fresh, greedy)]))
  return success, final, int(cstate.level)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_grpo_learns_the_toy_task_and_controls_do_not():
  steps = 200
  success, final, level = train_toy(steps)
  assert np.mean(success[:3]) < 0.1  # chance: 1/1024 for both tokens
  assert final > 0.8, (final, success)  # greedy, on fresh prompts
  assert level > 1  # the curriculum rose with success
  for control in (dict(negate=True), dict(shift_mask=True)):  # the run's budget, no less
    sampled, final, _ = train_toy(steps, **control)
    assert final < 0.3 and max(sampled[-5:]) < 0.3, (control, final, sampled)


def test_update_is_invariant_to_micro_batching():
  model = create_model(TOY, seed=1)
  graphdef, params, frozen = update.split(model)
  rng = np.random.default_rng(0)
  n, t = 8, 6
  batch = {"tokens": rng.integers(0, VOCAB, (n, t)).astype(np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
           "loss_mask": (rng.random((n, t - 1)) > 0.3).astype(np.float32),
           "old_logprobs": -rng.random((n, t - 1)).astype(np.float32) * 3,
           "turn_rewards": np.zeros((n, t - 1), np.float32),
           "advantages": rng.normal(size=n).astype(np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  opt = optax.sgd(1.0)
  outs = []
  for micro in (8, 2):
    fn = update.make_update_fn(graphdef, opt, grpo.GRPOConfig(kl_beta=0.0), micro_batch=micro,
                               chunk_size=16)
    outs.append(fn(jax.tree_util.tree_map(jnp.copy, params), frozen, opt.init(params), batch))
  (p1, _, m1), (p4, _, m4) = outs
  np.testing.assert_allclose(m1["loss"], m4["loss"], atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_step_is_skipped_and_params_kept():
  model = create_model(TOY, seed=2)
  graphdef, params, frozen = update.split(model)
  opt = optax.adam(1e-2)
  fn = update.make_update_fn(graphdef, opt, grpo.GRPOConfig(kl_beta=0.0), micro_batch=2,
                             chunk_size=16)
  n, t = 2, 4
  batch = {"tokens": jnp.ones((n, t), jnp.int32), "positions": jnp.tile(jnp.arange(t), (n, 1)),
           "loss_mask": jnp.ones((n, t - 1)), "old_logprobs": jnp.zeros((n, t - 1)),
           "turn_rewards": jnp.zeros((n, t - 1)), "advantages": jnp.array([jnp.nan, 1.0])}
  kept = jax.tree_util.tree_map(np.asarray, params)  # the update donates `params`
  new_params, _, metrics = fn(params, frozen, opt.init(kept), batch)
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(new_params)):
    np.testing.assert_array_equal(a, b)
