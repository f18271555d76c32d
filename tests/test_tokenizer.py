"""Tests for trustee_jax.models.tokenizer: the packaged tokenizers, conventions, export and errors."""
import json
import pathlib
import unicodedata

import gguf
import pytest
import tokenizers

from trustee_jax.models import packaged
from trustee_jax.models.tokenizer import Tokenizer, load_tokenizer, read_gguf_tokenizer_metadata

TEXTS = [
    "Hello world! 12345 + 67.8 = x",
    "  leading spaces\ttabs\n\nnewlines\r\n end ",
    "ünïcödé, 中文, emoji 🙂, ﬁ ligature",
    "def f(x):\n    return x**2  # comment",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
]


@pytest.fixture(scope="session")
def qwen3() -> Tokenizer:
  return load_tokenizer("qwen3")


@pytest.fixture(scope="session")
def smollm2() -> Tokenizer:
  return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def qwen25() -> Tokenizer:
  if "qwen2.5-coder-0.5b" not in packaged.installed_packaged_models():
    pytest.skip("the Qwen2.5-Coder-0.5B part packages are not installed (bash install.sh installs them)")
  return load_tokenizer("qwen2.5-coder-0.5b")


# Code, JSON, unicode (NFC and decomposed), digits, whitespace runs and chat markup.
QWEN_CORPUS = TEXTS + [
    "e\u0301 cafe\u0301 (decomposed) vs café",
    "I'm we'll they've it's DON'T",
    "3.14159265358979 1,000,000 0x1F 1e-9 2024-05-01T12:00:00Z",
    "          \n\n\n   \t \u00a0 \u3000 x\r\r\n",
    "Привет мир! Ελληνικά. العربية. हिन्दी. 日本語のテキスト。한국어 \U0001F468\u200d\U0001F469",
    "SELECT * FROM users WHERE id = 42;\n-- comment\nfn main() { println!(\"{}\", 1_000u64); }",
    "https://example.com/path?q=1&r=two#frag " + "a" * 300 + " !!!???...---___===+++",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2.5, null]}}\n</tool_call><|im_end|><|endoftext|>',
]


def test_qwen3_matches_tokenizer_json(qwen3):
  reference = tokenizers.Tokenizer.from_file(str(packaged.qwen3_tokenizer_dir() / "tokenizer.json"))
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>"]:
    assert qwen3.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_qwen3_conventions(qwen3):
  assert qwen3.vocab_size == 151669
  assert qwen3.eos_token_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>
  assert qwen3.bos_token_id is None
  assert qwen3.pad_token_id == 151643
  assert qwen3.token_id("<|im_end|>") == 151645
  assert qwen3.token_id("<tool_call>") == 151657
  assert qwen3.token_id("<think>") == 151667
  assert "<tool_call>" in qwen3.chat_template and "enable_thinking" in qwen3.chat_template


def test_smollm2_conventions(smollm2):
  assert smollm2.vocab_size == 49152
  assert smollm2.bos_token_id == smollm2.token_id("<|im_start|>") == 1
  assert smollm2.eos_token_ids == (2, 0)  # <|im_end|>, <|endoftext|>
  assert smollm2.pad_token_id == 2
  assert smollm2.encode("hi")[0] != smollm2.bos_token_id  # no BOS added
  # The template comes from the GGUF metadata (SmolLM2's own, with its default system prompt).
  assert smollm2.chat_template.startswith("{% for message in messages %}")
  assert "named SmolLM" in smollm2.chat_template


def test_smollm2_splits_digits_like_llama_cpp(smollm2):
  # llama.cpp's 'smollm' pre-tokenizer isolates every digit before GPT-2's regex.
  ids = smollm2.encode("year 2024")
  assert [smollm2.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]


def test_smollm2_matches_transformers_gguf_conversion(smollm2):
  pytest.importorskip("torch")  # transformers' GGUF reader imports torch
  import transformers  # pylint: disable=import-outside-toplevel
  path = packaged.smollm2_gguf_path()
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
    assert smollm2.encode(text) == reference.encode(text, add_special_tokens=False)
  assert smollm2.chat_template == reference.chat_template
  assert (smollm2.hf.bos_token, smollm2.hf.eos_token, smollm2.hf.pad_token, smollm2.hf.unk_token) == (
      reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token)


def test_qwen25_gguf_uses_qwen2_pre_tokenizer(qwen25):
  meta = read_gguf_tokenizer_metadata(packaged.qwen25_coder_gguf_path("0.5b"))
  assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
  ours = json.loads(qwen25.hf.backend_tokenizer.to_str())
  reference = json.loads((packaged.qwen3_tokenizer_dir() / "tokenizer.json").read_text())
  for key in ("normalizer", "pre_tokenizer"):
    assert ours[key] == reference[key], key
  assert ours["decoder"]["type"] == reference["decoder"]["type"] == "ByteLevel"


def test_qwen25_conventions(qwen25):
  assert qwen25.vocab_size == 151936  # the model's embedding size: 151665 tokens + 271 [PADn] placeholders
  assert qwen25.eos_token_ids == (151645, 151643)  # <|im_end|> (the GGUF's EOS), <|endoftext|>
  assert qwen25.pad_token_id == 151643 and qwen25.bos_token_id == 151643  # never added by encode
  assert qwen25.encode("hi") == [6023]
  for text, i in (("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
                  ("<tool_call>", 151657), ("</tool_call>", 151658)):
    assert qwen25.token_id(text) == i
  assert {151643, 151644, 151645} <= qwen25.special_token_ids
  assert 151657 not in qwen25.special_token_ids  # <tool_call>: a plain added token, as in Qwen's tokenizer.json
  assert qwen25.decode(qwen25.encode("<tool_call>x</tool_call><|im_end|>"), skip_special_tokens=True) == (
      "<tool_call>x</tool_call>")
  # Qwen2.5 has no <think> or <tool_response> tokens: they are ordinary text.
  assert len(qwen25.encode("<think>")) > 1 and len(qwen25.encode("<tool_response>")) > 1
  template = qwen25.chat_template
  assert "<tool_call>" in template and "<tool_response>" in template and "enable_thinking" not in template
  ll = qwen25.llguidance_tokenizer()
  assert ll.vocab_size == 151936 and ll.eos_tokens == [151645, 151643]


def test_qwen25_matches_qwen3_on_the_shared_vocabulary(qwen25, qwen3):
  reference = tokenizers.Tokenizer.from_file(str(packaged.qwen3_tokenizer_dir() / "tokenizer.json"))
  for text in QWEN_CORPUS:
    ids = qwen25.encode(text)
    assert ids == qwen3.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    assert max(ids) < 151665  # ids both vocabularies share
  ours = qwen25.hf.backend_tokenizer.get_vocab(with_added_tokens=True)
  theirs = qwen3.hf.backend_tokenizer.get_vocab(with_added_tokens=True)
  assert {t: i for t, i in theirs.items() if i < 151665} == {t: i for t, i in ours.items() if i < 151665}
  assert sorted(t for t, i in theirs.items() if i >= 151665) == [
      "</think>", "</tool_response>", "<think>", "<tool_response>"]


def test_qwen25_matches_transformers_gguf_conversion(qwen25):
  pytest.importorskip("torch")  # transformers' GGUF reader imports torch
  import transformers  # pylint: disable=import-outside-toplevel
  path = packaged.qwen25_coder_gguf_path("0.5b")
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in QWEN_CORPUS:
    # transformers' GGUF route leaves out Qwen's NFC normaliser; on NFC text the two agree.
    nfc = unicodedata.normalize("NFC", text)
    assert qwen25.encode(text) == qwen25.encode(nfc) == reference.encode(nfc, add_special_tokens=False)
  assert len(reference) == qwen25.vocab_size
  assert qwen25.chat_template == reference.chat_template
  assert sorted(i for i, t in reference.added_tokens_decoder.items() if t.special) == sorted(
      qwen25.special_token_ids)
  assert (qwen25.hf.bos_token, qwen25.hf.eos_token, qwen25.hf.pad_token) == (
      reference.bos_token, reference.eos_token, reference.pad_token)


def test_gguf_metadata_reader_matches_gguf_package():
  reader = gguf.GGUFReader(str(packaged.smollm2_gguf_path()))
  expected = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
  assert read_gguf_tokenizer_metadata(packaged.smollm2_gguf_path()) == expected


def test_truncated_gguf_is_named(tmp_path):
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(packaged.smollm2_gguf_path().read_bytes()[:200_000])
  with pytest.raises(ValueError, match="truncated.gguf is not a readable GGUF file"):
    load_tokenizer(truncated)
  not_gguf = tmp_path / "model.gguf"
  not_gguf.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
  with pytest.raises(ValueError, match="bad magic"):
    load_tokenizer(not_gguf)


@pytest.mark.parametrize("name", ["qwen3", "smollm2", "qwen25"])
def test_encode_decode(name, request):
  tok = request.getfixturevalue(name)
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("a<|im_end|>b")
  assert tok.token_id("<|im_end|>") in ids  # special tokens written in text are recognised
  assert tok.decode(ids, skip_special_tokens=True) == "ab"
  assert tok.token_id("<|im_end|>") in tok.special_token_ids


@pytest.mark.parametrize("name", ["qwen3", "smollm2", "qwen25"])
def test_token_bytes(name, request):
  tok = request.getfixturevalue(name)
  table = tok.token_bytes()
  assert len(table) == tok.vocab_size
  for text in TEXTS + ["x<|im_end|>"]:
    assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8")


def test_token_id_rejects_multi_token_text(qwen3):
  with pytest.raises(ValueError, match="not a single token"):
    qwen3.token_id("hello world")


def test_llguidance_tokenizer(smollm2):
  ll = smollm2.llguidance_tokenizer()
  assert ll.vocab_size == smollm2.vocab_size
  assert ll.eos_tokens == list(smollm2.eos_token_ids)
  assert ll.tokenize_str(TEXTS[0]) == smollm2.encode(TEXTS[0])
  assert smollm2.llguidance_tokenizer(n_vocab=49216).vocab_size == 49216
  with pytest.raises(ValueError, match="smaller"):
    smollm2.llguidance_tokenizer(n_vocab=100)


@pytest.mark.parametrize("name", ["qwen3", "smollm2", "qwen25"])
def test_save_pretrained_round_trip(name, request, tmp_path):
  tok = request.getfixturevalue(name)
  tok.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert isinstance(config.get("additional_special_tokens", []), list)
  assert "extra_special_tokens" not in config
  loaded = load_tokenizer(tmp_path)
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
    assert loaded.encode(text) == tok.encode(text)
  assert loaded.chat_template == tok.chat_template
  assert (loaded.eos_token_ids, loaded.bos_token_id, loaded.pad_token_id) == (
      tok.eos_token_ids, tok.bos_token_id, tok.pad_token_id)


def test_generation_config_eos_ids(qwen3, tmp_path):
  qwen3.save_pretrained(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151662]}))
  assert load_tokenizer(tmp_path).eos_token_ids == (151645, 151662, 151643)


def test_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither"):
    load_tokenizer(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
  with pytest.raises(ValueError, match=r"tokenizer\.json"):
    load_tokenizer(tmp_path)
  bad_gguf = tmp_path / "broken.gguf"
  bad_gguf.write_bytes(b"GGUF" + b"\x00" * 7)
  with pytest.raises(ValueError, match="broken.gguf"):
    load_tokenizer(bad_gguf)


def test_corrupt_tokenizer_config_is_named(tmp_path):
  (tmp_path / "tokenizer.json").write_bytes(
      (packaged.qwen3_tokenizer_dir() / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text("{")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
    load_tokenizer(pathlib.Path(tmp_path))
