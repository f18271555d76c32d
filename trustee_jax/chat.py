"""Chat format: conversations with tools to token ids, and policy output back to tool calls."""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One well-formed tool call parsed from model output."""
  name: str
  arguments: dict[str, Any]
  id: str = ""
