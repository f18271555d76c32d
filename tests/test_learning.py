"""The real loop with a learning signal: the pretrained Qwen2.5-Coder-0.5B policy (LoRA) in the
rule-checked home world, through `launch/train.py` and `configs/learning.py` as a user runs them.

The tiny random policy of configs/test.py never writes a call, so its rewards are all -1 and its
advantages all 0: the tests that use it check plumbing, not learning. This one checks that the
loop trains on a signal: groups whose rewards differ, non-zero advantages, adapters that move
by more than weight decay could, and validation logged before and after. Whether the policy
gets better is benchmarks/learning.py's question, with its controls (see benchmarks/README.md).
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from trustee_jax.models import packaged
from trustee_jax.train_logging import scalar_series

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 1
# One step (it must carry signal), validated before and after on one wave of the engine's 8
# slots: 12 tasks took two (about 6.5 min a validation on the AMD EPYC CI machine, a third of
# this test); the test checks validation is logged, not its level.
VAL_TASKS = 4


def _installed() -> bool:
  return "qwen2.5-coder-0.5b" in packaged.installed_packaged_models()


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.skipif(not _installed(), reason="Qwen2.5-Coder-0.5B part packages not installed "
                    "(bash install.sh installs them)")
def test_the_loop_trains_on_a_signal(tmp_path):
  cmd = [sys.executable, str(ROOT / "launch" / "train.py"),
         f"--config={ROOT / 'configs' / 'learning.py'}:qwen2.5-coder-0.5b",
         f"--workdir={tmp_path}", f"--config.train.steps={STEPS}",
         f"--config.validation.every={STEPS}", f"--config.validation.num_tasks={VAL_TASKS}",
         f"--config.checkpoint.every={STEPS}"]
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert "groups w/ signal" in proc.stdout  # the closing per-step summary
  s = scalar_series(tmp_path / "tb", ["reward/zero_variance_groups", "train/nonzero_advantage_frac",
                                      "episodes/with_valid_tool_call", "val/success_rate",
                                      "reward/std"])
  signal = [s["train/nonzero_advantage_frac"][k] > 0 for k in range(1, STEPS + 1)]
  assert sum(signal) > STEPS / 2, f"non-zero advantages in {sum(signal)} of {STEPS} steps: {s}"
  assert all(s["reward/zero_variance_groups"][k] < 1 for k in range(1, STEPS + 1)
             if s["train/nonzero_advantage_frac"][k] > 0)
  assert max(s["episodes/with_valid_tool_call"].values()) > 0  # real calls in the episodes
  assert sorted(s["val/success_rate"]) == [0, STEPS]  # before training and after
  # The adapters moved: B starts at zero, and only a gradient step (not weight decay) moves it.
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
  state = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  b = [np.abs(np.asarray(v)).max() for k, v in _flat(state["params"])
       if k.removesuffix("/value").endswith("_b")]
  assert b and max(b) > 1e-6, "LoRA B matrices are still zero: no update reached the adapters"


def _flat(tree, prefix=""):
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      yield from _flat(v, name)
    else:
      yield name, v
