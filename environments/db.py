"""DB: questions about, and changes to, a small generated SQLite database; real sqlite3, one database per episode.

Every episode gets a fresh in-memory database built from the task's tables. Questions are scored by the answer
(numbers compared numerically, lists by F1); changes are scored by reading the database back after the episode
and comparing every original table with the expected rows.

The database itself, and what keeps model-written SQL inside it, is :mod:`environments.db_sqlite`.
"""

from __future__ import annotations

import json
import random
import sqlite3
from typing import Any

from agentrl.envs import ToolEnvironment, ToolError, in_test_split, object_tools, tool
from agentrl.types import Message, Task, ToolCall
from environments.db_sqlite import (MAX_CELL_CHARS, MAX_ROWS, MAX_SQL_CHARS, format_rows, open_database, quoted,
                                   run_sql, table_state)

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ida", "Jack", "Kate", "Liam", "Mia", "Noah",
         "Olga", "Paul")
# few depts, cities and products, so counts and totals are often above 1
DEPTS = ("sales", "legal", "design", "support")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo")
PRODUCTS = ("pen", "desk", "lamp", "mug")
SCHEMA = {
    "people": (("name", "TEXT"), ("dept", "TEXT"), ("city", "TEXT"), ("age", "INTEGER"), ("salary", "INTEGER")),
    "depts": (("dept", "TEXT"), ("floor", "INTEGER"), ("budget", "INTEGER")),
    "orders": (("id", "INTEGER"), ("name", "TEXT"), ("product", "TEXT"), ("qty", "INTEGER")),
}
KINDS = ("lookup", "count", "aggregate", "join", "list", "insert", "update", "delete")
JOIN_TABLES = ("depts", "orders")  # "join" needs one of them
DEFAULTS = {"tables": tuple(SCHEMA), "kinds": KINDS, "rows": (6, 10), "schema_in_prompt": False}
EASY = {"tables": ("people",), "kinds": ("lookup", "count", "update", "delete"), "rows": (4, 5),
        "schema_in_prompt": True}

MAX_DRAWS = 1000
TOLERANCE = 1e-6


def normalize(value: Any) -> str:
    return str(value).strip().strip("'\"").strip().lower()


def same_value(given: str, truth: Any) -> bool:
    """Answers match after normalizing case and quotes; numbers match numerically ("3.0" is 3)."""
    given, truth = normalize(given), normalize(truth)
    try:
        return abs(float(given) - float(truth)) < TOLERANCE
    except ValueError:
        return given == truth


def set_f1(given: list[str], truth: list[str]) -> float:
    given_set, truth_set = {normalize(v) for v in given if normalize(v)}, {normalize(v) for v in truth}
    hits = len(given_set & truth_set)
    return 0.0 if hits == 0 else 2 * hits / (len(given_set) + len(truth_set))


class DBEnv(ToolEnvironment):
    """Answer a question about a small SQLite database, or change it as asked, with SQL.

    Args:
        tables: which tables the database has, a subset of ("people", "depts", "orders") with "people".
        kinds: task kinds: "lookup" (one value), "count", "aggregate" (max/min/total), "join" (needs depts
            or orders),
            "list" (several names; F1), "insert", "update", "delete" (changes; scored on the final state).
        rows: (fewest, most) rows of the people table.
        schema_in_prompt: give the tables and columns in the system prompt, and offer no list_tables and
            describe tools; otherwise the model finds them with those two.
    """

    name = "db"
    version = "db-v1"
    max_observation_chars = 1200

    def __init__(self, tables: tuple[str, ...] = DEFAULTS["tables"], kinds: tuple[str, ...] = KINDS,
                 rows: tuple[int, int] = DEFAULTS["rows"], schema_in_prompt: bool = False) -> None:
        tables, kinds, rows = tuple(tables), tuple(kinds), tuple(rows)  # configs may pass lists
        if "people" not in tables or not set(tables) <= set(SCHEMA):
            raise ValueError(f"tables must include 'people' and be a subset of {tuple(SCHEMA)}, got {tables}")
        if not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if "join" in kinds and not set(JOIN_TABLES) & set(tables):
            raise ValueError(f"the join kind needs one of the tables {JOIN_TABLES}")
        if len(rows) != 2 or not 3 <= rows[0] <= rows[1] <= 12:
            raise ValueError(f"rows must be (fewest, most) with 3 <= fewest <= most <= 12, got {rows}")
        # With the schema in the prompt there is nothing to explore, and two fewer tool schemas in every prompt.
        super().__init__(tools=() if schema_in_prompt else object_tools(self, ["list_tables", "describe"]))
        self.tables = tuple(t for t in SCHEMA if t in tables)
        self.kinds, self.rows, self.schema_in_prompt = kinds, rows, schema_in_prompt
        settings = {"tables": self.tables, "kinds": kinds, "rows": rows, "schema_in_prompt": schema_in_prompt}
        shown = (f"tables={'+'.join(self.tables)},kinds={'+'.join(kinds)},rows={rows[0]}-{rows[1]},"
                 f"schema_in_prompt={schema_in_prompt}")
        self.task_version = self.version if settings == DEFAULTS else f"{self.version}({shown})"
        self.system_prompt = "Answer the question about the SQLite database, or make the change it asks, with SQL."
        if schema_in_prompt:
            self.system_prompt += " Tables: " + "; ".join(
                f"{t}({', '.join(col for col, _ in SCHEMA[t])})" for t in self.tables) + "."
        self.conn: sqlite3.Connection | None = None
        self.guard: dict[str, Any] = {}

    def reset(self, task: Task) -> list[Message]:
        self.close()
        messages = super().reset(task)
        self.conn, self.guard = open_database(task.data["tables"])
        return messages

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # --- tools (list_tables and describe are offered only without the schema in the prompt) ------------
    def list_tables(self) -> str:
        """List the tables of the database."""
        names = run_sql(self.conn, self.guard, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")[1]
        return "\n".join(name for (name,) in names[:MAX_ROWS]) or "(no tables)"

    def describe(self, table: str) -> str:
        """Show a table's columns, their types and its row count.

        Args:
            table: the table name.
        """
        names = [n for (n,) in run_sql(self.conn, self.guard, "SELECT name FROM sqlite_master WHERE type = 'table'")[1]]
        if table not in names:
            raise ToolError(f"no table {table[:MAX_CELL_CHARS]!r}; tables: {', '.join(sorted(names)[:MAX_ROWS])}")
        columns = run_sql(self.conn, self.guard, f"PRAGMA table_info({quoted(table)})")[1]
        identifier = '"' + table.replace('"', '""') + '"'
        count = run_sql(self.conn, self.guard, f"SELECT COUNT(*) FROM {identifier}")[1][0][0]
        return f"{table}: " + ", ".join(f"{col[1]} {col[2]}" for col in columns) + f" ({count} rows)"

    @tool
    def query(self, sql: str) -> str:
        """Run one SQL statement and show its result.

        Args:
            sql: e.g. "SELECT name FROM people".
        """
        if len(sql) > MAX_SQL_CHARS:
            raise ToolError(f"SQL longer than {MAX_SQL_CHARS} characters")
        columns, rows, changed = run_sql(self.conn, self.guard, sql)
        if columns is not None:
            return format_rows(columns, rows)
        return f"{changed} row{'' if changed == 1 else 's'} changed" if changed >= 0 else "OK"

    @tool
    def answer(self, value: str = "") -> str:
        """Give the final answer; ends the episode.

        Args:
            value: the answer (several comma-separated); none after a change.
        """
        reward = self.score(value)
        self.finish(reward=reward, success=reward == 1.0)
        return "Answer recorded."

    # --- reward -------------------------------------------------------------------------------
    def score(self, value: str) -> float:
        """1.0 for a right answer or a right final database; list answers get F1; else 0.0."""
        data = self.task.data
        if data["expected"] is not None:  # a change: every original table must hold exactly the expected rows
            for name, rows in data["expected"].items():
                columns = [col for col, _ in data["tables"][name]["columns"]]
                state = table_state(self.conn, self.guard, name, len(rows))
                if state != {"columns": columns, "rows": sorted(rows, key=json.dumps)}:
                    return 0.0
            return 1.0
        if isinstance(data["answer"], list):
            return set_f1(value.replace("\n", ",").split(","), data["answer"])
        return float(same_value(value, data["answer"]))

    # --- tasks --------------------------------------------------------------------------------
    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        # The kind is drawn once, outside the retry loop, so both splits have the same mix of kinds.
        kind = rng.choice(self.kinds)
        for _ in range(MAX_DRAWS):
            tables = self.make_tables(rng)
            prompt, data = TASK_MAKERS[kind](rng, tables)
            # The database is part of the task: the same question over another database has another answer.
            content = json.dumps([prompt, tables], sort_keys=True)
            if in_test_split(content) == (split == "test"):
                break
        else:  # pragma: no cover - the space of databases is far too large to exhaust
            raise ValueError(f"{self.task_version}: cannot fill the {split!r} split")
        used = sorted({"people"} | set(data.pop("uses", ())))
        data = {"kind": kind, "tables": tables, "answer": None, "expected": None, "describe": used, **data}
        return Task(env=self.name, split=split, index=index, prompt=prompt, data=data, version=self.task_version)

    def make_tables(self, rng: random.Random) -> dict[str, dict[str, list]]:
        n = rng.randint(*self.rows)
        people = [[name, rng.choice(DEPTS), rng.choice(CITIES), rng.randint(20, 65), rng.randint(100, 999)]
                  for name in rng.sample(NAMES, n)]
        tables = {"people": people}
        if "depts" in self.tables:
            tables["depts"] = [[dept, rng.randint(1, 9), rng.randint(100, 999)]
                               for dept in sorted({p[1] for p in people})]
        if "orders" in self.tables:
            tables["orders"] = [[i + 1, rng.choice(people)[0], rng.choice(PRODUCTS), rng.randint(1, 9)]
                                for i in range(rng.randint(3, 8))]
        return {t: {"columns": [list(c) for c in SCHEMA[t]], "rows": rows} for t, rows in tables.items()}

    def oracle(self, task: Task) -> list[ToolCall]:
        data = task.data
        calls = [] if self.schema_in_prompt else [ToolCall("describe", {"table": t}) for t in data["describe"]]
        calls.append(ToolCall("query", {"sql": data["sql"]}))
        if data["expected"] is not None:
            return calls + [ToolCall("answer", {})]
        value = ", ".join(data["answer"]) if isinstance(data["answer"], list) else str(data["answer"])
        return calls + [ToolCall("answer", {"value": value})]


# --- one maker per kind: (rng, tables) -> (prompt, data with "sql" and "answer" or "expected") ---------------
_COLUMN = {"name": 0, "dept": 1, "city": 2, "age": 3, "salary": 4}
_COUNT_PHRASE = {"dept": "are in dept", "city": "live in city"}
_AGGREGATES = {"max": ("highest", max), "min": ("lowest", min), "sum": ("total", sum)}


def _people(tables: dict) -> list[list]:
    return tables["people"]["rows"]


def _lookup(rng: random.Random, tables: dict) -> tuple[str, dict]:
    person, column = rng.choice(_people(tables)), rng.choice(("dept", "city", "age", "salary"))
    sql = f"SELECT {column} FROM people WHERE name = {quoted(person[0])}"
    return f"What is the {column} of {quoted(person[0])}?", {"sql": sql, "answer": person[_COLUMN[column]]}


def _count(rng: random.Random, tables: dict) -> tuple[str, dict]:
    column = rng.choice(("dept", "city"))
    value = rng.choice(_people(tables))[_COLUMN[column]]
    count = sum(p[_COLUMN[column]] == value for p in _people(tables))
    sql = f"SELECT COUNT(*) FROM people WHERE {column} = {quoted(value)}"
    return f"How many people {_COUNT_PHRASE[column]} {quoted(value)}?", {"sql": sql, "answer": count}


def _aggregate(rng: random.Random, tables: dict) -> tuple[str, dict]:
    fn, column = rng.choice(sorted(_AGGREGATES)), rng.choice(("age", "salary"))
    dept = rng.choice(_people(tables))[1]
    word, apply = _AGGREGATES[fn]
    value = apply(p[_COLUMN[column]] for p in _people(tables) if p[1] == dept)
    sql = f"SELECT {fn.upper()}({column}) FROM people WHERE dept = {quoted(dept)}"
    return f"What is the {word} {column} in dept {quoted(dept)}?", {"sql": sql, "answer": value}


def _join(rng: random.Random, tables: dict) -> tuple[str, dict]:
    if "depts" in tables and ("orders" not in tables or rng.random() < 0.5):
        person, column = rng.choice(_people(tables)), rng.choice(("floor", "budget"))
        dept_row = next(d for d in tables["depts"]["rows"] if d[0] == person[1])
        sql = (f"SELECT depts.{column} FROM people JOIN depts ON people.dept = depts.dept "
               f"WHERE people.name = {quoted(person[0])}")
        prompt = f"What is the {column} of the dept of {quoted(person[0])}?"
        return prompt, {"sql": sql, "answer": dept_row[1 if column == "floor" else 2], "uses": ["depts"]}
    order = rng.choice(tables["orders"]["rows"])  # an existing order, so the total is never empty
    dept = next(p[1] for p in _people(tables) if p[0] == order[1])
    in_dept = {p[0] for p in _people(tables) if p[1] == dept}
    total = sum(o[3] for o in tables["orders"]["rows"] if o[2] == order[2] and o[1] in in_dept)
    sql = (f"SELECT SUM(orders.qty) FROM orders JOIN people ON orders.name = people.name "
           f"WHERE people.dept = {quoted(dept)} AND orders.product = {quoted(order[2])}")
    prompt = f"What is the total qty of {quoted(order[2])} ordered by people in dept {quoted(dept)}?"
    return prompt, {"sql": sql, "answer": total, "uses": ["orders"]}


def _list(rng: random.Random, tables: dict) -> tuple[str, dict]:
    dept = rng.choice(_people(tables))[1]
    names = sorted(p[0] for p in _people(tables) if p[1] == dept)
    sql = f"SELECT name FROM people WHERE dept = {quoted(dept)}"
    return f"Which people are in dept {quoted(dept)}? Give their names.", {"sql": sql, "answer": names}


def _changed(tables: dict, **changed: list[list]) -> dict[str, list]:
    return {name: changed.get(name, table["rows"]) for name, table in tables.items()}


def _insert(rng: random.Random, tables: dict) -> tuple[str, dict]:
    taken = {p[0] for p in _people(tables)}
    row = [rng.choice([n for n in NAMES if n not in taken]), rng.choice(DEPTS), rng.choice(CITIES),
           rng.randint(20, 65), rng.randint(100, 999)]
    prompt = (f"Add {quoted(row[0])} to people: dept {quoted(row[1])}, city {quoted(row[2])}, age {row[3]}, "
              f"salary {row[4]}.")
    sql = f"INSERT INTO people VALUES ({', '.join(map(quoted, row))})"
    return prompt, {"sql": sql, "expected": _changed(tables, people=_people(tables) + [row])}


def _update(rng: random.Random, tables: dict) -> tuple[str, dict]:
    person, column = rng.choice(_people(tables)), rng.choice(("dept", "city", "age", "salary"))
    choices = {"dept": DEPTS, "city": CITIES, "age": range(20, 66), "salary": range(100, 1000)}[column]
    value = rng.choice([v for v in choices if v != person[_COLUMN[column]]])
    people = [[*p[:_COLUMN[column]], value, *p[_COLUMN[column] + 1:]] if p is person else p for p in _people(tables)]
    sql = f"UPDATE people SET {column} = {quoted(value)} WHERE name = {quoted(person[0])}"
    prompt = f"Set the {column} of {quoted(person[0])} to {quoted(value)}."
    return prompt, {"sql": sql, "expected": _changed(tables, people=people)}


def _delete(rng: random.Random, tables: dict) -> tuple[str, dict]:
    person = rng.choice(_people(tables))
    if "orders" in tables and rng.random() < 0.5:
        name = rng.choice(tables["orders"]["rows"])[1]  # someone with orders
        orders = [o for o in tables["orders"]["rows"] if o[1] != name]
        sql = f"DELETE FROM orders WHERE name = {quoted(name)}"
        prompt = f"Delete all orders of {quoted(name)}."
        return prompt, {"sql": sql, "expected": _changed(tables, orders=orders), "uses": ["orders"]}
    sql = f"DELETE FROM people WHERE name = {quoted(person[0])}"
    people = [p for p in _people(tables) if p is not person]
    return f"Delete {quoted(person[0])} from people.", {"sql": sql, "expected": _changed(tables, people=people)}


TASK_MAKERS = {"lookup": _lookup, "count": _count, "aggregate": _aggregate, "join": _join, "list": _list,
               "insert": _insert, "update": _update, "delete": _delete}
