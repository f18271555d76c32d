"""One source of defaults (default_config) and one strict builder (config_dataclass.from_config)."""
import dataclasses
import pathlib

import pytest

from trustee_jax import config_files, curriculum, grpo, lora, rollout, run_settings, world
from trustee_jax.config_dataclass import from_config
from trustee_jax.default_config import default_config, role_sampling
from trustee_jax.simulator import judge, tasks, tools, user

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Every dataclass a run builds from a block of its config, as the trainer and the world build it.
BLOCKS = {
    "rollout": rollout.RolloutConfig.from_dict,
    "grpo": grpo.GRPOConfig.from_dict,
    "curriculum": curriculum.CurriculumConfig.from_dict,
    "world.task": lambda b: from_config(tasks.TaskGenConfig, b, block="world.task"),
    "world.user": lambda b: from_config(user.UserConfig, b, block="world.user"),
    "world.tools": lambda b: from_config(tools.ToolSimConfig, b, block="world.tools"),
    "world.judge": lambda b: from_config(judge.JudgeConfig, b, block="world.judge"),
    "world.task_refill": world.TaskRefill.from_dict,
}
CLASSES = {"rollout": rollout.RolloutConfig, "grpo": grpo.GRPOConfig,
           "curriculum": curriculum.CurriculumConfig, "world.task": tasks.TaskGenConfig,
           "world.user": user.UserConfig, "world.tools": tools.ToolSimConfig,
           "world.judge": judge.JudgeConfig, "world.task_refill": world.TaskRefill}
SHIPPED = ["demo", "learning", "learning:smollm2", "learning:qwen2.5-coder-0.5b,lm", "test",
           "trustee_paper", "qwen3_8b:gpu", "qwen3_8b:gpu8", "qwen3_8b:tpu",
           "ablations:no_curriculum", "ablations:no_user_intent"]


def block_of(cfg, path: str):
  for part in path.split("."):
    cfg = cfg[part]
  return cfg


def load(name: str):
  stem, sep, arg = name.partition(":")
  return config_files.get_config(f"{ROOT / 'configs' / stem}.py{sep}{arg}")


def test_every_config_file_is_listed():
  assert {n.partition(":")[0] for n in SHIPPED} == {p.stem for p in (ROOT / "configs").glob("*.py")}


@pytest.mark.parametrize("path", sorted(BLOCKS))
def test_dataclass_defaults_are_default_config(path):
  """Every field default_config sets has that value as the dataclass default: building from
  the default block changes nothing."""
  block = block_of(default_config(), path)
  cls = CLASSES[path]
  built = BLOCKS[path](block)
  assert built == cls(), {k: (getattr(built, k), getattr(cls(), k)) for k in block.keys()
                          if getattr(built, k) != getattr(cls(), k)}
  assert set(block.keys()) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_every_dataclass(name):
  cfg = load(name)
  for path, build in BLOCKS.items():
    build(block_of(cfg, path).to_dict() if path.startswith("world.") else block_of(cfg, path))
  w = cfg.world  # the simulators, as world.build_world makes them (their own checks included)
  tasks.TaskGenerator(None, w.task.to_dict())
  user.UserSimulator(None, w.user.to_dict())
  tools.ToolSimulator(None, w.tools.to_dict())
  judge.Judge(None, w.judge.to_dict())
  if cfg.get("lora") and cfg.lora.enabled:  # as the trainer builds it (policy.lora_config)
    lora.LoraConfig.from_dict(cfg.lora)
  run_settings.check_budgets(cfg)


@pytest.mark.parametrize("path,key", [
    ("rollout", "max_turn_tokenz"), ("grpo", "clip"), ("curriculum", "stepp"),
    ("world.task", "max_atempts"), ("world.user", "temprature"), ("world.tools", "use_ledgr"),
    ("world.judge", "num_vote")])
def test_a_typo_key_is_an_error_naming_it_and_its_block(path, key):
  block = block_of(default_config(), path)
  block[key] = 1
  with pytest.raises(ValueError, match=key) as e:
    BLOCKS[path](block)
  assert "config keys" in str(e.value)
  assert path.split(".")[-1] in str(e.value).lower() or path in str(e.value)


def test_from_config_names_the_known_fields_and_skips_only_what_it_is_told():
  with pytest.raises(ValueError, match=r"unknown rollout config keys \['x'\]; known: \['group_size'"):
    from_config(rollout.RolloutConfig, {"x": 1, "group_size": 2}, block="rollout")
  built = from_config(rollout.RolloutConfig, {"x": 1, "group_size": 2}, ignore=("x",))
  assert built == rollout.RolloutConfig(group_size=2)
  assert from_config(rollout.RolloutConfig, None) == rollout.RolloutConfig()
  with pytest.raises(TypeError):
    from_config(rollout.RolloutConfig, 3)


def test_role_sampling_holds_the_fields_the_simulators_send():
  assert set(role_sampling(max_tokens=1)) == set(tasks.sampling_kwargs(user.UserConfig()))
  c = default_config()
  c.world.user.temperature = 0.7  # each role its own field, not one shared reference
  assert c.world.judge.temperature is None and c.world.task.temperature == 1.0
  assert from_config(user.UserConfig, c.world.user.to_dict()).temperature == 0.7


@pytest.mark.parametrize("name", ["trustee_paper", "qwen3_8b:gpu8", "qwen3_8b:tpu"])
def test_full_fine_tunes_keep_f32_masters_and_compute_in_bf16(name):
  cfg = load(name)
  assert (cfg.model.param_dtype, cfg.model.dtype) == ("float32", "bfloat16")


def test_the_8b_config_needs_a_hardware_variant():
  lora = load("qwen3_8b:gpu")  # the trained weights are the f32 adapters over a bf16 base
  assert lora.lora.enabled and lora.lora.param_dtype == "float32"
  with pytest.raises(ValueError, match="gpu8"):
    load("qwen3_8b")
  with pytest.raises(ValueError, match="gpu8"):
    load("qwen3_8b:h100")


def test_paper_config_leaves_no_role_sampling_to_the_server():
  """SGLang and vLLM fall back to different defaults (vLLM reads the model's generation config),
  so the reference run names every role's sampling."""
  cfg = load("trustee_paper")
  for role in ("task", "user", "tools", "judge"):
    unset = [k for k in role_sampling(1) if cfg.world[role][k] is None]
    assert not unset, (role, unset)
    assert (cfg.world[role].temperature, cfg.world[role].top_p, cfg.world[role].top_k) == (
        0.6, 0.95, 20)
  assert cfg.world.judge.frequency_penalty == 0.1 and cfg.world.task.max_tokens == 8192
  assert cfg.train.recompute_old_logprobs  # as verl's actor, before the first update
  assert cfg.rollout.enable_thinking and cfg.rollout.show_reasoning and cfg.world.task.thinking_prompt
  assert cfg.rollout.turn_limits == "reference"
  assert cfg.simulator.json_mode == "prompted"
  assert not any(cfg.world[r].extra_fields for r in ("user", "tools", "judge"))
