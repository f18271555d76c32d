"""The embedded simulator server: `python -m trustee_jax.serving` (trustee_jax/serving/__main__.py
has the flags and the details), kept here so that `python launch/serve_simulator.py ...` works.

  python launch/serve_simulator.py [--model smollm2|qwen2.5-coder-0.5b|HF_DIR|tiny-llama|...]
      [--dtype float32|bfloat16] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
      [--num_slots 16] [--cache_len 4096] [--parent_pid PID]
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from trustee_jax.serving.__main__ import cli  # noqa: E402

if __name__ == "__main__":
  cli()
