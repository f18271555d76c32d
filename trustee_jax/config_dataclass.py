"""The one strict builder of config dataclasses from config blocks.

Every frozen dataclass a run builds from a block of its config (`rollout`, `grpo`, `curriculum`,
`world.task`, `world.user`, `world.tools`, `world.judge`) goes through `from_config`: a key the
dataclass lacks is an error naming the key, the block and the known fields, so a typo is never
silently dropped; a value of the wrong type for a bool/int/float/str field (optional or not) is
an error naming the key too. Keys a block carries for another reader are named at the call site
(`ignore`).
The defaults are `trustee_jax/default_config.py`'s; tests/test_config.py checks that the
dataclasses' own defaults agree with it.
"""
import dataclasses
import types
import typing
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


_SCALARS = (bool, int, float, str)


def _scalar_type(hint: Any) -> type | None:
  """bool/int/float/str for a field annotated so (or `X | None`); None for anything else."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if len(args) == 1 else None
  return hint if hint in _SCALARS else None


def type_problem(key: str, value: Any, hint: Any) -> str | None:
  """Why `value` cannot go in a field annotated `hint` (None when it can, or when the annotation
  is not a scalar one): ints are floats, bools are not numbers, None is left to the dataclass."""
  want = _scalar_type(hint)
  if want is None or value is None:
    return None
  if want is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif want is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok = isinstance(value, want)
  return None if ok else f"{key} must be {want.__name__}, got {value!r} ({type(value).__name__})"


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
  hints = typing.get_type_hints(cls)
  wrong = [p for k, v in kw.items() if (p := type_problem(k, v, hints.get(k)))]
  if wrong:
    raise error(f"{block or cls.__name__} config: {'; '.join(wrong)}")
  return cls(**kw)
