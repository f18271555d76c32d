"""The one strict builder of config dataclasses from config blocks.

Every frozen dataclass a run builds from a block of its config (`rollout`, `grpo`, `curriculum`,
`world.task`, `world.user`, `world.tools`, `world.judge`) goes through `from_config`: a key the
dataclass lacks is an error naming the key, the block and the known fields, so a typo is never
silently dropped. Keys a block carries for another reader are named at the call site (`ignore`).
The defaults are `trustee_jax/default_config.py`'s; tests/test_config.py checks that the
dataclasses' own defaults agree with it.
"""
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def as_dict(cfg: Any) -> dict[str, Any]:
  """A config block (ml_collections ConfigDict, mapping or None) as a plain dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):  # ConfigDict: nested blocks and references resolved
    return dict(cfg.to_dict())
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"a config block must be a mapping or a ConfigDict, got {type(cfg).__name__}")


def from_config(cls: type[T], cfg: Any, *, block: str | None = None, ignore: Iterable[str] = (),
                convert: Mapping[str, Callable[[Any], Any]] | None = None,
                error: type[Exception] = ValueError) -> T:
  """`cls` from a config block: None gives the defaults, an instance of `cls` is returned as is.

  Keys in `ignore` belong to another reader of the block and are skipped; any other key that is
  not a field of `cls` raises `error` (a ValueError) naming it. `convert` maps a field name to a
  function applied to its given value (e.g. a list to a tuple) before `cls` is built."""
  if cfg is None:
    return cls()
  if isinstance(cfg, cls):
    return cfg
  d = as_dict(cfg)
  known = [f.name for f in dataclasses.fields(cls)]
  ignore = set(ignore)
  unknown = sorted(set(d) - set(known) - ignore)
  if unknown:
    also = f" (ignored here: {sorted(ignore)})" if ignore else ""
    raise error(f"unknown {block or cls.__name__} config keys {unknown}; known: {known}{also}")
  kw = {k: v for k, v in d.items() if k not in ignore}
  for name, fn in (convert or {}).items():
    if name in kw:
      kw[name] = fn(kw[name])
  return cls(**kw)
