"""Ahead-of-time memory plan of the Qwen3-8B configs: no weights, no 16 GB allocation.

For each config it builds abstract parameters (shapes, dtypes and shardings only) on the
config's mesh, lowers and compiles the GRPO update and the sampler's decode step (and the
worst-case prefill: every slot admitted at once with a full prompt chunk), and reads XLA's
per-device memory analysis. Buffers that live across programs are added: while the update
runs, the engine's KV cache (and its merged weights under LoRA) and the reference policy
stay resident; while the engine decodes, the optimizer state does.

  python benchmarks/memory_8b.py --configs gpu,gpu8             # fake CPU devices
  .venv-tpu/bin/python benchmarks/memory_8b.py --platform tpu --configs tpu
  python benchmarks/memory_8b.py --platform gpu --configs gpu   # on a GPU machine

On CPU the figures miss GPU fusions and kernels (say so beside them); on TPU the compile
targets the real topology (jax.experimental.topologies), as MaxText's AOT compile does.
"""
import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {v: f"qwen3_8b:{v}" for v in ("gpu", "gpu8", "tpu")}  # configs/qwen3_8b.py's variants
GiB = 2**30


def load_config(name: str):
  """A variant of configs/qwen3_8b.py (gpu, gpu8, tpu) or any configs/NAME[:ARG]."""
  from trustee_jax import config_files  # after main() has put ROOT on sys.path
  stem, sep, arg = CONFIGS.get(name, name).partition(":")
  return config_files.get_config(f"{ROOT / 'configs' / stem}.py{sep}{arg}")


def target_devices(c, platform: str, proxy_topology: str):
  """The devices to compile for: fake CPU ones, a TPU topology (the config's own, or
  `proxy_topology` standing in for GPUs), or local GPUs."""
  import jax
  n = math.prod(c.mesh.shape)
  if platform == "tpu":
    from jax.experimental import topologies
    name = c.hardware.tpu_topology or proxy_topology
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  else:
    devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(f"{c.hardware.name}: mesh {tuple(c.mesh.shape)} needs {n} devices, "
                     f"{platform} offers {len(devices)}")
  return devices[:n]


@dataclasses.dataclass
class Program:
  """One compiled program's per-device bytes (XLA's memory analysis)."""
  args: int
  out: int
  temp: int
  alias: int
  peak: int

  error: str = ""

  @classmethod
  def compile(cls, lowered) -> "Program":
    """Compiles and measures; a compiler that refuses for memory (TPU) is a row, not a crash."""
    try:
      return cls.of(lowered.compile())
    except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED ...
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      line = next(l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l)
      return cls(0, 0, 0, 0, 0, error=line.strip()[:300])

  @classmethod
  def of(cls, compiled) -> "Program":
    m = compiled.memory_analysis()
    est = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes
    peak = getattr(m, "peak_memory_in_bytes", 0) or est
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
               m.alias_size_in_bytes, max(peak, est))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays with shardings (the largest shard set)."""
  import jax
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * x.dtype.itemsize
  return total


def with_shardings(tree, shardings):
  import jax
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan(c, platform: str, proxy_topology: str = "v5p:2x2x2") -> dict:
  """Compiles the config's update, decode and prefill; returns the memory table row."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from trustee_jax import grpo, lora, update
  from trustee_jax import sharding as shd
  from trustee_jax.models.model_configs import get_model_config
  from trustee_jax.models.transformer import KVCache, Transformer
  from trustee_jax.sampling import sampler

  devices = target_devices(c, platform, proxy_topology)
  proxy = platform == "tpu" and not c.hardware.tpu_topology
  mesh = shd.make_mesh(tuple(c.mesh.shape), devices=devices)
  mcfg = get_model_config(c.model.arch, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                          remat_policy=c.model.remat_policy,
                          attention_impl=c.model.attention_impl)
  use_lora = bool(c.lora.enabled)
  optimizer = update.build_optimizer(c.train.optimizer)
  gcfg = grpo.GRPOConfig.from_dict(c.grpo)
  t = c.train
  seq = int(c.rollout.max_episode_tokens)
  rows = c.train.tasks_per_step * c.rollout.group_size // c.train.updates_per_step
  rows = -(-rows // t.micro_batch) * t.micro_batch

  # abstract parameters, already placed
  if use_lora:
    lcfg = lora.LoraConfig.from_dict(c.lora)
    abstract = lora.abstract_model(mcfg, lcfg, mesh=mesh)
    graphdef, adapters, base = nnx.split(abstract, lora.LoraParam, ...)
    adapters = with_shardings(adapters, shd.state_shardings(adapters, mesh))
    base = with_shardings(base, shd.state_shardings(base, mesh))
    trainable = adapters
  else:
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0), mesh=mesh))
    graphdef, base = nnx.split(abstract)
    base = with_shardings(base, shd.state_shardings(base, mesh))
    trainable = base
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  opt_state = with_shardings(opt_state, optax.tree_utils.tree_map_params(  # moments as params
      optimizer, lambda _, sh: sh, opt_state, param_shardings,
      transform_non_params=lambda _: replicated))

  # the GRPO update on one mini-batch of the longest bucket
  def arr(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=shd.batch_sharding(mesh, len(shape), batch=shape[0]))
  targets = (rows, seq - 1)  # per-token arrays are aligned with the targets tokens[:, 1:]
  batch = {"tokens": arr((rows, seq), jnp.int32), "positions": arr((rows, seq), jnp.int32),
           "loss_mask": arr(targets, jnp.float32), "old_logprobs": arr(targets, jnp.float32),
           "turn_rewards": arr(targets, jnp.float32), "advantages": arr((rows,), jnp.float32)}
  if gcfg.kl_beta > 0:
    batch["ref_logprobs"] = arr(targets, jnp.float32)
  kw = dict(micro_batch=t.micro_batch, temperature=c.rollout.temperature,
            chunk_size=t.logprob_chunk)
  # The one update of both modes, trainable state and optimizer state donated (as the Trainer)
  frozen = base if use_lora else nnx.State({})
  lowered = update.make_update_fn(graphdef, optimizer, gcfg, **kw).lower(
      trainable, frozen, opt_state, batch)
  upd = Program.compile(lowered)

  # the engine: its weights, KV cache and counts; decode chunk and worst-case prefill
  if use_lora and c.lora.sampler_weights == "merged":
    eng_graphdef = lora.base_graphdef(abstract)
    eng_state = with_shardings(
        jax.eval_shape(lambda b, a: lora.merge_params(b, a, lcfg), base, adapters),
        jax.tree_util.tree_map(lambda x: x.sharding, base))
  elif use_lora:
    eng_graphdef, eng_state = graphdef, nnx.merge_state(adapters, base)
  else:
    eng_graphdef, eng_state = graphdef, base
  slots, cache_len = c.engine.num_slots, c.engine.cache_len
  cache_axes = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")
  kv_shape = (mcfg.num_layers, slots, cache_len, mcfg.num_kv_heads, mcfg.head_dim)
  kv_sharding = shd.named_sharding(mesh, shd.LOGICAL_RULES, cache_axes, kv_shape)
  kv = jax.ShapeDtypeStruct(kv_shape, jnp.dtype(mcfg.dtype), sharding=kv_sharding)
  cache = KVCache(k=kv, v=kv)
  row_sh = shd.named_sharding(mesh, shd.LOGICAL_RULES, ("cache_batch",), (slots,))
  counts = jax.ShapeDtypeStruct((slots, mcfg.vocab_size), jnp.int32, sharding=shd.named_sharding(
      mesh, shd.LOGICAL_RULES, ("cache_batch", "vocab"), (slots, mcfg.vocab_size)))
  vec = lambda dtype, n=slots: jax.ShapeDtypeStruct((n,), dtype, sharding=row_sh)  # noqa: E731
  sampling = sampler.RowSampling(vec(jnp.float32), vec(jnp.float32), vec(jnp.int32),
                                 vec(jnp.float32), vec(jnp.uint32), vec(jnp.int32))
  layers = (jax.eval_shape(sampler.unstack_layers, eng_graphdef, eng_state)
            if c.engine.get("unstack_layers", True) else None)
  dec = Program.compile(sampler.decode.lower(
      eng_graphdef, eng_state, layers, cache, counts, vec(jnp.int32), vec(jnp.int32),
      vec(jnp.int32), sampling, None, steps=c.engine.decode_chunk, attend_len=cache_len,
      use_filter=True, n_top=0))
  chunk = int(c.engine.get("prefill_chunk", 512))
  two = jax.ShapeDtypeStruct((slots, chunk), jnp.int32, sharding=shd.batch_sharding(
      mesh, 2, batch=slots))
  pre = Program.compile(sampler.prefill.lower(
      eng_graphdef, eng_state, cache, counts, two, two, vec(jnp.int32), vec(jnp.int32),
      sampling, None, attend_len=cache_len, use_filter=True, n_top=0))

  # what stays resident beside each program (buffers the program's arguments do not hold)
  weights = per_device_bytes(base)
  opt_bytes = per_device_bytes(opt_state)
  kv_bytes = per_device_bytes(cache) + per_device_bytes(counts)
  merged = use_lora and c.lora.sampler_weights == "merged"
  # the initial params, kept in the compute dtype (policy.build) for the KL reference
  reference = 0 if use_lora or gcfg.kl_beta == 0 else weights * jnp.dtype(
      mcfg.dtype).itemsize // jnp.dtype(mcfg.param_dtype).itemsize
  if not use_lora:  # the engine shares the params, but keeps the step's first ones until
    engine_extra = weights if t.updates_per_step > 1 else 0  # the step's last update ends
    beside_update = kv_bytes + engine_extra + reference
    beside_engine = opt_bytes + reference
  else:
    engine_extra = per_device_bytes(eng_state) if merged else 0
    beside_update = kv_bytes + engine_extra
    beside_engine = opt_bytes + (weights + per_device_bytes(adapters) if merged else 0)
  during_update = 0 if upd.error else upd.peak + beside_update  # 0: did not compile
  during_decode = 0 if dec.error else dec.peak + beside_engine
  during_prefill = 0 if pre.error else pre.peak + beside_engine
  device = int(c.hardware.memory_gib * GiB)
  peak = max(during_update, during_decode, during_prefill)
  return {
      "config": CONFIGS.get(c.hardware.key, c.hardware.key), "hardware": c.hardware.name,
      "compiled_on": f"{platform}:{devices[0].device_kind}" + (" (GPU proxy)" if proxy else ""), "mesh": list(c.mesh.shape),
      "mode": f"LoRA r={c.lora.rank}" if use_lora else "full fine-tune",
      "param_dtype": mcfg.param_dtype, "opt_dtype": ",".join(sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(
          opt_state) if jnp.issubdtype(x.dtype, jnp.floating)})), "remat": mcfg.remat_policy, "rows_per_update": rows,
      "micro_batch": t.micro_batch, "seq": seq, "slots": slots, "cache_len": cache_len,
      "sampler_weights": c.lora.sampler_weights if use_lora else "training params",
      "update": dataclasses.asdict(upd), "decode": dataclasses.asdict(dec),
      "prefill": dataclasses.asdict(pre),
      "resident": {"weights": weights, "optimizer": opt_bytes, "kv_cache": kv_bytes,
                   "engine_weights": engine_extra, "reference": reference},
      "during_update": during_update, "during_decode": during_decode,
      "during_prefill": during_prefill, "device_bytes": device,
      "headroom_gib": None if (upd.error or dec.error or pre.error) else round(
          (device - peak) / GiB, 2),
      "errors": [f"{n}: {p.error}" for n, p in (("update", upd), ("decode", dec), ("prefill", pre))
                 if p.error],
  }


def table(rows: list[dict]) -> str:
  g = lambda b: f"{b / GiB:.1f}" if b else "OOM"  # noqa: E731
  lines = ["| config | compiled on | mesh | mode | update peak | + resident | decode | "
           "prefill | worst phase | device | headroom |", "|" + "---|" * 11]
  for r in rows:
    resident = r["during_update"] - r["update"]["peak"]
    worst = max(r["during_update"], r["during_decode"], r["during_prefill"])
    lines.append(
        f"| {r['config']} | {r['compiled_on']} | {'x'.join(map(str, r['mesh']))} | {r['mode']} "
        f"| {g(r['update']['peak'])} | {g(resident)} | {g(r['during_decode'])} | "
        f"{g(r['during_prefill'])} | {g(worst)} | {g(r['device_bytes'])} | "
        + (f"{r['headroom_gib']:+.1f} |" if r["headroom_gib"] is not None else
           "does not compile: " + "; ".join(r["errors"])[:160] + " |"))
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", default="gpu,gpu8", help="comma list: gpu, gpu8, tpu")
  ap.add_argument("--platform", default="cpu", choices=("cpu", "tpu", "gpu"))
  ap.add_argument("--proxy-topology", default="v5p:2x2x2",
                  help="with --platform tpu: the TPU topology that stands in for GPU configs")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. engine.num_slots=16 (repeatable)")
  ap.add_argument("--json", default="", help="append one JSON line per config here")
  args = ap.parse_args()
  if args.platform == "cpu":  # before jax starts: enough fake devices for any mesh here
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
  elif args.platform == "tpu":
    os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only: no TPU runtime here
  sys.path.insert(0, str(ROOT))
  rows = []
  for name in args.configs.split(","):
    c = load_config(name)
    with c.unlocked():
      c.hardware.key = name
      for item in args.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
          node = node[p]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else (
            value.lower() in ("1", "true", "yes"))
    row = plan(c, args.platform, args.proxy_topology)
    rows.append(row)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
  print(table(rows))
  print(json.dumps({"benchmark": "memory_8b", "platform": args.platform, "rows": rows}))


if __name__ == "__main__":
  main()
