"""Builds the simulated world a run trains in: the frozen LM behind a URL (SGLang or the
embedded server, started here as a child process that dies with us), or the rule-based doubles."""
import asyncio
import collections
import dataclasses
import logging
import os
import pathlib
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np

from trustee_jax.config_dataclass import from_config
from trustee_jax.seeding import retry_seed
from trustee_jax.simulator import doubles, judge, tasks, tools, tools_pool, user
from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError

# The servers run as `python -m` modules of this package (trustee_jax/serving/), found the way
# this process found it (an install, or a checkout on sys.path: see `_server_env`).
JAX_SERVER = "trustee_jax.serving"
LLAMACPP_SERVER = "trustee_jax.serving.llamacpp"


@dataclasses.dataclass(frozen=True)
class TaskRefill:
  """How a step gets its tasks when generation falls short or the simulator is down (the
  reference: 2x oversampling, up to 5 rounds, at a level 10 lower). `easier` knobs come from the
  trainer; an outage is waited out with doubling sleeps for up to `outage_wait_s` in all."""
  rounds: int = 5
  oversample: int = 2
  level_drop: int = 10
  outage_wait_s: float = 300.0
  max_sleep_s: float = 30.0

  @classmethod
  def from_dict(cls, d: Any) -> "TaskRefill":
    return from_config(cls, d, block="world.task_refill")


class SimWorld:
  """The roles plus task generation, simulator counters, and clean shutdown: a rollout.World."""

  def __init__(self, generator, user_sim, tool_sim, judge_sim, pool, *, client=None,
               servers: list[subprocess.Popen] | None = None, refill: TaskRefill = TaskRefill(),
               oracle=None):
    self.user, self.tools, self.judge, self.oracle = user_sim, tool_sim, judge_sim, oracle
    self.generator, self.pool, self.client = generator, pool, client
    self.servers = list(servers or [])
    self.refill = refill
    self.counters: collections.Counter = collections.Counter()

  async def make_tasks(self, knobs_list, seed: int,
                       easier: Callable[[int], Sequence[Any]] | None = None) -> list[tasks.Task]:
    """One task per knobs, tools sampled from the pool. A short batch is refilled from
    `easier(n)` knobs (refill.oversample x the missing count a round, up to refill.rounds
    rounds); what is still missing is counted (`world/tasks/short`), never padded."""
    got = await self._generate(knobs_list, seed)
    for r in range(self.refill.rounds if easier is not None else 0):
      missing = len(knobs_list) - len(got)
      if missing <= 0:
        break
      extra = await self._generate(easier(self.refill.oversample * missing),
                                   retry_seed(seed, r + 1), avoid=got)
      got += extra[:missing]
      self.counters["tasks/refilled"] += min(missing, len(extra))
    self.counters["tasks/short"] += len(knobs_list) - len(got)
    return got

  async def _generate(self, knobs_list, seed: int, avoid: Sequence[tasks.Task] = ()):
    """One round of generation; a simulator outage is waited out (counted) for up to
    refill.outage_wait_s, then a SimulatorError naming the endpoint and the time waited."""
    requests = tasks.sample_requests(self.pool, knobs_list, np.random.default_rng(seed))
    waited, sleep = 0.0, min(1.0, self.refill.max_sleep_s)
    while True:
      try:
        batch = await self.generator.generate_batch(
            requests, avoid_queries=[t.first_user_query for t in avoid])
        break
      except SimulatorError as e:
        if waited >= self.refill.outage_wait_s:
          raise SimulatorError(e.endpoint, e.cause, f"task generation gave up after waiting "
                               f"{waited:.0f}s (world.task_refill.outage_wait_s="
                               f"{self.refill.outage_wait_s:g}): {e.message}") from e
        self.counters["tasks/outage_waits"] += 1
        logging.warning("task generation: %s; retrying in %.0fs (%.0fs waited so far)", e,
                        sleep, waited)
        await asyncio.sleep(sleep)
        waited, sleep = waited + sleep, min(2 * sleep, self.refill.max_sleep_s)
    for index, reason in batch.failures:  # loud: why a task is missing, not only how many
      logging.warning("task %d not generated: %s", index, reason[:2000])
    self.counters["tasks/failed"] += len(batch.failures)
    self.counters["tasks/generated"] += len(batch.tasks)
    return batch.tasks

  async def make_validation_tasks(self, knobs_list, seed: int) -> list[tasks.Task]:
    """The fixed validation set: the doubles' held-out split (tasks no training step draws), or,
    in an LM world, tasks generated like any others from a seed no training step uses."""
    if isinstance(self.generator, doubles.TaskGeneratorDouble):
      return doubles.heldout_tasks(len(knobs_list), seed, list(knobs_list))
    return await self.make_tasks(knobs_list, seed)

  def stats(self) -> dict[str, float]:
    out = {f"world/{k}": float(v) for k, v in self.counters.items()}
    if self.client is not None:
      out.update({f"simulator/{k}": float(v) for k, v in self.client.stats().items()})
    return out

  async def aclose(self) -> None:
    if self.client is not None:
      await self.client.aclose()
    for server in self.servers:
      stop_server(server)


def start_embedded_servers(sim_cfg) -> tuple[tuple[str, ...], list[subprocess.Popen]]:
  """Starts the run's own simulator on 127.0.0.1: one JAX server (`simulator.backend="jax"`) or
  `simulator.processes` llama.cpp servers of one thread each ("llamacpp"; each serves one
  request at a time, so several spread the load); each gets SIGTERM if this process dies."""
  backend = sim_cfg.get("backend", "jax")
  if backend == "jax":
    url, proc = start_embedded_server(sim_cfg, _jax_server_cmd(sim_cfg, sim_cfg.get("port", 0)))
    return (url,), [proc]
  if backend != "llamacpp":
    raise ValueError(f"unknown simulator.backend {backend!r}: jax | llamacpp")
  started: list[tuple[str, subprocess.Popen]] = []
  try:
    for _ in range(int(sim_cfg.get("processes", 1))):
      started.append(start_embedded_server(sim_cfg, [
          sys.executable, "-m", LLAMACPP_SERVER, f"--model={sim_cfg.model}",
          "--host=127.0.0.1", f"--n_ctx={sim_cfg.cache_len}", "--n_threads=1",
          f"--parent_pid={os.getpid()}"]))
  except BaseException:
    for _, proc in started:
      stop_server(proc)
    raise
  return tuple(u for u, _ in started), [p for _, p in started]


def _jax_server_cmd(sim_cfg, port: int) -> list[str]:
  cmd = [sys.executable, "-m", JAX_SERVER, f"--model={sim_cfg.model}",
         "--host=127.0.0.1", f"--num_slots={sim_cfg.num_slots}",
         f"--cache_len={sim_cfg.cache_len}", f"--parent_pid={os.getpid()}"]
  if sim_cfg.get("tokenizer"):
    cmd.append(f"--tokenizer={sim_cfg.tokenizer}")
  if sim_cfg.get("dtype"):
    cmd.append(f"--dtype={sim_cfg.dtype}")
  return cmd + ([f"--port={port}"] if port else [])


def start_embedded_server(sim_cfg, cmd: list[str]) -> tuple[str, subprocess.Popen]:
  """Runs one server command (a free port added unless it names one) until /health answers."""
  if not any(a.startswith("--port=") for a in cmd):
    cmd = [*cmd, f"--port={free_port()}"]
  port = int(next(a for a in cmd if a.startswith("--port=")).split("=", 1)[1])
  log = open(pathlib.Path(sim_cfg.get("log_dir", ".")) / "simulator_server.log", "ab")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env())
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + float(sim_cfg.get("startup_timeout_s", 600))
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"embedded simulator server exited with {proc.returncode} during "
                         f"start-up; see {log.name}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return url, proc
    except httpx.HTTPError:
      pass
    time.sleep(1.0)
  stop_server(proc)
  raise TimeoutError(f"embedded simulator server not healthy at {url} after start-up timeout")


def _server_env() -> dict[str, str]:
  """This environment, with the checkout this process imported trustee_jax from first on
  PYTHONPATH (unless it came from site-packages), so that `python -m trustee_jax.serving` runs
  the same code, installed or not."""
  root = pathlib.Path(__file__).resolve().parent.parent  # holds trustee_jax/
  env = dict(os.environ)
  if root in {pathlib.Path(p).resolve()
              for p in [*site.getsitepackages(), site.getusersitepackages()]}:
    return env  # installed: the child finds it where this process did
  rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
  env["PYTHONPATH"] = os.pathsep.join([str(root), *rest])
  return env


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def stop_server(proc: subprocess.Popen | None, timeout_s: float = 30.0) -> None:
  """SIGTERM, `timeout_s` to finish gracefully, then SIGKILL; a finished process is left be."""
  if proc is None or proc.poll() is not None:
    return
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def check_ablations(cfg) -> None:
  """The environment ablations hide fields from LM roles; the rule-based doubles and the judge
  modes that check calls against the expected ones would silently ignore or need them."""
  ablate = tuple(cfg.rollout.get("ablate", ()))
  if ablate and cfg.simulator.mode == "doubles":
    raise ValueError(f"rollout.ablate={ablate} needs an LM world: the doubles ignore the fields")
  if "expected_tool_calls" in ablate and cfg.world.judge.get("mode", "lm") != "lm":
    raise ValueError(f"rollout.ablate names expected_tool_calls, which judge.mode="
                     f"{cfg.world.judge.mode!r} checks the calls against; use judge.mode='lm'")


async def build_world(cfg) -> SimWorld:
  """The world named by `cfg.simulator.mode`: "doubles", "embedded" or "url"."""
  check_ablations(cfg)
  sim, w = cfg.simulator, cfg.world
  task_source, oracle_name = w.get("task_source", "lm"), w.get("oracle", "")
  if task_source not in ("lm", "rule") or oracle_name not in ("", "rule"):
    raise ValueError(f"world.task_source must be 'lm' or 'rule' and world.oracle '' or 'rule', "
                     f"got {task_source!r} and {oracle_name!r}")
  if oracle_name and sim.mode != "doubles" and task_source != "rule":
    raise ValueError("world.oracle='rule' needs tasks that carry a rule oracle: "
                     "world.task_source='rule' (the LM task generator writes none)")
  oracle = doubles.JudgeDouble() if oracle_name else None
  if sim.mode == "doubles":
    judge_name = sim.get("doubles_judge", "rule")
    if judge_name not in doubles.JUDGES:
      raise ValueError(f"simulator.doubles_judge must be one of {sorted(doubles.JUDGES)}, "
                       f"got {judge_name!r}")
    return SimWorld(doubles.TaskGeneratorDouble(), doubles.UserDouble(),
                    doubles.ToolDouble(cfg.rollout.max_parallel_calls),
                    doubles.JUDGES[judge_name](), doubles.double_pool(),
                    refill=TaskRefill.from_dict(w.get("task_refill", {})), oracle=oracle)
  servers = []
  if sim.mode == "embedded":
    urls, servers = await asyncio.to_thread(start_embedded_servers, sim)
  elif sim.mode == "url":
    urls = tuple(sim.urls)
  else:
    raise ValueError(f"unknown simulator.mode {sim.mode!r}: doubles | embedded | url")
  client = SimulatorClient(ClientConfig(
      urls=urls, api_key=sim.get("api_key") or None, timeout_s=sim.timeout_s,
      max_retries=sim.max_retries, max_concurrency=sim.max_concurrency,
      json_mode=sim.get("json_mode", "constrained")))
  if task_source == "rule":  # the home family's tasks and tools; the LM plays the other roles
    generator, pool = doubles.TaskGeneratorDouble(w.task.to_dict()), doubles.double_pool()
  else:
    generator = tasks.TaskGenerator(client, w.task.to_dict())
    pool = (tools_pool.load_pool(w.tool_pool, lenient=w.get("lenient_pool", False))
            if w.get("tool_pool") else tools_pool.load_shipped_pool())
  roles = (generator, user.UserSimulator(client, w.user.to_dict()),
           tools.ToolSimulator(client, w.tools.to_dict()), judge.Judge(client, w.judge.to_dict()))
  return SimWorld(*roles, pool, client=client, servers=servers,
                  refill=TaskRefill.from_dict(w.get("task_refill", {})), oracle=oracle)
