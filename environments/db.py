"""DB: questions about, and changes to, a small generated SQLite database; real sqlite3, one database per episode.

Every episode gets a fresh in-memory database built from the task's tables. Questions are scored by the answer
(numbers compared numerically, lists by F1); changes are scored by reading the database back after the episode
and comparing every original table with the expected rows.

Safety: the connection is in memory, TEMP storage too (no temp files); an authorizer allows only ordinary SQL on
it (no ATTACH, so no files and no ``VACUUM INTO``; no virtual tables; no PRAGMA but a few read-only ones; functions
from an allow-list, so no ``load_extension``); ``setlimit`` and ``max_page_count`` cap value, statement and database
sizes; and a progress handler stops any statement after a fixed number of virtual-machine steps (deterministic,
unlike a clock) or a wall-clock backstop. DROP TABLE, ALTER
and the like are allowed: they can only damage the episode's own database, and the reward then sees the damage.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from typing import Any

from agentrl.envs import ToolEnvironment, ToolError, in_test_split, object_tools, tool
from agentrl.types import Message, Task, ToolCall

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
MAX_SQL_CHARS = 1000
MAX_ROWS = 20  # rows shown by query
MAX_CELL_CHARS = 40
MAX_RESULT_CHARS = 1000  # a query result stops before this; max_observation_chars is the last cut
# Memory: stored data is capped by max_page_count; what one statement builds on the side (a sort, a recursive
# CTE's queue) by its steps times the size of a value, at most ~200k x 1000 bytes.
MAX_VALUE_BYTES = 1000  # SQLITE_LIMIT_LENGTH: the longest string, blob or row
MAX_PAGES = 1000  # PRAGMA max_page_count of the main and the temp database: 4 MB each
PROGRESS_EVERY = 1000  # VM steps between progress-handler calls
MAX_PROGRESS_CALLS = 200  # 200k VM steps a statement (the tasks' own need under 1k); then it is interrupted
WALL_LIMIT_S = 2.0  # backstop for steps that are slow on their own
TOLERANCE = 1e-6

_ALLOWED_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}") for name in (
    "SELECT", "READ", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "SAVEPOINT", "RECURSIVE",
    "CREATE_TABLE", "CREATE_TEMP_TABLE", "DROP_TABLE", "DROP_TEMP_TABLE", "ALTER_TABLE",
    "CREATE_INDEX", "CREATE_TEMP_INDEX", "DROP_INDEX", "DROP_TEMP_INDEX", "REINDEX", "ANALYZE",
    "CREATE_VIEW", "CREATE_TEMP_VIEW", "DROP_VIEW", "DROP_TEMP_VIEW",
    "CREATE_TRIGGER", "CREATE_TEMP_TRIGGER", "DROP_TRIGGER", "DROP_TEMP_TRIGGER")}
_READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info"}
_FUNCTIONS = set("""count sum total avg min max group_concat string_agg abs round lower upper length substr substring
    trim ltrim rtrim replace instr coalesce ifnull nullif iif typeof printf format like glob quote hex unicode char
    likely unlikely date time datetime julianday strftime unixepoch row_number rank dense_rank ntile lag lead
    first_value last_value nth_value percent_rank cume_dist sign
    sqlite_rename_table sqlite_rename_test sqlite_rename_quotefix sqlite_rename_column sqlite_drop_column""".split())
# (the sqlite_rename_* / sqlite_drop_column functions are SQLite's own, run inside ALTER TABLE; SQL cannot call them)


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


def quoted(value: Any) -> str:
    """A value as an SQL literal (the prompt shows text values the same way, so they are the same tokens)."""
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def open_database(tables: dict[str, dict[str, list]]) -> tuple[sqlite3.Connection, dict[str, Any]]:
    """A fresh in-memory database holding ``tables``, locked down; returns it and its guard state."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    # check_same_thread=False: the env service may run one episode's calls on different worker threads (one at
    # a time, never concurrently). temp_store: TEMP tables and big sorts would otherwise go to files in /var/tmp.
    for pragma in ("temp_store = MEMORY", f"main.max_page_count = {MAX_PAGES}", f"temp.max_page_count = {MAX_PAGES}"):
        conn.execute(f"PRAGMA {pragma}")
    for name, table in tables.items():
        columns = ", ".join(f"{col} {kind}" for col, kind in table["columns"])
        conn.execute(f"CREATE TABLE {name} ({columns})")
        marks = ", ".join("?" * len(table["columns"]))
        conn.executemany(f"INSERT INTO {name} VALUES ({marks})", table["rows"])
    guard: dict[str, Any] = {"denied": "", "calls": 0, "deadline": 0.0}

    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action == sqlite3.SQLITE_FUNCTION:
            allowed, what = (arg2 or "").lower() in _FUNCTIONS, f"function {arg2}()"
        elif action == sqlite3.SQLITE_PRAGMA:
            allowed, what = (arg1 or "").lower() in _READ_PRAGMAS, f"PRAGMA {arg1}"
        else:
            allowed, what = action in _ALLOWED_ACTIONS, {
                sqlite3.SQLITE_ATTACH: "ATTACH (and VACUUM INTO)", sqlite3.SQLITE_DETACH: "DETACH",
                sqlite3.SQLITE_CREATE_VTABLE: "virtual tables", sqlite3.SQLITE_DROP_VTABLE: "virtual tables",
            }.get(action, f"action {action}")
        if not allowed:
            guard["denied"] = what
        return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY

    def progress() -> int:
        guard["calls"] += 1
        return int(guard["calls"] > MAX_PROGRESS_CALLS or time.monotonic() > guard["deadline"])

    conn.set_authorizer(authorize)
    conn.set_progress_handler(progress, PROGRESS_EVERY)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 4 * MAX_SQL_CHARS)
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")  # CAST(x'ff' AS TEXT) must not raise on fetch
    return conn, guard


def run_sql(conn: sqlite3.Connection, guard: dict[str, Any], sql: str) -> tuple[list[str] | None, list[tuple], int]:
    """Run one statement under the guard: (column names or None, up to MAX_ROWS + 1 rows, rows changed or -1).

    Raises ToolError with a reason the model can read.
    """
    guard.update(denied="", calls=0, deadline=time.monotonic() + WALL_LIMIT_S)
    before = conn.total_changes
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(MAX_ROWS + 1) if cursor.description else []
    except sqlite3.Error as exc:
        message = str(exc)
        if guard["denied"]:  # sqlite's own words vary ("not authorized", "authorization denied", ...)
            message = f"not allowed: {guard['denied']}"
        elif message == "interrupted":
            message = "the statement ran too long and was stopped"
        raise ToolError(message) from None
    except (ValueError, OverflowError, MemoryError) as exc:  # e.g. a lone surrogate cannot be encoded
        raise ToolError(f"cannot run that: {exc}") from None
    columns = [d[0] for d in cursor.description] if cursor.description else None
    # rowcount is -1 for a WITH ... INSERT and for DDL; total_changes counts rows whatever the statement.
    changed = conn.total_changes - before
    return columns, rows, changed if changed or cursor.rowcount >= 0 else -1


def format_cell(value: Any) -> str:
    text = "NULL" if value is None else value.hex() if isinstance(value, bytes) else str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "..."


def format_rows(columns: list[str], rows: list[tuple]) -> str:
    """A header line and one line per row, cells joined by " | "; at most MAX_ROWS rows and MAX_RESULT_CHARS."""
    lines = [" | ".join(columns)]
    for row in rows[:MAX_ROWS]:
        line = " | ".join(map(format_cell, row))
        if sum(map(len, lines)) + len(line) > MAX_RESULT_CHARS:
            break
        lines.append(line)
    shown = len(lines) - 1
    if shown < len(rows):
        lines.append(f"... (more rows; the first {shown} are shown)")
    elif not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def table_state(conn: sqlite3.Connection, guard: dict[str, Any], name: str, max_rows: int) -> dict | None:
    """A main-schema table's columns and rows (sorted), or None if it is gone or holds more than ``max_rows``."""
    # main.: a TEMP table of the same name would otherwise shadow it.
    found = run_sql(conn, guard, f"SELECT name FROM main.sqlite_master WHERE type = 'table' AND name = {quoted(name)}")
    if not found[1]:
        return None
    columns = [row[1] for row in run_sql(conn, guard, f"PRAGMA main.table_info({name})")[1]]
    if run_sql(conn, guard, f"SELECT COUNT(*) FROM main.{name}")[1][0][0] > max_rows:
        return None
    cursor = conn.execute(f"SELECT * FROM main.{name}")
    return {"columns": columns, "rows": sorted((list(r) for r in cursor.fetchall()), key=json.dumps)}


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
