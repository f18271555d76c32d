"""What a resume may change: the config check, pure, on hand-made configs."""
import json

import pytest

from trustee_jax.checkpoint import (CheckpointMismatchError, check_resumable, config_changes,
                                    flatten)

SAVED = {"seed": 0, "train": {"steps": 10, "optimizer": {"learning_rate": 1e-6}},
         "rollout": {"group_size": 8}, "log": {"episodes_every": 1}, "mesh": {"shape": [2, 1, 1]}}


def test_flatten_names_every_leaf_by_its_path():
  assert flatten(SAVED)["train.optimizer.learning_rate"] == 1e-6
  assert flatten(SAVED)["mesh.shape"] == [2, 1, 1]  # sequences are leaves


def test_steps_logging_and_topology_may_change_the_rest_may_not():
  running = json.loads(json.dumps(SAVED))
  running["train"]["steps"], running["log"]["episodes_every"] = 20, 5
  running["mesh"]["shape"] = (1, 1, 1)
  assert config_changes(SAVED, running) == {}
  running["train"]["optimizer"]["learning_rate"] = 1e-5
  running["rollout"]["group_size"] = 4
  running["seed"] = 1
  assert config_changes(SAVED, running) == {
      "rollout.group_size": (8, 4), "seed": (0, 1),
      "train.optimizer.learning_rate": (1e-6, 1e-5)}
  added = dict(SAVED, new_block={"x": 1})  # a field only one side has is a change too
  assert config_changes(SAVED, added) == {"new_block.x": (None, 1)}


def test_a_changed_learning_rate_is_refused_by_name_unless_allowed():
  running = json.loads(json.dumps(SAVED))
  running["train"]["optimizer"]["learning_rate"] = 3e-6
  with pytest.raises(CheckpointMismatchError, match=r"train\.optimizer\.learning_rate.*"
                                                    r"resume\.allow_changes"):
    check_resumable(json.dumps(SAVED), json.dumps(running))
  check_resumable(json.dumps(SAVED), running, allow=("train.optimizer.*",))  # on purpose
  check_resumable(SAVED, json.dumps(SAVED))  # the same config, either form


def test_a_field_added_since_the_checkpoint_is_no_change_at_its_default():
  """A checkpoint written before a config field existed resumes when the field holds its
  default; set to anything else, it is a change like any other."""
  defaults = {"rollout": {"group_size": 8, "ablate": ()}, "hardware": {"platform": ""}}
  running = json.loads(json.dumps(SAVED))
  running["rollout"]["ablate"], running["hardware"] = [], {"platform": ""}
  assert config_changes(SAVED, running, defaults=defaults) == {}
  running["rollout"]["ablate"] = ["user_intent"]
  assert config_changes(SAVED, running, defaults=defaults) == {
      "rollout.ablate": (None, ["user_intent"])}


def test_attention_kernel_and_a_cpu_smoke_run_may_change_on_resume():
  saved = {"model": {"attention_impl": "einsum"}, "hardware": {"allow_cpu": False}}
  assert config_changes(saved, {"model": {"attention_impl": "xla"},
                                "hardware": {"allow_cpu": True}}) == {}
