"""The built-in environments: oracle, determinism, split hygiene, rewards, bad calls and name lookup."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from agentrl.envs import make_env
from agentrl.types import ToolCall
from environments.calculator import CalculatorEnv
from agentrl.rollout.traces import oracle_conversation
from environments.lookup import KEY_WORDS, LookupEnv
from tests.env_checks import assert_oracle_solves, assert_tasks_identical_across_processes, play

ROOT = Path(__file__).resolve().parents[1]
ENVS = [CalculatorEnv, LookupEnv]


@pytest.mark.parametrize("cls, full", [(CalculatorEnv, 1.0), (LookupEnv, 10.0)])
def test_oracle_solves_the_whole_test_split(cls, full):
    env = cls()
    tasks = env.tasks("test")
    assert len(tasks) == 200
    assert_oracle_solves(env, tasks, full)


@pytest.mark.parametrize("cls", ENVS)
def test_tasks_are_deterministic_and_varied(cls):
    assert cls().tasks("test", 30) == cls().tasks("test", 30)
    assert cls().tasks("train", 30, start=5000) == cls().tasks("train", 30, start=5000)
    prompts = [t.prompt for t in cls().tasks("train", 100)]
    assert len(set(prompts)) > 90
    assert all(t.version == cls.version for t in cls().tasks("train", 5))


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("calculator", [{"max_operand": 50}], 20)
    assert_tasks_identical_across_processes("lookup", [{"max_hops": 5}], 20)


def test_constructor_kwargs_shape_the_distribution():
    small = CalculatorEnv(max_operand=9, ops=["*"])
    tasks = small.tasks("train", 50)
    assert all(" * " in t.data["expression"] for t in tasks)
    assert all(int(x) <= 9 for t in tasks for x in t.data["expression"].split(" * "))
    assert tasks[0].version == "calculator-v1(min_operand=2,max_operand=9,ops=*)"
    assert tasks == CalculatorEnv(max_operand=9, ops=("*",)).tasks("train", 50)
    hops = {t.data["hops"] for t in LookupEnv(min_hops=4, max_hops=5).tasks("train", 50)}
    assert hops == {4, 5}
    plain = CalculatorEnv(phrasing="plain").tasks("train", 20)
    assert all(t.prompt == f"What is {t.data['expression']}?" for t in plain)
    assert plain[0].version.endswith(",phrasing=plain)")
    with pytest.raises(ValueError):
        CalculatorEnv(ops=("/",))
    with pytest.raises(ValueError, match="phrasing"):
        CalculatorEnv(phrasing="poem")
    with pytest.raises(ValueError):
        LookupEnv(min_hops=3, max_hops=2)


@pytest.mark.parametrize("env", [CalculatorEnv(), CalculatorEnv(max_operand=20), LookupEnv()],
                         ids=lambda env: env.task_version)
def test_train_and_test_do_not_share_tasks(env):
    train, test = env.tasks("train", 2000), env.tasks("test")
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    # With max_operand=20 there are only ~600 problems, so this fails unless the split is enforced.
    solved = lambda tasks: {json.dumps(t.data, sort_keys=True) for t in tasks}  # noqa: E731
    assert not solved(train) & solved(test)


def test_lookup_split_membership_does_not_shape_the_hop_distribution(monkeypatch):
    # Drawing the hop count inside the split's retry loop made a split's hop mix follow how many of its prompts
    # each hop count happened to get (word keys: 38% 2-hop in the test split); a policy that guesses the hop
    # count then scored by its guess. Exaggerate the imbalance: every 2-hop prompt is a test prompt.
    import environments.lookup as lookup

    real = lookup.in_test_split
    monkeypatch.setattr(lookup, "in_test_split", lambda content: content.endswith("/2") or real(content))
    tasks = LookupEnv(alphabet="words", key_length=[1, 1]).tasks("test", 200)
    counts = collections.Counter(t.data["hops"] for t in tasks)
    assert all(abs(counts[h] / 200 - 1 / 3) < 0.1 for h in (1, 2, 3)), counts


def test_calculator_rewards():
    env = CalculatorEnv()
    task = env.task_at("test", 3)
    truth = task.data["answer"]
    for value, reward in [(truth, 1.0), (truth + 1e-9, 1.0), (float(truth), 1.0), (truth + 1, 0.0), (-truth, 0.0)]:
        result = play(env, task, [ToolCall("answer", {"value": value})])[0]
        assert (result.done, result.reward, env.info["success"]) == (True, reward, reward == 1.0), value


@pytest.mark.parametrize("expression, shown", [
    ("347 + 589", "936"), ("2 * (3 + 4)", "14"), ("7 / 2", "3.5"), ("6 / 3", "2"), ("0.1 + 0.2", "0.3"),
    ("-5 + 2", "-3"), ("10 - 2.5", "7.5"), ("1 / 3", "0.333333333333"), (" 12*12 ", "144"),
])
def test_calculate_results(expression, shown):
    env = CalculatorEnv()
    result = play(env, env.task_at("train", 0), [ToolCall("calculate", {"expression": expression})])[0]
    assert result.observation == shown and not result.done


def test_lookup_rewards_and_partial_credit():
    env = LookupEnv(min_hops=3, max_hops=3)
    task = env.task_at("test", 0)
    chain, table = task.data["chain"], task.data["table"]
    assert [table[k] for k in chain[:-1]] == chain[1:]
    get = lambda key: ToolCall("get", {"key": key})  # noqa: E731
    answer = lambda key: ToolCall("answer", {"key": key})  # noqa: E731
    cases = [
        ([answer(chain[3])], 10.0, True),
        ([answer(" " + chain[3].upper())], 10.0, True),
        ([answer("nope")], 0.0, False),
        ([get(chain[0]), get(chain[1]), answer(chain[1])], 4.0, False),
        ([get(chain[0]), get("zzzzz"), get(chain[1]), get(chain[2]), answer(chain[2])], 6.0, False),
        ([get(chain[1]), get(chain[0]), answer(chain[0])], 2.0, False),  # out of order: only the first hop
    ]
    for calls, reward, success in cases:
        result = play(env, task, calls)[-1]
        assert (result.done, result.reward, env.info["success"]) == (True, reward, success), calls
    long = LookupEnv(min_hops=6, max_hops=6)
    task = long.task_at("train", 0)
    calls = long.oracle(task)[:-1] + [ToolCall("answer", {"key": "wrong"})]
    assert play(long, task, calls)[-1].reward == 8.0  # partial credit is capped below a correct answer


def bad_calls(env):
    calls = [ToolCall("nope", {}), ToolCall("answer", {}), ToolCall("answer", {"value": "abc", "key": 5}),
             ToolCall("answer", {"extra": 1})]
    if isinstance(env, CalculatorEnv):
        exprs = ["2 +", "1 / 0", "2 ** 10", "x + 1", "__import__('os').system('true')", "", "1e999", "9" * 300]
        calls.append(ToolCall("answer", {"value": "abc"}))
        return calls + [ToolCall("calculate", {"expression": e}) for e in exprs]
    # Keys are 3-4 characters, so a 5-character key is never in the table.
    return calls + [ToolCall("answer", {"key": 5}), ToolCall("get", {"key": ["a"]}),
                    ToolCall("get", {"key": "zz9z9"})]


@pytest.mark.parametrize("cls", ENVS)
def test_bad_calls_are_error_observations(cls):
    env = cls()
    task = env.task_at("test", 1)
    calls = bad_calls(env)
    results = play(env, task, calls)
    for call, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, call
    assert not env.done and env.info["tool_errors"] == len(calls)
    final = [env.step(call) for call in env.oracle(task)][-1]  # the episode is still playable
    assert final.done and env.info["success"]
    after = env.step(env.oracle(task)[-1])
    assert after.observation.startswith("Error: ") and "finished" in after.observation
    assert env.done and env.reward == final.reward and env.info["success"]


def test_unknown_lookup_key_message():
    env = LookupEnv()
    assert play(env, env.task_at("train", 0), [ToolCall("get", {"key": "x"})])[0].observation == "Error: no key 'x'"


def test_make_env_resolves_names_and_paths():
    assert isinstance(make_env("calculator"), CalculatorEnv)
    assert make_env("calculator", max_operand=9).max_operand == 9
    assert isinstance(make_env("lookup"), LookupEnv)
    assert isinstance(make_env("environments.lookup:LookupEnv", max_hops=4), LookupEnv)
    with pytest.raises(KeyError, match="calculator.*lookup"):
        make_env("no_such_env")


@pytest.mark.parametrize("name, kwargs", [
    ("calculator", {"min_operand": 10, "max_operand": 99, "ops": ["+", "-"]}),
    ("calculator", {"min_operand": 10, "max_operand": 99, "ops": ["+", "-"], "phrasing": "plain"}),
    ("lookup", {"alphabet": "words", "key_length": [1, 1]}),
    ("lookup", {"alphabet": "digits", "key_length": [3, 3], "max_hops": 2}),
])
def test_oracle_solves_non_default_settings(name, kwargs):
    env = make_env(name, **kwargs)
    tasks = env.tasks("test", 50)
    assert all("(" in t.version for t in tasks)  # the settings are written into the version
    for task in tasks:
        assert oracle_conversation(make_env(name, **kwargs), task).success, task.id
    if name == "lookup" and kwargs["alphabet"] == "words":
        assert all(t.data["start"] in KEY_WORDS for t in tasks)
