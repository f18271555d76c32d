"""Serves a frozen model over the OpenAI-compatible API (the embedded simulator server).

  python -m trustee_jax.serving [--model smollm2|qwen2.5-coder-0.5b|HF_DIR|tiny-llama|...]
      [--dtype float32|bfloat16] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
      [--num_slots 16] [--cache_len 4096] [--parent_pid PID]

Prints the base URL once it accepts requests. SIGTERM or SIGINT stop it gracefully (in-flight
requests get `--graceful_timeout_s` to finish, the rest fail). With --parent_pid it also stops
when that process dies, even by SIGKILL: on Linux the kernel sends SIGTERM
(prctl PR_SET_PDEATHSIG) when the parent exits, and a watchdog polls the pid everywhere.
The API key can also come from $TRUSTEE_SIMULATOR_API_KEY (kept out of `ps`).
`launch/serve_simulator.py` is the same command (a wrapper around `cli`). The flags are defined
when this module is imported, so import it only to run it.
"""
import os
import signal
import threading

from absl import app, flags

from trustee_jax.models.packaged import MODELS  # light: no JAX
from trustee_jax.serving.lifetime import die_with_parent  # light: no JAX

_MODEL = flags.DEFINE_string(
    "model", "smollm2", f"A packaged GGUF ({', '.join(MODELS)}), a Hugging Face directory, or a "
    "named config from trustee_jax/models/model_configs.py with random weights (e.g. tiny-llama).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Weights and compute dtype "
                           "(default: float32 for GGUF files and random shapes, the checkpoint's "
                           "for HF directories).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer source if not the model's own "
                                 "('smollm2', 'qwen3', a directory).")
_SERVED_NAME = flags.DEFINE_string("served_model_name", None, "Model name in replies "
                                   "(default: --model).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port).")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1.")
flags.DEFINE_alias("api-key", "api_key")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 16, "Requests decoded together.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 4096, "Context per slot (prompt + reply).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 4096, "Waiting requests before 429s.")
_DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 8, "Decode steps per engine step.")
_KV_LAYOUT = flags.DEFINE_enum("kv_layout", "dense", ["dense", "paged"],
                               "KV cache: a row per slot, or one pool of blocks shared by all "
                               "(a prompt prefix already computed is reused).")
_MAX_TOKENS = flags.DEFINE_integer("default_max_tokens", None, "Cap on replies that name no "
                                   "max_tokens (default: the rest of the context).")
_PARENT_PID = flags.DEFINE_integer("parent_pid", None, "Exit when this process dies.")
_GRACE = flags.DEFINE_float("graceful_timeout_s", 30.0, "Time in-flight requests get on stop.")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                               "uvicorn's log level ('info' logs every request).")

def main(argv):
  del argv
  stop = threading.Event()
  if _PARENT_PID.value:
    die_with_parent(_PARENT_PID.value, stop.set)
  # Heavy imports after flag parsing keep --help fast.
  from trustee_jax.serving.server import ServerThread, load_simulator  # noqa: PLC0415
  sim = load_simulator(_MODEL.value, _TOKENIZER.value, served_name=_SERVED_NAME.value,
                       num_slots=_NUM_SLOTS.value, cache_len=_CACHE_LEN.value,
                       max_queue=_MAX_QUEUE.value, decode_chunk=_DECODE_CHUNK.value,
                       dtype=_DTYPE.value, kv_layout=_KV_LAYOUT.value)
  api_key = _API_KEY.value or os.environ.get("TRUSTEE_SIMULATOR_API_KEY")
  server = ServerThread(sim.app(api_key, default_max_tokens=_MAX_TOKENS.value), _HOST.value,
                        _PORT.value, graceful_timeout_s=_GRACE.value,
                        log_level=_LOG_LEVEL.value)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  try:
    server.start()
    print(f"simulator {sim.model_name} serving at {server.url}/v1 "
          f"(slots={_NUM_SLOTS.value}, context={_CACHE_LEN.value}, "
          f"dtype={sim.engine.cfg.dtype}, "
          f"api_key={'on' if api_key else 'off'})", flush=True)
    while not stop.wait(1.0):
      pass
    print("stopping: finishing in-flight requests", flush=True)
  finally:
    server.stop(timeout_s=_GRACE.value + 30)
    sim.close()
  print("simulator stopped", flush=True)


def cli() -> None:
  app.run(main)


if __name__ == "__main__":
  cli()
