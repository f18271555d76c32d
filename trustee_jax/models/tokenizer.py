"""Tokenizers for the policy and the simulator: SmolLM2, Qwen2.5-Coder (GGUF), Qwen3, any HF directory.

`load_tokenizer` returns a `Tokenizer`, a thin wrapper over a transformers fast tokenizer
(`TokenizersBackend`, alias `PreTrainedTokenizerFast`) that fixes the conventions the rest of the
code relies on: encoding adds no special tokens but recognises special tokens written in the text,
and the ids that end generation are explicit. The GGUF route reads the file's metadata itself and
builds the byte-level BPE with `tokenizers` directly, so it needs neither torch nor the `gguf` package.
"""
import dataclasses
import json
import mmap
import pathlib
import struct
from typing import Any

import tokenizers
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from trustee_jax.models import packaged

# GGUF token types (llama.cpp's llama_token_type): 3 is CONTROL, 4 is USER_DEFINED.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4
# GGUF metadata value types: struct codes of the scalars, then string (8) and array (9).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# The end-of-text token of ChatML-family vocabularies; it ends generation beside the end of turn.
_END_OF_TEXT = "<|endoftext|>"
# Qwen2's (and Qwen2.5's and Qwen3's) split regex, as in their tokenizer.json: like Llama 3's, but
# every digit alone. llama.cpp calls this pre-tokenizer 'qwen2'.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PRE = ("qwen2",)
# Packaged models whose tokenizer is read from their GGUF (see packaged.MODELS).
_PACKAGED_GGUF = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """A fast Hugging Face tokenizer with this project's conventions.

  `hf` is the underlying transformers tokenizer (save it with `save_pretrained` for export).
  `eos_token_ids` are the ids that end generation (the tokenizer's EOS, the ids from a
  `generation_config.json` beside it, and `<|endoftext|>` when the vocabulary has it).
  """
  hf: transformers.PreTrainedTokenizerFast
  eos_token_ids: tuple[int, ...]

  @property
  def vocab_size(self) -> int:
    """Number of ids this tokenizer can produce, added tokens included (a model's embedding may be larger)."""
    return len(self.hf)

  @property
  def chat_template(self) -> str | None:
    return self.hf.chat_template

  @property
  def bos_token_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def pad_token_id(self) -> int | None:
    return self.hf.pad_token_id

  @property
  def special_token_ids(self) -> frozenset[int]:
    """Ids of the special (control) tokens, which `decode(..., skip_special_tokens=True)` drops."""
    return frozenset(i for i, t in self.hf.added_tokens_decoder.items() if t.special)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; adds no BOS/EOS, but special tokens written in the text become their ids."""
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_id(self, text: str) -> int:
    """The id of `text` when it encodes to exactly one token (e.g. "<|im_end|>", "<tool_call>", "\\n")."""
    ids = self.encode(text)
    if len(ids) != 1:
      raise ValueError(f"{text!r} is not a single token: it encodes to {ids}")
    return ids[0]

  def token_bytes(self) -> list[bytes]:
    """The bytes each id stands for, indexed by id (special tokens as their text); for grammar engines."""
    backend = self.hf.backend_tokenizer
    if not isinstance(backend.decoder, decoders.ByteLevel):
      raise NotImplementedError(
          f"token_bytes supports byte-level BPE only; this tokenizer's decoder is {backend.decoder!r}")
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in self.hf.added_tokens_decoder.items()}
    table = [b""] * self.vocab_size
    for token, i in backend.get_vocab(with_added_tokens=True).items():
      if i in added:
        table[i] = added[i].encode("utf-8")
      elif all(ch in to_byte for ch in token):
        table[i] = bytes(to_byte[ch] for ch in token)
      else:
        table[i] = token.encode("utf-8")
    return table

  def llguidance_tokenizer(self, n_vocab: int | None = None) -> Any:
    """An `llguidance.LLTokenizer` for token masks; `n_vocab` is the model's (padded) vocabulary size.

    Building it takes about a second, so callers build it once and keep it.
    """
    import llguidance.hf  # pylint: disable=import-outside-toplevel

    if n_vocab is not None and n_vocab < self.vocab_size:
      raise ValueError(f"n_vocab={n_vocab} is smaller than the tokenizer's {self.vocab_size} ids")
    return llguidance.hf.from_tokenizer(self.hf, n_vocab=n_vocab, eos_token=list(self.eos_token_ids))

  def save_pretrained(self, directory: str | pathlib.Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and the chat template, loadable by transformers 4 and 5.

    transformers 5 writes `tokenizer_class: TokenizersBackend` and a list under `extra_special_tokens`,
    which transformers 4 (used by some serving stacks) cannot read; both are rewritten.
    """
    directory = pathlib.Path(directory)
    self.hf.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
      config["additional_special_tokens"] = extra
    elif extra is not None:
      config["extra_special_tokens"] = extra
    for key in ("backend", "is_local", "local_files_only", "name_or_path"):
      config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(source: str | pathlib.Path) -> Tokenizer:
  """Load "smollm2", "qwen2.5-coder-0.5b"/"-1.5b" (packaged GGUFs), "qwen3", a `.gguf` file or an HF dir."""
  if source == "smollm2":
    return tokenizer_from_gguf(packaged.smollm2_gguf_path())
  if source in _PACKAGED_GGUF:
    return tokenizer_from_gguf(packaged.packaged_gguf_path(str(source)))
  if source == "qwen3":
    return tokenizer_from_hf_dir(packaged.qwen3_tokenizer_dir())
  path = pathlib.Path(source)
  if path.is_file() and path.suffix == ".gguf":
    return tokenizer_from_gguf(path)
  if path.is_dir():
    return tokenizer_from_hf_dir(path)
  raise FileNotFoundError(
      f"tokenizer source {str(source)!r} is neither one of {', '.join(_PACKAGED_GGUF)}, 'qwen3', "
      "a .gguf file nor a directory")


def tokenizer_from_hf_dir(directory: str | pathlib.Path) -> Tokenizer:
  """Tokenizer from tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
  directory = pathlib.Path(directory)
  tokenizer_file = directory / "tokenizer.json"
  if not tokenizer_file.is_file():
    raise FileNotFoundError(f"{tokenizer_file} is missing (a fast tokenizer is required)")
  _check_json(tokenizer_file)
  config_file = directory / "tokenizer_config.json"
  if config_file.is_file():
    _check_json(config_file)
  try:
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
  except Exception as e:  # tokenizers raises bare Exceptions on malformed models
    raise ValueError(f"cannot build a tokenizer from {tokenizer_file}: {e}") from e
  _check_chat_template(hf, directory)
  extra_eos = ()
  generation_config = directory / "generation_config.json"
  if generation_config.is_file():
    eos = _check_json(generation_config).get("eos_token_id")
    extra_eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  return Tokenizer(hf=hf, eos_token_ids=_eos_ids(hf, extra_eos))


def tokenizer_from_gguf(path: str | pathlib.Path) -> Tokenizer:
  """Byte-level BPE tokenizer and chat template from a GGUF file's metadata (llama.cpp's 'gpt2' model)."""
  meta = read_gguf_tokenizer_metadata(path)
  if meta.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
                     "(only byte-level BPE, 'gpt2')")
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if key not in meta:
      raise ValueError(f"{path}: metadata key {key!r} is missing")
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  backend = tokenizers.Tokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(tokens)},
      merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
  pre = meta.get("tokenizer.ggml.pre")
  backend.pre_tokenizer = _gguf_pre_tokenizer(pre, path)
  if pre in _QWEN2_PRE:  # Qwen's tokenizer.json normalises to NFC (llama.cpp, transformers' GGUF route do not)
    backend.normalizer = normalizers.NFC()
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([
      tokenizers.AddedToken(t, normalized=False, special=True)
      for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
  backend.add_tokens([
      tokenizers.AddedToken(t, normalized=False, special=False)
      for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])

  def token(key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None else None

  control = [t for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
      unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
      additional_special_tokens=control, chat_template=meta.get("tokenizer.chat_template"),
      clean_up_tokenization_spaces=False)
  return Tokenizer(hf=hf, eos_token_ids=_eos_ids(hf, ()))


def read_gguf_tokenizer_metadata(path: str | pathlib.Path) -> dict[str, Any]:
  """The `tokenizer.*` metadata of a GGUF file (v2/v3, little-endian) as plain Python values.

  A direct reader of the key-value header: `gguf.GGUFReader` also parses it, but builds a numpy
  view per string and takes seconds on a 49k-token vocabulary; this takes a fraction of one.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    try:
      return _read_gguf_kv(data, prefix="tokenizer.")
    except (struct.error, ValueError, UnicodeDecodeError, IndexError, OverflowError) as e:
      raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _read_gguf_kv(data: Any, prefix: str) -> dict[str, Any]:
  """Key-value pairs whose key starts with `prefix`, parsed from GGUF bytes."""
  if data[:4] != b"GGUF":
    raise ValueError("bad magic (not a GGUF file)")
  version, _, kv_count = struct.unpack_from("<IQQ", data, 4)
  if version not in (2, 3):
    raise ValueError(f"unsupported GGUF version {version}")
  pos = 24

  def read(fmt: str) -> Any:
    nonlocal pos
    (value,) = struct.unpack_from(fmt, data, pos)
    pos += struct.calcsize(fmt)
    return value

  def read_str() -> str:
    nonlocal pos
    n = read("<Q")
    if pos + n > len(data):
      raise ValueError("string runs past the end of the file")
    pos += n
    return bytes(data[pos - n:pos]).decode("utf-8")

  def read_value(kind: int) -> Any:
    nonlocal pos
    if kind == _GGUF_STRING:
      return read_str()
    if kind == _GGUF_ARRAY:
      item_kind, count = read("<I"), read("<Q")
      if item_kind in _GGUF_SCALARS:
        fmt = f"<{count}{_GGUF_SCALARS[item_kind]}"
        values = list(struct.unpack_from(fmt, data, pos))
        pos += struct.calcsize(fmt)
        return values
      return [read_value(item_kind) for _ in range(count)]
    if kind in _GGUF_SCALARS:
      return read("<" + _GGUF_SCALARS[kind])
    raise ValueError(f"unknown GGUF value type {kind}")

  out = {}
  for _ in range(kv_count):
    key = read_str()
    value = read_value(read("<I"))
    if key.startswith(prefix):
      out[key] = value
  return out


def _gguf_pre_tokenizer(pre: str | None, path: str | pathlib.Path) -> pre_tokenizers.PreTokenizer:
  """llama.cpp's pre-tokenizer for the GGUF `tokenizer.ggml.pre` names this module knows.

  'smollm' (like 'starcoder') splits every digit, then applies GPT-2's regex; 'gpt2'/'default' is GPT-2's;
  'qwen2' is Qwen's regex split (isolated) then byte-level without GPT-2's regex, as Qwen's tokenizer.json.
  """
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _QWEN2_PRE:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  if pre in ("smollm", "starcoder", "refact", "codeshell"):
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in (None, "default", "gpt2"):
    return byte_level
  raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")


def _eos_ids(hf: transformers.PreTrainedTokenizerFast, extra: tuple[int, ...]) -> tuple[int, ...]:
  """EOS first, then the extra ids, then <|endoftext|> when the vocabulary has it; no duplicates."""
  ids = [hf.eos_token_id] if hf.eos_token_id is not None else []
  ids += list(extra)
  end_of_text = hf.get_vocab().get(_END_OF_TEXT)
  if end_of_text is not None:
    ids.append(end_of_text)
  if not ids:
    raise ValueError(f"tokenizer {hf.name_or_path!r} has no EOS token")
  return tuple(dict.fromkeys(int(i) for i in ids))


def _check_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _check_chat_template(hf: transformers.PreTrainedTokenizerFast, directory: pathlib.Path) -> None:
  if hf.chat_template is not None and not isinstance(hf.chat_template, str):
    raise ValueError(f"{directory}: named chat templates ({sorted(hf.chat_template)}) are not supported")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte-level alphabet: each byte maps to one printable character."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table
