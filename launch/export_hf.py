"""Exports a run's trained policy as a Hugging Face directory.

  python launch/export_hf.py --workdir runs/demo --out exports/demo [--step N] [--dtype bfloat16]
  python launch/export_hf.py --base_model smollm2 --out exports/smollm2   # the untrained base
  python launch/export_hf.py --base_model qwen2.5-coder-0.5b --out exports/qwen-coder-0.5b

OUT gets config.json, model safetensors, the tokenizer with the chat template the policy was
trained with, and generation_config.json: transformers loads it unchanged
(AutoModelForCausalLM.from_pretrained(OUT)), and SGLang or vLLM serve it.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from trustee_jax.models.packaged import MODELS  # noqa: E402  (light: no JAX)

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_BASE = flags.DEFINE_string("base_model", None, "Instead of --workdir: an untrained policy as "
                            f"a run names it (a packaged GGUF: {', '.join(MODELS)}; an HF "
                            "directory; a named config).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "With --base_model and a named config: its "
                                 "tokenizer (default: qwen3 for Qwen shapes, else smollm2).")
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weights dtype in the safetensors (default: the trained one).")


def main(argv):
  del argv
  from trustee_jax import export  # after flags: keeps --help fast
  if (_WORKDIR.value is None) == (_BASE.value is None):
    raise app.UsageError("give exactly one of --workdir and --base_model")
  try:
    if _WORKDIR.value:
      out = export.export_hf(_WORKDIR.value, _OUT.value, _STEP.value, dtype=_DTYPE.value)
    else:
      out = export.export_base(_BASE.value, _OUT.value, tokenizer=_TOKENIZER.value,
                               dtype=_DTYPE.value)
  except export.ExportError as e:
    raise SystemExit(f"export failed: {e}") from e
  record = (out / "trustee_export.json").read_text()
  print(f"exported {record.strip()}\n  to {out}")
  print(f"  load:  transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
  print(f"  serve: python launch/serve_simulator.py --model {out}")


if __name__ == "__main__":
  app.run(main)
