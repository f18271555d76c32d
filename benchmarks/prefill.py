"""Prompt tokens/s of the engine's prefill against transformers, on the simulator's common case.

  python benchmarks/prefill.py [--model qwen2.5-coder-0.5b] [--prompt_len 1024]
      [--batches 1,4] [--rounds 3] [--torch_threads 2]

The simulator and the policy spend their prompt time here: a ~1k-token prompt (system prompt,
tools, conversation) read before the first sampled token. Same weights (the packaged GGUF, f32),
same prompts, greedy, both sides build the KV cache and stop at the first token:
  engine:       Engine(num_slots=B, prefill_chunk) .generate(prompts, max_new_tokens=1), its
                prefix caches dropped before every run (no reuse across runs);
  transformers: one forward with use_cache=True and logits of the last position only
                (`logits_to_keep=1`), torch in inference mode on fixed threads.
Contenders alternate (benchmarks/common.py); the first tokens must agree. Achieved FLOP/s counts
the projections and MLP over every prompt token, causal attention (half the square) and one
unembedding row per prompt, as a fraction of this machine's f32 matmul rate measured in the same
run. llama.cpp's server on the same GGUF is compared over HTTP in simulator_backends.py; prefix
sharing across a task's episodes in paged_cache.py. The last line is one JSON object.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from trustee_jax.models import loading, tokenizer  # noqa: E402
from trustee_jax.models.transformer import ModelConfig  # noqa: E402
from trustee_jax.sampling.engine import Engine, SamplingParams  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "qwen2.5-coder-0.5b", list(loading.PACKAGED),
                           "Packaged GGUF model (transformers reads the same file).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "Tokens per prompt.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Prompts prefilled together.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "The engine's prefill chunk.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed runs per contender (alternating).")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads.")


def prefill_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Matmul FLOPs of prefilling `batch` prompts of `length` tokens up to one token's logits."""
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  per_token = common.layer_matmul_params(cfg)
  attention = cfg.num_layers * 2 * batch * length * length * h * hd / 2  # causal: half
  return 2.0 * (per_token * batch * length + attention + batch * d * cfg.vocab_size)


def prompts(tok, n: int, length: int, vocab: int) -> list[list[int]]:
  """n different prompts of exactly `length` tokens (numbered lines: they differ at once)."""
  out = []
  for i in range(n):
    text = " ".join(f"[{i}.{k}] the user asks the tool for the state of the garden lights"
                    for k in range(length))
    out.append([t % vocab for t in tok.encode(text)[:length]])
  return out


def main(_):
  torch = common.pin_torch_threads(_THREADS.value)
  import transformers  # pylint: disable=import-outside-toplevel
  probe = common.matmul_probe(torch_threads=_THREADS.value)
  print(f"matmul probe: {probe}", flush=True)
  model = loading.load_model(_MODEL.value)
  cfg, t = model.cfg, _PROMPT_LEN.value
  tok = tokenizer.load_tokenizer(loading.default_tokenizer(_MODEL.value))
  path = loading.gguf_path(_MODEL.value)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  greedy_one = SamplingParams(max_new_tokens=1, temperature=0.0)
  out = {"benchmark": "prefill", "model": f"{_MODEL.value} (GGUF, f32)", "prompt_len": t,
         "prefill_chunk": _CHUNK.value, "machine": common.machine(), "matmul_probe": probe}
  for batch in map(int, _BATCHES.value):
    batch_prompts = prompts(tok, batch, t, cfg.vocab_size)
    ids = torch.tensor(batch_prompts)
    first = {}

    def check(name, tokens):
      first[name] = tokens
      assert len(tokens) == batch, (name, tokens)

    with Engine(model, num_slots=batch, cache_len=t + 8, prefill_chunk=_CHUNK.value) as eng:
      def run_engine(eng=eng, batch_prompts=batch_prompts):
        eng.update_params(eng.state)  # drops every resident cache: the whole prompt prefills
        return [c.tokens[0] for c in eng.generate(batch_prompts, greedy_one)]

      def run_torch(ids=ids):
        with torch.inference_mode():
          logits = hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1).tolist()

      res = common.alternate({"engine": run_engine, "transformers": run_torch},
                             rounds=_ROUNDS.value, check=check)
      prefilled = eng.stats["prefill_tokens"]
    flops = prefill_flops(cfg, batch, t)
    entry = {name: {"prompt_tokens_per_s": batch * t / r["min_s"],
                    "median_prompt_tokens_per_s": batch * t / r["median_s"],
                    "first_call_s": r["first_call_s"], "runs_s": r["runs_s"],
                    "compiles_in_timed_runs": r["compiles_in_timed_runs"],
                    "fraction_of_matmul_probe": flops / r["min_s"] / probe["best_flops"]}
             for name, r in res.items()}
    entry["engine"]["prefilled_tokens_all_runs"] = prefilled
    entry["prefill_gflop"] = flops / 1e9
    entry["same_first_tokens"] = float(np.mean(
        [a == b for a, b in zip(first["engine"], first["transformers"])]))
    entry["speedup"] = (entry["engine"]["prompt_tokens_per_s"]
                        / entry["transformers"]["prompt_tokens_per_s"])
    out[f"batch_{batch}"] = entry
    print(f"prefill batch {batch}: {entry}", flush=True)
  common.emit(out)


if __name__ == "__main__":
  app.run(main)
