"""The trainer against a deliberately flaky simulator: the user simulator is an HTTP server that
answers some requests with 500s, hangs, dropped connections, malformed bodies and 429s, and task
generation is down for the first seconds of the run. Every step still trains, nothing is lost,
and the causes are counted in TensorBoard under simulator/ and world/."""
import asyncio
import itertools
import json
import time

import pytest

from test_client import ScriptedServer, drop, hang, ok, reply
from test_train import load_config
from trustee_jax import train, world
from trustee_jax.simulator import doubles, user
from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError
from trustee_jax.train_logging import scalar_series, scalar_steps

STEPS = 3
FAULTS = {"http_5xx": reply(500, {"error": {"message": "boom"}}), "timeout": hang(),
          "connect": drop(), "bad_response": reply(200, "{not json"),
          "http_429": reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})}


def user_reply(i: int):
  """A schema-valid user reply; every fourth one ends the conversation."""
  return ok(json.dumps({"thought": "", "response": "" if i % 4 == 3 else "Go on.",
                        "reward": (i % 3) - 1}))


def schedule(n: int = 4000) -> list:
  """Request i's answer: every fourth one a fault, the kinds in turn (one of each in 20).

  Two episodes run at once and share this sequence, so one call's retries can land on faults
  while the other episode takes the good answers in between (with faults on every other
  request and 3 retries, a timing change once lost an episode this way). Faults one in four and
  8 retries make that chance (1/4)^8 per call."""
  faults, replies = itertools.cycle(FAULTS.values()), itertools.count(0, 2)
  return [next(faults) if i % 4 == 1 else user_reply(next(replies)) for i in range(20)] * (n // 20)


class OutageAtStart:
  """The doubles' task generator, unreachable for its first `calls` batches (waited out with
  the world's sleeps: about a second here)."""

  def __init__(self, calls: int):
    self.inner, self.down, self.refused_at = doubles.TaskGeneratorDouble(), calls, []

  async def generate_batch(self, requests, *, avoid_queries=()):
    if len(self.refused_at) < self.down:
      self.refused_at.append(time.monotonic())
      raise SimulatorError("http://127.0.0.1:9", "connect", "task generator down")
    return await self.inner.generate_batch(requests, avoid_queries=avoid_queries)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_step_trains_through_a_flaky_simulator(tmp_path):
  cfg = load_config("test", **{"train.steps": STEPS, "validation.every": 0,
                               "rollout_concurrency": 2})

  async def run():
    async with ScriptedServer(*schedule()) as srv:
      client = SimulatorClient(ClientConfig(urls=(srv.url,), timeout_s=1.0, max_retries=8,
                                            backoff_base_s=0.01, backoff_max_s=0.05))
      sim_world = world.SimWorld(
          OutageAtStart(calls=3), user.UserSimulator(client), doubles.ToolDouble(),
          doubles.CoinJudge(), doubles.double_pool(), client=client,
          refill=world.TaskRefill(outage_wait_s=30.0, max_sleep_s=0.5))
      last = await asyncio.to_thread(train.train, cfg, tmp_path, sim_world)
      return last, len(srv.requests)

  last, requests = asyncio.run(run())
  tb = tmp_path / "tb"
  assert scalar_steps(tb, "train/loss") == list(range(1, STEPS + 1))  # every step updated
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [STEPS - 1, STEPS]  # keep=2, nothing half-written
  assert all((tmp_path / "episodes" / f"step_{s}.jsonl").exists() for s in range(1, STEPS + 1))
  signal = scalar_series(tb, ["train/nonzero_advantage_frac"])["train/nonzero_advantage_frac"]
  assert sum(v > 0 for v in signal.values()) >= 2, signal  # a signal in most steps
  counts = {k: v for k, v in last.items() if k.startswith(("simulator/", "world/"))}
  for cause in FAULTS:
    assert counts.get(f"simulator/retries/{cause}", 0) > 0, (cause, counts)
  assert counts["world/tasks/outage_waits"] == 3 and counts.get("world/tasks/short", 0) == 0
  assert last["episodes/dropped"] == 0  # every fault was retried through: no episode lost
  assert requests > 20
