"""Exports a run's trained policy as a Hugging Face directory.

  python launch/export_hf.py --workdir runs/demo --out exports/demo [--step N] [--dtype bfloat16]
  python launch/export_hf.py --base_model smollm2 --out exports/smollm2   # the untrained base
  python launch/export_hf.py --base_model qwen2.5-coder-0.5b --out exports/qwen-coder-0.5b
  python launch/export_hf.py --workdir runs/lora --format=adapter \
      --base_dir exports/qwen-coder-0.5b --out exports/lora   # a LoRA run as a PEFT adapter

OUT gets config.json, model safetensors, the tokenizer with the chat template the policy was
trained with, and generation_config.json: transformers loads it unchanged
(AutoModelForCausalLM.from_pretrained(OUT)), and SGLang or vLLM serve it. --format=adapter
writes a LoRA run's adapters as peft does (adapter_config.json, adapter_model.safetensors) for
vLLM / SGLang --enable-lora or peft.PeftModel.from_pretrained; --format=both writes OUT/merged
and OUT/adapter.
"""
import json
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
_FORMAT = flags.DEFINE_enum("format", "merged", ["merged", "adapter", "both"],
                            "With --workdir: merged weights, a PEFT adapter (LoRA runs only), "
                            "or both (OUT/merged, OUT/adapter).")
_BASE_DIR = flags.DEFINE_string("base_dir", None, "With --format=adapter|both: the base's HF "
                                "directory (e.g. exported with --base_model), checked and "
                                "written as base_model_name_or_path (default: the run's "
                                "model name).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weights dtype in the safetensors (default: the trained one).")


def main(argv):
  del argv
  from trustee_jax import export  # after flags: keeps --help fast
  if (_WORKDIR.value is None) == (_BASE.value is None):
    raise app.UsageError("give exactly one of --workdir and --base_model")
  if _BASE.value and (_FORMAT.value != "merged" or _BASE_DIR.value):
    raise app.UsageError("--format=adapter|both and --base_dir need --workdir (a LoRA run)")
  if _BASE_DIR.value and _FORMAT.value == "merged":
    raise app.UsageError("--base_dir is for the adapter: add --format=adapter or --format=both")
  out = pathlib.Path(_OUT.value)
  try:
    if _BASE.value:
      report(export.export_base(_BASE.value, out, tokenizer=_TOKENIZER.value,
                                dtype=_DTYPE.value))
      return
    if _FORMAT.value != "merged":  # first: refuses a full fine-tune before writing anything
      adapter_out = out / "adapter" if _FORMAT.value == "both" else out
      report(export.export_adapter(_WORKDIR.value, adapter_out, _STEP.value,
                                   base_dir=_BASE_DIR.value, dtype=_DTYPE.value))
    if _FORMAT.value != "adapter":
      merged_out = out / "merged" if _FORMAT.value == "both" else out
      report(export.export_hf(_WORKDIR.value, merged_out, _STEP.value, dtype=_DTYPE.value))
  except export.ExportError as e:
    raise SystemExit(f"export failed: {e}") from e


def report(out: pathlib.Path) -> None:
  """How to load and serve what was written to `out`."""
  record = json.loads((out / "trustee_export.json").read_text())
  print(f"exported {json.dumps(record)}\n  to {out}")
  if record.get("format") == "adapter":
    print(f"  load:  peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
          f"{record['base']!r}), {str(out)!r})")
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    if not pathlib.Path(record["base"]).is_dir():
      print(f"  note:  base_model_name_or_path is the run's model name {record['base']!r}, not "
            f"a directory; export it (--base_model {record['model']} --out DIR) and pass "
            "--base_dir DIR so servers and peft find the exact base")
    print(f"  serve: vllm serve {record['base']} --enable-lora --max-lora-rank {rank} "
          f"--lora-modules policy={out}")
    return
  print(f"  load:  transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
  print(f"  serve: python launch/serve_simulator.py --model {out}")


if __name__ == "__main__":
  app.run(main)
