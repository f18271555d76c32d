"""The engine on a paged KV cache against the dense one, on a tiny random model: the same tokens
and logprobs on staggered requests, on G episodes sharing a prompt and on their next turns,
and under block exhaustion (requests queue, then finish); every block is free at the end."""
import threading
import time

import numpy as np
import pytest

from trustee_jax.models.model_configs import get_model_config
from trustee_jax.models.transformer import create_model
from trustee_jax.sampling.engine import Engine, RequestError, SamplingParams

VOCAB, SLOTS, CACHE_LEN, BLOCK = 512, 4, 128, 8


@pytest.fixture(scope="module")
def model():
  return create_model(get_model_config("tiny-qwen3", vocab_size=VOCAB, initializer_range=0.2),
                      seed=2)


@pytest.fixture(scope="module")
def dense(model):
  with Engine(model, num_slots=SLOTS, cache_len=CACHE_LEN) as eng:
    yield eng


@pytest.fixture(scope="module")
def paged(model):
  with Engine(model, num_slots=SLOTS, cache_len=CACHE_LEN, kv_layout="paged",
              block_size=BLOCK, num_blocks=40) as eng:
    yield eng


def _prompts(lengths, seed=0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _staggered(engine: Engine, prompts, params) -> list:
  """Each request submitted 50 ms after the one before, from its own thread."""
  results = [None] * len(prompts)

  def client(i):
    time.sleep(0.05 * i)
    results[i] = engine.submit(prompts[i], params[i]).result(timeout=300)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def _same(got, want) -> None:
  for g, w in zip(got, want, strict=True):
    assert g.tokens == w.tokens
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def _all_free(engine: Engine) -> None:
  m = engine.metrics()
  assert m["kv_blocks_used"] == 0 and m["kv_blocks_free"] == m["kv_blocks_total"]


def test_staggered_requests_match_the_dense_engine(dense, paged):
  prompts = _prompts([5, 19, 33, 12, 9, 26])
  params = [SamplingParams(max_new_tokens=12, temperature=0.0),
            SamplingParams(max_new_tokens=9, temperature=1.0, seed=5),
            SamplingParams(max_new_tokens=20, temperature=0.8, seed=6, top_k=20),
            SamplingParams(max_new_tokens=6, temperature=0.0, top_logprobs=3),
            SamplingParams(max_new_tokens=15, temperature=1.0, seed=7, top_p=0.9),
            SamplingParams(max_new_tokens=8, temperature=1.0, seed=8, frequency_penalty=0.5)]
  want = dense.generate(prompts, params)
  got = _staggered(paged, prompts, params)
  _same(got, want)
  assert got[3].top_logprobs is not None
  np.testing.assert_allclose([lp for row in got[3].top_logprobs for _, lp in row],
                             [lp for row in want[3].top_logprobs for _, lp in row], atol=1e-4)
  _all_free(paged)


def test_episodes_sharing_a_prompt_share_its_blocks_and_match(dense, paged):
  prompt = _prompts([45], seed=1)[0]  # five full blocks before its last token
  params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s) for s in range(4)]
  want = dense.generate([prompt] * 4, params)
  before = paged.metrics()["reused_tokens"]
  got = paged.generate([prompt] * 4, params)
  _same(got, want)
  assert len({tuple(c.tokens) for c in got}) > 1  # the episodes diverge
  # One prefills the prompt; the others wait a step, then share its five blocks.
  assert sorted(c.cached_tokens for c in got) == [0, 40, 40, 40]
  assert paged.metrics()["reused_tokens"] - before == 120
  # Next turns: each conversation finds its own last turn's blocks (now freed, still cached).
  follow = [prompt + c.tokens + [7, 8, 9] for c in got]
  greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
  want2 = dense.generate(follow, greedy)
  got2 = paged.generate(follow, greedy)
  _same(got2, want2)
  assert all(c.cached_tokens == 48 for c in got2)  # 45 + 10 - 1 computed: six full blocks
  _all_free(paged)


def test_exhausted_pool_queues_requests_that_then_finish(model, dense):
  prompts = _prompts([12, 17, 10, 20], seed=3)
  params = [SamplingParams(max_new_tokens=14, temperature=1.0, seed=s) for s in range(4)]
  want = dense.generate(prompts, params)
  # Seven blocks of 8: each request needs four or five, so they run one or two at a time.
  with Engine(model, num_slots=SLOTS, cache_len=CACHE_LEN, kv_layout="paged", block_size=BLOCK,
              num_blocks=7) as eng:
    futures = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
    peak = 0
    while not all(f.done() for f in futures):
      m = eng.metrics()
      peak = max(peak, m["busy_slots"])
      assert m["kv_blocks_used"] <= 7
      time.sleep(0.005)
    _same([f.result() for f in futures], want)
    assert peak < len(prompts)  # some waited for blocks
    _all_free(eng)
    with pytest.raises(RequestError, match="more than the 7 KV blocks"):
      eng.submit(list(range(40)), SamplingParams(max_new_tokens=20))


def test_paged_layout_rejects_bad_settings(model):
  with pytest.raises(ValueError, match="kv_layout must be"):
    Engine(model, kv_layout="ragged")
  with pytest.raises(ValueError, match="multiple of block_size"):
    Engine(model, cache_len=100, kv_layout="paged", block_size=16)


def test_a_failed_step_frees_every_block_and_new_weights_drop_the_prefixes(model, monkeypatch):
  from trustee_jax.sampling import engine as engine_module
  prompts = _prompts([20, 11], seed=4)
  greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
  with Engine(model, num_slots=SLOTS, cache_len=CACHE_LEN, kv_layout="paged", block_size=BLOCK,
              num_blocks=16) as eng:
    before = eng.generate(prompts, greedy)
    decode, calls = engine_module.sampler.decode, []

    def fault_once(*args, **kw):
      calls.append(1)
      if len(calls) == 1:
        raise RuntimeError("injected device fault")
      return decode(*args, **kw)

    monkeypatch.setattr(engine_module.sampler, "decode", fault_once)
    with pytest.raises(engine_module.EngineError, match="injected device fault"):
      eng.generate(prompts, greedy)
    _all_free(eng)
    assert eng.metrics()["kv_blocks_cached"] == 0  # the failed pool's prefixes are gone
    again = eng.generate(prompts, greedy)
    assert [c.tokens for c in again] == [c.tokens for c in before]
    assert eng.generate(prompts[:1], greedy)[0].cached_tokens == 16  # from `again`
    eng.update_params(eng.state)
    assert eng.generate(prompts[:1], greedy)[0].cached_tokens == 0
    _all_free(eng)
