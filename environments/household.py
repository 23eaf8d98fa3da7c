"""Household: a kitchen of receptacles and objects; move, open, clean, heat and cool things to reach a goal.

A small text world in the spirit of ALFWorld, written here rather than wrapped (TextWorld would add a game
compiler and seconds per episode for what is a few dicts). Places hold objects; the drawer, cabinet and fridge
can be closed; objects can be dirty, hot or cold; the agent stands somewhere and holds at most one object.
The task is a goal state ('Put a clean "mug" on the "table".'); the episode ends by itself when the goal
holds (reward 1.0), or when the action budget is spent (reward = the share of goal predicates that hold).

Every name a tool takes (an object or a place) is written in double quotes wherever the model reads it, as it
is in a tool call's JSON: a byte-level BPE reads ` mug` after a space and `"mug` after a quote as different
tokens, and a small model copies a value far sooner when the prompt holds the same tokens as the call
(docs/learning.md, "Quoting the start key").
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from agentrl.envs.base import ToolEnvironment, tool
from agentrl.envs.schema import function_schema
from agentrl.envs.tools import Tool, ToolError
from agentrl.types import Message, StepResult, Task, ToolCall

PLACES = ("table", "counter", "shelf", "drawer", "cabinet", "fridge", "sink", "stove")
OPENABLE = ("drawer", "cabinet", "fridge")
GOAL_PLACES = ("table", "counter", "shelf", "drawer", "cabinet", "fridge")
INSIDE = ("drawer", "cabinet", "fridge", "sink")  # "in the fridge", but "on the table"
FOOD = ("apple", "egg", "potato", "tomato", "bread", "soup", "onion", "lettuce")
DISHES = ("mug", "cup", "plate", "bowl", "pan", "pot", "spoon", "fork")
TYPES = FOOD + DISHES
# what each state-changing tool does, and where it has to be done
TREATMENTS = {"clean": "sink", "heat": "stove", "cool": "fridge"}
RESULT_STATE = {"clean": "clean", "heat": "hot", "cool": "cold"}
# kind -> (target types, goal places, required state or None, how many objects)
KINDS = {
    "place": (TYPES, GOAL_PLACES, None, 1),
    "clean": (DISHES, GOAL_PLACES, "clean", 1),
    "heat": (FOOD, tuple(p for p in GOAL_PLACES if p != "fridge"), "hot", 1),
    "cool": (FOOD, GOAL_PLACES, "cold", 1),
    "two": (TYPES, GOAL_PLACES, None, 2),
}
# "the": the room holds one object of the goal's type (two for "two"), and "a soup" is not English
TEMPLATES = {"place": "Put the {obj} {prep} the {place}.", "clean": "Put a clean {obj} {prep} the {place}.",
             "heat": "Heat the {obj} and put it {prep} the {place}.",
             "cool": "Cool the {obj} and put it {prep} the {place}.", "two": "Put two {obj} items {prep} the {place}."}
DEFAULTS = {"kinds": tuple(KINDS), "objects": 6, "closed": True, "auto_walk": False, "show_room": False,
            "max_actions": 30, "take_place": True}
# For a tiny model trained from scratch: every argument of every call is a word of the goal sentence
# (docs/envs/household.md, "Arguments and the easy preset").
EASY = {"kinds": ("place", "clean", "heat", "cool"), "objects": 2, "closed": False, "auto_walk": True,
        "show_room": True, "max_actions": 6, "take_place": False}
MAX_DRAWS = 1000


def in_test_split(content: str) -> bool:
    """Stable split membership of a goal (sha256: Python's hash() is salted per process)."""
    return int(hashlib.sha256(content.encode()).hexdigest(), 16) % 10 == 0


def normalize(word: str) -> str:
    """The noun a model meant: 'The Dirty Mug' -> 'mug', 'apples' -> 'apple' (wording is not the skill)."""
    words = word.replace('"', " ").replace("'", " ").lower().split()
    last = words[-1] if words else ""
    for plural in ("es", "s"):
        if last.endswith(plural) and last[: -len(plural)] in TYPES:
            return last[: -len(plural)]
    return last


def quote(name: str) -> str:
    return f'"{name}"'


def article(word: str) -> str:
    return f"an {word}" if word.lstrip('"')[:1] in tuple("aeiou") else f"a {word}"


def describe(obj: dict[str, Any]) -> str:
    """An object as the model sees it: 'dirty "mug"', 'cold "apple"', '"bowl"'."""
    return " ".join([*(["dirty"] if obj["dirty"] else []), *([obj["temp"]] if obj["temp"] != "room" else []),
                     quote(obj["type"])])


def initial_state(data: dict[str, Any]) -> dict[str, Any]:
    return {"at": "door", "holding": None, "closed": list(data["closed"]),
            "objects": [dict(o) for o in data["objects"]]}


def contents(state: dict[str, Any], place: str) -> str:
    """'"table": dirty "mug", "apple"', '"fridge": closed' or '"shelf": nothing'."""
    if place in state["closed"]:
        return f"{quote(place)}: closed"
    here = [describe(o) for o in state["objects"] if o["place"] == place]
    return f"{quote(place)}: {', '.join(here) or 'nothing'}"


def where(state: dict[str, Any]) -> str:
    return "door" if state["at"] == "door" else quote(state["at"])


def room(state: dict[str, Any]) -> str:
    """What ``look`` shows: the agent's place, every closed or non-empty place, and what the agent holds."""
    shown = [contents(state, p) for p in PLACES
             if p in state["closed"] or any(o["place"] == p for o in state["objects"])]
    holding = state["holding"]
    held = article(describe(holding)) if holding else "nothing"
    return f"You are at the {where(state)}. {''.join(f'{line}. ' for line in shown)}You hold {held}."


def progress(objects: list[dict[str, Any]], goal: dict[str, Any]) -> tuple[int, int]:
    """(goal predicates that hold, all goal predicates). Each needed object is one location predicate plus
    its required state; the objects of the goal's type that satisfy most are counted."""
    def holds(obj: dict[str, Any]) -> int:
        state = goal["state"]
        satisfied = {"clean": not obj["dirty"], "hot": obj["temp"] == "hot", "cold": obj["temp"] == "cold"}
        return int(obj["place"] == goal["place"]) + (int(satisfied[state]) if state else 0)
    scores = sorted((holds(o) for o in objects if o["type"] == goal["type"]), reverse=True)
    per_object = 1 + (1 if goal["state"] else 0)
    return sum(scores[: goal["count"]]), per_object * goal["count"]


class HouseholdEnv(ToolEnvironment):
    """Reach a goal state in a kitchen: find the object, take it, treat it, put it where the goal says.

    Args:
        kinds: task kinds to draw from: "place" (put X on Y), "clean" (put a clean dish on Y), "heat" and
            "cool" (treat a food, then put it on Y), "two" (put two X in Y; one object is held at a time).
        objects: distractor objects in the room besides the goal's own.
        closed: the drawer, cabinet and fridge start closed (contents hidden until opened; adds ``open``).
        auto_walk: acting on a place walks there; otherwise the agent must ``go`` first (adds ``go``).
        show_room: the prompt describes the room as ``look`` would, and there is no ``look`` tool (shorter
            episodes for small models: where the object is is read from the prompt).
        max_actions: tool calls (bad ones included) before the episode ends with partial credit.
        take_place: ``take`` names the place to take the object from. With false it names only the object
            and walks to one in sight (needs ``auto_walk``): the model no longer reads where the object is,
            and copies every argument from the goal sentence.
    """

    name = "household"
    version = "household-v1"
    system_prompt = "You are in a kitchen. Use the tools to make the goal true."

    def __init__(self, kinds: tuple[str, ...] = DEFAULTS["kinds"], objects: int = DEFAULTS["objects"],
                 closed: bool = DEFAULTS["closed"], auto_walk: bool = DEFAULTS["auto_walk"],
                 show_room: bool = DEFAULTS["show_room"], max_actions: int = DEFAULTS["max_actions"],
                 take_place: bool = DEFAULTS["take_place"]) -> None:
        kinds = tuple(kinds)  # configs may pass a list
        if not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {tuple(KINDS)}, got {kinds}")
        if not 0 <= objects <= len(TYPES) - 1:
            raise ValueError(f"objects must be in 0..{len(TYPES) - 1}, got {objects}")
        if max_actions < 1:
            raise ValueError(f"max_actions must be >= 1, got {max_actions}")
        if not take_place and not auto_walk:
            raise ValueError("take_place=False needs auto_walk=True: take then walks to the object")
        # only the tools the setting needs: every schema is ~50 tokens of a small model's context
        optional = [(self.look, not show_room), (self.go, not auto_walk), (self.open, closed)]
        super().__init__(tools=[Tool(function_schema(fn, fn.__name__), fn) for fn, wanted in optional if wanted])
        if not take_place:
            self.replace_tool(Tool(function_schema(self.take_in_sight, "take"), self.take_in_sight))
        self.kinds, self.objects, self.closed, self.auto_walk, self.show_room, self.max_actions = (
            kinds, objects, closed, auto_walk, show_room, max_actions)
        self.take_place = take_place
        kwargs = {"kinds": kinds, "objects": objects, "closed": closed, "auto_walk": auto_walk,
                  "show_room": show_room, "max_actions": max_actions, "take_place": take_place}
        # Results record the distribution, not just the generator, when the defaults are changed.
        # take_place joined later: versions written before it existed stay the same when it is left on.
        shown = ",".join(f"{k}={'+'.join(v) if k == 'kinds' else v}" for k, v in kwargs.items()
                         if k != "take_place" or not v)
        self.task_version = self.version if kwargs == DEFAULTS else f"{self.version}({shown})"
        self.state: dict[str, Any] = {}

    # --- episode ------------------------------------------------------------------------------
    def reset(self, task: Task) -> list[Message]:
        self.state = initial_state(task.data)
        return super().reset(task)

    def step(self, call: ToolCall) -> StepResult:
        result = super().step(call)
        if self.done or self.info["tool_calls"] < self.max_actions:
            return result
        met, total = progress(self.state["objects"], self.task.data["goal"])
        self.finish(reward=met / total, success=False)
        return StepResult(observation=result.observation + "\nYou are out of actions.", reward=self.reward,
                          done=True, info={**result.info, **self.info})

    def _changed(self, observation: str) -> str:
        """After a state change: end the episode if the goal now holds."""
        met, total = progress(self.state["objects"], self.task.data["goal"])
        if met == total:
            self.finish(reward=1.0, success=True)
            return observation + " The goal is done."
        return observation

    def _place(self, place: str, act_there: bool = True) -> str:
        """The place named, checked; an action done there walks there (auto_walk) or needs the agent there."""
        place = normalize(place)
        if place not in PLACES:
            raise ToolError(f"there is no {quote(place)}; places: {', '.join(map(quote, PLACES))}")
        if act_there and self.auto_walk:
            self.state["at"] = place
        elif act_there and self.state["at"] != place:
            raise ToolError(f"you are at the {where(self.state)}, not the {quote(place)}; go there first")
        return place

    def _contents(self, place: str) -> str:
        return contents(self.state, place)

    def _held(self, obj: str) -> dict[str, Any]:
        holding = self.state["holding"]
        if holding is None or holding["type"] != normalize(obj):
            have = article(describe(holding)) if holding else "nothing"
            raise ToolError(f"you are not holding {article(quote(normalize(obj)))}; you hold {have}")
        return holding

    def _inside(self, place: str) -> str:
        return f"{'in' if place in INSIDE else 'on'} the {quote(place)}"


    def look(self) -> str:
        """See the room and what you hold."""
        return room(self.state)

    def go(self, place: str) -> str:
        """Walk to a place.

        Args:
            place: place name.
        """
        place = self._place(place, act_there=False)
        self.state["at"] = place
        return f"You are at the {quote(place)}. {self._contents(place)}."

    def open(self, place: str) -> str:
        """Open a drawer, cabinet or fridge.

        Args:
            place: place name.
        """
        place = self._place(place)
        if place not in OPENABLE:
            raise ToolError(f"the {quote(place)} cannot be opened")
        if place not in self.state["closed"]:
            raise ToolError(f"the {quote(place)} is already open")
        self.state["closed"].remove(place)
        return f"You open the {quote(place)}. {self._contents(place)}."

    @tool
    def take(self, object: str, place: str) -> str:
        """Take an object from a place.

        Args:
            object: object name.
            place: place name.
        """
        place, wanted = self._place(place), normalize(object)
        if place in self.state["closed"]:
            raise ToolError(f"the {quote(place)} is closed; open it first")
        if self.state["holding"] is not None:
            raise ToolError(f"you already hold {article(describe(self.state['holding']))}; put it somewhere first")
        found = next((o for o in self.state["objects"] if o["place"] == place and o["type"] == wanted), None)
        if found is None:
            raise ToolError(f"there is no {quote(wanted)} {self._inside(place)}; {self._contents(place)}")
        found["place"], self.state["holding"] = "hand", found
        return f"You take the {describe(found)} from the {quote(place)}."

    def take_in_sight(self, object: str) -> str:
        """Take an object; you walk to where it is.

        Args:
            object: object name.
        """
        wanted = normalize(object)
        if self.state["holding"] is not None:
            raise ToolError(f"you already hold {article(describe(self.state['holding']))}; put it somewhere first")
        seen = [o for o in self.state["objects"] if o["type"] == wanted and o["place"] in PLACES
                and o["place"] not in self.state["closed"]]
        if not seen:
            raise ToolError(f"there is no {quote(wanted)} in sight; {room(self.state)}")
        # For "two", an object already where the goal wants it stays there.
        goal = self.task.data["goal"]
        found = next((o for o in seen if o["place"] != goal["place"]), seen[0])
        return self.take(wanted, found["place"])

    @tool
    def put(self, object: str, place: str) -> str:
        """Put the held object in or on a place.

        Args:
            object: object name.
            place: place name.
        """
        place = self._place(place)
        held = self._held(object)
        if place in self.state["closed"]:
            raise ToolError(f"the {quote(place)} is closed; open it first")
        held["place"], self.state["holding"] = place, None
        return self._changed(f"You put the {describe(held)} {self._inside(place)}.")

    def _treat(self, verb: str, obj: str) -> str:
        held = self._held(obj)
        self._place(TREATMENTS[verb])
        if verb == "clean":
            held["dirty"] = False
        else:
            held["temp"] = RESULT_STATE[verb]
        return self._changed(f"You {verb} the {quote(held['type'])} at the {quote(TREATMENTS[verb])}. "
                             f"It is {RESULT_STATE[verb]}.")

    @tool
    def clean(self, object: str) -> str:
        """Clean the held object at the sink.

        Args:
            object: object name.
        """
        return self._treat("clean", object)

    @tool
    def heat(self, object: str) -> str:
        """Heat the held object on the stove.

        Args:
            object: object name.
        """
        return self._treat("heat", object)

    @tool
    def cool(self, object: str) -> str:
        """Cool the held object in the fridge.

        Args:
            object: object name.
        """
        return self._treat("cool", object)

    # --- tasks --------------------------------------------------------------------------------
    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        # The kind is drawn once, outside the retry loop, so both splits have the same kind mix.
        kind = rng.choice(self.kinds)
        types, places, state, count = KINDS[kind]
        for _ in range(MAX_DRAWS):
            target, goal_place = rng.choice(types), rng.choice(places)
            prep = "in" if goal_place in INSIDE else "on"
            prompt = TEMPLATES[kind].format(obj=quote(target), prep=prep, place=quote(goal_place))
            # The goal sentence is all the prompt says, so splitting on it keeps prompts disjoint.
            if in_test_split(prompt) == (split == "test"):
                break
        else:  # pragma: no cover - a few hundred goals, a tenth of them test goals
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        objects = []
        # No goal predicate holds at the start: the goal's objects are elsewhere and not yet treated.
        for _ in range(count):
            start = rng.choice([p for p in PLACES if p != goal_place and not (state == "cold" and p == "fridge")])
            objects.append({"type": target, "place": start, "dirty": state == "clean" or
                            (target in DISHES and rng.random() < 0.5), "temp": "cold" if start == "fridge" else "room"})
        for other in rng.sample([t for t in TYPES if t != target], self.objects):
            start = rng.choice(PLACES)
            objects.append({"type": other, "place": start, "dirty": other in DISHES and rng.random() < 0.5,
                            "temp": "cold" if start == "fridge" else "hot" if start == "stove" else "room"})
        rng.shuffle(objects)
        data = {"kind": kind, "goal": {"type": target, "place": goal_place, "state": state, "count": count},
                "objects": objects, "closed": list(OPENABLE) if self.closed else []}
        if self.show_room:
            prompt += " " + room(initial_state(data))
        return Task(env=self.name, split=split, index=index, prompt=prompt, data=data, version=self.task_version)

    def oracle(self, task: Task) -> list[ToolCall]:
        goal, closed, at = task.data["goal"], set(task.data["closed"]), "door"
        calls = [] if self.show_room else [ToolCall("look", {})]

        def visit(place: str, open_it: bool = True) -> None:
            nonlocal at
            if not self.auto_walk and at != place:
                calls.append(ToolCall("go", {"place": place}))
            at = place
            if open_it and place in closed:
                calls.append(ToolCall("open", {"place": place}))
                closed.discard(place)

        sources = [o["place"] for o in task.data["objects"] if o["type"] == goal["type"]][: goal["count"]]
        verb = next((v for v, s in RESULT_STATE.items() if s == goal["state"]), None)
        for source in sources:
            visit(source)
            where_from = {"place": source} if self.take_place else {}
            calls.append(ToolCall("take", {"object": goal["type"], **where_from}))
            if verb:
                visit(TREATMENTS[verb], open_it=False)
                calls.append(ToolCall(verb, {"object": goal["type"]}))
            visit(goal["place"])
            calls.append(ToolCall("put", {"object": goal["type"], "place": goal["place"]}))
        return calls
