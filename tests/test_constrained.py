"""Constrained decoding: llguidance grammars and masks, and schema-valid JSON from the engine
with SmolLM2-135M at temperature 1 (and from a random model, which has no idea of JSON)."""
import json

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from trustee_jax.models import model_configs, tokenizer, weights
from trustee_jax.models.transformer import create_model
from trustee_jax.sampling import constrained, sampler
from trustee_jax.sampling.engine import Engine, SamplingParams

_STR = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "enum": {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"], "additionalProperties": False},
    "nested": {
        "type": "object", "additionalProperties": False, "required": ["user"],
        "properties": {"user": {
            "type": "object", "additionalProperties": False, "required": ["name", "address"],
            "properties": {"name": _STR, "address": {
                "type": "object", "additionalProperties": False, "required": ["city", "zip"],
                "properties": {"city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}},
    "array": {
        "type": "object", "additionalProperties": False, "required": ["tags", "points"],
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                "minItems": 1, "maxItems": 3},
                       "points": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                             "maximum": 9},
                                  "minItems": 2, "maxItems": 4}}},
    "required": {
        "type": "object", "additionalProperties": False, "required": ["id", "done"],
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                       "note": _STR, "done": {"type": "boolean"}}},
    "integer_ranges": {
        "type": "object", "additionalProperties": False, "required": ["score", "age", "delta"],
        "properties": {"score": {"type": "integer", "minimum": -1, "maximum": 1},
                       "age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "delta": {"type": "integer", "minimum": -50, "maximum": -10}}},
    "judge": {
        "type": "object", "additionalProperties": False, "required": ["reason", "score"],
        "properties": {"reason": {"type": "string", "maxLength": 40},
                       "score": {"enum": [-1, 0, 1]}}},
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def compiler(tok):
  vocab = model_configs.get_model_config("smollm2-135m").vocab_size
  return constrained.GrammarCompiler(tok.llguidance_tokenizer(vocab), vocab)


@pytest.fixture(scope="module")
def engine(tok, compiler):
  with Engine(weights.load_gguf(), num_slots=4, cache_len=512, decode_fn=tok.decode,
              grammar_compiler=compiler) as eng:
    yield eng


def _prompt(tok, name):
  return tok.hf.apply_chat_template(
      [{"role": "user", "content": f"Reply with one JSON object ({name})."}],
      tokenize=False, add_generation_prompt=True)


def _is_compact(text: str, value) -> bool:
  return text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_json_schema_grammar_and_matcher_errors(compiler):
  assert constrained.json_schema_grammar(SCHEMAS["enum"])
  assert compiler.for_json_schema(json.dumps(SCHEMAS["enum"])) is not None
  with pytest.raises(constrained.GrammarError, match="not JSON"):
    compiler.for_json_schema('{"type": ')
  with pytest.raises(constrained.GrammarError, match="Unsatisfiable"):
    compiler.for_json_schema({"type": "integer", "minimum": 3, "maximum": 1})
  with pytest.raises(constrained.GrammarError):
    compiler.matcher(constrained.lark_grammar('start: "a" undefined_rule'))


def _allowed(compiler, matcher, mask, row):
  constrained.fill_mask(matcher, mask, row)
  return np.asarray(sampler.unpack_bitmask(jnp.asarray(mask), compiler.vocab_size))


def test_mask_follows_the_grammar(tok, compiler):
  matcher = compiler.for_json_schema(SCHEMAS["enum"])
  mask = compiler.allocate(2)
  first = _allowed(compiler, matcher, mask, 1)
  assert first[0].all()  # other rows untouched (all allowed)
  starts = [tok.decode([i]) for i in np.flatnonzero(first[1])]
  assert starts and all(s.startswith("{") for s in starts), starts  # compact: no blank first
  ids = tok.encode('{"color":"green","size":2}')
  for t in ids:
    allowed = _allowed(compiler, matcher, mask, 1)
    assert allowed[1, t], tok.decode([t])
    assert matcher.consume_token(t)
  allowed = _allowed(compiler, matcher, mask, 1)
  assert set(np.flatnonzero(allowed[1])) <= set(tok.eos_token_ids)  # only the end remains
  matcher = compiler.for_json_schema(SCHEMAS["enum"])
  for t in tok.encode('{"color":"'):
    assert matcher.consume_token(t)
  allowed = _allowed(compiler, matcher, mask, 0)
  assert not allowed[0, tok.encode("yellow")[0]] and not allowed[0, tok.encode("1")[0]]


def test_schema_outputs_parse_and_validate_at_temperature_one(tok, engine):
  names = list(SCHEMAS)
  prompts, params = [], []
  for name in names:
    for seed in SEEDS:
      prompts.append(tok.encode(_prompt(tok, name)))
      params.append(SamplingParams(max_new_tokens=96, temperature=1.0, seed=seed,
                                   json_schema=SCHEMAS[name]))
  results = engine.generate(prompts, params)
  seen = {}
  for sp, c in zip(params, results):
    text = tok.decode(c.tokens, skip_special_tokens=True)
    assert c.finish_reason == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, sp.json_schema)
    assert _is_compact(text, value), text
    seen.setdefault(json.dumps(sp.json_schema), set()).add(text)
  assert all(len(v) > 1 for v in seen.values()), seen  # seeds give different objects


def test_schema_given_as_text_and_grammar_given_as_lark(tok, engine):
  schema = SCHEMAS["judge"]
  c = engine.generate([tok.encode(_prompt(tok, "judge"))], SamplingParams(
      max_new_tokens=64, temperature=0.0, json_schema=json.dumps(schema)))[0]
  jsonschema.validate(json.loads(tok.decode(c.tokens, skip_special_tokens=True)), schema)
  lark = constrained.lark_grammar('start: ("yes" | "no") "!"')
  for seed in SEEDS:
    c = engine.generate([tok.encode("Is the sky blue? Answer:")], SamplingParams(
        max_new_tokens=8, temperature=1.0, seed=seed, grammar=lark))[0]
    assert c.finish_reason == "stop"
    assert tok.decode(c.tokens, skip_special_tokens=True) in ("yes!", "no!")


def test_cut_by_max_tokens_is_reported_as_length(tok, engine):
  c = engine.generate([tok.encode(_prompt(tok, "nested"))], SamplingParams(
      max_new_tokens=4, temperature=1.0, seed=0, json_schema=SCHEMAS["nested"]))[0]
  assert c.finish_reason == "length" and len(c.tokens) == 4
  with pytest.raises(json.JSONDecodeError):
    json.loads(tok.decode(c.tokens, skip_special_tokens=True))


def test_constrained_and_free_requests_share_the_batch(tok, engine):
  free = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
  prompt = tok.encode("Write a short poem about rain:")
  alone = engine.generate([prompt], free)[0].tokens
  mixed = engine.generate([prompt, tok.encode(_prompt(tok, "enum"))], [free, SamplingParams(
      max_new_tokens=32, temperature=1.0, seed=3, json_schema=SCHEMAS["enum"])])
  assert mixed[0].tokens == alone
  jsonschema.validate(json.loads(tok.decode(mixed[1].tokens, skip_special_tokens=True)),
                      SCHEMAS["enum"])


def test_random_model_still_yields_valid_compact_json(tok, compiler):
  cfg = model_configs.get_model_config("tiny-llama", initializer_range=0.5)
  with Engine(create_model(cfg, seed=1), num_slots=4, cache_len=256, decode_fn=tok.decode,
              grammar_compiler=compiler) as eng:
    names = ["enum", "integer_ranges", "judge", "array"]
    results = eng.generate([[1, 2, 3]] * len(names), [SamplingParams(
        max_new_tokens=128, temperature=1.0, seed=4, json_schema=SCHEMAS[n]) for n in names])
  for name, c in zip(names, results):
    text = tok.decode(c.tokens, skip_special_tokens=True)
    assert c.finish_reason == "stop", (name, text)
    value = json.loads(text)
    jsonschema.validate(value, SCHEMAS[name])
    assert _is_compact(text, value), text
