"""The kg environment: oracle, graph shape, set-F1 rewards, variables, bad calls, determinism, service."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentrl.envs import make_env
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.model import build_tiny_model
from agentrl.types import ToolCall
from environments.kg import EASY, FUNCTIONAL, INVERSE, KINDS, MAX_VARIABLES, MULTI, VOCAB, KGEnv
from tests.env_checks import (
    assert_copied_words_are_shown_tokens, assert_oracle_solves, assert_served_like_in_process,
    assert_tasks_identical_across_processes, play,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [{}, EASY]


@functools.cache
def cached_test_split(easy: bool = False) -> list:
    """The test split, made once per file (each task draws several candidates to land in the split)."""
    return KGEnv(**EASY).tasks("test") if easy else KGEnv().tasks("test")


def neighbors(entity, relation):
    return ToolCall("neighbors", {"entity": entity, "relation": relation})


def answer(value):
    return ToolCall("answer", {"value": value})


def first_task(env, kind, where=lambda task: True):
    return next(t for t in cached_test_split() if t.data["kind"] == kind and where(t))


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["default", "easy"])
def test_oracle_solves_the_whole_test_split(kwargs):
    env = KGEnv(**kwargs)
    tasks = cached_test_split(bool(kwargs))
    assert len(tasks) == 200 and {t.data["kind"] for t in tasks} == set(env.kinds)
    assert_oracle_solves(env, tasks)


def test_graphs_are_well_formed():
    for task in KGEnv().tasks("train", 50):
        graph = task.data["graph"]
        kind_of = {name: kind for kind, names in graph["entities"].items() for name in names}
        tails = {}
        for head, relation, tail in graph["edges"]:
            tails.setdefault((head, relation), []).append(tail)
            head_type, tail_type = {**FUNCTIONAL, **MULTI}[relation]
            assert (kind_of[head], kind_of[tail]) == (head_type, tail_type)
        for relation, (head_type, _) in FUNCTIONAL.items():
            assert all(len(tails[(name, relation)]) == 1 for name in graph["entities"][head_type])
        for inverse, relation in INVERSE.items():  # inverses agree with their functional relation
            assert sorted((t, h) for (h, r), ts in tails.items() if r == inverse for t in ts) == \
                sorted((h, t) for (h, r), ts in tails.items() if r == relation for t in ts)
        friends = {(h, t) for (h, r), ts in tails.items() if r == "friend" for t in ts}
        assert friends == {(t, h) for h, t in friends} and not any(h == t for h, t in friends)


def test_easy_preset_is_short_and_names_what_to_copy():
    env = KGEnv(**EASY)
    assert [t["function"]["name"] for t in env.tools()] == ["answer", "count", "intersection", "neighbors"]
    words = {w for names in VOCAB.values() for w in names} | set(FUNCTIONAL) | set(MULTI)
    for task in env.tasks("train", 200):
        calls = env.oracle(task)
        assert 2 <= len(calls) <= 4
        quoted_words = re.findall(r'"([^"]*)"', task.prompt)
        assert set(quoted_words) <= words, task.prompt
        for call in calls:  # every relation the oracle follows is named in the question, quoted
            if call.name == "neighbors":
                assert f'"{call.arguments["relation"]}"' in task.prompt


def test_easy_values_are_single_tokens_the_model_has_seen(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", size="micro",
                                                               env_names=["environments.kg:KGEnv"]))
    words = {w for names in VOCAB.values() for w in names} | set(FUNCTIONAL) | set(MULTI) | set(map(str, range(1000)))
    lengths = assert_copied_words_are_shown_tokens(tokenizer, KGEnv(**EASY), cached_test_split(easy=True)[:60],
                                                   words, every_word=True)
    assert max(lengths) < 680, max(lengths)


def test_tasks_are_deterministic_varied_and_balanced():
    assert KGEnv().tasks("test", 30) == KGEnv().tasks("test", 30)
    assert KGEnv(**EASY).tasks("train", 30, start=5000) == KGEnv(**EASY).tasks("train", 30, start=5000)
    train = KGEnv().tasks("train", 300)
    assert len({json.dumps([t.prompt, t.data["graph"]]) for t in train}) == 300
    assert len({t.prompt for t in train}) > 150
    counts = {kind: sum(t.data["kind"] == kind for t in train) for kind in KINDS}
    assert all(30 <= n <= 70 for n in counts.values()), counts


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("environments.kg:KGEnv", SETTINGS, 20)


def test_train_and_test_do_not_share_tasks():
    # A task is the question over its graph: question texts recur over other graphs (with other answers), but
    # no (question, graph) pair is in both splits.
    env = KGEnv(**EASY)
    content = lambda tasks: {json.dumps([t.prompt, t.data["graph"]], sort_keys=True) for t in tasks}  # noqa: E731
    assert not content(env.tasks("train", 1000)) & content(cached_test_split(easy=True))


def test_constructor_kwargs_shape_the_distribution():
    tasks = KGEnv(**EASY).tasks("train", 50)
    assert {t.data["kind"] for t in tasks} == set(EASY["kinds"])
    assert all(5 <= len(t.data["graph"]["entities"]["person"]) <= 6 for t in tasks)
    assert tasks[0].version == ("kg-v1(kinds=hop1+hop2+count+intersect,people=5-6,others=2-3,friend_chance=0.3,"
                                "relations_tool=False)")
    assert KGEnv().task_version == "kg-v1" and "relations" in [t["function"]["name"] for t in KGEnv().tools()]
    assert all(len(t.data["plan"]) == 3 for t in KGEnv(kinds=["hop3"]).tasks("train", 10))
    for bad in ({"kinds": ["poem"]}, {"kinds": []}, {"people": [2, 5]}, {"people": [6, 5]}, {"people": [5, 99]},
                {"others": [1, 3]}, {"friend_chance": 0.0}):
        with pytest.raises(ValueError):
            KGEnv(**bad)


# --- rewards ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hop1", "hop2", "hop3"])
def test_entity_answers(kind):
    env = KGEnv()
    task = first_task(env, kind)
    truth = task.data["answer"][0]
    other = next(n for n in task.data["graph"]["entities"]["person"] + task.data["graph"]["entities"]["city"]
                 if n != truth)
    cases = [(truth, 1.0), (f' "{truth.upper()}" ', 1.0), (other, 0.0), ("", 0.0), ("#0", 0.0),
             (f"{truth}, {other}", 2 / 3)]
    for value, reward in cases:
        result = play(env, task, [answer(value)])[0]
        assert result.done and result.reward == pytest.approx(reward) and env.info["success"] == (reward == 1.0)


def test_set_answers_get_f1_and_variables_resolve():
    env = KGEnv()
    task = first_task(env, "intersect", where=lambda t: len(t.data["answer"]) >= 2)
    truth = task.data["answer"]
    outsider = next(p for p in task.data["graph"]["entities"]["person"] if p not in truth)
    cases = [
        ([answer(", ".join(reversed(truth)))], 1.0),
        ([answer(truth[0])], 2 / (1 + len(truth))),
        ([answer(", ".join([*truth, outsider]))], 2 * len(truth) / (2 * len(truth) + 1)),
        ([answer(outsider)], 0.0),
        (env.oracle(task), 1.0),
        (env.oracle(task)[:1] + [answer("#0")], None),  # a variable holding a superset: partial credit
        ([answer("#0")], 0.0),  # no such variable yet
    ]
    for calls, reward in cases:
        result = play(env, task, calls)[-1]
        if reward is None:
            first = set(env.variables[0])
            reward = 2 * len(first & set(truth)) / (len(first) + len(truth))
        assert result.done and result.reward == pytest.approx(reward), calls
        assert env.info["success"] == (reward == 1.0)


def test_count_answers():
    env = KGEnv()
    task = first_task(env, "count")
    n = task.data["answer"]
    for value, reward in [(str(n), 1.0), (f"{n}.0", 1.0), (f" '{n}' ", 1.0), (str(n + 1), 0.0), ("many", 0.0),
                          ("", 0.0)]:
        result = play(env, task, [answer(value)])[0]
        assert result.reward == reward and env.info["success"] == (reward == 1.0), value


def test_tools_follow_the_graph():
    env = KGEnv()
    task = first_task(env, "hop2")
    graph = task.data["graph"]
    person = graph["entities"]["person"][0]
    employer = next(t for h, r, t in graph["edges"] if h == person and r == "employer")
    staff = sorted(t for h, r, t in graph["edges"] if h == employer and r == "employee")
    results = play(env, task, [
        ToolCall("relations", {"entity": person}), neighbors(person.lower(), "employer"),
        neighbors("#0", "employee"), ToolCall("count", {"variable": "#1"}),
        ToolCall("intersection", {"first": "#1", "second": person}), neighbors(f'"{employer}"', " Employee "),
        neighbors(graph["entities"]["city"][0], "resident"), neighbors("#1", "employer")])
    obs = [r.observation for r in results]
    assert set(json.loads(obs[0])) >= {"employer", "home", "hobby"}
    assert obs[1] == f'#0: ["{employer}"]' and obs[2] == f"#1: {json.dumps(staff)}" and obs[3] == str(len(staff))
    assert obs[4] == f'#2: ["{person}"]' and obs[5] == f"#3: {json.dumps(staff)}"
    assert obs[6].startswith("#4: [") and obs[7] == f'#5: ["{employer}"]'  # a set of people -> their employers


# --- bad calls ----------------------------------------------------------------------------------
def test_bad_calls_are_error_observations_and_the_episode_goes_on():
    env = KGEnv()
    task = first_task(env, "intersect")
    calls = [
        ToolCall("nope", {}), ToolCall("neighbors", {"entity": "Ann"}),
        ToolCall("neighbors", {"entity": 5, "relation": "x"}),
        ToolCall("count", {}), ToolCall("answer", {"value": 3}), ToolCall("answer", {"value": "x", "extra": 1}),
        ToolCall("intersection", {"first": ["#0"], "second": "#1"}),
        neighbors("Nobody", "friend"), neighbors("x" * 100_000, "friend"), neighbors("#0", "friend"),
        neighbors(task.data["graph"]["entities"]["city"][0], "employer"), neighbors("#-1", "friend"),
        ToolCall("count", {"variable": "#7"}), ToolCall("relations", {"entity": "#99999999999999999999"}),
        ToolCall("intersection", {"first": "#0", "second": "#1"}),
    ]
    results = play(env, task, calls)
    for call, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, call
        assert len(result.observation) < 400, call
    assert env.info["tool_errors"] == len(calls) and env.variables == []
    final = [env.step(call) for call in env.oracle(task)][-1]  # the episode is still playable
    assert final.done and final.reward == 1.0
    after = env.step(env.oracle(task)[-1])
    assert after.observation.startswith("Error: ") and "finished" in after.observation


def test_variables_are_capped():
    env = KGEnv()
    task = env.task_at("test", 0)
    person = task.data["graph"]["entities"]["person"][0]
    results = play(env, task, [neighbors(person, "friend")] * (MAX_VARIABLES + 3))
    assert all(not r.observation.startswith("Error") for r in results[:MAX_VARIABLES])
    assert all(r.observation == f"Error: too many variables (at most {MAX_VARIABLES})" for r in results[MAX_VARIABLES:])
    assert play(env, task, env.oracle(task))[-1].reward == 1.0  # a new episode starts with no variables


# --- the env service ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", SETTINGS, ids=["default", "easy"])
def test_oracle_episodes_through_remote_env_match_in_process(kwargs):
    service = EnvService(env_factories([("environments.kg:KGEnv", kwargs)]), threads=4)
    with serve_in_thread(service) as url:
        assert_served_like_in_process(url, "kg", lambda: KGEnv(**kwargs), KGEnv(**kwargs).tasks("test", 5),
                                      [ToolCall("nosuch", {}), neighbors("Nobody", "friend"),
                                       ToolCall("count", {"variable": "#3"})], [answer("1")])


def test_make_env_builds_it_by_path():
    env = make_env("environments.kg:KGEnv", **EASY)
    assert isinstance(env, KGEnv) and env.task_version == KGEnv(**EASY).task_version
