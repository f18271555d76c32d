"""Grammar-constrained decoding on llguidance: JSON schemas (and Lark grammars) to token masks.

JSON is compact by default (`whitespace_flexible: false`, shared/DESIGN.md §5): with free
whitespace a small model under a mask can emit pages of blanks.
"""
import json
from typing import Any

import llguidance
import llguidance.numpy as llg_np
import numpy as np

COMPACT_JSON = {"whitespace_flexible": False}


class GrammarError(ValueError):
  """An invalid or unsatisfiable schema or grammar."""


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
  """llguidance grammar for a JSON schema, compact unless the schema's x-guidance says so."""
  try:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
  except (ValueError, TypeError) as e:
    raise GrammarError(f"invalid JSON schema: {e}") from e


def lark_grammar(lark: str) -> str:
  return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
  """Builds matchers for one tokenizer (building the LLTokenizer is the slow part: once)."""

  def __init__(self, ll_tokenizer: "llguidance.LLTokenizer", vocab_size: int):
    self.ll_tokenizer = ll_tokenizer
    self.vocab_size = vocab_size

  def matcher(self, grammar: str) -> "llguidance.LLMatcher":
    """A fresh matcher; raises GrammarError naming the problem for a bad grammar."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, self.ll_tokenizer)
    if is_error:
      raise GrammarError(f"invalid grammar: {messages[0] if messages else 'unknown error'}")
    matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
      raise GrammarError(f"grammar rejected: {matcher.get_error()}")
    return matcher

  def for_json_schema(self, schema: dict[str, Any] | str) -> "llguidance.LLMatcher":
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise GrammarError(f"schema is not JSON: {e}") from e
    return self.matcher(json_schema_grammar(schema))

  def allocate(self, batch: int) -> np.ndarray:
    """An all-allowed int32 bitmask [batch, ceil(V/32)]."""
    return llg_np.allocate_token_bitmask(batch, self.vocab_size)


def fill_mask(matcher: "llguidance.LLMatcher", bitmask: np.ndarray, row: int) -> None:
  """Writes the matcher's allowed next tokens into row `row` of the bitmask."""
  llg_np.fill_next_token_bitmask(matcher, bitmask, row)
  if matcher.is_error():
    raise GrammarError(f"grammar matcher failed: {matcher.get_error()}")
