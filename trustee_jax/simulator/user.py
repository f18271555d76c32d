"""The user simulator: the frozen LM plays the task's person and replies to the agent.

It sees the persona, the hidden intent (and facts, when the task has them), the tools' names and
the conversation rendered as escaped data; it replies in 1-3 sentences and grades the agent's last
message -1/0/1. An empty reply ends the episode (goal met, or clearly failed).
"""
import dataclasses
from typing import Any

from trustee_jax.config_dataclass import from_config
from trustee_jax.simulator import system_prompts
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.judge import render_trajectory
from trustee_jax.simulator.tasks import Task, sampling_kwargs


@dataclasses.dataclass(frozen=True)
class UserConfig:
  max_response_chars: int = 400
  max_thought_chars: int = 300
  temperature: float | None = None
  top_p: float | None = None
  max_tokens: int | None = 384
  frequency_penalty: float | None = None
  extra_fields: bool = True  # a private `thought` before the reply (the reference has none)
  top_k: int | None = None  # SGLang's and vLLM's extension; None: the server's default
  chat_template_kwargs: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class UserReply:
  response: str
  reward: int
  ended: bool


def user_schema(cfg: UserConfig) -> dict[str, Any]:
  """A private thought first (extra_fields), then the reply ("" ends the episode), then the
  turn reward."""
  props = {"thought": {"type": "string", "maxLength": cfg.max_thought_chars},
           "response": {"type": "string", "maxLength": cfg.max_response_chars},
           "reward": {"type": "integer", "enum": [-1, 0, 1]}}
  if not cfg.extra_fields:
    del props["thought"]
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


class UserSimulator:
  """Replies as the task's user to the agent's last (text) message."""

  def __init__(self, client: Any, cfg: Any = None):
    self.client = client
    self.cfg: UserConfig = from_config(UserConfig, cfg, block="world.user")
    self._template = system_prompts.load_template("user.jinja")
    self._schema = user_schema(self.cfg)

  def prompt(self, task: Task, messages: list[dict[str, Any]]) -> str:
    tools = [{"name": tools_pool.tool_name(t),
              "description": tools_pool.function_of(t).get("description", "")} for t in task.tools]
    return self._template.render(task=task, tools=tools, trajectory=render_trajectory(messages),
                                 extra_fields=self.cfg.extra_fields)

  async def respond(self, task: Task, messages: list[dict[str, Any]], seed: int) -> UserReply:
    if not messages or messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
      raise ValueError("the user simulator answers an assistant text message; the last message "
                       f"is {messages[-1] if messages else None!r}")
    raw = await self.client.chat_json([{"role": "user", "content": self.prompt(task, messages)}],
                                      self._schema, role="user", seed=seed,
                                      affinity=task.affinity, **sampling_kwargs(self.cfg))
    response = str(raw["response"]).strip()
    return UserReply(response=response, reward=int(raw["reward"]), ended=not response)
