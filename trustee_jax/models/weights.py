"""Weights in and out: HF safetensors (Llama, Qwen2, Qwen3) load and save; GGUF in (gguf_weights).

Every loader maps its file onto HF names in HF layout ([out, in] linears), and one filler
turns those into the stacked NNX parameters: layer by layer into one host buffer per
parameter, then straight into its sharding, so no checkpoint sits whole in memory twice.
"""
import contextlib
import dataclasses
import json
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from trustee_jax import sharding as shd
from trustee_jax.models.hf_config import WeightsError, config_from_hf, config_to_hf
from trustee_jax.models.transformer import PARAM_AXES, ModelConfig, Transformer


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                    "added_tokens.json", "tokenizer.model")
MAX_SHARD_BYTES = 2_000_000_000


# ---------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One parameter: its HF name ('{}' = layer), HF shape, and the two layout maps."""
  hf: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _specs(cfg: ModelConfig) -> dict[str, _Spec]:
  """Our parameter name -> how it is stored in an HF checkpoint (per layer if stacked)."""
  d, f, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
  same = lambda x: x
  t = lambda x: x.T
  lay = "model.layers.{}."
  heads_in = lambda n: lambda w: w.T.reshape(d, n, hd)  # [n*hd, d] -> [d, n, hd]
  heads_out = lambda x: x.reshape(d, -1).T
  specs = {
      "embed": _Spec("model.embed_tokens.weight", (cfg.vocab_size, d), same, same),
      "final_norm": _Spec("model.norm.weight", (d,), same, same),
      "attn_norm": _Spec(lay + "input_layernorm.weight", (d,), same, same),
      "wq": _Spec(lay + "self_attn.q_proj.weight", (h * hd, d), heads_in(h), heads_out),
      "wk": _Spec(lay + "self_attn.k_proj.weight", (kv * hd, d), heads_in(kv), heads_out),
      "wv": _Spec(lay + "self_attn.v_proj.weight", (kv * hd, d), heads_in(kv), heads_out),
      "wo": _Spec(lay + "self_attn.o_proj.weight", (d, h * hd),
                  lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
      "mlp_norm": _Spec(lay + "post_attention_layernorm.weight", (d,), same, same),
      "w_gate": _Spec(lay + "mlp.gate_proj.weight", (f, d), t, t),
      "w_up": _Spec(lay + "mlp.up_proj.weight", (f, d), t, t),
      "w_down": _Spec(lay + "mlp.down_proj.weight", (d, f), t, t),
  }
  if cfg.qk_norm:
    specs["q_norm"] = _Spec(lay + "self_attn.q_norm.weight", (hd,), same, same)
    specs["k_norm"] = _Spec(lay + "self_attn.k_norm.weight", (hd,), same, same)
  if cfg.qkv_bias:
    for name, proj, n in (("bq", "q", h), ("bk", "k", kv), ("bv", "v", kv)):
      specs[name] = _Spec(lay + f"self_attn.{proj}_proj.bias", (n * hd,),
                          lambda b, n=n: b.reshape(n, hd), lambda x: x.reshape(-1))
  if not cfg.tie_embeddings:
    specs["lm_head"] = _Spec("lm_head.weight", (cfg.vocab_size, d), t, t)
  return specs


def _hf_names(cfg: ModelConfig, specs: dict[str, _Spec]) -> Iterator[tuple[str, str, int]]:
  """(hf name, our name, layer or -1) in HF's order: embed, layers, norm, head."""
  layered = [n for n in specs if PARAM_AXES[n][0] == "layers"]
  yield specs["embed"].hf, "embed", -1
  for layer in range(cfg.num_layers):
    for n in layered:
      yield specs[n].hf.format(layer), n, layer
  yield specs["final_norm"].hf, "final_norm", -1
  if "lm_head" in specs:
    yield specs["lm_head"].hf, "lm_head", -1


@dataclasses.dataclass(frozen=True)
class _Tensors:
  """A checkpoint seen as HF names: shapes, the file each lives in, and a reader."""
  shapes: dict[str, tuple[int, ...]]
  files: dict[str, str]
  read: Callable[[str], np.ndarray]  # float array in HF layout


def _read_checked(tensors: _Tensors, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in tensors.shapes:
    where = sorted(set(tensors.files.values())) or ["(no files)"]
    raise WeightsError(f"{', '.join(where)}: missing tensor {name!r}")
  if tuple(tensors.shapes[name]) != tuple(shape):
    raise WeightsError(f"{tensors.files[name]}: tensor {name!r} has shape "
                       f"{tuple(tensors.shapes[name])}, expected {tuple(shape)}")
  return tensors.read(name)


def _build(cfg: ModelConfig, tensors: _Tensors, mesh, rules) -> Transformer:
  """Fill an abstract Transformer from HF-named tensors, one parameter at a time."""
  specs = _specs(cfg)
  expected = {hf for hf, _, _ in _hf_names(cfg, specs)}
  extra = sorted(n for n in tensors.shapes if n not in expected and not _IGNORED.match(n)
                 and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if extra:
    raise WeightsError(f"{tensors.files[extra[0]]}: unexpected tensor(s) {extra[:5]} for a "
                       f"{cfg.architecture} model with {cfg.num_layers} layers")
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), mesh=mesh, rules=rules))
  graphdef, abs_state = nnx.split(abstract)
  leaves = jax.tree_util.tree_flatten_with_path(abs_state)[0]
  shardings = (jax.tree_util.tree_leaves(shd.state_shardings(abs_state, mesh, rules))
               if mesh is not None else [None] * len(leaves))
  values = {}
  for (path, leaf), sharding in zip(leaves, shardings, strict=True):
    name = path[0].key
    spec = specs[name]
    buf = np.empty(leaf.shape, leaf.dtype)  # the only host copy of this parameter
    layered = abs_state[name].get_metadata()[shd.AXES_KEY][0] == "layers"
    for layer in range(leaf.shape[0]) if layered else [None]:
      x = _read_checked(tensors, spec.hf.format(layer), spec.hf_shape)
      buf[layer if layered else ...] = spec.to_ours(x)
    if sharding is None:
      values[name] = jax.device_put(buf)
    else:
      values[name] = jax.make_array_from_callback(leaf.shape, sharding, lambda i, b=buf: b[i])
    del buf
  state = jax.tree_util.tree_map_with_path(lambda p, _: values[p[0].key], abs_state)
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- HF in


def _safetensors_files(path: pathlib.Path) -> dict[str, list[str]]:
  """File -> tensor names, from model.safetensors or model.safetensors.index.json."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise WeightsError(f"{index}: not a safetensors index ({e})") from e
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(str(path / file), []).append(name)
    return files
  single = path / "model.safetensors"
  if not single.is_file():
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json")
  return {str(single): []}


def _open_safetensors(path: pathlib.Path, stack: contextlib.ExitStack) -> _Tensors:
  """All tensors of a (sharded) safetensors checkpoint, opened lazily as numpy."""
  shapes, files, handles = {}, {}, {}
  for file, listed in _safetensors_files(path).items():
    try:
      handle = stack.enter_context(safe_open(file, framework="numpy"))
      names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
      raise WeightsError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    missing = sorted(set(listed) - set(names))
    if missing:
      raise WeightsError(f"{file}: missing tensor {missing[0]!r} listed in the index")
    for name in names:
      shapes[name] = tuple(handle.get_slice(name).get_shape())
      files[name], handles[name] = file, handle

  def read(name: str) -> np.ndarray:
    dtype = handles[name].get_slice(name).get_dtype()
    if dtype not in _FLOAT_DTYPES:
      raise WeightsError(f"{files[name]}: tensor {name!r} has dtype {dtype}, expected floats")
    try:
      return handles[name].get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise WeightsError(f"{files[name]}: cannot read tensor {name!r}: {e}") from e

  return _Tensors(shapes, files, read)


def _check_config_matches(cfg: ModelConfig, tensors: _Tensors, source: str) -> None:
  """config.json's sizes against the tensors' shapes, so a mismatch names the config key."""
  layer = re.compile(r"model\.layers\.(\d+)\.")
  layers = {int(m.group(1)) for n in tensors.shapes if (m := layer.match(n))}
  if layers and max(layers) + 1 != cfg.num_layers:
    raise WeightsError(f"{source}: num_hidden_layers={cfg.num_layers} does not match the "
                       f"checkpoint, which has layers 0..{max(layers)}")
  specs = _specs(cfg)
  for key, value, ours, axis in (
      ("vocab_size", cfg.vocab_size, "embed", 0), ("hidden_size", cfg.hidden_size, "embed", 1),
      ("intermediate_size", cfg.intermediate_size, "w_up", 0),
      ("num_attention_heads*head_dim", cfg.num_heads * cfg.head_dim, "wq", 0),
      ("num_key_value_heads*head_dim", cfg.num_kv_heads * cfg.head_dim, "wk", 0)):
    name, want = specs[ours].hf.format(0), specs[ours].hf_shape
    shape = tensors.shapes.get(name)
    if shape is not None and len(shape) == len(want) and shape[axis] != want[axis]:
      raise WeightsError(f"{source}: {key}={value} does not match the checkpoint: "
                         f"{tensors.files[name]}: tensor {name!r} has shape {tuple(shape)}, "
                         f"expected {want}")


def load_hf(path, *, mesh=None, param_dtype: str | None = None, dtype: str | None = None,
            rules=shd.LOGICAL_RULES) -> Transformer:
  """A Transformer from an HF directory (config.json + safetensors), sharded over `mesh`.

  param_dtype defaults to the checkpoint's dtype; dtype (compute) to param_dtype.
  """
  path = pathlib.Path(path)
  config_file = path / "config.json"
  try:
    config_json = json.loads(config_file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise WeightsError(f"{config_file}: cannot read the model config: {e}") from e
  cfg = config_from_hf(config_json, source=str(config_file), name=path.name)
  param_dtype = param_dtype or cfg.param_dtype
  cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
  with contextlib.ExitStack() as stack:
    tensors = _open_safetensors(path, stack)
    _check_config_matches(cfg, tensors, str(config_file))
    return _build(cfg, tensors, mesh, rules)


# ---------------------------------------------------------------------------- HF out


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _shard_plan(entries: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Greedy split of (name, nbytes) in order into files of at most max_bytes (or one)."""
  plan, size = [[]], 0
  for name, nbytes in entries:
    if plan[-1] and size + nbytes > max_bytes:
      plan, size = plan + [[]], 0
    plan[-1].append(name)
    size += nbytes
  return plan


def save_hf(model: Transformer, out_dir, tokenizer=None, *, dtype: str | None = None,
            generation_config: dict | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> pathlib.Path:
  """Write an HF directory (config, safetensors, generation config, tokenizer) that
  transformers, vLLM and SGLang load unchanged.

  dtype casts the weights (default: the parameters' dtype). tokenizer: a transformers
  tokenizer (save_pretrained) or a directory whose tokenizer files are copied.
  """
  out = pathlib.Path(out_dir)
  cfg = model.cfg
  specs = _specs(cfg)
  dtype = dtype or jnp.dtype(model.embed[...].dtype).name
  np_dtype = jnp.dtype(dtype)
  writer = jax.process_index() == 0
  if writer:
    out.mkdir(parents=True, exist_ok=True)
  bos, eos = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
  order = list(_hf_names(cfg, specs))
  nbytes = {hf: int(np.prod(specs[n].hf_shape)) * np_dtype.itemsize for hf, n, _ in order}
  plan = _shard_plan([(hf, nbytes[hf]) for hf, _, _ in order], max_shard_bytes)
  where = {hf: (n, layer) for hf, n, layer in order}
  weight_map = {}
  for i, names in enumerate(plan):
    file = ("model.safetensors" if len(plan) == 1
            else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors")
    tensors = {}
    for hf in names:
      name, layer = where[hf]
      param = getattr(model, name)[...]
      x = _to_host(param if layer < 0 else param[layer])
      tensors[hf] = np.ascontiguousarray(specs[name].to_hf(x).astype(np_dtype))
      weight_map[hf] = file
    if writer:
      save_file(tensors, str(out / file), metadata={"format": "pt"})
  if not writer:
    return out
  if len(plan) > 1:
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, bos, eos), indent=2))
  gen = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
  gen.update(generation_config or {})
  (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
  _save_tokenizer(tokenizer, out)
  return out


def _save_tokenizer(tokenizer, out: pathlib.Path) -> None:
  if tokenizer is None:
    return
  if hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(str(out))
    return
  src = pathlib.Path(tokenizer)
  if not (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
    raise TypeError(f"tokenizer must have save_pretrained or be a tokenizer directory; "
                    f"got {tokenizer!r}")
  for file in _TOKENIZER_FILES:
    if (src / file).is_file():
      shutil.copy(src / file, out / file)


# ---------------------------------------------------------------------------- GGUF in


def load_gguf(path=None, *, mesh=None, param_dtype: str = "float32", dtype: str | None = None,
              rules=shd.LOGICAL_RULES) -> Transformer:
  """A Transformer from a llama.cpp GGUF file (default: the packaged SmolLM2-135M);
  see gguf_weights."""
  from trustee_jax.models import gguf_weights  # it imports this module
  return gguf_weights.load_gguf(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype,
                                rules=rules)
