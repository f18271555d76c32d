"""Tool pools: the shipped pool, TRUSTEE's layout as it is, broken pools reported by name, sampling."""
import copy
import json

import jsonschema
import numpy as np
import pytest

from trustee_jax.simulator import tools_pool as tp


def _entry(name, toolset, category, params=None, **fn):
  return {"type": "function",
          "function": {"name": name, "description": f"{name} does things.",
                       "parameters": params or {"type": "object", "properties": {},
                                                "required": []}, **fn},
          "toolset_name": toolset, "toolset_description": toolset, "category": category}


# An excerpt in the exact shape of TRUSTEE's toolbench_tools.json: names with spaces and slashes,
# a name repeated across toolsets of one category, non-standard types, string defaults on numbers.
TRUSTEE_EXCERPT = {
    "Advertising": {
        "Bing Keyword Planner": [_entry("Keyword Ideas", "Bing Keyword Planner", "Advertising", {
            "type": "object",
            "properties": {"keywords": {"type": "string", "description": "Comma-separated.",
                                        "default": "dog,puppy"},
                           "size": {"type": "number", "description": "px", "default": "1000"}},
            "required": ["keywords"]})],
        "Instant messaging": [_entry("messages/send", "Instant messaging", "Advertising")],
        "MultipleTeamsCallingTest": [_entry("getPetById", "MultipleTeamsCallingTest", "Advertising")],
        "PrivatePublicAPI": [_entry("getPetById", "PrivatePublicAPI", "Advertising")],
    },
    "Gaming": {
        "GuildWars2": [_entry("listMaps", "GuildWars2", "Gaming", {
            "type": "object",
            "properties": {"apiKey": {"type": "credentials", "description": "Your API key"},
                           "language": {"type": "select", "description": "en, es, de"},
                           "ids": {"type": "array", "description": "Ids"}},
            "required": ["apiKey"]})],
    },
}


def test_shipped_pool_is_strictly_valid_and_sized():
  pool = tp.load_shipped_pool()
  assert tp.pool_problems(pool, strict=True) == []
  assert 5 <= len(pool) <= 8
  assert all(2 <= len(toolsets) <= 4 for toolsets in pool.values())
  entries = [e for ts in pool.values() for es in ts.values() for e in es]
  assert 50 <= len(entries) <= 70
  fns = [tp.function_of(e) for e in entries]
  assert len({f["name"] for f in fns}) == len(fns)  # unique across the whole pool
  assert sum(any("enum" in p for p in f["parameters"]["properties"].values()) for f in fns) >= 15
  assert all(e["type"] == "function" and e["category"] in pool for e in entries)


def test_trustee_layout_loads_leniently_and_repairs_types(tmp_path):
  path = tmp_path / "toolbench_tools.json"
  path.write_text(json.dumps(TRUSTEE_EXCERPT))
  with pytest.raises(tp.ToolPoolError) as strict:
    tp.load_pool(path)
  assert "Gaming/GuildWars2/listMaps" in str(strict.value)
  pool = tp.load_pool(path, lenient=True)
  props = pool["Gaming"]["GuildWars2"][0]["function"]["parameters"]["properties"]
  assert props["apiKey"]["type"] == "string" and props["language"]["type"] == "string"
  assert TRUSTEE_EXCERPT["Gaming"]["GuildWars2"][0]["function"]["parameters"]["properties"][
      "apiKey"]["type"] == "credentials"  # the input is not modified
  assert tp.pool_problems(pool, strict=False) == []
  assert set(pool["Advertising"]) == set(TRUSTEE_EXCERPT["Advertising"])  # nothing dropped


def test_broken_pool_reports_every_bad_entry_by_name(tmp_path):
  pool = copy.deepcopy(TRUSTEE_EXCERPT)
  pool["Advertising"]["Bing Keyword Planner"][0]["function"]["parameters"]["properties"][
      "keywords"]["type"] = "strng"
  pool["Advertising"]["Instant messaging"].append({"type": "function", "function": {
      "name": "no_params", "description": "x"}})
  pool["Advertising"]["Instant messaging"].append(
      _entry("messages/send", "Instant messaging", "Advertising"))
  pool["Gaming"]["Empty"] = []
  path = tmp_path / "broken.json"
  path.write_text(json.dumps(pool))
  with pytest.raises(tp.ToolPoolError) as err:
    tp.load_pool(path)
  msg = str(err.value)
  for where in ("Advertising/Bing Keyword Planner/Keyword Ideas: parameters invalid at "
                "properties/keywords/type",
                "Advertising/Instant messaging/no_params: parameters is not an object",
                "Advertising/Instant messaging/messages/send: duplicate tool name",
                "Gaming/Empty: not a non-empty list of tools",
                "does not match"):  # strict name style
    assert where in msg, where
  # Lenient mode drops what it cannot repair and keeps the rest.
  lenient = tp.load_pool(path, lenient=True)
  names = [tp.tool_name(e) for e in lenient["Advertising"]["Instant messaging"]]
  assert names == ["messages/send"]
  keyword = lenient["Advertising"]["Bing Keyword Planner"][0]["function"]["parameters"]
  assert keyword["properties"]["keywords"]["type"] == "string"  # unknown type names -> string
  assert "Empty" not in lenient["Gaming"]


def test_strict_rules():
  ok = _entry("get_x", "T", "C", {"type": "object", "properties": {"a": {"type": "string"}},
                                  "required": ["a"]})
  assert tp.tool_problems(ok, strict=True) == []
  bad = copy.deepcopy(ok)
  bad["function"]["parameters"]["required"] = ["b"]
  assert any("not in properties" in p for p in tp.tool_problems(bad, strict=True))
  assert tp.tool_problems(bad, strict=False) == []
  not_object = copy.deepcopy(ok)
  not_object["function"]["parameters"]["type"] = "array"
  assert tp.tool_problems(not_object, strict=False)
  bare = {"name": "get_x", "description": "d", "parameters": {"type": "object"}}
  assert tp.tool_problems(bare, strict=True) == []  # bare function dicts are accepted
  assert tp.tool_spec(bare) == {"type": "function", "function": bare}
  with pytest.raises(tp.ToolPoolError, match="cannot read"):
    tp.load_pool("/nonexistent/pool.json")


def test_sample_tools_one_category_deduplicated_and_deterministic():
  pool = tp.load_shipped_pool()
  for seed in range(20):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    category, tools = tp.sample_tools(pool, n, rng)
    available = {tp.tool_name(e) for es in pool[category].values() for e in es}
    names = [t["function"]["name"] for t in tools]
    assert len(names) == min(n, len(available)) and len(set(names)) == len(names)
    assert set(names) <= available
    assert all(set(t) == {"type", "function"} for t in tools)  # metadata stripped
    for t in tools:
      jsonschema.Draft202012Validator.check_schema(t["function"]["parameters"])
  a = tp.sample_tools(pool, 4, np.random.default_rng(7))
  b = tp.sample_tools(pool, 4, np.random.default_rng(7))
  assert a == b


def test_sample_tools_takes_toolsets_until_enough():
  pool = {"C": {f"T{i}": [_entry(f"t{i}_{j}", f"T{i}", "C") for j in range(2)]
                for i in range(5)}}
  for seed in range(10):
    _, tools = tp.sample_tools(pool, 3, np.random.default_rng(seed))
    toolsets = {t["function"]["name"].split("_")[0] for t in tools}
    assert len(tools) == 3 and len(toolsets) == 2  # two toolsets of 2 were needed, not more
  _, tools = tp.sample_tools(TRUSTEE_EXCERPT, 10, np.random.default_rng(0))
  names = [t["function"]["name"] for t in tools]
  assert len(names) == len(set(names))  # getPetById appears in two toolsets, sampled once
  with pytest.raises(ValueError):
    tp.sample_tools(pool, 0, np.random.default_rng(0))


def _builder():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parent.parent / "launch" / "build_tool_pool.py"
  spec = importlib.util.spec_from_file_location("build_tool_pool", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _param(name, kind="string", required=True, enum=()):
  return {"name": name, "type": kind, "description": f"The {name} value.", "required": required,
          "enum": list(enum)}


def test_build_tool_pool_validates_deduplicates_and_reports(tmp_path):
  import asyncio

  from trustee_jax.simulator.client import SimulatorError
  from trustee_jax.simulator.doubles import ScriptedClient
  build = _builder()

  def lm(req):
    key = next(iter(req.schema["properties"]))
    if key == "categories":
      return {"categories": [{"description": "Cooking at home.", "name": "Cooking"},
                             {"description": "Duplicate by case.", "name": "cooking"}]}
    if key == "toolsets":
      return {"toolsets": [{"description": "Recipe search service.", "name": "Recipes"},
                           {"description": "Groceries delivered.", "name": "Groceries"}]}
    if "Groceries" in req.prompt:
      raise SimulatorError("http://x", "invalid_output", "no valid output")
    return {"tools": [
        {"description": "Find recipes by ingredient.", "name": "find_recipes", "parameters": [
            _param("ingredient"), _param("diet", enum=["vegan", "none", "vegan"]),
            _param("max_minutes", "integer", False, enum=["ignored"])]},
        {"description": "Same name again, dropped.", "name": "find_recipes", "parameters": []}]}

  client = ScriptedClient(lm)
  pool, report = asyncio.run(build.build_pool(
      client, num_categories=2, toolsets_per_category=2, tools_per_toolset=2, seed=3,
      temperature=0.5))
  assert list(pool) == ["Cooking"] and list(pool["Cooking"]) == ["Recipes"]
  (entry,) = pool["Cooking"]["Recipes"]
  params = entry["function"]["parameters"]
  assert params["required"] == ["ingredient", "diet"]
  assert params["properties"]["diet"]["enum"] == ["vegan", "none"]
  assert "enum" not in params["properties"]["max_minutes"]
  assert entry["toolset_name"] == "Recipes" and entry["category"] == "Cooking"
  text = "\n".join(report)
  assert "duplicate category 'cooking'" in text
  assert "Cooking/Recipes/find_recipes: duplicate tool name" in text
  assert "dropped toolset Cooking/Groceries" in text and "invalid_output" in text
  seeds = [r.kwargs["seed"] for r in client.requests]
  assert len(set(seeds)) == len(seeds) and all(r.kwargs["temperature"] == 0.5
                                               for r in client.requests)
  for schema in (build.category_schema(2), build.toolset_schema(2), build.tools_schema(2)):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["x-guidance"] == {"whitespace_flexible": False}
  out = tmp_path / "pool.json"
  out.write_text(json.dumps(pool))
  assert tp.load_pool(out) == pool
