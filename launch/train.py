"""Trains a policy with GRPO in the simulated world.

  python launch/train.py --config configs/demo.py --workdir runs/demo [--config.train.steps=5]

Reusing a workdir resumes from its newest complete checkpoint. The workdir may be a URI
(--workdir gs://bucket/run: pip install -r requirements-gcs.txt). Other libraries'
INFO lines (orbax, jax, httpx) are shown only with -v 0 (or --verbosity=0); a config whose
hardware names a GPU or TPU refuses a CPU backend unless --config.hardware.allow_cpu=True.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and "
                               "episodes go: a directory or a URI (gs://bucket/run).",
                               required=True)


def main(argv):
  del argv
  from trustee_jax import distributed, runtime, train, train_logging  # after flags: fast --help
  if not flags.FLAGS["verbosity"].present:  # -v asks for every library's INFO lines
    logging.get_absl_handler().addFilter(
        train_logging.OwnInfoOnly((ROOT / "trustee_jax", ROOT / "launch")))
  cfg = _CONFIG.value
  distributed.initialize_from_config(cfg.get("distributed"))  # before any device is touched
  import jax
  logging.info("%s", runtime.backend_summary(jax.default_backend(), jax.devices(),
                                             jax.local_device_count(), jax.process_count()))
  runtime.check_backend(cfg.hardware, jax.default_backend())
  workdir = runtime.run_path(_WORKDIR.value)  # gs://... stays a URI
  if cfg.simulator.mode == "embedded":  # its server's log is a local file
    if runtime.is_uri(workdir):
      logging.info("simulator server log in %s (the workdir is remote)",
                   pathlib.Path(cfg.simulator.log_dir).absolute())
    else:
      with cfg.unlocked():
        cfg.simulator.log_dir = str(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  shape = tuple(cfg.get("mesh", {}).get("shape", ()) or ())
  print(f"policy mesh (data, fsdp, tensor): {shape or 'none (one device)'}", flush=True)
  last = train.train(cfg, workdir)
  print("\n== trustee-jax run finished ==")
  print(train_logging.step_table(workdir / "tb"))
  for key in ("train/loss", "train/kl_mean", "train/entropy_mean"):
    if key in last:
      print(f"  {key:24s} {last[key]:.4f}")
  print(f"  checkpoints   {workdir / 'checkpoints'}")
  print(f"  episodes      {workdir / 'episodes'}")
  print(f"  TensorBoard   tensorboard --logdir {workdir / 'tb'}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (a --config override naming no field, a value of the
  wrong type) said in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, a missing required flag
    sys.exit(f"launch/train.py: {e}")
  except (KeyError, AttributeError) as e:
    inner = e.args[0] if e.args else e  # ml_collections wraps a KeyError in the AttributeError
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    message = str(inner).replace("\n", " ")
    sys.exit(f"launch/train.py: a --config override names no config field: {message}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
