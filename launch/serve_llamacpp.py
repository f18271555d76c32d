"""llama.cpp's OpenAI-compatible server behind this project's shim:
`python -m trustee_jax.serving.llamacpp` (trustee_jax/serving/llamacpp.py has the flags and the
details), kept here so that `python launch/serve_llamacpp.py ...` works.

  python launch/serve_llamacpp.py --model qwen2.5-coder-0.5b|FILE.gguf [--host 127.0.0.1]
      [--port 8000] [--n_ctx 4096] [--n_threads 2] [--logits_all] [--api_key KEY]
      [--parent_pid PID]
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from trustee_jax.serving.llamacpp import cli  # noqa: E402

if __name__ == "__main__":
  cli()
