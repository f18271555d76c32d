"""The paper's ablations, one flag each on top of configs/trustee_paper.py:

  python launch/train.py --config configs/ablations.py:NAME --workdir runs/NAME

NAME is one of `names()`: the curriculum ablations `no_curriculum` (every aspect of every task
drawn uniformly over its whole range, the level never moves), `hard_curriculum` (the level pinned
at its maximum, 100), `soft_off` (no soft draws: every task at exactly the level's knobs) and
`pin_<aspect>` (that aspect held at the maximum level's value, the rest adaptive), and the
environment ablations `no_user_intent`, `no_user_persona`, `no_expected_tool_calls` (the field
hidden from the simulator roles that see it: rollout.ABLATIONS).
"""
import pathlib

from trustee_jax import config_files, curriculum

_PAPER = pathlib.Path(__file__).with_name("trustee_paper.py")


def _changes() -> dict[str, dict]:
  """NAME -> {block: {key: value}}: the one change each ablation makes to the paper config."""
  out = {"no_curriculum": {"curriculum": dict(step=0, epsilon=1.0,
                                              soft_aspects=curriculum.ASPECTS)},
         "hard_curriculum": {"curriculum": dict(level_init=100, level_max=100, step=0)},
         "soft_off": {"curriculum": dict(epsilon=0.0)},
         "no_user_intent": {"rollout": dict(ablate=("user_intent",))},
         "no_user_persona": {"rollout": dict(ablate=("user_persona",))},
         "no_expected_tool_calls": {"rollout": dict(ablate=("expected_tool_calls",))}}
  out.update({f"pin_{a}": {"curriculum": dict(pinned=(a,))} for a in curriculum.ASPECTS})
  return out


def names() -> list[str]:
  return sorted(_changes())


def get_config(name: str):
  changes = _changes()
  if name not in changes:
    raise ValueError(f"unknown ablation {name!r}; one of: {', '.join(names())}")
  c = config_files.get_config(_PAPER)
  for block, values in changes[name].items():
    c[block].update(values)
  return c
