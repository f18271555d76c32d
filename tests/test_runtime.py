"""runtime.py: workdir URIs stay URIs, and a config naming an accelerator refuses a CPU backend."""
import os
import pathlib
import types

import jax
import pytest

from trustee_jax import config_files, runtime

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU_CONFIGS = ("test.py", "demo.py", "learning.py")
ACCELERATOR_CONFIGS = {"trustee_paper.py": "gpu", "qwen3_8b.py:gpu": "gpu",
                       "qwen3_8b.py:gpu8": "gpu", "qwen3_8b.py:tpu": "tpu"}


def hardware(name: str):
  return config_files.get_config(str(ROOT / "configs" / name)).hardware


def test_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for uri in ("gs://x/y", "s3://bucket/runs/a"):
    path = runtime.run_path(uri)
    assert os.fspath(path) == uri and os.fspath(path / "tb") == f"{uri}/tb"
    assert os.fspath(runtime.run_path(path)) == uri  # idempotent on its own output
  assert os.fspath(runtime.run_path("runs/a")) == str(tmp_path / "runs" / "a")
  assert not list(tmp_path.iterdir())  # nothing made locally, no <cwd>/gs:/x/y
  with pytest.raises(ValueError, match="no filesystem for the scheme nope://"):
    runtime.run_path("nope://x/y")


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_configs_start_on_any_backend(name):
  for backend in ("cpu", "gpu", "tpu"):
    runtime.check_backend(hardware(name), backend)


@pytest.mark.parametrize("name", sorted(ACCELERATOR_CONFIGS))
def test_accelerator_configs_refuse_cpu_unless_allowed(name):
  hw, want = hardware(name), ACCELERATOR_CONFIGS[name]
  assert hw.platform == want
  runtime.check_backend(hw, want)
  with pytest.raises(runtime.BackendError, match=rf"needs a {want} backend.*is cpu.*"
                     rf"install.sh {want}.*hardware.allow_cpu=True"):
    runtime.check_backend(hw, "cpu")
  other = "tpu" if want == "gpu" else "gpu"
  with pytest.raises(runtime.BackendError, match=f"is {other}"):  # allow_cpu is for CPU only
    runtime.check_backend({**hw, "allow_cpu": True}, other)
  hw.lock()  # as launch/train.py's flags hold it: only existing keys can be set
  hw.allow_cpu = True  # --config.hardware.allow_cpu=True
  runtime.check_backend(hw, "cpu")


def test_an_unknown_platform_is_refused_by_name():
  with pytest.raises(ValueError, match="hardware.platform.*'cuda'"):
    runtime.check_backend({"platform": "cuda"}, "gpu")


def test_backend_summary_counts_device_kinds():
  devices = [types.SimpleNamespace(device_kind="H100")] * 2 + \
      [types.SimpleNamespace(device_kind="H200")]
  assert runtime.backend_summary("gpu", devices, 1, 3) == \
      "JAX backend gpu: 3 device(s) (2x H100, 1x H200), 1 on this process, 3 process(es)"
  assert "JAX backend cpu: 1 device(s)" in runtime.backend_summary(
      jax.default_backend(), jax.devices()[:1], 1, 1)


def test_device_memory_is_the_fullest_devices_or_none_on_cpu():
  gib = 1024 ** 3
  stats = [{"bytes_in_use": 2 * gib, "peak_bytes_in_use": 5 * gib, "bytes_limit": 80 * gib},
           {"bytes_in_use": 3 * gib, "peak_bytes_in_use": 4 * gib, "bytes_limit": 80 * gib}]
  devices = [types.SimpleNamespace(memory_stats=lambda s=s: s) for s in stats]
  assert runtime.device_memory(devices) == {"in_use": 3.0, "peak": 5.0, "limit": 80.0}
  assert runtime.device_memory(jax.local_devices()) is None  # CPU reports none
