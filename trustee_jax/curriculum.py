"""Adaptive task curriculum: a pytree state, its update from batch rewards, and per-task knobs.

Reference (JamyDon/TRUSTEE, `recipe/trustee/utils/dataset/curriculum.py`): one float level D in
[1, level_max]; after each step D += step when the batch-mean final reward is >= the upper threshold,
else D -= step when it is <= the lower one (floored at 1). Each aspect is `floor(m * D)` clipped to its
range (criteria `1 + floor(m * D)`); pinned ("fixed") aspects use D = level_max; with probability eps
the soft aspects are drawn uniformly over their whole range. Here the level is an int32 (the reference
float level only ever takes integer values from integer steps), aspect values come from a table built
in Python float64 from the static config (so `floor(m * D)` matches the reference bit for bit and the
jitted code only indexes), and one soft-curriculum coin is drawn per task (the reference flips two
independent coins per task, one when sampling tools and one for the task prompt).
"""
import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trustee_jax import config_dataclass

ASPECTS = ("num_tools", "num_expected_calls", "persona_level", "ambiguity_level", "expected_turns",
           "system_prompt_level", "num_criteria", "max_user_turns", "max_assistant_turns",
           "max_tool_turns")
MODES = ("level", "target_success", "per_aspect")

# The reference's config keys for the same aspects (its `multipliers` and `fixed_aspects`).
_ALIASES = (("expected_tool_calls", "num_expected_calls"), ("user_persona", "persona_level"),
            ("query_ambiguity", "ambiguity_level"), ("expected_turns_level", "expected_turns"),
            ("system_prompt", "system_prompt_level"), ("user_persona_level", "persona_level"),
            ("query_ambiguity_level", "ambiguity_level"))

# TRUSTEE's released multipliers (`recipe/trustee/config/config.yaml`).
REFERENCE_MULTIPLIERS = (("num_tools", 0.10), ("num_expected_calls", 0.03), ("persona_level", 0.02),
                         ("ambiguity_level", 0.02), ("expected_turns", 0.02),
                         ("system_prompt_level", 0.03), ("num_criteria", 0.04),
                         ("max_user_turns", 0.03), ("max_assistant_turns", 0.06),
                         ("max_tool_turns", 0.03))
SOFT_ASPECTS = ("num_tools", "num_expected_calls", "persona_level", "ambiguity_level",
                "expected_turns")


def canonical_aspect(name: str) -> str:
  """Maps a reference aspect key (e.g. `user_persona`) to this module's name; loud on unknowns."""
  name = dict(_ALIASES).get(name, name)
  if name not in ASPECTS:
    raise ValueError(f"unknown curriculum aspect {name!r}; known: {ASPECTS}")
  return name


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
  """Static curriculum settings (hashable, so jitted functions take it as a static argument).

  mode: "level" (the reference), "target_success" (move the level to hold an EMA of the batch
  success rate within `target_success +- target_tolerance`), "per_aspect" (one level per aspect:
  on success the least advanced aspect rises, on failure the most advanced falls back).
  caps: optional upper bounds per aspect on top of the built-in ranges (e.g. num_criteria 2).
  """
  mode: str = "level"
  level_min: int = 1
  level_max: int = 100
  level_init: int = 1
  step: int = 3
  threshold_up: float = 0.5
  threshold_down: float = 0.0
  update_every: int = 1
  multipliers: tuple[tuple[str, float], ...] = REFERENCE_MULTIPLIERS
  caps: tuple[tuple[str, int], ...] = ()
  epsilon: float = 0.5
  soft_aspects: tuple[str, ...] = SOFT_ASPECTS
  pinned: tuple[str, ...] = ()
  min_turns: int = 1
  target_success: float = 0.5
  target_tolerance: float = 0.1
  success_threshold: float = 0.5
  ema_decay: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"curriculum mode {self.mode!r} is not one of {MODES}")
    if not 1 <= self.level_min <= self.level_init <= self.level_max:
      raise ValueError(f"need 1 <= level_min <= level_init <= level_max, got "
                       f"{self.level_min}, {self.level_init}, {self.level_max}")
    if self.step < 0 or self.update_every < 1 or self.min_turns < 0:
      raise ValueError("step >= 0, update_every >= 1 and min_turns >= 0 are required")
    if self.threshold_down > self.threshold_up:
      raise ValueError(f"threshold_down {self.threshold_down} > threshold_up {self.threshold_up}")
    if not 0.0 <= self.epsilon <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
      raise ValueError("epsilon must lie in [0, 1] and ema_decay in [0, 1)")
    names = [n for n, _ in self.multipliers]
    if sorted(names) != sorted(ASPECTS):
      raise ValueError(f"multipliers must name each aspect once: got {names}, need {ASPECTS}")
    if any(m < 0 or not math.isfinite(m) for _, m in self.multipliers):
      raise ValueError(f"multipliers must be finite and >= 0 (knobs rise with the level): "
                       f"{self.multipliers}")
    for name in (*self.soft_aspects, *self.pinned, *(n for n, _ in self.caps)):
      if name not in ASPECTS:
        raise ValueError(f"unknown curriculum aspect {name!r}; known: {ASPECTS}")

  @classmethod
  def from_dict(cls, d: Any) -> "CurriculumConfig":
    """Builds from a mapping or ml_collections ConfigDict; accepts the reference's aspect names
    (multipliers and caps as {aspect: value}; aspects a multipliers mapping omits keep the
    reference's). Unknown keys are an error."""
    def multipliers(v):
      given = {canonical_aspect(k): float(m) for k, m in dict(v).items()}
      return tuple((n, given.get(n, m)) for n, m in REFERENCE_MULTIPLIERS)
    aspects = lambda v: tuple(canonical_aspect(n) for n in v)
    return config_dataclass.from_config(cls, d, block="curriculum", convert={
        "multipliers": multipliers, "soft_aspects": aspects, "pinned": aspects,
        "caps": lambda v: tuple((canonical_aspect(k), int(c)) for k, c in dict(v).items())})

  def multiplier(self, name: str) -> float:
    return dict(self.multipliers)[name]


@flax.struct.dataclass
class CurriculumState:
  """Checkpointed curriculum state. `level` is int32 [] (or [len(ASPECTS)] in per_aspect mode)."""
  level: jax.Array
  success_ema: jax.Array
  steps_since_update: jax.Array


@flax.struct.dataclass
class TaskKnobs:
  """Per-task difficulty knobs, int32 arrays of shape [batch]; `level` and `soft` are for logging.

  persona_level: 0 expert, 1 beginner, 2 novice. system_prompt_level: 0 detailed, 1 medium,
  2 brief, 3 bare "helpful assistant". num_criteria: judge criteria that apply, 1..5.
  ambiguity_level / expected_turns: 0..2. `soft` is 1 where the soft-curriculum coin fired.
  """
  num_tools: Any
  num_expected_calls: Any
  persona_level: Any
  ambiguity_level: Any
  expected_turns: Any
  system_prompt_level: Any
  num_criteria: Any
  max_user_turns: Any
  max_assistant_turns: Any
  max_tool_turns: Any
  level: Any = 0
  soft: Any = 0

  @property
  def batch_size(self) -> int:
    return int(np.shape(self.num_tools)[0])

  def task(self, i: int) -> dict[str, int]:
    """Task i's knobs as Python ints (aspects plus `level` and `soft`)."""
    out = {}
    for f in dataclasses.fields(self):
      value = np.asarray(getattr(self, f.name))
      out[f.name] = int(value if value.ndim == 0 else value[i])
    return out

  def unbatch(self) -> list["TaskKnobs"]:
    """One TaskKnobs of Python ints per task."""
    return [TaskKnobs(**self.task(i)) for i in range(self.batch_size)]


def _bounds(cfg: CurriculumConfig, name: str) -> tuple[int, int, int | None]:
  """(offset, lowest, highest or None) of an aspect, as in the reference's `_get_difficulty_params`."""
  offset, lo, hi = {
      "num_tools": (0, 1, None), "num_expected_calls": (0, 1, None),
      "persona_level": (0, 0, 2), "ambiguity_level": (0, 0, 2), "expected_turns": (0, 0, 2),
      "system_prompt_level": (0, 0, 3), "num_criteria": (1, 1, 5),
      "max_user_turns": (0, cfg.min_turns, None),
      "max_assistant_turns": (0, 2 * cfg.min_turns, None),
      "max_tool_turns": (0, cfg.min_turns, None)}[name]
  cap = dict(cfg.caps).get(name)
  if cap is not None:
    if cap < lo:
      raise ValueError(f"cap {cap} on {name} is below its minimum {lo}")
    hi = cap if hi is None else min(hi, cap)
  return offset, lo, hi


def aspect_value(cfg: CurriculumConfig, name: str, level: int) -> int:
  """Python reference of one knob: clip(offset + floor(m * level), lo, hi) in float64 math."""
  offset, lo, hi = _bounds(cfg, name)
  value = max(lo, offset + math.floor(cfg.multiplier(name) * float(level)))
  return value if hi is None else min(hi, value)


def soft_range(cfg: CurriculumConfig, name: str) -> tuple[int, int]:
  """Inclusive range a soft draw covers: the bounded range, or [lo, value at level_max]."""
  _, lo, hi = _bounds(cfg, name)
  return lo, (hi if hi is not None else aspect_value(cfg, name, cfg.level_max))


def _table(cfg: CurriculumConfig) -> np.ndarray:
  """int32 [len(ASPECTS), level_max - level_min + 1]: every knob at every level."""
  levels = range(cfg.level_min, cfg.level_max + 1)
  return np.array([[aspect_value(cfg, a, lv) for lv in levels] for a in ASPECTS], np.int32)


def init_state(cfg: CurriculumConfig) -> CurriculumState:
  """The starting state: every level at level_init, the success EMA at the target."""
  shape = (len(ASPECTS),) if cfg.mode == "per_aspect" else ()
  return CurriculumState(level=jnp.full(shape, cfg.level_init, jnp.int32),
                         success_ema=jnp.asarray(cfg.target_success, jnp.float32),
                         steps_since_update=jnp.zeros((), jnp.int32))


def aspect_levels(cfg: CurriculumConfig, state: CurriculumState) -> jax.Array:
  """int32 [len(ASPECTS)]: the level each aspect is read at (pinned aspects at level_max)."""
  levels = jnp.broadcast_to(jnp.asarray(state.level, jnp.int32), (len(ASPECTS),))
  pinned = np.array([a in cfg.pinned for a in ASPECTS])
  return jnp.where(pinned, cfg.level_max, levels)


def mean_level(cfg: CurriculumConfig, state: CurriculumState) -> jax.Array:
  """Scalar int32 level for logging: the level, or the floor of the mean unpinned aspect level."""
  if cfg.mode != "per_aspect":
    return jnp.asarray(state.level, jnp.int32)
  free = np.array([a not in cfg.pinned for a in ASPECTS])
  if not free.any():
    return jnp.asarray(cfg.level_max, jnp.int32)
  return (jnp.sum(jnp.where(free, state.level, 0)) // int(free.sum())).astype(jnp.int32)


def _batch_mean(rewards: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(mean over valid entries, whether any entry is valid)."""
  rewards = jnp.asarray(rewards, jnp.float32).reshape(-1)
  valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid, bool).reshape(-1)
  n = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, rewards, 0.0)) / jnp.maximum(n, 1), n > 0


def _move_one_aspect(cfg: CurriculumConfig, levels: jax.Array, up: jax.Array,
                     down: jax.Array) -> jax.Array:
  """per_aspect: raise the least advanced free aspect (first on ties) on success, lower the most
  advanced (last on ties, so a failed raise is undone first) on failure."""
  free = np.array([a not in cfg.pinned for a in ASPECTS])
  can_up = free & (levels < cfg.level_max)
  can_down = free & (levels > cfg.level_min)
  i_up = jnp.argmin(jnp.where(can_up, levels, jnp.iinfo(jnp.int32).max))
  i_down = len(ASPECTS) - 1 - jnp.argmax(jnp.where(can_down, levels, -1)[::-1])
  one_up = jax.nn.one_hot(i_up, len(ASPECTS), dtype=jnp.int32) * (up & jnp.any(can_up))
  one_down = jax.nn.one_hot(i_down, len(ASPECTS), dtype=jnp.int32) * (down & jnp.any(can_down))
  return jnp.clip(levels + cfg.step * (one_up - one_down), cfg.level_min, cfg.level_max)


def update(cfg: CurriculumConfig, state: CurriculumState, batch_rewards: jax.Array,
           valid: jax.Array | None = None) -> CurriculumState:
  """Moves the level from one batch's final rewards (any shape; `valid` masks dropped episodes).

  As the reference: up by `step` if mean >= threshold_up, else down if mean <= threshold_down,
  clipped to [level_min, level_max], every `update_every` calls. A batch with no valid episode
  leaves the state unchanged (the reference would read a missing mean as 0 and step down).
  """
  mean, has = _batch_mean(batch_rewards, valid)
  counter = state.steps_since_update + has.astype(jnp.int32)
  due = has & (counter >= cfg.update_every)
  ema = state.success_ema
  if cfg.mode == "target_success":
    rewards = jnp.asarray(batch_rewards, jnp.float32)
    success = (rewards >= cfg.success_threshold).astype(jnp.float32)
    rate, _ = _batch_mean(success, valid)
    ema = jnp.where(has, cfg.ema_decay * ema + (1.0 - cfg.ema_decay) * rate, ema)
    up = ema >= cfg.target_success + cfg.target_tolerance
    down = ema <= cfg.target_success - cfg.target_tolerance
  else:
    up = mean >= cfg.threshold_up
    down = ~up & (mean <= cfg.threshold_down)
  up, down = up & due, down & due
  if cfg.mode == "per_aspect":
    level = _move_one_aspect(cfg, state.level, up, down)
  else:
    delta = cfg.step * (up.astype(jnp.int32) - down.astype(jnp.int32))
    level = jnp.clip(state.level + delta, cfg.level_min, cfg.level_max)
  return CurriculumState(level=level.astype(jnp.int32), success_ema=ema.astype(jnp.float32),
                         steps_since_update=jnp.where(due, 0, counter).astype(jnp.int32))


def base_knobs(cfg: CurriculumConfig, state: CurriculumState) -> dict[str, jax.Array]:
  """Scalar int32 knob per aspect at the current level(s), before any soft draw."""
  levels = aspect_levels(cfg, state) - cfg.level_min
  values = jnp.asarray(_table(cfg))[jnp.arange(len(ASPECTS)), levels]
  return {a: values[i] for i, a in enumerate(ASPECTS)}


def knobs(cfg: CurriculumConfig, state: CurriculumState, rng: jax.Array,
          batch_size: int) -> TaskKnobs:
  """Knobs for `batch_size` tasks; per task, with probability epsilon, the unpinned soft aspects
  are drawn uniformly over `soft_range` instead. Deterministic given rng; monotone in the level."""
  base = base_knobs(cfg, state)
  soft_names = [a for a in ASPECTS if a in cfg.soft_aspects and a not in cfg.pinned]
  out = {a: jnp.broadcast_to(base[a], (batch_size,)) for a in ASPECTS}
  coin = jnp.zeros((batch_size,), bool)
  if cfg.epsilon > 0 and soft_names:
    coin_key, draw_key = jax.random.split(rng)
    coin = jax.random.uniform(coin_key, (batch_size,)) < cfg.epsilon
    for a in soft_names:
      lo, hi = soft_range(cfg, a)
      draw = jax.random.randint(jax.random.fold_in(draw_key, ASPECTS.index(a)), (batch_size,),
                                lo, hi + 1, jnp.int32)
      out[a] = jnp.where(coin, draw, out[a])
  level = jnp.broadcast_to(mean_level(cfg, state), (batch_size,))
  return TaskKnobs(**{a: v.astype(jnp.int32) for a, v in out.items()}, level=level,
                   soft=coin.astype(jnp.int32))


def metrics(cfg: CurriculumConfig, state: CurriculumState) -> dict[str, jax.Array]:
  """Scalars to log: the level, each aspect's un-softened knob, the success EMA."""
  out = {"curriculum/level": mean_level(cfg, state),
         "curriculum/success_ema": state.success_ema}
  out.update({f"curriculum/{a}": v for a, v in base_knobs(cfg, state).items()})
  if cfg.mode == "per_aspect":
    out.update({f"curriculum/level_{a}": state.level[i] for i, a in enumerate(ASPECTS)})
  return out
