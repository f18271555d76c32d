"""A smart-home task family for the rule-based world: devices, their wording, and task drawing.

Each setter writes one store key ("temperature", "light.kitchen", ...); `get_state` reads one. A
task is a list of goals: setter calls the user wants, absolute ("set the thermostat to 21
degrees") or relative ("make it 2 degrees warmer", which needs a read of the current value
first), or, when `get_state` is the only tool offered, values the user wants read out.

The curriculum's knobs shape it as they shape the LM world's tasks: `num_tools` is the tools
offered (through the pool sampler; the others are distractors); `num_expected_calls` the goals,
one setter call each (a relative goal's read comes on top); `ambiguity_level` 0 states every
value, 1 leaves some goals without their values ("change one of the lights"), 2 only hints at
every goal ("sort out the lighting"), the user giving each goal's values when asked;
`persona_level` the wording (expert terse, beginner polite, novice chatty and indirect);
`expected_turns` 1 makes one goal relative, 2 every goal that can be (only with `get_state`
offered). One goal-and-starting-value pair in `HELDOUT_EVERY` is held out from training.
"""
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trustee_jax.simulator import tools_pool

CATEGORY = "Home Assistant"
ROOMS, DOORS = ("kitchen", "bedroom", "living_room"), ("front", "back", "garage")
GENRES = ["jazz", "rock", "classical", "pop"]
MODES, ALARMS = ("quick", "standard", "deep"), ("06:30", "07:00", "07:15", "07:45", "08:00", "09:30")
HELDOUT_EVERY = 8  # one (goals, starting values) pair in this many is held out


@dataclasses.dataclass(frozen=True)
class Spec:
  """One setter: its schema, the store key and values it writes, and how people talk about it."""
  toolset: str
  description: str
  properties: dict[str, Any]
  domain: str  # the store key, or its prefix before ".<place>"
  target: str | None  # the argument holding the written value (None: the tool writes "locked")
  values: tuple  # the values a goal asks for
  states: tuple  # the values the store may hold
  ask: Callable[[dict], str]  # the goal with every value stated
  fact: Callable[[dict], str]  # the values, as the user says them when asked
  kind: str  # the goal with its values left out
  hint: str  # the goal only hinted at
  label: Callable[[dict], str]  # what a read of the key reports
  topics: tuple[str, ...]  # word starts of a question about this device
  where: str | None = None  # the argument naming a room or door, part of the key
  places: tuple = ()
  steps: tuple[int, ...] = ()  # relative changes a goal may ask for (empty: none)
  change: Callable[[dict, int], str] | None = None  # "the volume 10 percent louder"

  def key(self, args: dict) -> str:
    return f"{self.domain}.{args[self.where]}" if self.where else self.domain

  def value(self, args: dict) -> Any:
    return args[self.target] if self.target else "locked"

  def keys(self) -> list[str]:
    return [f"{self.domain}.{p}" for p in self.places] if self.where else [self.domain]

  def sample(self, rng: np.random.Generator) -> dict:
    """Arguments of a random goal."""
    args = {self.where: str(rng.choice(self.places))} if self.where else {}
    if self.target:
      args[self.target] = _py(rng.choice(self.values))
    return args


def _py(x: Any) -> Any:
  return x.item() if isinstance(x, np.generic) else x


def _room(a: dict) -> str:
  return a["room"].replace("_", " ")


def _ud(d: int, up: str, down: str) -> str:
  return up if d > 0 else down


_INT = lambda lo, hi, d: {"type": "integer", "minimum": lo, "maximum": hi, "description": d}
_ENUM = lambda values, d: {"type": "string", "enum": list(values), "description": d}
_PCT = tuple(range(0, 101, 10))
SPECS: dict[str, Spec] = {
    "set_temperature": Spec(
        "Climate", "Set the thermostat's target temperature in degrees celsius.",
        {"value": _INT(16, 28, "Target temperature.")}, "temperature", "value",
        tuple(range(16, 29)), tuple(range(16, 29)),
        lambda a: f"set the thermostat to {a['value']} degrees",
        lambda a: f"I'd like the thermostat at {a['value']} degrees.", "change the thermostat",
        "do something about the temperature", lambda a: "the thermostat temperature",
        ("temperature", "thermostat", "degree", "warm", "cool", "heat", "cold"),
        steps=(1, 2, 3), change=lambda a, d: f"it {abs(d)} degrees {_ud(d, 'warmer', 'cooler')}"),
    "set_fan": Spec(
        "Climate", "Set a room's fan speed (0 is off, 5 is the fastest).",
        {"room": _ENUM(ROOMS, "Room."), "speed": _INT(0, 5, "Fan speed.")}, "fan", "speed",
        tuple(range(1, 6)), tuple(range(6)),
        lambda a: f"set the {_room(a)} fan to speed {a['speed']}",
        lambda a: f"The {_room(a)} fan at speed {a['speed']}.", "adjust one of the fans",
        "get some air moving", lambda a: f"the {_room(a)} fan speed", ("fan", "speed", "air", "room"),
        "room", ROOMS, (1, 2),
        lambda a, d: f"the {_room(a)} fan {abs(d)} step{'s' * (abs(d) > 1)} "
                     f"{_ud(d, 'faster', 'slower')}"),
    "set_volume": Spec(
        "Media", "Set the speaker volume in percent.", {"level": _INT(0, 100, "Volume.")},
        "volume", "level", tuple(range(5, 101, 5)), tuple(range(0, 101, 5)),
        lambda a: f"set the speaker volume to {a['level']} percent",
        lambda a: f"Make the volume {a['level']} percent.", "adjust the speaker volume",
        "fix the sound", lambda a: "the speaker volume",
        ("volume", "loud", "speaker", "sound", "quiet"), steps=(10, 20),
        change=lambda a, d: f"the volume {abs(d)} percent {_ud(d, 'louder', 'quieter')}"),
    "play_music": Spec(
        "Media", "Play a music genre on the speakers.", {"genre": _ENUM(GENRES, "Genre.")},
        "music", "genre", tuple(GENRES), (*GENRES, "off"), lambda a: f"play some {a['genre']} music",
        lambda a: f"I'm in the mood for {a['genre']}.", "put some music on",
        "liven the place up a bit", lambda a: "what music is playing",
        ("music", "genre", "song", "play", "listen")),
    "set_alarm": Spec(
        "Media", "Set the wake-up alarm.", {"time": {
            "type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$",
            "description": "Time as HH:MM, 24-hour."}}, "alarm", "time", ALARMS, (*ALARMS, "off"),
        lambda a: f"set an alarm for {a['time']}", lambda a: f"Wake me at {a['time']}.",
        "set an alarm", "make sure I wake up on time tomorrow", lambda a: "the alarm time",
        ("alarm", "wake", "time", "clock")),
    "set_light": Spec(
        "Lights", "Set a room's light brightness in percent (0 is off).",
        {"room": _ENUM(ROOMS, "Room."), "brightness": _INT(0, 100, "Brightness.")}, "light",
        "brightness", _PCT[1:], _PCT, lambda a: f"set the {_room(a)} light to {a['brightness']} percent",
        lambda a: f"The {_room(a)} light, at {a['brightness']} percent.", "change one of the lights",
        "sort out the lighting", lambda a: f"the {_room(a)} light brightness",
        ("light", "bright", "lamp", "dim", "room"), "room", ROOMS, (10, 20, 30),
        lambda a, d: f"the {_room(a)} light {abs(d)} percent {_ud(d, 'brighter', 'dimmer')}"),
    "set_blinds": Spec(
        "Lights", "Set how far a room's blinds are open, in percent (0 is closed).",
        {"room": _ENUM(ROOMS, "Room."), "position": _INT(0, 100, "Percent open.")}, "blinds",
        "position", _PCT[1:], _PCT, lambda a: f"open the {_room(a)} blinds to {a['position']} percent",
        lambda a: f"The {_room(a)} blinds, {a['position']} percent open.", "adjust one of the blinds",
        "do something about the daylight", lambda a: f"how far the {_room(a)} blinds are open",
        ("blind", "shade", "window", "daylight", "open", "room"), "room", ROOMS, (10, 20, 30),
        lambda a, d: f"the {_room(a)} blinds {abs(d)} percent {_ud(d, 'more', 'less')} open"),
    "lock_door": Spec(
        "Security and Cleaning", "Lock a door.", {"door": _ENUM(DOORS, "Door.")}, "door", None,
        ("locked",), ("locked", "unlocked"), lambda a: f"lock the {a['door']} door",
        lambda a: f"The {a['door']} door.", "lock up a door", "make the house secure",
        lambda a: f"whether the {a['door']} door is locked", ("door", "lock", "secur"), "door", DOORS),
    "start_vacuum": Spec(
        "Security and Cleaning", "Start the robot vacuum in a cleaning mode.",
        {"mode": _ENUM(MODES, "Cleaning mode.")}, "vacuum", "mode", MODES, ("idle", *MODES),
        lambda a: f"run the vacuum in {a['mode']} mode", lambda a: f"A {a['mode']} clean, please.",
        "start the vacuum", "get the floors cleaned", lambda a: "what the vacuum is doing",
        ("vacuum", "clean", "mode", "floor")),
}
GET_STATE = {"name": "get_state", "description": (
    "Read a value of the home. Keys: temperature, volume, music, alarm, vacuum, and light.<room>, "
    "fan.<room>, blinds.<room> (rooms: kitchen, bedroom, living_room), door.<door> (doors: front, "
    "back, garage)."), "parameters": {"type": "object", "properties": {"key": {
        "type": "string", "description": "Which value to read, e.g. 'volume' or 'light.kitchen'."}},
        "required": ["key"]}}


def function(name: str) -> dict[str, Any]:
  """The OpenAI function schema of a tool of the family."""
  if name == "get_state":
    return GET_STATE
  spec = SPECS[name]
  return {"name": name, "description": spec.description,
          "parameters": {"type": "object", "properties": spec.properties,
                         "required": list(spec.properties)}}


def double_pool() -> tools_pool.Pool:
  """The family's tools as a pool in the shipped layout (one category), for `sample_tools`."""
  pool: tools_pool.Pool = {CATEGORY: {}}
  for name in [*SPECS, "get_state"]:
    toolset = SPECS[name].toolset if name in SPECS else "Status"
    pool[CATEGORY].setdefault(toolset, []).append(
        {"type": "function", "function": function(name), "toolset_name": toolset,
         "toolset_description": f"{toolset} of the home.", "category": CATEGORY})
  return pool


@dataclasses.dataclass(frozen=True)
class Goal:
  """One thing the user wants: a setter call (relative when `step`), or a read (`name` get_state)."""
  name: str
  arguments: dict[str, Any]
  key: str
  start: Any  # the key's value before the task
  step: int = 0

  @property
  def target(self) -> Any:
    return self.start if self.name == "get_state" else SPECS[self.name].value(self.arguments)

  def phrase(self, level: int) -> str:
    """The request at vagueness `level` (0 every value, 1 the device only, 2 a hint)."""
    if self.name == "get_state":
      return f"tell me {self._label()}"
    spec = SPECS[self.name]
    if level:
      return spec.kind if level == 1 else spec.hint
    return f"make {spec.change(self.arguments, self.step)}" if self.step else spec.ask(self.arguments)

  def fact(self) -> str:
    """The goal's values, as the user gives them when asked."""
    if self.name == "get_state":
      return f"I'd like to know {self._label()}."
    spec = SPECS[self.name]
    return (f"I'd like {spec.change(self.arguments, self.step)} than now." if self.step
            else spec.fact(self.arguments))

  def _label(self) -> str:
    spec = spec_of_key(self.key)
    return spec.label({spec.where: self.key.split(".", 1)[1]} if spec.where else {})


def spec_of_key(key: str) -> Spec:
  """The setter whose device a store key belongs to."""
  return next(s for s in SPECS.values() if key in s.keys())


def _set_goal(name: str, rng: np.random.Generator, relative: bool) -> Goal:
  spec = SPECS[name]
  args = spec.sample(rng)
  if not relative:
    start = _py(rng.choice([s for s in spec.states if s != spec.value(args)]))
    return Goal(name, args, spec.key(args), start)
  step = int(rng.choice(spec.steps)) * int(rng.choice([1, -1]))
  targets = [v for v in spec.values if v - step in spec.states]
  args[spec.target] = _py(rng.choice(targets))
  return Goal(name, args, spec.key(args), args[spec.target] - step, step)


def _goals(kn: dict[str, int], names: Sequence[str], rng: np.random.Generator) -> list[Goal]:
  setters = [n for n in names if n in SPECS]
  if not setters:  # only get_state offered: values to read out
    keys = sorted(k for s in SPECS.values() for k in s.keys())
    picked = rng.choice(keys, min(kn["num_expected_calls"], len(keys)), replace=False)
    return [Goal("get_state", {"key": str(k)}, str(k), _py(rng.choice(spec_of_key(str(k)).states)))
            for k in picked]
  chosen = [str(n) for n in rng.choice(setters, min(kn["num_expected_calls"], len(setters)),
                                       replace=False)]
  can = [n for n in chosen if SPECS[n].steps] if "get_state" in names else []
  relative = set(can[:{0: 0, 1: 1}.get(kn["expected_turns"], len(can))])
  return [_set_goal(n, rng, n in relative) for n in chosen]


def _join(parts: Sequence[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


_EXPERT = ("{B}.", "Please {b}.", "Need you to {b}.")
_HELLO, _THANKS = ("Hi,", "Hello,", "Hey,"), ("Thanks!", "Thank you.", "Thanks a lot.")
_CONTEXT = ("I just got home from work.", "My daughter set all of this up for me.",
            "Guests are coming over tonight.", "It's been a long day.")
_SORRY = ("Sorry if that's a silly question!", "I hope that's not too much trouble.",
          "Thank you so much, dear.")


def query(phrases: Sequence[str], persona: int, rng: np.random.Generator) -> str:
  """The first message: the requests, worded as the persona (0 expert, 1 beginner, 2 novice)."""
  b = _join(phrases)
  if persona <= 0:
    return str(rng.choice(_EXPERT)).format(B=_cap(b), b=b)
  if persona == 1:
    return f"{rng.choice(_HELLO)} could you please {b}? {rng.choice(_THANKS)}"
  return (f"Hello! {rng.choice(_CONTEXT)} I'm not very good with all these gadgets, but I was "
          f"hoping you could maybe {b}? {rng.choice(_SORRY)}")


def reveal(facts: Sequence[str], persona: int, rng: np.random.Generator) -> str:
  """The user's answer to a question: the facts, in the persona's words."""
  text = " ".join(facts)
  if persona <= 0:
    return text
  if persona == 1:
    return f"{rng.choice(('Sure!', 'Of course.', 'Oh, right.'))} {text}"
  return f"Oh, um, let me think... {text} {rng.choice(_SORRY)}"


def restate(phrases: Sequence[str], persona: int, rng: np.random.Generator) -> str:
  """The user's reply when the agent stops short: what is still wanted, in the persona's words."""
  b = _join(phrases)
  if persona <= 0:
    return f"Not done yet: {b}."
  if persona == 1:
    return f"Hmm, that doesn't look done yet. Could you please {b}? {rng.choice(_THANKS)}"
  return f"Oh dear, I don't think that worked... could you still {b}? {rng.choice(_SORRY)}"


PERSONAS = ("An expert smart-home user who knows the devices well.",
            "A beginner with smart-home devices.",
            "A novice who finds smart-home gadgets confusing.")


def draw_task(kn: dict[str, int], names: Sequence[str], rng: np.random.Generator
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(raw task for `tasks.make_task`, oracle) for the offered tool names at these knobs."""
  goals = _goals(kn, names, rng)
  reads = goals[0].name == "get_state"
  start = {g.key: g.start for g in goals}
  state = {k: start[k] if k in start else _py(rng.choice(SPECS[name].states))
           for name in names if name in SPECS for k in SPECS[name].keys()} | start
  n, ambiguity, persona = len(goals), min(2, kn["ambiguity_level"]), min(2, kn["persona_level"])
  vague = set(range(n)) if ambiguity == 2 else (  # the world is drawn first: wording aside
      {int(i) for i in rng.choice(n, max(1, n // 2), replace=False)} if ambiguity else set())
  levels = [0 if reads or i not in vague else ambiguity for i in range(n)]
  expected, calls = [], []
  for g in goals:
    call = {"name": g.name, "arguments": dict(g.arguments)}
    expected += [{"name": "get_state", "arguments": {"key": g.key}}, call] if g.step else [call]
    calls.append(call)
  intent = [g.phrase(0) + (f" (from {g.start} to {g.target})" if g.step else
                           f" (it is {g.start})" if reads else "") for g in goals]
  raw = {"user_intent": _cap(_join(intent)) + ".", "user_persona": PERSONAS[persona],
         "hidden_facts": [g.fact() for g, lv in zip(goals, levels) if lv],
         "initial_state": [f"{k}={json.dumps(v)}" for k, v in state.items()],
         "expected_tool_calls": [c["name"] for c in expected], "expected_calls": expected,
         "first_user_query": query([g.phrase(lv) for g, lv in zip(goals, levels)], persona, rng)}
  oracle = {"calls": calls, "report": [g.start for g in goals] if reads else [],
            "expected_state": state | {g.key: g.target for g in goals},
            "goals": [{"name": g.name, "key": g.key, "target": g.target, "said": g.phrase(lv),
                       "fact": g.fact(), "topics": list(spec_of_key(g.key).topics)}
                      for g, lv in zip(goals, levels)]}
  return raw, oracle


def is_heldout(raw: dict[str, Any]) -> bool:
  """Whether a task's goals with their starting values are in the held-out split (wording and
  distractor devices aside): the same split for every seed and knob setting."""
  start = dict(s.split("=", 1) for s in raw["initial_state"])
  keys = [c["arguments"]["key"] if c["name"] == "get_state" else SPECS[c["name"]].key(c["arguments"])
          for c in raw["expected_calls"]]
  ident = json.dumps([raw["expected_calls"], [start[k] for k in keys]], sort_keys=True)
  digest = hashlib.blake2b(ident.encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % HELDOUT_EVERY == 0
