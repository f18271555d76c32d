"""Task generation: per-task schema, validation beyond the schema, regeneration, batches, round trips."""
import asyncio
import dataclasses
import json

import jsonschema
import ml_collections
import numpy as np
import pytest

from trustee_jax.simulator import task_checks as tc
from trustee_jax.simulator import tasks as tl
from trustee_jax.simulator import tools_pool
from trustee_jax.simulator.doubles import ScriptedClient


@dataclasses.dataclass
class Knobs:
  num_tools: int = 3
  num_expected_calls: int = 2
  persona_level: int = 2
  ambiguity_level: int = 1
  expected_turns: int = 0
  system_prompt_level: int = 1
  num_criteria: int = 2
  max_user_turns: int = 3
  max_assistant_turns: int = 6
  max_tool_turns: int = 3


POOL = tools_pool.load_shipped_pool()
TOOLS = [tools_pool.tool_spec(e) for e in POOL["Online Shopping"]["Cart and Orders"][:3]]
NAMES = [t["function"]["name"] for t in TOOLS]  # add_to_cart, view_cart, checkout_cart


CALLS = [{"name": "add_to_cart", "arguments": {"product_id": "K-220", "quantity": 2}},
         {"name": "checkout_cart", "arguments": {"shipping_speed": "express",
                                                 "payment_method_id": "pm-7"}}]


def reply(query="Hi, I want to buy that blue kettle I looked at yesterday.", **over):
  out = {"user_intent": "Buy 2 blue kettles (product K-220) with express shipping.",
         "user_persona": "A novice online shopper.",
         "hidden_facts": ["The product id is K-220.", "Their saved card is PM-7."],
         "initial_state": ["Product K-220 is in stock at $39."],
         "expected_calls": CALLS,
         "first_user_query": query}
  out.update(over)
  return out


def ref_reply(**over):
  """A reply under the reference's schema (expected_arguments off): tool names only."""
  out = reply()
  del out["expected_calls"]
  return {**out, "expected_tool_calls": ["add_to_cart", "checkout_cart"], **over}


REF = tl.TaskGenConfig(expected_arguments=False)


def test_schema_is_built_per_task():
  schema = tl.task_schema(NAMES, 2, REF)
  jsonschema.Draft202012Validator.check_schema(schema)
  assert schema["x-guidance"] == {"whitespace_flexible": False}
  order = list(schema["properties"])
  assert order == ["user_intent", "user_persona", "hidden_facts", "initial_state",
                   "expected_tool_calls", "first_user_query"]
  assert schema["required"] == order and schema["additionalProperties"] is False
  calls = schema["properties"]["expected_tool_calls"]
  assert calls["items"]["enum"] == sorted(NAMES)
  assert (calls["minItems"], calls["maxItems"]) == (2, 2)
  slack = tl.task_schema(NAMES, 1, dataclasses.replace(REF, calls_slack=1))["properties"]
  assert (slack["expected_tool_calls"]["minItems"], slack["expected_tool_calls"]["maxItems"]) == (1, 2)
  ref = tl.task_schema(NAMES, 2, dataclasses.replace(REF, hidden_facts=False, initial_state=False))
  assert list(ref["properties"]) == ["user_intent", "user_persona", "expected_tool_calls",
                                     "first_user_query"]
  jsonschema.validate(ref_reply(), schema)
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate(ref_reply(expected_tool_calls=["cancel_order", "add_to_cart"]), schema)


def test_schema_with_expected_arguments():
  schema = tl.task_schema(NAMES, 2, tools=TOOLS)
  jsonschema.Draft202012Validator.check_schema(schema)
  assert list(schema["properties"]) == ["user_intent", "user_persona", "hidden_facts",
                                        "initial_state", "expected_calls", "first_user_query"]
  calls = schema["properties"]["expected_calls"]
  assert (calls["minItems"], calls["maxItems"]) == (2, 2)
  branches = calls["items"]["anyOf"]
  assert [b["properties"]["name"] for b in branches] == [{"const": n} for n in sorted(NAMES)]
  add = next(b for b in branches if b["properties"]["name"]["const"] == "add_to_cart")
  assert add["properties"]["arguments"]["required"] == ["product_id"]
  assert add["properties"]["arguments"]["additionalProperties"] is False
  jsonschema.validate(reply(), schema)
  jsonschema.validate(reply(expected_calls=[CALLS[0], {"name": "view_cart", "arguments": {}}]),
                      schema)
  add_call = CALLS[0]["arguments"]
  for bad in ({"name": "add_to_cart", "arguments": {**add_call, "quantity": "2"}},  # wrong type
              {"name": "add_to_cart", "arguments": {**add_call, "colour": "blue"}},  # unknown
              {"name": "add_to_cart", "arguments": {"quantity": 2}},  # required one missing
              {"name": "cancel_order", "arguments": {}},  # not a sampled tool
              {"name": "view_cart"}):  # no arguments
    with pytest.raises(jsonschema.ValidationError):
      jsonschema.validate(reply(expected_calls=[CALLS[0], bad]), schema)
  with pytest.raises(ValueError, match="sampled tools"):
    tl.task_schema(NAMES, 2)


def test_expected_calls_validation():
  schema = tl.task_schema(NAMES, 2, tools=TOOLS)
  problems = lambda **over: tc.task_problems(reply(**over), schema, NAMES, TOOLS)
  assert problems() == []
  assert problems(expected_calls=[CALLS[0], {"name": "cancel_order", "arguments": {}}]) == [
      "expected_calls[1] calls 'cancel_order', not a sampled tool"]
  wrong = [{"name": "add_to_cart", "arguments": {"product_id": "K-220", "quantity": 20}}, CALLS[1]]
  assert problems(expected_calls=wrong) == [
      "expected_calls[0] add_to_cart: arguments 20 is greater than the maximum of 10"]
  unsaid = [{"name": "add_to_cart", "arguments": {"product_id": "K-999", "quantity": 3}}, CALLS[1]]
  assert problems(expected_calls=unsaid) == [
      "expected_calls[0] add_to_cart: values nobody gives ['K-999', 3]"]
  # Tolerant: case and punctuation ("pm-7" for "PM-7."), numbers as text, 2.0 as "2"; the
  # enum value "express" is the tool's choice, not something the user has to say.
  two = [{"name": "add_to_cart", "arguments": {"product_id": "k 220", "quantity": 2.0}}, CALLS[1]]
  assert problems(expected_calls=two, user_intent="Buy two kettles, K-220, times 2.") == []
  # Facts only in the initial state are not something the user gives.
  assert problems(hidden_facts=["The product id is K-220."],
                  initial_state=["Card PM-7 is saved."])[0].startswith("expected_calls[1]")
  # Without the tools only the schema speaks.
  assert tc.task_problems(reply(expected_calls=wrong), schema, NAMES)[0].startswith("schema: ")


def test_make_task_carries_expected_calls():
  task = tl.make_task(reply(), category="Shop", tools=TOOLS, knobs=dataclasses.asdict(Knobs()),
                      seed=1)
  assert task.expected_calls == CALLS and task.expected_tool_calls == ["add_to_cart", "checkout_cart"]
  both = tl.make_task({**reply(), "expected_tool_calls": ["view_cart"]}, category="Shop",
                      tools=TOOLS, knobs=dataclasses.asdict(Knobs()), seed=1)
  assert both.expected_tool_calls == ["view_cart"] and both.expected_calls == CALLS
  ref = tl.make_task(ref_reply(), category="Shop", tools=TOOLS, knobs=dataclasses.asdict(Knobs()),
                     seed=1)
  assert ref.expected_calls == [] and ref.expected_tool_calls == ["add_to_cart", "checkout_cart"]
  old = {k: v for k, v in ref.to_dict().items() if k != "expected_calls"}
  assert tl.Task.from_dict(old) == ref  # tasks saved before expected_calls still load


def test_string_limits_fit_the_token_budget():
  big = tl.task_schema(NAMES, 2, tl.TaskGenConfig(max_tokens=None), TOOLS)["properties"]
  small_cfg = tl.TaskGenConfig(max_tokens=300, chars_per_token=3.0)
  small = tl.task_schema(NAMES, 2, small_cfg, TOOLS)["properties"]
  assert big["user_intent"]["maxLength"] == 600
  total = (small["user_intent"]["maxLength"] + small["user_persona"]["maxLength"]
           + small["first_user_query"]["maxLength"]
           + small["hidden_facts"]["maxItems"] * small["hidden_facts"]["items"]["maxLength"]
           + small["initial_state"]["maxItems"] * small["initial_state"]["items"]["maxLength"])
  assert total <= 300 * 3.0
  assert small["user_intent"]["maxLength"] < 600
  with pytest.raises(ValueError, match="no room"):
    tl.task_schema(NAMES, 2, tl.TaskGenConfig(max_tokens=20), TOOLS)


def test_generate_builds_a_task_from_one_valid_reply():
  client = ScriptedClient([reply()])
  gen = tl.TaskGenerator(client, {"temperature": 0.7, "max_tokens": 900})
  task = asyncio.run(gen.generate(Knobs(), TOOLS, "Online Shopping", seed=11))
  assert task.expected_tool_calls == ["add_to_cart", "checkout_cart"]
  assert task.expected_calls == CALLS
  assert task.hidden_facts == ["The product id is K-220.", "Their saved card is PM-7."]
  assert task.knobs["persona_level"] == 2 and task.tool_names == NAMES
  assert task.system_prompt.startswith("You are a helpful assistant that can call tools")
  (req,) = client.requests
  assert req.role == "task" and req.kwargs["seed"] == 11
  assert req.kwargs["temperature"] == 0.7 and req.kwargs["max_tokens"] == 900
  assert "knows nothing about the domain" in req.prompt  # persona level 2
  assert "leaves out a detail" in req.prompt  # ambiguity level 1
  assert all(n in req.prompt for n in NAMES)
  assert "expected_calls: the tool calls" in req.prompt and "expected_tool_calls" not in req.prompt
  assert req.schema == tl.task_schema(NAMES, 2, gen.cfg, TOOLS)


def test_invalid_tasks_are_regenerated_with_new_seeds():
  client = ScriptedClient([
      reply(query="Please call add_to_cart for the kettle."),  # names a tool
      reply(user_intent="   "),  # blank intent
      reply(hidden_facts=["The kettle ships to [location]."]),  # an unfilled slot (seen live)
      reply()])
  gen = tl.TaskGenerator(client, {"max_attempts": 4})
  task = asyncio.run(gen.generate(Knobs(), TOOLS, "Shop", seed=5))
  assert task.first_user_query.startswith("Hi, I want")
  seeds = [r.kwargs["seed"] for r in client.requests]
  assert seeds[0] == 5 and len(set(seeds)) == 4
  problems = tc.task_problems(reply(query="Order XXX for {name} on <date>"),
                              tl.task_schema(NAMES, 2, tools=TOOLS), NAMES, TOOLS)
  assert problems == ["placeholders instead of values: ['<date>', 'XXX', '{name}']"]


def test_generation_gives_up_loudly_after_max_attempts():
  bad = reply(query="use checkout_cart now")
  client = ScriptedClient([bad, bad])
  gen = tl.TaskGenerator(client, tl.TaskGenConfig(max_attempts=2))
  with pytest.raises(tl.TaskGenerationError) as err:
    asyncio.run(gen.generate(Knobs(), TOOLS, "Shop", seed=1))
  assert "attempt 1" in str(err.value) and "attempt 2" in str(err.value)
  assert "names tools ['checkout_cart']" in str(err.value)
  assert len(client.requests) == 2


def test_switches_off_give_the_reference_task():
  ref = ref_reply()
  del ref["hidden_facts"], ref["initial_state"]
  client = ScriptedClient([ref])
  cfg = ml_collections.ConfigDict({"hidden_facts": False, "initial_state": False,
                                   "expected_arguments": False})
  task = asyncio.run(tl.TaskGenerator(client, cfg).generate(Knobs(), TOOLS, "Shop", seed=1))
  assert task.hidden_facts == [] and task.initial_state == [] and task.expected_calls == []
  assert "expected_tool_calls: the names" in client.requests[0].prompt
  assert "expected_calls" not in client.requests[0].prompt
  assert "hidden_facts" not in client.requests[0].prompt
  assert "initial_state" not in client.requests[0].prompt


def test_task_round_trips_through_json():
  task = asyncio.run(tl.TaskGenerator(ScriptedClient([reply()])).generate(
      Knobs(), TOOLS, "Shop", seed=3))
  back = tl.Task.from_dict(json.loads(json.dumps(task.to_dict())))
  assert back == task
  with pytest.raises(ValueError, match=r"unknown fields \['extra'\]"):
    tl.Task.from_dict({**task.to_dict(), "extra": 1})
  partial = {k: v for k, v in task.to_dict().items() if k not in ("user_intent", "oracle")}
  with pytest.raises(ValueError, match=r"missing \['user_intent'\]"):
    tl.Task.from_dict(partial)


def test_knobs_from_objects_mappings_and_errors():
  assert tl.knobs_dict(Knobs())["num_tools"] == 3
  assert tl.knobs_dict(dataclasses.asdict(Knobs()) | {"level": 4})["num_criteria"] == 2
  with pytest.raises(ValueError, match="max_tool_turns"):
    tl.knobs_dict({k: 1 for k in tl.KNOB_FIELDS if k != "max_tool_turns"})


def test_batch_regenerates_duplicates_and_reports_without_padding():
  same = "Hi, I want to buy that blue kettle I looked at yesterday."
  replies = {0: [reply(query=same)], 1: [reply(query=same + "!"), reply(query="Need a new toaster.")],
             2: [reply(query="use view_cart")] * 3}
  def answer(req):
    i = int(req.prompt.split("# Domain\n")[1].split("\n")[0])
    return replies[i].pop(0) if len(replies[i]) > 1 else replies[i][0]
  client = ScriptedClient(answer)
  gen = tl.TaskGenerator(client)
  reqs = [tl.TaskRequest(Knobs(), str(i), TOOLS, seed=100 + i) for i in range(3)]
  batch = asyncio.run(gen.generate_batch(reqs))
  assert [t.category for t in batch.tasks] == ["0", "1"]
  assert batch.tasks[1].first_user_query == "Need a new toaster."
  assert not batch.complete and [i for i, _ in batch.failures] == [2]
  assert "names tools ['view_cart']" in batch.failures[0][1]


def test_batch_reports_persistent_duplicates_and_propagates_infrastructure_errors():
  gen = tl.TaskGenerator(ScriptedClient(lambda req: reply()), tl.TaskGenConfig(batch_rounds=2))
  reqs = [tl.TaskRequest(Knobs(), "c", TOOLS, seed=i) for i in range(2)]
  batch = asyncio.run(gen.generate_batch(reqs, avoid_queries=["something else"]))
  assert len(batch.tasks) == 1 and batch.failures[0][0] == 1
  assert "duplicate first query after 2 round(s)" in batch.failures[0][1]

  def down(req):
    raise ConnectionError("simulator unreachable")
  with pytest.raises(ConnectionError):
    asyncio.run(tl.TaskGenerator(ScriptedClient(down)).generate_batch(reqs))


def test_sample_requests_from_pool_and_curriculum_batch():
  from trustee_jax import curriculum
  knobs = [Knobs(num_tools=n) for n in (1, 4, 9)]
  reqs = tl.sample_requests(POOL, knobs, np.random.default_rng(0))
  assert [len(r.tools) for r in reqs] == [1, 4, 9]
  assert len({r.seed for r in reqs}) == 3
  fields = {f.name for f in dataclasses.fields(curriculum.TaskKnobs)}
  batch = curriculum.TaskKnobs(**{k: np.array([2, 3], np.int32) for k in tl.KNOB_FIELDS},
                               **{k: np.zeros(2, np.int32) for k in fields - set(tl.KNOB_FIELDS)})
  reqs = tl.sample_requests(POOL, batch, np.random.default_rng(0))
  assert [len(r.tools) for r in reqs] == [2, 3]


def test_system_prompt_levels():
  from trustee_jax.simulator.system_prompts import system_prompt
  prompts = [system_prompt(level, TOOLS) for level in range(4)]
  assert prompts[3] == "You are a helpful assistant."
  assert len(prompts[0]) > len(prompts[1]) > len(prompts[2]) > len(prompts[3])
  assert "<tool_call>" in prompts[0] and all(n in prompts[0] for n in NAMES)
  assert not any(n in p for n in NAMES for p in prompts[1:])
  with pytest.raises(ValueError):
    system_prompt(4, TOOLS)


def test_unsaid_values_become_hidden_facts_when_configured():
  unsaid = [{"name": "add_to_cart", "arguments": {"product_id": "K-999", "quantity": 3}}, CALLS[1]]
  raw = reply(expected_calls=unsaid)
  fixed = tc.with_unsaid_values_as_facts(raw, TOOLS)
  assert fixed["hidden_facts"] == [*raw.get("hidden_facts", []),
                                   "For add_to_cart: product id is K-999, quantity is 3."]
  said = [fixed["user_intent"], fixed["first_user_query"], *fixed["hidden_facts"]]
  assert tc.call_problems(unsaid, TOOLS, said) == []  # every expected value is now given
  assert tc.with_unsaid_values_as_facts(reply(), TOOLS)["hidden_facts"] == reply().get(
      "hidden_facts", [])  # nothing unsaid, nothing added
  with pytest.raises(ValueError, match="unsaid_values"):
    tl.TaskGenConfig(unsaid_values="ignore")


def test_a_reply_that_never_validates_is_a_failed_attempt_but_an_outage_propagates():
  from trustee_jax.simulator.client import SimulatorError
  errors = iter([SimulatorError("http://sim", "invalid_output", "too long after 2 re-asks")])

  def answer(request):
    err = next(errors, None)
    if err is not None:
      raise err
    return reply()

  client = ScriptedClient(answer)
  task = asyncio.run(tl.TaskGenerator(client, {"max_attempts": 2}).generate(
      Knobs(), TOOLS, "Shop", seed=5))
  assert task.first_user_query.startswith("Hi, I want") and len(client.requests) == 2

  def down(request):
    raise SimulatorError("http://sim", "connect", "refused")

  with pytest.raises(SimulatorError, match="connect"):
    asyncio.run(tl.TaskGenerator(ScriptedClient(down), {"max_attempts": 2}).generate(
        Knobs(), TOOLS, "Shop", seed=5))


def test_thinking_prompt_asks_for_a_think_block_at_the_detailed_levels():
  """A thinking policy's detailed and medium system prompts ask for <think> (the reference's);
  the brief and bare ones do not, and without thinking_prompt none does."""
  from trustee_jax.simulator import system_prompts
  for level, asks in ((0, True), (1, True), (2, False), (3, False)):
    assert ("<think>" in system_prompts.system_prompt(level, thinking=True)) == asks, level
    assert "<think>" not in system_prompts.system_prompt(level)
