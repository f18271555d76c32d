"""The paged KV cache against the dense one: the same requests through both engines, alternating.

  python benchmarks/paged_cache.py [--rounds 3] [--group 8] [--shared_prompt 512]

SmolLM2-135M (the packaged GGUF), f32, on this CPU. Two workloads, each timed per engine
(common.alternate; every round starts from empty prefix caches):
- distinct: 16 prompts of --prompt_len tokens, greedy, --new_tokens each (no prefix to share:
  what the block tables and the gather cost);
- group: one task's --group episodes, a --shared_prompt-token prompt (system prompt, tools and
  first query) sampled with a seed per episode: the paged engine prefills the shared blocks
  once, the dense one once per slot.
Both engines must return the same tokens. Reports seconds, prefilled tokens and the KV blocks
the paged engine held, and prints one JSON object last.
"""
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from trustee_jax.models import tokenizer, weights  # noqa: E402
from trustee_jax.sampling.engine import Engine, SamplingParams  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per engine and workload.")
_GROUP = flags.DEFINE_integer("group", 8, "Episodes of one task (slots).")
_SHARED = flags.DEFINE_integer("shared_prompt", 512, "Tokens of the task's shared prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Tokens of each distinct prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens sampled per request.")
_BLOCK = flags.DEFINE_integer("block_size", 16, "Tokens per KV block.")
CACHE_LEN, DISTINCT = 1024, 16


def prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
  """n different prompts of exactly `length` tokens (numbered lines, so they differ at once)."""
  out = []
  for i in range(n):
    text = " ".join(f"item {seed}-{i}-{k}: the quiet river city" for k in range(length))
    out.append(tok.encode(text)[:length])
  return out


def workload(eng: Engine, requests: list[list[int]], params: list[SamplingParams]):
  """Runs the requests from empty prefix caches; their tokens and the tokens prefilled."""
  eng.update_params(eng.state)  # forget every resident prefix
  before = eng.stats["prefill_tokens"]
  futures = [eng.submit(r, p) for r, p in zip(requests, params)]
  tokens = [f.result().tokens for f in futures]
  return tokens, eng.stats["prefill_tokens"] - before, eng.metrics()


def main(_):
  model, tok = weights.load_gguf(), tokenizer.load_tokenizer("smollm2")
  slots = max(DISTINCT, _GROUP.value)
  engines = {"dense": Engine(model, num_slots=slots, cache_len=CACHE_LEN),
             "paged": Engine(model, num_slots=slots, cache_len=CACHE_LEN, kv_layout="paged",
                             block_size=_BLOCK.value)}
  cases = {
      "distinct": (prompts(tok, DISTINCT, _PROMPT_LEN.value, 0),
                   [SamplingParams(max_new_tokens=_NEW.value, temperature=0.0)] * DISTINCT),
      "group": (prompts(tok, 1, _SHARED.value, 1) * _GROUP.value,
                [SamplingParams(max_new_tokens=_NEW.value, temperature=1.0, seed=s)
                 for s in range(_GROUP.value)])}
  out = {"benchmark": "paged_cache", "model": "smollm2-135m", "block_size": _BLOCK.value,
         "cache_len": CACHE_LEN, "new_tokens": _NEW.value, "machine": common.machine()}
  try:
    for case, (requests, params) in cases.items():
      seen: dict[str, tuple] = {}

      def check(name, result, seen=seen):
        tokens, prefilled, metrics = result
        seen[name] = (prefilled, metrics)
        assert tokens == seen.setdefault("tokens", tokens), f"{case}: {name} sampled other tokens"

      res = common.alternate({n: (lambda e=e, r=requests, p=params: workload(e, r, p))
                              for n, e in engines.items()}, rounds=_ROUNDS.value, check=check)
      out[case] = {n: {"seconds": r["min_s"], "runs_s": r["runs_s"],
                       "compiles_in_timed_runs": r["compiles_in_timed_runs"],
                       "prefilled_tokens": seen[n][0]} for n, r in res.items()}
      out[case]["paged"]["kv_blocks_after"] = {k: v for k, v in seen["paged"][1].items()
                                               if k.startswith("kv_blocks_")}
      out[case]["paged_over_dense_time"] = (out[case]["paged"]["seconds"]
                                            / out[case]["dense"]["seconds"])
      print(f"{case}: {out[case]}", flush=True)
  finally:
    for eng in engines.values():
      eng.close()
  common.emit(out)


if __name__ == "__main__":
  app.run(main)
