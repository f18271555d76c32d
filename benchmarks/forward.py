"""Forward tokens/s of a packaged GGUF model (SmolLM2-135M unless --model names another): the
JAX decoder (jitted) against transformers PyTorch.

  python benchmarks/forward.py [--model smollm2] [--batch 8] [--length 256] [--rounds 3]
      [--torch_threads 2]

Same weights (the packaged GGUF, f32), same random tokens, full logits on both sides; torch
in inference mode on a fixed number of threads. The contenders alternate; compile time is
reported apart. Achieved FLOP/s is the model's matmul FLOPs over the best time, as a
fraction of this machine's plain f32 matmul FLOP/s (best of jnp.dot and torch.matmul at
2048², measured in the same run). A breakdown times the JAX forward without the unembedding.
The last line is one JSON object.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from trustee_jax.models import loading  # noqa: E402
from trustee_jax.models.transformer import ModelConfig  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "smollm2", list(loading.PACKAGED), "Packaged GGUF model "
                           "(transformers reads the same file).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per forward.")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per sequence.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed runs per contender (alternating).")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads.")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of one JAX "
                               "forward here (view in TensorBoard / Perfetto).")


def forward_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Matmul FLOPs of one forward with full logits: projections, MLP, unembedding, and the
  attention scores and mixing over the whole length x length square (both sides compute it)."""
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  per_token = common.layer_matmul_params(cfg)
  per_token += d * cfg.vocab_size
  tokens = batch * length
  attention = cfg.num_layers * 2 * batch * length * length * h * hd
  return 2.0 * (per_token * tokens + attention)


def main(_):
  torch = common.pin_torch_threads(_THREADS.value)
  import transformers  # pylint: disable=import-outside-toplevel
  b, t = _BATCH.value, _LENGTH.value
  probe = common.matmul_probe(torch_threads=_THREADS.value)
  print(f"matmul probe: {probe}", flush=True)

  model = loading.load_model(_MODEL.value)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  path = loading.gguf_path(_MODEL.value)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

  tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
  tokens = jnp.asarray(tokens_np)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  tokens_pt = torch.from_numpy(tokens_np.astype(np.int64))

  @jax.jit
  def jax_logits(state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions)[0]

  @jax.jit
  def jax_hidden(state, tokens, positions):
    return nnx.merge(graphdef, state).hidden_states(tokens, positions)[0]

  def torch_logits():
    with torch.inference_mode():
      return hf(input_ids=tokens_pt, use_cache=False).logits

  shapes = {}

  def check(name, out):
    shapes[name] = tuple(out.shape)
    assert shapes[name] == (b, t, cfg.vocab_size), (name, shapes[name])

  res = common.alternate({"jax": lambda: jax_logits(state, tokens, positions),
                          "torch": torch_logits}, rounds=_ROUNDS.value, check=check)
  diff = np.abs(np.asarray(jax_logits(state, tokens, positions)) - torch_logits().numpy())
  hidden = common.alternate({"jax_no_unembed": lambda: jax_hidden(state, tokens, positions)},
                            rounds=_ROUNDS.value)["jax_no_unembed"]
  if _PROFILE.value:
    with jax.profiler.trace(_PROFILE.value):
      common.block(jax_logits(state, tokens, positions))

  flops = forward_flops(cfg, b, t)
  out = {"benchmark": "forward", "model": f"{_MODEL.value} (GGUF, f32)", "batch": b, "length": t,
         "machine": common.machine(), "matmul_probe": probe, "forward_gflop": flops / 1e9,
         "max_abs_logit_diff": float(diff.max())}
  for name, r in res.items():
    out[name] = {"tokens_per_s": b * t / r["min_s"], "median_tokens_per_s": b * t / r["median_s"],
                 "first_call_s": r["first_call_s"], "runs_s": r["runs_s"],
                 "achieved_flops": flops / r["min_s"],
                 "fraction_of_matmul_probe": flops / r["min_s"] / probe["best_flops"]}
  out["jax"]["compile_s"] = res["jax"]["first_call_s"] - res["jax"]["min_s"]
  out["jax_no_unembed_s"] = hidden["min_s"]
  out["unembed_share_of_jax_time"] = 1 - hidden["min_s"] / res["jax"]["min_s"]
  out["jax_over_torch"] = out["jax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
  out["aim_jax_over_torch"] = 1.1
  out["aim_met"] = out["jax_over_torch"] >= 1.1
  common.emit(out)


if __name__ == "__main__":
  app.run(main)
