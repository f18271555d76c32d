"""One way to name a model everywhere (policy, simulator server, export, benchmarks):
a packaged GGUF ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"), a Hugging Face
directory, or a named shape from model_configs with random weights (tests)."""
import pathlib

from trustee_jax import sharding as shd
from trustee_jax.models import model_configs, packaged, weights
from trustee_jax.models import tokenizer as tok_lib
from trustee_jax.models.transformer import Transformer, create_model

PACKAGED = tuple(packaged.MODELS)  # the GGUF files shipped in (part) packages


def default_tokenizer(name: str) -> str:
  """The tokenizer a model name implies: its own file or directory; for random shapes, Qwen3's
  for the Qwen families and SmolLM2's otherwise."""
  if name in PACKAGED or pathlib.Path(name).is_dir():
    return name
  return "qwen3" if "qwen" in name else "smollm2"


def policy_tokenizer(name: str, tokenizer: str = "") -> str:
  """The tokenizer of a run that names model `name` and `tokenizer`: a packaged model's or HF
  directory's own (a config's `tokenizer` is only for random shapes, which share some names)."""
  if name in PACKAGED or pathlib.Path(name).is_dir():
    return name
  return tokenizer or default_tokenizer(name)


def gguf_path(name: str) -> pathlib.Path:
  """The file of a packaged GGUF model (SmolLM2's where pip put it, the others verified)."""
  return packaged.smollm2_gguf_path() if name == "smollm2" else packaged.packaged_gguf_path(name)


def load_model(name: str, *, mesh=None, param_dtype: str | None = None,
               dtype: str | None = None, seed: int = 0, remat_policy: str | None = None,
               attention_impl: str | None = None, rules=None) -> Transformer:
  """The model `name` stands for, its weights in `param_dtype` (default: f32 for GGUF files,
  the checkpoint's dtype for HF directories) computing in `dtype` (default: param_dtype),
  laid out on `mesh` by the logical-axis `rules` (default: sharding.LOGICAL_RULES; a run's
  are `sharding.rules_from_config(cfg.mesh.rules)`), attending by `attention_impl` (default:
  the config's, einsum; see models/attention.py)."""
  rules = shd.LOGICAL_RULES if rules is None else rules
  if name in PACKAGED:
    model = weights.load_gguf(gguf_path(name), mesh=mesh, param_dtype=param_dtype or "float32",
                              dtype=dtype, rules=rules)
  elif pathlib.Path(name).is_dir():
    model = weights.load_hf(name, mesh=mesh, param_dtype=param_dtype, dtype=dtype, rules=rules)
  elif name in model_configs.MODEL_CONFIGS:
    overrides = {k: v for k, v in (("param_dtype", param_dtype),
                                   ("dtype", dtype or param_dtype)) if v}
    model = create_model(model_configs.get_model_config(
        name, **overrides, **({"remat_policy": remat_policy} if remat_policy else {})),
        seed=seed, mesh=mesh, rules=rules)
  else:
    raise ValueError(f"unknown model {name!r}: expected one of {PACKAGED} (packaged GGUF), a "
                     f"Hugging Face directory, or a named config {sorted(model_configs.MODEL_CONFIGS)}")
  if remat_policy:
    model.cfg = model.cfg.replace(remat_policy=remat_policy)
  if attention_impl:
    model.cfg = model.cfg.replace(attention_impl=attention_impl)
  return model


def load_model_and_tokenizer(name: str, tokenizer: str = "", **kw) -> tuple[Transformer, tok_lib.Tokenizer]:
  """`load_model(name, **kw)` and its tokenizer (`tokenizer` overrides the implied one)."""
  return load_model(name, **kw), tok_lib.load_tokenizer(tokenizer or default_tokenizer(name))
