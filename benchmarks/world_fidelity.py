"""World fidelity: how often the frozen-LM world does what a rule-based oracle says it should.

  python benchmarks/world_fidelity.py [--tasks 6] [--episodes 6] [--config configs/demo.py]
      [--url http://host:port]   # an already running simulator (e.g. SGLang); default: SmolLM2
                                 # served in-process on 127.0.0.1

Four rates, with a scripted agent (no policy model), every LM call through the real client:
  1. task_first_try_valid: LM-generated tasks on the shipped pool that are schema-valid and pass
     validation on the very first ask (no re-ask, no regeneration).
  2. user_ended_before_agent_acted: the agent's first message is a clarifying question; the LM
     user ends the episode (empty reply) although no tool was called yet. Over the generated
     tasks and the smart-home episodes together.
  3. tool_contradicts_ledger: smart-home episodes (doubles' task family, where a tool is a plain
     key-value store) with the LM as tool simulator; each `get_state` read, before and after a
     write, is checked by rule against doubles.ToolDouble's store replayed from the same ledger.
  4. judge_disagrees_with_oracle: the LM judge's score against doubles.JudgeDouble's on those
     episodes, whose scripted write is right, has a wrong value, or uses a wrong tool (1/0/-1).
Role settings (max_tokens, limits) come from --config's `world` block. The last line printed is
one JSON object with every figure, the simulator model's name and the machine's load.
"""
import argparse
import asyncio
import collections
import importlib.util
import json
import os
import pathlib
import re
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from trustee_jax.chat import ToolCall  # noqa: E402
from trustee_jax.simulator import doubles, judge as judge_lib, tasks as tasks_lib  # noqa: E402
from trustee_jax.simulator import tools as tools_lib, tools_pool, user as user_lib  # noqa: E402
from trustee_jax.simulator.client import ClientConfig, SimulatorClient, SimulatorError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLARIFY = "Happy to help with that. Before I start, could you tell me exactly what you need?"
DONE = "All set: I have made the change you asked for."
VARIANTS = ("right", "wrong_value", "wrong_tool")  # oracle scores 1, 0, -1
NUMERIC_RANGE = {"temperature": (10, 35), "volume": (0, 100), "light": (0, 100)}
WORDS = {"music": doubles.GENRES, "door": ["locked", "unlocked"]}
SKIP_KEYS = re.compile(r"time|date|id$|_id|timestamp|updated|duration", re.I)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def knobs(ambiguity: int, num_tools: int) -> dict[str, int]:
  return dict(num_tools=num_tools, num_expected_calls=1, persona_level=1,
              ambiguity_level=ambiguity, expected_turns=1, system_prompt_level=3,
              num_criteria=2, max_user_turns=3, max_assistant_turns=5, max_tool_turns=4)


# ---- the rule: does a tool answer state the store's value? ------------------------------------


def _leaves(obj: Any, key: str = "") -> list[tuple[str, Any]]:
  if isinstance(obj, dict):
    return [x for k, v in obj.items() for x in _leaves(v, str(k))]
  if isinstance(obj, list):
    return [x for v in obj for x in _leaves(v, key)]
  return [(key, obj)]


def stated_values(text: str, store_key: str) -> set:
  """The values of `store_key`'s domain that a tool answer states (JSON leaves, else its words)."""
  domain = store_key.split(".")[0]
  try:
    leaves = _leaves(json.loads(text))
  except ValueError:
    leaves = [("", text)]
  found: set = set()
  for k, v in leaves:
    if SKIP_KEYS.search(k):
      continue
    if isinstance(v, bool) and domain == "door" and "lock" in k.lower():
      found.add("locked" if v else "unlocked")
      continue
    s = str(v)
    if domain in NUMERIC_RANGE:
      lo, hi = NUMERIC_RANGE[domain]
      found |= {int(float(n)) for n in re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", s)
                if lo <= float(n) <= hi and float(n).is_integer()}
    else:
      found |= {w for w in WORDS[domain] if re.search(rf"\b{w}\b", s.lower())}
  return found


def classify(text: str, store_key: str, expected: Any) -> str:
  """consistent (states the store's value), contradicts (states only other values), unclear
  (states no value of the domain), or error (an error for a key the store holds)."""
  if text.strip().lower().startswith("error"):
    return "error"
  found = stated_values(text, store_key)
  if expected in found:
    return "consistent"
  return "contradicts" if found else "unclear"


# ---- scripted episodes -----------------------------------------------------------------------


def _call_message(call: ToolCall) -> dict[str, Any]:
  return {"role": "assistant", "content": "", "tool_calls": [{
      "id": call.id, "type": "function",
      "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]}


def scripted_write(task: tasks_lib.Task, variant: str, rng: np.random.Generator) -> ToolCall | None:
  """The agent's write: the oracle call, the same tool with another value, or another setter."""
  name, args = task.oracle["calls"][0]["name"], dict(task.oracle["calls"][0]["arguments"])
  spec = doubles.SPECS[name]
  if variant == "right":
    return ToolCall(name, args, "call_1")
  if variant == "wrong_value":
    for _ in range(100):
      other = spec.sample(rng)
      if other != args:
        return ToolCall(name, other, "call_1")
  others = [n for n in task.tool_names if n in doubles.SPECS and n != name]
  if not others:
    return None
  other = str(rng.choice(others))
  return ToolCall(other, doubles.SPECS[other].sample(rng), "call_1")


async def smart_home_episode(task, variant, seed, *, user_sim, tool_sim, judge_sim) -> dict:
  """Clarify -> user; read; write; read -> LM tools; done; LM judge vs the oracle judge."""
  rng = np.random.default_rng(seed)
  msgs = [{"role": "system", "content": task.system_prompt},
          {"role": "user", "content": task.first_user_query},
          {"role": "assistant", "content": CLARIFY}]
  first = await user_sim.respond(task, msgs, tasks_lib.derive_seed(seed, 1))
  answer = first.response or (await doubles.UserDouble().respond(task, msgs, seed)).response
  msgs.append({"role": "user", "content": answer})
  expected_name = task.oracle["calls"][0]["name"]
  key = doubles.SPECS[expected_name].key(task.oracle["calls"][0]["arguments"])
  ledger = tools_lib.ToolLedger.for_task(task)
  write = scripted_write(task, variant, rng)
  plan = [ToolCall("get_state", {"key": key}, "call_0")] + ([write] if write else []) + [
      ToolCall("get_state", {"key": key}, "call_2")]
  checks = []
  for i, call in enumerate(plan):
    store = doubles.ToolDouble.state(ledger)  # what a plain store holds before this call
    (res,) = await tool_sim.execute(task, ledger, [call], tasks_lib.derive_seed(seed, 10 + i))
    msgs += [_call_message(call), {"role": "tool", "tool_call_id": call.id, "name": call.name,
                                   "content": res.content}]
    if call.name == "get_state":
      checks.append({"when": "before_write" if i == 0 else "after_write", "key": key,
                     "expected": store[key], "result": res.content,
                     "verdict": classify(res.content, key, store[key]) if res.valid else "rejected"})
  msgs.append({"role": "assistant", "content": DONE})
  lm = await judge_sim.score(task, msgs, task.knobs["num_criteria"], tasks_lib.derive_seed(seed, 3))
  oracle = await doubles.JudgeDouble().score(task, msgs, task.knobs["num_criteria"], seed)
  return {"variant": variant, "user_ended_first": first.ended, "reads": checks,
          "judge": lm.score, "oracle": oracle.score, "judge_reason": lm.reason}


async def smart_home_tasks(n: int, seed: int) -> list[tasks_lib.Task]:
  """Vague smart-home requests (the value must be asked for) with `get_state` among the tools."""
  pool = doubles.double_pool()
  get_state = [tools_pool.tool_spec(e) for es in pool[doubles.CATEGORY].values() for e in es
               if tools_pool.tool_name(e) == "get_state"]
  out = []
  for i in range(n):
    kn = knobs(ambiguity=1, num_tools=4)
    (req,) = tasks_lib.sample_requests(pool, [kn], np.random.default_rng(seed + i))
    tools = [t for t in req.tools if tools_pool.tool_name(t) != "get_state"][:3] + get_state
    out.append(await doubles.TaskGeneratorDouble().generate(kn, tools, req.category, seed + i))
  return out


# ---- the run ---------------------------------------------------------------------------------


async def generated_tasks(client, world, n: int, seed: int) -> tuple[list, dict]:
  """n single asks (no re-ask, no regeneration) on the shipped pool; what went wrong, by kind."""
  cfg = {**world.task.to_dict(), "max_attempts": 1}
  gen = tasks_lib.TaskGenerator(client, cfg)
  pool = tools_pool.load_shipped_pool()
  rng = np.random.default_rng(seed)
  reqs = tasks_lib.sample_requests(pool, [knobs(ambiguity=int(rng.integers(3)), num_tools=3)
                                          for _ in range(n)], rng)
  outs = await asyncio.gather(*(gen.generate(r.knobs, r.tools, r.category, r.seed) for r in reqs),
                              return_exceptions=True)
  why: collections.Counter = collections.Counter()
  tasks = []
  for out in outs:
    if isinstance(out, tasks_lib.Task):
      tasks.append(out)
    elif isinstance(out, tasks_lib.TaskGenerationError):
      first = re.search(r"\(seed -?\d+\): ([^;\n]*)", str(out))
      why["validation: " + (first.group(1) if first else str(out))[:60]] += 1
    elif isinstance(out, SimulatorError):
      why[f"simulator {out.cause}: {out.message.split('last: ')[-1][:50]}"] += 1
    else:
      raise out
  return tasks, dict(why)


async def first_user_turns(user_sim, tasks: list, seed: int) -> list[bool]:
  async def one(i, task):
    msgs = [{"role": "system", "content": task.system_prompt},
            {"role": "user", "content": task.first_user_query},
            {"role": "assistant", "content": CLARIFY}]
    return (await user_sim.respond(task, msgs, tasks_lib.derive_seed(seed, i))).ended
  return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks))))


def rate(num: int, den: int) -> float | None:
  return round(num / den, 3) if den else None


def summarise(gen_tasks, gen_why, n_asked, gen_ended, episodes) -> dict:
  reads = [c for e in episodes for c in e["reads"]]
  verdicts = collections.Counter(c["verdict"] for c in reads)
  by_when = {w: dict(collections.Counter(c["verdict"] for c in reads if c["when"] == w))
             for w in ("before_write", "after_write")}
  ended = gen_ended + [e["user_ended_first"] for e in episodes]
  agree = [e["judge"] == e["oracle"] for e in episodes]
  confusion = collections.Counter(f"oracle {e['oracle']:+d} / judge {e['judge']:+d}"
                                  for e in episodes)
  return {
      "task_first_try_valid": rate(len(gen_tasks), n_asked),
      "user_ended_before_agent_acted": rate(sum(ended), len(ended)),
      "tool_contradicts_ledger": rate(verdicts["contradicts"], len(reads)),
      "judge_disagrees_with_oracle": rate(agree.count(False), len(agree)),
      "counts": {"tasks_asked": n_asked, "tasks_valid_first_try": len(gen_tasks),
                 "task_failures": gen_why, "first_user_turns": len(ended),
                 "user_ended_first": sum(ended), "smart_home_episodes": len(episodes),
                 "reads": len(reads), "read_verdicts": dict(verdicts), "reads_by_when": by_when,
                 "judge_confusion": dict(sorted(confusion.items())),
                 "judge_disagrees_by_variant": {
                     v: rate(sum(1 for e in episodes if e["variant"] == v and
                                 e["judge"] != e["oracle"]),
                             sum(1 for e in episodes if e["variant"] == v)) for v in VARIANTS}},
      "tool_states_store_value": rate(verdicts["consistent"], len(reads)),
      "judge_always_1_would_disagree": rate(sum(e["oracle"] != 1 for e in episodes),
                                            len(episodes)),
      "tool_unclear_or_error": rate(verdicts["unclear"] + verdicts["error"], len(reads)),
  }


async def run(args, url: str, model_name: str) -> dict:
  cfg = load_config(args.config)
  w = cfg.world
  base = dict(urls=(url,), timeout_s=args.timeout_s, max_retries=1,
              max_concurrency=args.concurrency)
  # Task generation is asked once (no re-ask) to measure the first try; episodes re-ask as the
  # world does in training, so a cut reply costs time, not the episode.
  async with SimulatorClient(ClientConfig(**base, max_reasks=0)) as once, \
      SimulatorClient(ClientConfig(**base, max_reasks=2)) as client:
    user_sim = user_lib.UserSimulator(client, w.user.to_dict())
    tool_sim = tools_lib.ToolSimulator(client, w.tools.to_dict())
    judge_sim = judge_lib.Judge(client, w.judge.to_dict())
    home = await smart_home_tasks(args.episodes, args.seed + 1000)
    t0 = time.perf_counter()
    gen_tasks, gen_why = await generated_tasks(once, w, args.tasks, args.seed)
    t_tasks = time.perf_counter() - t0
    print(f"tasks: {len(gen_tasks)}/{args.tasks} valid on the first try in {t_tasks:.0f}s "
          f"{gen_why}", file=sys.stderr, flush=True)
    first_turns = first_user_turns(user_sim, gen_tasks, args.seed)
    eps = [smart_home_episode(t, VARIANTS[i % len(VARIANTS)], args.seed + i, user_sim=user_sim,
                              tool_sim=tool_sim, judge_sim=judge_sim) for i, t in enumerate(home)]
    outs = await asyncio.gather(first_turns, *eps, return_exceptions=True)
    gen_ended = outs[0] if isinstance(outs[0], list) else []
    episodes = [o for o in outs[1:] if isinstance(o, dict)]
    failed = [f"{type(o).__name__}: {str(o)[:160]}" for o in outs if isinstance(o, BaseException)]
    stats = collections.Counter(once.stats()) + collections.Counter(client.stats())
  out = summarise(gen_tasks, gen_why, args.tasks, gen_ended, episodes)
  out.update(simulator_model=model_name, simulator_url=url, infrastructure_failures=failed,
             simulator_calls=dict(sorted(stats.items())),
             seconds={"task_generation": round(t_tasks, 1),
                      "episodes": round(time.perf_counter() - t0 - t_tasks, 1)},
             samples={"reads": [c for e in episodes for c in e["reads"]][:4],
                      "judge": [{k: e[k] for k in ("variant", "oracle", "judge", "judge_reason")}
                                for e in episodes[:3]]})
  return out


def served_model(url: str) -> str:
  data = httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()
  return ", ".join(m["id"] for m in data["data"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tasks", type=int, default=6, help="generated tasks (first-try rate)")
  ap.add_argument("--episodes", type=int, default=6, help="scripted smart-home episodes")
  ap.add_argument("--config", default=str(ROOT / "configs" / "demo.py"),
                  help="config whose `world` block sets the roles")
  ap.add_argument("--url", default=None, help="a running simulator; default: SmolLM2 in-process")
  ap.add_argument("--num_slots", type=int, default=8)
  ap.add_argument("--cache_len", type=int, default=2048)
  ap.add_argument("--concurrency", type=int, default=8)
  ap.add_argument("--timeout_s", type=float, default=900.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  load_before, t0 = os.getloadavg(), time.perf_counter()
  sim = server = None
  try:
    if args.url:
      url = args.url
    else:
      from trustee_jax.models import packaged  # noqa: PLC0415
      from trustee_jax.simulator.server import ServerThread, load_simulator  # noqa: PLC0415
      sim = load_simulator("smollm2", served_name=f"smollm2-135m-instruct "
                           f"({pathlib.Path(packaged.smollm2_gguf_path()).name})",
                           num_slots=args.num_slots, cache_len=args.cache_len)
      server = ServerThread(sim.app()).start()
      url = server.url
    result = asyncio.run(run(args, url, served_model(url)))
  finally:
    if server is not None:
      server.stop()
    if sim is not None:
      sim.close()
  result = {"bench": "world_fidelity", **result, "config": args.config,
            "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(),
                        "wall_s": round(time.perf_counter() - t0, 1)}}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
