"""The DB environment's database: a fresh in-memory SQLite per episode, locked down for model-written SQL.

Safety: the connection is in memory, TEMP storage too (no temp files); an authorizer allows only ordinary SQL on
it (no ATTACH, so no files and no ``VACUUM INTO``; no virtual tables; no PRAGMA but a few read-only ones; functions
from an allow-list, so no ``load_extension``); ``setlimit`` and ``max_page_count`` cap value, statement and database
sizes; and a progress handler stops any statement after a fixed number of virtual-machine steps (deterministic,
unlike a clock) or a wall-clock backstop. DROP TABLE, ALTER
and the like are allowed: they can only damage the episode's own database, and the reward then sees the damage.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from agentrl.envs import ToolError

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
