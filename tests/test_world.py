"""world.build_world: the run's own simulator servers started on 127.0.0.1 and stopped again."""
import asyncio
import importlib.util

import httpx
import pytest

from trustee_jax import rollout, world
from trustee_jax.default_config import default_config
from trustee_jax.simulator import doubles, tasks
from trustee_jax.simulator.client import SimulatorError


def _cfg(tmp_path, **simulator):
  cfg = default_config()
  cfg.simulator.update(mode="embedded", log_dir=str(tmp_path), startup_timeout_s=300.0,
                       **simulator)
  return cfg


def _start_and_stop(cfg) -> tuple[tuple[str, ...], list[int]]:
  async def go():
    w = await world.build_world(cfg)
    urls = tuple(w.client.config.urls)
    codes = [httpx.get(u + "/health", timeout=10).status_code for u in urls]
    assert all(u.startswith("http://127.0.0.1:") for u in urls)
    await w.aclose()
    assert all(p.poll() is not None for p in w.servers)  # stopped with the world
    return urls, codes
  return asyncio.run(go())


@pytest.mark.timeout(600)
def test_jax_backend_starts_one_server_and_stops_it(tmp_path):
  urls, codes = _start_and_stop(_cfg(tmp_path, backend="jax", model="tiny-llama", num_slots=2,
                                     cache_len=256))
  assert len(urls) == 1 and codes == [200]


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (install.sh builds it)")
def test_llamacpp_backend_starts_each_process_on_its_own_port(tmp_path):
  urls, codes = _start_and_stop(_cfg(tmp_path, backend="llamacpp", processes=2, model="smollm2",
                                     cache_len=512))
  assert len(set(urls)) == 2 and codes == [200, 200]


def test_unknown_backend_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="simulator.backend"):
    world.start_embedded_servers(_cfg(tmp_path, backend="vllm").simulator)


def test_doubles_world_is_a_rollout_world():
  """SimWorld has everything the Trainer and rollout call (rollout.World, a Protocol)."""
  cfg = default_config()
  cfg.simulator.mode = "doubles"

  async def go():
    w = await world.build_world(cfg)
    assert isinstance(w, rollout.World)
    assert await w.make_tasks([], seed=0) == [] and isinstance(w.stats(), dict)
    await w.aclose()
  asyncio.run(go())


def test_servers_start_as_package_modules(tmp_path):
  """Started with `python -m`, so an install without the checkout's launch/ directory works."""
  sim = _cfg(tmp_path, backend="jax", model="tiny-llama").simulator
  assert world._jax_server_cmd(sim, 0)[1:3] == ["-m", "trustee_jax.serving"]


class FlakyGenerator:
  """A task generator that fails the first `outages` batches (the simulator unreachable) and
  then writes a task only for knobs whose num_tools is at most `max_tools`."""

  def __init__(self, outages=0, max_tools=99):
    self.outages, self.max_tools, self.batches = outages, max_tools, []
    self.inner = doubles.TaskGeneratorDouble()

  async def generate_batch(self, requests, *, avoid_queries=()):
    self.batches.append(([r.knobs["num_tools"] for r in requests], list(avoid_queries)))
    if self.outages:
      self.outages -= 1
      raise SimulatorError("http://127.0.0.1:1", "connect", "connection refused")
    batch = await self.inner.generate_batch(requests, avoid_queries=avoid_queries)
    keep = [t for t in batch.tasks if t.knobs["num_tools"] <= self.max_tools]
    return tasks.TaskBatch(keep, batch.failures + [(0, "too hard")] * (len(batch.tasks) - len(keep)))


def knobs(n, num_tools):
  kn = dict(num_tools=num_tools, num_expected_calls=1, persona_level=0, ambiguity_level=0,
            expected_turns=1, system_prompt_level=0, num_criteria=1, max_user_turns=2,
            max_assistant_turns=3, max_tool_turns=2)
  return [dict(kn) for _ in range(n)]


def flaky_world(gen, **refill):
  return world.SimWorld(gen, None, None, None, doubles.double_pool(),
                        refill=world.TaskRefill(max_sleep_s=0.01, **refill))


def test_short_batch_is_refilled_from_easier_knobs_then_counted():
  gen = FlakyGenerator(max_tools=2)
  w = flaky_world(gen, rounds=2, oversample=2)
  asked = []

  def easier(n):
    asked.append(n)
    return knobs(n, 2)
  got = asyncio.run(w.make_tasks(knobs(2, 2) + knobs(2, 5), 0, easier=easier))
  assert len(got) == 4 and asked == [4]  # 2 missing, asked twice over, filled in one round
  assert w.counters["tasks/refilled"] == 2 and w.counters["tasks/short"] == 0
  first_queries = [t.first_user_query for t in got[:2]]
  assert gen.batches[1] == ([2] * 4, first_queries)  # no refill repeats a task it has
  # Knobs nothing can satisfy: bounded rounds, then a short batch, counted, never padded.
  w = flaky_world(FlakyGenerator(max_tools=0), rounds=3)
  assert asyncio.run(w.make_tasks(knobs(3, 2), 0, easier=lambda n: knobs(n, 2))) == []
  assert w.counters["tasks/short"] == 3 and len(w.generator.batches) == 4
  # Validation (no `easier`) is never refilled.
  w = flaky_world(FlakyGenerator(max_tools=2))
  assert len(asyncio.run(w.make_tasks(knobs(1, 2) + knobs(1, 5), 0))) == 1


def test_outage_is_waited_out_then_named():
  w = flaky_world(FlakyGenerator(outages=3), outage_wait_s=1.0)
  assert len(asyncio.run(w.make_tasks(knobs(2, 2), 0))) == 2
  assert w.counters["tasks/outage_waits"] == 3
  w = flaky_world(FlakyGenerator(outages=10 ** 6), outage_wait_s=0.05)
  with pytest.raises(SimulatorError, match=r"127\.0\.0\.1:1.*gave up after waiting.*outage_wait_s"):
    asyncio.run(w.make_tasks(knobs(1, 2), 0))


def test_an_lm_world_can_play_the_rule_tasks_and_score_them_by_their_oracle():
  """world.task_source='rule': the home family's tasks (made here, no server needed) with the
  LM in the other roles; world.oracle='rule' adds the rule judge beside the LM one."""
  cfg = default_config()
  cfg.simulator.update(mode="url", urls=("http://127.0.0.1:9",))
  cfg.world.update(task_source="rule", oracle="rule")

  async def go():
    w = await world.build_world(cfg)
    assert isinstance(w.generator, doubles.TaskGeneratorDouble)
    assert isinstance(w.oracle, doubles.JudgeDouble) and not isinstance(w.judge, doubles.JudgeDouble)
    knobs = dict(num_tools=2, num_expected_calls=1, persona_level=0, ambiguity_level=0,
                 expected_turns=1, system_prompt_level=1, num_criteria=1, max_user_turns=3,
                 max_assistant_turns=4, max_tool_turns=3)
    (task,) = await w.make_tasks([knobs], seed=0)
    assert task.oracle["calls"] and task.expected_calls
    await w.aclose()
  asyncio.run(go())


@pytest.mark.parametrize("mode, source, oracle, match", [
    ("url", "lm", "rule", "carry a rule oracle"), ("url", "lm", "lm", "world.oracle"),
    ("doubles", "ledger", "", "world.task_source")])
def test_an_oracle_needs_tasks_that_carry_one(mode, source, oracle, match):
  cfg = default_config()
  cfg.simulator.update(mode=mode, urls=("http://127.0.0.1:9",))
  cfg.world.update(task_source=source, oracle=oracle)
  with pytest.raises(ValueError, match=match):
    asyncio.run(world.build_world(cfg))
