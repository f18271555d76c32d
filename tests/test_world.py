"""world.build_world: the run's own simulator servers started on 127.0.0.1 and stopped again."""
import asyncio
import importlib.util

import httpx
import pytest

from trustee_jax import rollout, world
from trustee_jax.default_config import default_config


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
