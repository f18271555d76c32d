"""The paper's ablations, one flag each on top of configs/trustee_paper.py:

  python launch/train.py --config configs/ablations.py:NAME --workdir runs/NAME

NAME is one of `names()`. As the reference's scripts (recipe/trustee/scripts/ablations/*.sh):
  no_curriculum        the level starts at its maximum, 100 (ablation_no_curriculum.sh:
                       level_initial=100; the update rule is unchanged)
  soft_off             no soft draws, epsilon 0 (ablation_soft_curriculum.sh, whose comment
                       calls this the hard curriculum)
  pin_tool, pin_turn, pin_user, pin_system_prompt, pin_criteria
                       one difficulty dimension's aspects held at the top level's values
                       (ablation_curriculum.sh's fixed_aspects groups)
  no_user_intent, no_user_persona, no_expected_tool_calls
                       the field hidden from the simulator roles that see it (rollout.ABLATIONS;
                       ablation_environment.sh's simulator.ablate_* flags)
and two of this project's: hard_curriculum (the level pinned at 100: it never moves) and
pin_<aspect> for each single aspect.
"""
import pathlib

from trustee_jax import config_files, curriculum

_PAPER = pathlib.Path(__file__).with_name("trustee_paper.py")

# The reference's five difficulty dimensions and their aspects (ablation_curriculum.sh).
DIMENSIONS = (("tool", ("num_tools", "num_expected_calls")),
              ("turn", ("expected_turns", "max_user_turns", "max_assistant_turns",
                        "max_tool_turns")),
              ("user", ("persona_level", "ambiguity_level")),
              ("system_prompt", ("system_prompt_level",)),
              ("criteria", ("num_criteria",)))


def _changes() -> dict[str, dict]:
  """NAME -> {block: {key: value}}: the one change each ablation makes to the paper config."""
  out = {"no_curriculum": {"curriculum": dict(level_init=100)},
         "hard_curriculum": {"curriculum": dict(level_init=100, step=0)},
         "soft_off": {"curriculum": dict(epsilon=0.0)},
         "no_user_intent": {"rollout": dict(ablate=("user_intent",))},
         "no_user_persona": {"rollout": dict(ablate=("user_persona",))},
         "no_expected_tool_calls": {"rollout": dict(ablate=("expected_tool_calls",))}}
  out.update({f"pin_{a}": {"curriculum": dict(pinned=(a,))} for a in curriculum.ASPECTS})
  out.update({f"pin_{d}": {"curriculum": dict(pinned=aspects)} for d, aspects in DIMENSIONS})
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
