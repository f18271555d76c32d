"""run_settings: budgets refused by name before a run starts, on every shipped config."""
import pathlib

import pytest

from trustee_jax import config_files, run_settings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str, **overrides):
  """configs/NAME.py's config (NAME may carry the file's argument) with dotted overrides."""
  stem, sep, arg = name.partition(":")
  cfg = config_files.get_config(f"{ROOT / 'configs' / stem}.py{sep}{arg}")
  cfg.update_from_flattened_dict(overrides)
  return cfg


SHIPPED_CONFIGS = sorted({p.stem for p in (ROOT / "configs").glob("*.py")}
                         - {"qwen3_8b", "ablations"}
                         | {"learning:smollm2", "learning:qwen2.5-coder-0.5b,lm", "qwen3_8b:gpu",
                            "qwen3_8b:gpu8", "qwen3_8b:tpu", "ablations:no_curriculum",
                            "ablations:hard_curriculum"})


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_has_budgets_that_fit(name):
  run_settings.check_budgets(load_config(name))


@pytest.mark.parametrize("key,value,match", [
    ("train.steps", -1, "train.steps must be at least 1"),
    ("train.micro_batch", 0, "train.micro_batch must be at least 1"),
    ("engine.cache_len", 1024, "engine.cache_len"),
    ("train.length_buckets", (512, 1024), "length_buckets"),
    ("rollout.max_turn_tokens", 1536, "max_turn_tokens")])
def test_budgets_that_cannot_hold_are_refused_by_name(key, value, match):
  with pytest.raises(ValueError, match=match):
    run_settings.check_budgets(load_config("test", **{key: value}))


def test_the_engine_cache_bounds_episodes_only_for_the_in_process_engine():
  run_settings.check_budgets(load_config("test", **{"engine.cache_len": 1024, "engine.backend": "sglang"}))
