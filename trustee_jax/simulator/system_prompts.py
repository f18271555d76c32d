"""The policy's system prompts at four levels of detail, and the jinja loader for every role prompt.

Level 0 is detailed (steps, the Hermes `<tool_call>` format, the tool names), 1 medium, 2 brief,
3 a bare "You are a helpful assistant." Tool schemas themselves are added by the chat template.
"""
import pathlib
from typing import Any

import jinja2

PROMPTS_DIR = pathlib.Path(__file__).resolve().parent / "prompts"
NUM_LEVELS = 4


def load_template(name: str) -> jinja2.Template:
  """A prompt template from `simulator/prompts/`, with undefined variables an error."""
  env = jinja2.Environment(
      loader=jinja2.FileSystemLoader(PROMPTS_DIR), undefined=jinja2.StrictUndefined,
      keep_trailing_newline=False, autoescape=False)
  return env.get_template(name)


def system_prompt(level: int, tools: list[dict[str, Any]] | None = None, *,
                  thinking: bool = False) -> str:
  """The policy's system prompt at `level` (0 detailed .. 3 bare); with `thinking`, the detailed
  and medium ones ask for a <think> block before each action (the reference's, for Qwen3)."""
  if not 0 <= level < NUM_LEVELS:
    raise ValueError(f"system prompt level must be in [0, {NUM_LEVELS - 1}], got {level}")
  names = [t.get("function", t)["name"] for t in tools or []]
  return load_template("system_prompt.jinja").render(level=level, tool_names=names,
                                                     thinking=thinking).strip()
