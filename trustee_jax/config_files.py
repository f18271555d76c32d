"""Config files (configs/*.py) loaded by path, as launch/train.py's `--config` reads them.

`path:arg` calls the file's `get_config(arg)` (big_vision style, e.g. `configs/qwen3_8b.py:gpu8`),
a bare path its `get_config()`. Configs are files, not a package: one that builds on another
(qwen3_8b.py on trustee_paper.py) loads it with `load_module`.
"""
import importlib.util
import os
import pathlib
import re
import types

import ml_collections


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """The config file at `path`, executed as a fresh module (its own name: no clash with an
  installed package or another config of the same stem)."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"no config file {path}")
  name = "trustee_config_" + re.sub(r"\W", "_", str(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config `spec` names: `path/to/file.py` or `path/to/file.py:arg`."""
  path, sep, arg = str(spec).partition(":")
  module = load_module(path)
  return module.get_config(arg) if sep else module.get_config()
