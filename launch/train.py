"""Trains a policy with GRPO in the simulated world.

  python launch/train.py --config configs/demo.py --workdir runs/demo [--config.train.steps=5]

Reusing a workdir resumes from its newest complete checkpoint.
"""
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and "
                               "episodes go.", required=True)


def main(argv):
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per simulator call otherwise
  from trustee_jax import distributed, train  # after flags: keeps --help fast
  cfg = _CONFIG.value
  distributed.initialize_from_config(cfg.get("distributed"))  # before any device is touched
  workdir = pathlib.Path(_WORKDIR.value).absolute()
  if cfg.simulator.mode == "embedded":
    with cfg.unlocked():
      cfg.simulator.log_dir = str(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  shape = tuple(cfg.get("mesh", {}).get("shape", ()) or ())
  print(f"policy mesh (data, fsdp, tensor): {shape or 'none (one device)'}", flush=True)
  last = train.train(cfg, workdir)
  from trustee_jax.train_logging import step_table
  print("\n== trustee-jax run finished ==")
  print(step_table(workdir / "tb"))
  for key in ("train/loss", "train/kl_mean", "train/entropy_mean"):
    if key in last:
      print(f"  {key:24s} {last[key]:.4f}")
  print(f"  checkpoints   {workdir / 'checkpoints'}")
  print(f"  episodes      {workdir / 'episodes'}")
  print(f"  TensorBoard   tensorboard --logdir {workdir / 'tb'}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
