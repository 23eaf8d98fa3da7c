"""The db environment on real SQLite: oracle, rewards read from the database, SQL abuse, determinism, service."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentrl.envs import make_env
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.model import build_tiny_model
from agentrl.types import ToolCall
from environments.db import CITIES, DEPTS, EASY, KINDS, MAX_ROWS, NAMES, SCHEMA, DBEnv
from tests.env_checks import (
    assert_copied_words_are_shown_tokens, assert_oracle_solves, assert_served_like_in_process,
    assert_tasks_identical_across_processes, play,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [{}, EASY]


@functools.cache
def cached_test_split(easy: bool = False) -> list:
    """The test split, made once per file (each task draws several candidates to land in the split)."""
    return DBEnv(**EASY).tasks("test") if easy else DBEnv().tasks("test")


def query(sql):
    return ToolCall("query", {"sql": sql})


def first_task(env, kind):
    return next(t for t in cached_test_split() if t.data["kind"] == kind)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["default", "easy"])
def test_oracle_solves_the_whole_test_split(kwargs):
    env = DBEnv(**kwargs)
    tasks = cached_test_split(bool(kwargs))
    assert len(tasks) == 200 and {t.data["kind"] for t in tasks} == set(env.kinds)
    assert_oracle_solves(env, tasks)
    env.close()


def test_easy_preset_is_short_and_copies_single_words():
    env = DBEnv(**EASY)
    assert [t["function"]["name"] for t in env.tools()] == ["answer", "query"]
    assert "people(name, dept, city, age, salary)" in env.system_prompt
    vocabulary = {*NAMES, *DEPTS, *CITIES, *map(str, range(1000))}
    for task in env.tasks("train", 200):
        calls = env.oracle(task)
        assert len(calls) == 2
        quoted_words = re.findall(r"'([^']*)'", task.prompt)
        assert quoted_words and set(quoted_words) <= vocabulary, task.prompt
        assert all(f"'{word}'" in calls[0].arguments["sql"] for word in quoted_words), task.prompt
        assert calls[-1].arguments.get("value", "") in vocabulary | {""}, task.prompt


def test_easy_values_are_single_tokens_the_model_has_seen(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", size="micro",
                                                               env_names=["environments.db:DBEnv"]))
    vocabulary = {*NAMES, *DEPTS, *CITIES, *(column for column, _ in SCHEMA["people"]), *map(str, range(1000))}
    lengths = assert_copied_words_are_shown_tokens(tokenizer, DBEnv(**EASY), cached_test_split(easy=True)[:60],
                                                   vocabulary)
    assert max(lengths) < 400, max(lengths)


def test_tasks_are_deterministic_varied_and_balanced():
    assert DBEnv().tasks("test", 30) == DBEnv().tasks("test", 30)
    assert DBEnv(**EASY).tasks("train", 30, start=5000) == DBEnv(**EASY).tasks("train", 30, start=5000)
    train = DBEnv().tasks("train", 400)
    assert len({(t.prompt, json.dumps(t.data["tables"])) for t in train}) == 400
    counts = {kind: sum(t.data["kind"] == kind for t in train) for kind in KINDS}
    assert all(30 <= n <= 70 for n in counts.values()), counts


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("environments.db:DBEnv", SETTINGS, 20)


def test_train_and_test_do_not_share_tasks():
    # A task is the question over its database: the same question text recurs over other databases (with other
    # answers), but no (question, database) pair is in both splits.
    env = DBEnv(**EASY)
    content = lambda tasks: {json.dumps([t.prompt, t.data["tables"]], sort_keys=True) for t in tasks}  # noqa: E731
    assert not content(env.tasks("train", 2000)) & content(cached_test_split(easy=True))


def test_constructor_kwargs_shape_the_distribution():
    env = DBEnv(**EASY)
    tasks = env.tasks("train", 50)
    assert {t.data["kind"] for t in tasks} <= set(EASY["kinds"])
    assert all(set(t.data["tables"]) == {"people"} and 4 <= len(t.data["tables"]["people"]["rows"]) <= 5
               for t in tasks)
    assert tasks[0].version == ("db-v1(tables=people,kinds=lookup+count+update+delete,rows=4-5,"
                                "schema_in_prompt=True)")
    assert DBEnv().task_version == "db-v1"
    assert DBEnv(tables=["people", "depts"], kinds=["join"]).task_version != "db-v1"
    assert [t["function"]["name"] for t in DBEnv().tools()] == ["answer", "query", "list_tables", "describe"]
    for bad in ({"tables": ["depts"]}, {"tables": ["people", "nope"]}, {"kinds": ["poem"]}, {"kinds": []},
                {"tables": ["people"], "kinds": ["join"]}, {"rows": [2, 5]}, {"rows": [5, 4]}):
        with pytest.raises(ValueError):
            DBEnv(**bad)


# --- rewards ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lookup", "count", "aggregate", "join"])
def test_value_answers(kind):
    env = DBEnv()
    task = first_task(env, kind)
    truth = task.data["answer"]
    right = [str(truth), f" '{str(truth).upper()}' "] + ([f"{truth}.0"] if isinstance(truth, int) else [])
    wrong = ["", "nothing", str(truth) + "x"] + ([str(truth + 1)] if isinstance(truth, int) else [])
    for value, reward in [*((v, 1.0) for v in right), *((v, 0.0) for v in wrong)]:
        result = play(env, task, [ToolCall("answer", {"value": value})])[0]
        assert (result.done, result.reward, env.info["success"]) == (True, reward, reward == 1.0), value


def test_list_answers_get_f1():
    env = DBEnv()
    task = next(t for t in cached_test_split() if t.data["kind"] == "list" and len(t.data["answer"]) >= 2)
    names = task.data["answer"]
    outsider = next(n for n in NAMES if n not in names)
    cases = [(", ".join(reversed(names)), 1.0), ("\n".join(n.lower() for n in names), 1.0),
             (names[0], 2 / (1 + len(names))), (", ".join([*names, outsider]), 2 * len(names) / (2 * len(names) + 1)),
             (outsider, 0.0), ("", 0.0)]
    for value, reward in cases:
        result = play(env, task, [ToolCall("answer", {"value": value})])[0]
        assert result.reward == pytest.approx(reward) and env.info["success"] == (reward == 1.0), value


def test_changes_are_scored_on_the_final_database():
    env = DBEnv()
    update = first_task(env, "update")
    people = update.data["tables"]["people"]["rows"]
    sql = update.data["sql"]
    name = sql.rsplit("= ", 1)[1]
    other = next(p[0] for p in people if f"'{p[0]}'" != name)
    cases = [
        ([], 0.0),  # nothing changed
        ([query(sql)], 1.0),
        ([query(sql.replace(f"= {name}", f"IN ({name})"))], 1.0),  # other SQL, same final state
        ([query("BEGIN"), query(sql), query("COMMIT")], 1.0),
        ([query("BEGIN"), query(sql), query("ROLLBACK")], 0.0),
        ([query(sql), query(f"DELETE FROM people WHERE name = '{other}'")], 0.0),  # a change too many
        ([query(sql.split(" WHERE")[0])], 0.0),  # every row changed
        ([query(sql), query("DROP TABLE orders")], 0.0),  # the other tables must survive too
        ([query(sql), query("DROP TABLE people")], 0.0),
        ([query(sql), query("ALTER TABLE people ADD COLUMN extra INTEGER")], 0.0),
        ([query(sql), query("CREATE TABLE scratch (a)"), query("CREATE INDEX i ON people(name)")], 1.0),
        # a TEMP table of the same name shadows people for the model, not for the reward
        ([query("CREATE TEMP TABLE people AS SELECT * FROM main.people"), query(sql)], 0.0),
    ]
    for calls, reward in cases:
        result = play(env, update, [*calls, ToolCall("answer", {})])[-1]
        assert (result.done, result.reward, env.info["success"]) == (True, reward, reward == 1.0), calls
    # the answer's value does not matter after a change
    assert play(env, update, [query(sql), ToolCall("answer", {"value": "done"})])[-1].reward == 1.0
    for kind in ("insert", "delete"):
        task = first_task(env, kind)
        assert play(env, task, [ToolCall("answer", {})])[-1].reward == 0.0
        assert play(env, task, [query(task.data["sql"]), query(task.data["sql"]), ToolCall("answer", {})])[-1].reward \
            == (1.0 if kind == "delete" else 0.0)  # a second delete finds nothing; a second insert duplicates


def test_a_question_after_damage_is_still_scored_by_its_answer():
    env = DBEnv()
    task = first_task(env, "lookup")
    result = play(env, task, [query("DROP TABLE people"), ToolCall("answer", {"value": str(task.data["answer"])})])
    assert result[-1].reward == 1.0


# --- bad calls and abuse -----------------------------------------------------------------------
def test_bad_calls_are_error_observations_and_the_episode_goes_on(tmp_path):
    env = DBEnv()
    task = first_task(env, "update")
    target = tmp_path / "evil.db"
    calls = [
        ToolCall("nope", {}), ToolCall("query", {}), ToolCall("query", {"sql": 5}), ToolCall("query", {"sql": None}),
        ToolCall("query", {"sql": "SELECT 1", "extra": 1}), ToolCall("answer", {"value": ["a"]}),
        ToolCall("describe", {"table": "nope"}), ToolCall("describe", {"table": "x" * 10_000}),
        ToolCall("describe", {}), ToolCall("list_tables", {"table": "people"}),
        query("SELEC name FROM people"), query("SELECT nosuch FROM people"), query("SELECT 1; DELETE FROM people"),
        query(f"ATTACH '{target}' AS evil"), query(f"VACUUM INTO '{target}'"),
        query("SELECT load_extension('/usr/lib/x.so')"), query("PRAGMA writable_schema = 1"),
        query("PRAGMA journal_mode = WAL"), query("CREATE VIRTUAL TABLE v USING fts5(x)"),
        query("SELECT readfile('/etc/passwd')"), query("SELECT zeroblob(1000000000)"), query("SELECT 'a\x00b'"),
        query("SELECT '\ud800'"), query("SELECT " + "1 + " * 500 + "1"),
    ]
    results = play(env, task, calls)
    for call, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, call
        assert len(result.observation) < 1300, call
    assert env.info["tool_errors"] == len(calls) and not target.exists()
    assert "not allowed: ATTACH" in results[13].observation and "not allowed: ATTACH" in results[14].observation
    assert "load_extension" in results[15].observation
    final = [env.step(call) for call in env.oracle(task)][-1]  # the episode is still playable
    assert final.done and final.reward == 1.0
    after = env.step(env.oracle(task)[-1])
    assert after.observation.startswith("Error: ") and "finished" in after.observation


def test_runaway_statements_are_stopped_quickly():
    env = DBEnv()
    env.reset(env.task_at("test", 0))
    for sql in ["WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) INSERT INTO people (name) "
                "SELECT n FROM r"]:
        start = time.monotonic()
        result = env.step(query(sql))
        assert time.monotonic() - start < 2.0
        assert result.observation == "Error: the statement ran too long and was stopped"
    assert env.step(query("SELECT COUNT(*) FROM people")).observation.startswith("COUNT(*)\n")


def test_huge_results_are_capped():
    env = DBEnv()
    env.reset(env.task_at("test", 0))
    many = env.step(query("SELECT * FROM people a, people b, people c")).observation
    assert len(many) <= 1100 and many.endswith(" are shown)") and "truncated" not in many
    narrow = env.step(query("SELECT a.age FROM people a, people b, people c")).observation
    assert narrow.count("\n") == MAX_ROWS + 1 and narrow.endswith(f"the first {MAX_ROWS} are shown)")
    wide = env.step(query("SELECT printf('%.*c', 500, 'x') AS w")).observation
    assert wide == "w\n" + "x" * 40 + "..."
    assert env.step(query("SELECT 1 WHERE 0")).observation == "1\n(no rows)"
    long_sql = env.step(query("SELECT '" + "x" * 5000 + "'")).observation
    assert long_sql.startswith("Error: SQL longer than")


def test_stored_and_built_data_are_capped_in_memory():
    # TEMP tables and sorts stay in memory (SQLite's default puts them in files under /var/tmp), and neither
    # the database nor one value can grow without bound.
    fds = lambda: {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")  # noqa: E731
                   if os.path.exists(f"/proc/self/fd/{fd}")}
    env = DBEnv()
    env.reset(env.task_at("test", 0))
    before = fds()
    grow = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {}) INSERT INTO {} " \
           "SELECT printf('%.*c', 900, 'x') FROM r"
    results = [env.step(query(sql)).observation for sql in [
        "CREATE TEMP TABLE t (x)", grow.format(2000, "t"), "SELECT x FROM t ORDER BY x DESC LIMIT 1",
        grow.format(100_000, "t"), "CREATE TABLE m (x)", grow.format(100_000, "m"),
        "WITH RECURSIVE r(n, s) AS (SELECT 1, 'x' UNION ALL SELECT n + 1, s || s FROM r WHERE n < 30) "
        "SELECT length(s) FROM r"]]
    assert results[:3] == ["OK", "2000 rows changed", "x\n" + "x" * 40 + "..."]
    assert results[3:] == ["Error: database or disk is full", "OK", "Error: database or disk is full",
                           "Error: string or blob too big"]
    assert fds() <= before


def test_destructive_sql_damages_only_the_episode():
    env = DBEnv()
    task = env.task_at("test", 0)
    results = play(env, task, [query("DROP TABLE people"), query("DROP TABLE depts"), query("DROP TABLE orders")])
    assert [r.observation for r in results] == ["OK", "OK", "OK"]
    assert env.step(ToolCall("list_tables", {})).observation == "(no tables)"
    assert play(env, task, env.oracle(task))[-1].reward == 1.0  # the next episode starts from the task's tables


def test_read_only_pragmas_and_exploration_tools():
    env = DBEnv()
    task = env.task_at("test", 0)
    results = play(env, task, [ToolCall("list_tables", {}), ToolCall("describe", {"table": "people"}),
                               query("PRAGMA table_info(depts)")])
    assert results[0].observation == "depts\norders\npeople"
    rows = len(task.data["tables"]["people"]["rows"])
    assert results[1].observation == \
        f"people: name TEXT, dept TEXT, city TEXT, age INTEGER, salary INTEGER ({rows} rows)"
    assert results[2].observation.startswith("cid | name | type")


# --- the env service ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", SETTINGS, ids=["default", "easy"])
def test_oracle_episodes_through_remote_env_match_in_process(kwargs):
    service = EnvService(env_factories([("environments.db:DBEnv", kwargs)]), threads=4)
    with serve_in_thread(service) as url:
        assert_served_like_in_process(url, "db", lambda: DBEnv(**kwargs), DBEnv(**kwargs).tasks("test", 5),
                                      [ToolCall("nosuch", {}), query("ATTACH 'x.db' AS x"),
                                       query("SELECT * FROM people")], [ToolCall("answer", {"value": "1"})])


def test_make_env_builds_it_by_path():
    env = make_env("environments.db:DBEnv", **EASY)
    assert isinstance(env, DBEnv) and env.task_version == DBEnv(**EASY).task_version
