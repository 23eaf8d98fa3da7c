"""KG: multi-hop questions over a small generated knowledge graph, with KG-agent tools and set variables #0, #1, ...

Each task has its own graph (people, companies, cities and sports joined by typed relations), so answers must be
read from the tools, not remembered. ``neighbors`` and ``intersection`` store their result sets as variables
(``#0``, ``#1``, ... in call order, as in the KG-agent literature); any tool takes an entity name or a variable.
The reward is the F1 of the answered set against the true one (a count must match exactly).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from agentrl.envs import ToolEnvironment, ToolError, in_test_split, object_tools, tool
from agentrl.types import Message, Task, ToolCall

VOCAB = {
    "person": ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ida", "Jack", "Kate", "Liam", "Mia",
               "Noah", "Olga", "Paul"),
    "company": ("Acme", "Apex", "Nova", "Orbit", "Pixel", "Delta", "Vertex", "Zenith"),
    "city": ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid"),
    "sport": ("chess", "golf", "tennis", "yoga", "soccer", "rugby"),
}
# relation -> (from type, to type); functional relations have exactly one tail, the others any number
FUNCTIONAL = {"employer": ("person", "company"), "home": ("person", "city"), "hobby": ("person", "sport"),
              "location": ("company", "city"), "owner": ("company", "person")}
MULTI = {"friend": ("person", "person"), "employee": ("company", "person"), "resident": ("city", "person"),
         "fan": ("sport", "person")}
INVERSE = {"employee": "employer", "resident": "home", "fan": "hobby"}  # multi relation -> the one it inverts
KINDS = ("hop1", "hop2", "hop3", "count", "count_hop", "intersect")
DEFAULTS = {"kinds": KINDS, "people": (8, 12), "others": (3, 4), "friend_chance": 0.3, "relations_tool": True}
EASY = {"kinds": ("hop1", "hop2", "count", "intersect"), "people": (5, 6), "others": (2, 3), "friend_chance": 0.3,
        "relations_tool": False}
ARGUMENTS = {"neighbors": ("entity", "relation"), "intersection": ("first", "second"), "count": ("variable",)}
MAX_DRAWS = 1000
MAX_VARIABLES = 100
_VARIABLE = re.compile(r"#(\d+)")


def normalize(value: str) -> str:
    return value.strip().strip("'\"").strip().lower()


def set_f1(given: set[str], truth: set[str]) -> float:
    hits = len(given & truth)
    return 0.0 if hits == 0 else 2 * hits / (len(given) + len(truth))


def quoted(word: str) -> str:
    # Relations and entities are quoted in the question as they are in a call ({"relation": "owner"}), so the
    # word is the same tokens in both places.
    return f'"{word}"'


def chains(start: str, hops: int) -> list[tuple[str, ...]]:
    """Every path of ``hops`` functional relations from an entity type."""
    if hops == 0:
        return [()]
    return [(rel, *rest) for rel, (head, tail) in sorted(FUNCTIONAL.items()) if head == start
            for rest in chains(tail, hops - 1)]


class KGEnv(ToolEnvironment):
    """Answer a question about a knowledge graph by following relations with ``neighbors``.

    Args:
        kinds: question kinds: "hop1", "hop2", "hop3" (follow 1-3 relations to one entity), "count" (how many
            neighbours), "count_hop" (how many neighbours of an entity one hop away), "intersect" (who is a
            neighbour of two entities).
        people: (fewest, most) people in a graph.
        others: (fewest, most) companies, cities and sports each.
        friend_chance: chance that two people are friends.
        relations_tool: offer the ``relations`` tool (the questions name their relations, so it is only for
            exploring; without it every prompt is one tool schema shorter).
    """

    name = "kg"
    version = "kg-v1"
    max_observation_chars = 1000
    system_prompt = "Answer from the knowledge graph. Results are stored as variables #0, #1, ..."

    def __init__(self, kinds: tuple[str, ...] = KINDS, people: tuple[int, int] = DEFAULTS["people"],
                 others: tuple[int, int] = DEFAULTS["others"], friend_chance: float = 0.3,
                 relations_tool: bool = True) -> None:
        kinds, people, others = tuple(kinds), tuple(people), tuple(others)  # configs may pass lists
        if not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if len(people) != 2 or not 3 <= people[0] <= people[1] <= len(VOCAB["person"]):
            raise ValueError(f"people must be (fewest, most) within 3..{len(VOCAB['person'])}, got {people}")
        if len(others) != 2 or not 2 <= others[0] <= others[1] <= len(VOCAB["sport"]):
            raise ValueError(f"others must be (fewest, most) within 2..{len(VOCAB['sport'])}, got {others}")
        if not 0.0 < friend_chance <= 1.0:
            raise ValueError(f"friend_chance must be in (0, 1], got {friend_chance}")
        super().__init__(tools=object_tools(self, ["relations"]) if relations_tool else ())
        self.kinds, self.people, self.others, self.friend_chance = kinds, people, others, friend_chance
        settings = {"kinds": kinds, "people": people, "others": others, "friend_chance": friend_chance,
                    "relations_tool": relations_tool}
        shown = (f"kinds={'+'.join(kinds)},people={people[0]}-{people[1]},others={others[0]}-{others[1]},"
                 f"friend_chance={friend_chance},relations_tool={relations_tool}")
        self.task_version = self.version if settings == DEFAULTS else f"{self.version}({shown})"
        self.kind_of: dict[str, str] = {}  # entity -> type
        self.edges: dict[tuple[str, str], list[str]] = {}  # (entity, relation) -> sorted tails
        self.variables: list[list[str]] = []

    def reset(self, task: Task) -> list[Message]:
        graph = task.data["graph"]
        self.kind_of = {name: kind for kind, names in graph["entities"].items() for name in names}
        self.edges = {}
        for head, relation, tail in graph["edges"]:
            self.edges.setdefault((head, relation), []).append(tail)
        self.variables = []
        return super().reset(task)

    # --- tools (relations is offered only with relations_tool) ------------------------------------
    def relations(self, entity: str) -> str:
        """List the relations of an entity.

        Args:
            entity: a name or a variable like "#0".
        """
        members = self.resolve(entity)
        found = sorted({rel for member in members for (head, rel) in self.edges if head == member})
        return json.dumps(found)

    @tool
    def neighbors(self, entity: str, relation: str) -> str:
        """Follow a relation from an entity or a variable; gives a new variable.

        Args:
            entity: a name or a variable like "#0".
            relation: e.g. "employer".
        """
        members = self.resolve(entity)
        relation = normalize(relation)
        allowed = {rel for rel, (head, _) in {**FUNCTIONAL, **MULTI}.items()
                   if any(self.kind_of[m] == head for m in members)}
        if members and relation not in allowed:
            raise ToolError(f"{entity[:40]} has no relation {relation[:40]!r}; it has: {', '.join(sorted(allowed))}")
        return self.store(sorted({tail for m in members for tail in self.edges.get((m, relation), [])}))

    @tool
    def intersection(self, first: str, second: str) -> str:
        """The entities in both variables; gives a new variable.

        Args:
            first: a variable.
            second: a variable.
        """
        second_members = set(self.resolve(second))
        return self.store([m for m in self.resolve(first) if m in second_members])

    @tool
    def count(self, variable: str) -> str:
        """Count the entities in a variable.

        Args:
            variable: e.g. "#0".
        """
        return str(len(self.resolve(variable)))

    @tool
    def answer(self, value: str) -> str:
        """Give the final answer; ends the episode.

        Args:
            value: an entity, a number or a variable.
        """
        reward = self.score(value)
        self.finish(reward=reward, success=reward == 1.0)
        return "Answer recorded."

    # --- state --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> list[str]:
        """The entities a name or a variable stands for."""
        ref = ref.strip().strip("'\"").strip()
        match = _VARIABLE.fullmatch(ref)
        if match:
            index = int(match.group(1))
            if index >= len(self.variables):
                raise ToolError(f"no variable {ref}; there are {len(self.variables)}")
            return self.variables[index]
        canonical = {name.lower(): name for name in self.kind_of}
        if ref.lower() not in canonical:
            raise ToolError(f"no entity {ref[:40]!r}")
        return [canonical[ref.lower()]]

    def store(self, members: list[str]) -> str:
        if len(self.variables) >= MAX_VARIABLES:
            raise ToolError(f"too many variables (at most {MAX_VARIABLES})")
        self.variables.append(members)
        return f"#{len(self.variables) - 1}: {json.dumps(members)}"

    def score(self, value: str) -> float:
        """F1 of the answered entities against the truth; a count must be the number itself."""
        truth = self.task.data["answer"]
        if isinstance(truth, int):
            try:
                return float(float(normalize(value)) == truth)
            except ValueError:
                return 0.0
        match = _VARIABLE.fullmatch(normalize(value))
        if match and int(match.group(1)) < len(self.variables):
            given = {m.lower() for m in self.variables[int(match.group(1))]}
        else:
            given = {normalize(part) for part in value.split(",") if normalize(part)}
        return set_f1(given, {t.lower() for t in truth})

    # --- tasks --------------------------------------------------------------------------------
    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        # The kind is drawn once, outside the retry loop, so both splits have the same mix of kinds.
        kind = rng.choice(self.kinds)
        for _ in range(MAX_DRAWS):
            graph = self.make_graph(rng)
            prompt, data = QUESTION_MAKERS[kind](rng, graph)
            # The graph is part of the task: the same question over another graph has another answer.
            if in_test_split(json.dumps([prompt, graph], sort_keys=True)) == (split == "test"):
                break
        else:  # pragma: no cover - the space of graphs is far too large to exhaust
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        data = {"kind": kind, "graph": graph, **data}
        return Task(env=self.name, split=split, index=index, prompt=prompt, data=data, version=self.task_version)

    def make_graph(self, rng: random.Random) -> dict[str, Any]:
        entities = {"person": sorted(rng.sample(VOCAB["person"], rng.randint(*self.people)))}
        for kind in ("company", "city", "sport"):
            entities[kind] = sorted(rng.sample(VOCAB[kind], rng.randint(*self.others)))
        edges = []
        for relation, (head, tail) in sorted(FUNCTIONAL.items()):
            edges += [[name, relation, rng.choice(entities[tail])] for name in entities[head]]
        people = entities["person"]
        for i, a in enumerate(people):
            for b in people[i + 1:]:
                if rng.random() < self.friend_chance:
                    edges += [[a, "friend", b], [b, "friend", a]]
        for inverse, relation in INVERSE.items():
            edges += [[tail, inverse, head] for head, rel, tail in list(edges) if rel == relation]
        return {"entities": entities, "edges": sorted(edges)}

    def oracle(self, task: Task) -> list[ToolCall]:
        """Replays the question's plan; a single entity is passed on by name, a set by its variable."""
        calls = [ToolCall(op, dict(zip(ARGUMENTS[op], args))) for op, *args in task.data["plan"]]
        return calls + [ToolCall("answer", {"value": task.data["final"]})]


# --- one maker per kind: (rng, graph) -> (prompt, data with "plan", "final" and "answer") --------------------
def _tails(graph: dict, head: str, relation: str) -> list[str]:
    return [t for h, r, t in graph["edges"] if h == head and r == relation]


def _follow(graph: dict, start: str, path: tuple[str, ...]) -> tuple[list[list], str]:
    """The neighbors steps along a functional path (each hop's entity by name) and the entity reached."""
    plan, here = [], start
    for relation in path:
        plan.append(["neighbors", here, relation])
        here = _tails(graph, here, relation)[0]
    return plan, here


def _hops(hops: int):
    def make(rng: random.Random, graph: dict) -> tuple[str, dict]:
        kind = rng.choice(("person", "company"))
        path = rng.choice(chains(kind, hops))
        start = rng.choice(graph["entities"][kind])
        plan, end = _follow(graph, start, path)
        phrase = " of the ".join(quoted(rel) for rel in reversed(path))
        return f"What is the {phrase} of {quoted(start)}?", {"plan": plan, "final": end, "answer": [end]}
    return make


def _count(rng: random.Random, graph: dict, hop: bool = False) -> tuple[str, dict]:
    relation = rng.choice(sorted(MULTI))
    kind = MULTI[relation][0]
    if hop:  # reach an entity of that kind through one functional relation first
        first = rng.choice([rel for rel, (head, tail) in sorted(FUNCTIONAL.items()) if tail == kind])
        start = rng.choice(graph["entities"][FUNCTIONAL[first][0]])
        plan, here = _follow(graph, start, (first,))
        phrase = f"the {quoted(first)} of {quoted(start)}"
    else:
        here = rng.choice(graph["entities"][kind])
        plan, phrase = [], quoted(here)
    plan += [["neighbors", here, relation], ["count", f"#{len(plan)}"]]
    n = len(_tails(graph, here, relation))
    return f"How many {quoted(relation)} neighbors does {phrase} have?", {"plan": plan, "final": str(n), "answer": n}


def _intersect(rng: random.Random, graph: dict) -> tuple[str, dict]:
    person = rng.choice(graph["entities"]["person"])
    # the relations that lead to this person, each from an entity that has it as a neighbour
    sources = [(rel, _tails(graph, person, INVERSE[rel])[0]) for rel in sorted(INVERSE)]
    friends = _tails(graph, person, "friend")
    if friends:
        sources.append(("friend", rng.choice(friends)))
    (rel1, src1), (rel2, src2) = rng.sample(sources, 2)
    both = sorted(set(_tails(graph, src1, rel1)) & set(_tails(graph, src2, rel2)))
    article = lambda rel: "an" if rel[0] in "aeiou" else "a"  # noqa: E731
    prompt = (f"Who is both {article(rel1)} {quoted(rel1)} of {quoted(src1)} and {article(rel2)} {quoted(rel2)} "
              f"of {quoted(src2)}?")
    plan = [["neighbors", src1, rel1], ["neighbors", src2, rel2], ["intersection", "#0", "#1"]]
    return prompt, {"plan": plan, "final": "#2", "answer": both}


QUESTION_MAKERS = {"hop1": _hops(1), "hop2": _hops(2), "hop3": _hops(3), "count": _count,
                   "count_hop": lambda rng, graph: _count(rng, graph, hop=True), "intersect": _intersect}
