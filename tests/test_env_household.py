"""The household environment: oracle, determinism, split hygiene, state-based rewards, bad calls, remote service."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from agentrl.envs import make_env
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import Task, ToolCall
from environments.household import EASY, KINDS, HouseholdEnv
from tests.env_checks import (
    assert_oracle_solves, assert_served_like_in_process, assert_tasks_identical_across_processes, play
)

ROOT = Path(__file__).resolve().parents[1]
PATH = "environments.household:HouseholdEnv"
# The easy preset before take_place: the model reads where the object is from the room description.
EASY_LOOKUP = {**EASY, "take_place": True}
SETTINGS = [{}, EASY, EASY_LOOKUP, {"closed": True, "auto_walk": True},
            {"closed": False, "auto_walk": False, "objects": 0}, {"kinds": ["two"], "objects": 15, "show_room": True},
            {"kinds": ["two", "clean"], "objects": 15, "closed": True, "auto_walk": True, "take_place": False}]


def call(name, **arguments):
    return ToolCall(name, arguments)


def custom_task(env, goal, objects, closed=()):
    """A hand-made room: ``objects`` are (type, place) pairs, or (type, place, dirty, temp)."""
    rows = [dict(zip(("type", "place", "dirty", "temp"), (*o, False, "room")[:4] if len(o) == 2 else o))
            for o in objects]
    data = {"kind": "custom", "goal": goal, "objects": rows, "closed": list(closed)}
    return Task(env.name, "test", 0, "a hand-made goal", data, env.task_version)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
def test_oracle_solves_the_whole_test_split(kwargs):
    env = HouseholdEnv(**kwargs)
    tasks = env.tasks("test")
    assert len(tasks) == 200
    assert all(len(results) <= env.max_actions for results in assert_oracle_solves(env, tasks))


@pytest.mark.parametrize("kwargs", [EASY, EASY_LOOKUP], ids=["easy", "easy_lookup"])
def test_easy_preset_is_short_and_single_token(kwargs):
    env = HouseholdEnv(**kwargs)
    assert [t["function"]["name"] for t in env.tools()] == ["clean", "cool", "heat", "put", "take"]
    take_arguments = env.tools()[-1]["function"]["parameters"]["properties"]
    assert list(take_arguments) == (["object", "place"] if kwargs["take_place"] else ["object"])
    for task in env.tasks("train", 100):
        calls = env.oracle(task)
        assert 2 <= len(calls) <= 3 and calls[0].name == "take"
        source = next(o["place"] for o in task.data["objects"] if o["type"] == task.data["goal"]["type"])
        assert f'"{source}": ' in task.prompt  # where the object is, is in the prompt
        assert all(" " not in value for c in calls for value in c.arguments.values())  # one word each
        goal_sentence = task.prompt.split(" You are at ")[0]
        copied = [value for c in calls for value in c.arguments.values()]
        # without take_place every argument is a word of the goal sentence; with it, take's place is not
        assert [f'"{v}"' in goal_sentence for v in copied].count(False) == (1 if kwargs["take_place"] else 0)
        conversation = oracle_conversation(HouseholdEnv(**kwargs), task)
        assert all(len(m["content"].split()) <= 30 for m in conversation.messages if m["role"] == "tool")


def test_copied_names_are_the_same_tokens_in_the_prompt_and_the_call(tokenizer):
    # A small model copies a name from its context into a call far sooner when the context shows it as the
    # same token ids as the call's JSON does ('"mug' after a quote, not ' mug' after a space): names are quoted.
    chat = ChatFormat(tokenizer)
    for task in HouseholdEnv(**EASY_LOOKUP).tasks("test", 20):
        env = HouseholdEnv(**EASY_LOOKUP)
        messages = env.reset(task)
        for c in env.oracle(task):
            context = chat.prompt_ids(messages, env.tools())
            for value in c.arguments.values():
                copied = [i for i in chat.encode(json.dumps(value)) if tokenizer.decode([i]).strip() != '"']
                assert any(context[i:i + len(copied)] == copied for i in range(len(context))), (task.prompt, c)
            messages += [{"role": "assistant", "content": "", "tool_calls": [c.to_message_entry()]},
                         {"role": "tool", "name": c.name, "content": env.step(c).observation}]


def test_tasks_are_deterministic_and_varied():
    assert HouseholdEnv().tasks("test", 30) == HouseholdEnv().tasks("test", 30)
    assert HouseholdEnv(**EASY).tasks("train", 30, start=5000) == HouseholdEnv(**EASY).tasks("train", 30, start=5000)
    tasks = HouseholdEnv().tasks("train", 300)
    assert len({t.prompt for t in tasks}) > 150
    assert len({json.dumps(t.data, sort_keys=True) for t in tasks}) == 300
    assert all(t.version == "household-v1" for t in tasks)
    assert HouseholdEnv(**EASY).task_version == ("household-v1(kinds=place+clean+heat+cool,objects=2,closed=False,"
                                                 "auto_walk=True,show_room=True,max_actions=6,take_place=False)")
    # take_place came later: left on, it does not change the versions written before it
    assert HouseholdEnv(**EASY_LOOKUP).task_version == ("household-v1(kinds=place+clean+heat+cool,objects=2,"
                                                        "closed=False,auto_walk=True,show_room=True,max_actions=6)")
    assert HouseholdEnv(take_place=True).task_version == "household-v1"
    assert HouseholdEnv(**EASY).tasks("test", 30) != HouseholdEnv(**EASY_LOOKUP).tasks("test", 30)
    assert {t["function"]["name"] for t in HouseholdEnv().tools()} == {"look", "go", "open", "take", "put", "clean",
                                                                       "heat", "cool"}


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("environments.household:HouseholdEnv", [{}, EASY, EASY_LOOKUP], 30)


@pytest.mark.parametrize("kwargs", [{}, EASY], ids=["defaults", "easy"])
def test_train_and_test_do_not_share_goals(kwargs):
    env = HouseholdEnv(**kwargs)
    train, test = env.tasks("train", 2000), env.tasks("test")
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    # the kind is drawn outside the split's retry loop, so both splits have the same kind mix
    for tasks in (train, test):
        counts = collections.Counter(t.data["kind"] for t in tasks)
        assert all(abs(counts[k] / len(tasks) - 1 / len(env.kinds)) < 0.1 for k in env.kinds), counts


def test_no_goal_predicate_holds_at_the_start():
    env = HouseholdEnv(kinds=list(KINDS), objects=15)
    for task in env.tasks("train", 500):
        goal = task.data["goal"]
        for obj in task.data["objects"]:
            if obj["type"] == goal["type"]:
                assert obj["place"] != goal["place"]
                assert {"clean": obj["dirty"], "hot": obj["temp"] != "hot", "cold": obj["temp"] != "cold",
                        None: True}[goal["state"]]


def test_rewards_come_from_the_final_state():
    env = HouseholdEnv(closed=False, auto_walk=True, max_actions=4)
    goal = {"type": "mug", "place": "table", "state": "clean", "count": 1}
    task = custom_task(env, goal, [("mug", "sink", True, "room"), ("mug", "shelf", True, "room"), ("egg", "table")])
    cases = [
        # another route than the oracle's (the second mug) still succeeds: the reward reads the world
        ([call("take", object="mug", place="shelf"), call("clean", object="mug"),
          call("put", object="mug", place="table")], 1.0, True),
        # dirty mug on the table: 1 of 2 predicates when the budget runs out
        ([call("take", object="mug", place="sink"), call("put", object="mug", place="table"), call("look"),
          call("look")], 0.5, False),
        # clean mug left on the counter: 1 of 2
        ([call("take", object="mug", place="sink"), call("clean", object="mug"),
          call("put", object="mug", place="counter"), call("look")], 0.5, False),
        # a wrong object and errors: nothing
        ([call("take", object="egg", place="table"), call("clean", object="egg"),
          call("put", object="mug", place="table"), call("put", object="egg", place="fridge")], 0.0, False),
    ]
    for calls, reward, success in cases:
        result = play(env, task, calls)[-1]
        assert (result.done, result.reward, env.info["success"]) == (True, reward, success), calls
    # partial credit for two objects, and success as soon as the second one lands
    two = {"type": "apple", "place": "fridge", "state": None, "count": 2}
    task = custom_task(env, two, [("apple", "table"), ("apple", "shelf")])
    result = play(env, task, [call("take", object="apple", place="table"), call("put", object="apple", place="fridge"),
                              call("take", object="apples", place="shelf"), call("look")])[-1]
    assert (result.done, result.reward, env.info["success"]) == (True, 0.5, False)
    results = play(env, task, [call("take", object="apple", place="table"),
                               call("put", object="apple", place="fridge"),
                               call("take", object="apple", place="shelf"),
                               call("put", object="Apple", place="fridge")])
    assert [r.done for r in results] == [False, False, False, True] and results[-1].reward == 1.0
    assert results[-1].observation.endswith("The goal is done.")
    # heating, then the budget ends with the food in hand: only the state predicate holds
    hot = {"type": "soup", "place": "table", "state": "hot", "count": 1}
    task = custom_task(env, hot, [("soup", "fridge", False, "cold")])
    result = play(env, task, [call("take", object="soup", place="fridge"), call("heat", object="soup"),
                              call("look"), call("look")])[-1]
    assert result.reward == 0.5 and "You are out of actions." in result.observation


def test_take_without_a_place_walks_to_the_object_in_sight():
    env = HouseholdEnv(kinds=["two"], closed=True, auto_walk=True, take_place=False, max_actions=10)
    two = {"type": "apple", "place": "fridge", "state": None, "count": 2}
    task = custom_task(env, two, [("apple", "table"), ("apple", "drawer"), ("cup", "shelf")], closed=["drawer"])
    results = play(env, task, [
        call("take", object="apple", place="table"), call("take", object="cup"),
        call("put", object="cup", place="sink"),
        call("take", object="apples"), call("put", object="apple", place="fridge"),
        call("take", object="apple"), call("open", place="drawer"), call("take", object="apple"),
        call("put", object="apple", place="fridge")])
    assert [r.observation for r in results] == [
        "Error: take got unknown argument(s) ['place']; it takes ['object']",
        'You take the "cup" from the "shelf".',
        'You put the "cup" in the "sink".',
        'You take the "apple" from the "table".',
        'You put the "apple" in the "fridge".',
        # the apple already in the fridge is in sight, but the goal wants it there: only that one is left
        'You take the "apple" from the "fridge".',
        'You open the "drawer". "drawer": "apple".',
        'Error: you already hold an "apple"; put it somewhere first',
        'You put the "apple" in the "fridge".']
    assert not env.done  # one apple back in the fridge, the other still in the closed drawer
    results = play(env, task, [call("take", object="apple"), call("put", object="apple", place="fridge"),
                               call("open", place="drawer"), call("take", object="apple"),
                               call("put", object="apple", place="fridge")])
    assert results[3].observation == 'You take the "apple" from the "drawer".'  # not the one in the fridge
    assert results[-1].done and results[-1].reward == 1.0 and env.info["success"]
    assert play(env, task, [call("take", object="egg")])[0].observation == (
        'Error: there is no "egg" in sight; You are at the door. "table": "apple". "shelf": "cup". '
        '"drawer": closed. You hold nothing.')


def test_closed_places_and_walking():
    env = HouseholdEnv(closed=True, auto_walk=False)
    goal = {"type": "apple", "place": "drawer", "state": "cold", "count": 1}
    task = custom_task(env, goal, [("apple", "table")], closed=["drawer", "fridge"])
    results = play(env, task, [
        call("look"), call("take", object="apple", place="table"), call("go", place="table"),
        call("take", object="apple", place="table"), call("cool", object="apple"), call("go", place="fridge"),
        call("cool", object="apple"), call("go", place="drawer"), call("put", object="apple", place="drawer"),
        call("open", place="drawer"), call("put", object="apple", place="drawer")])
    shown = [r.observation for r in results]
    assert shown[0] == 'You are at the door. "table": "apple". "drawer": closed. "fridge": closed. You hold nothing.'
    assert shown[1] == 'Error: you are at the door, not the "table"; go there first'
    assert shown[2] == 'You are at the "table". "table": "apple".'
    assert shown[3] == 'You take the "apple" from the "table".'
    assert shown[4] == 'Error: you are at the "table", not the "fridge"; go there first'
    assert shown[6] == 'You cool the "apple" at the "fridge". It is cold.'  # cooling does not need the fridge open
    assert shown[8] == 'Error: the "drawer" is closed; open it first'
    assert shown[9] == 'You open the "drawer". "drawer": nothing.'
    assert shown[10] == 'You put the cold "apple" in the "drawer". The goal is done.' and results[-1].reward == 1.0


def bad_calls():
    return [
        call("nope"), call("take"), call("take", object=5, place="table"), call("take", object="mug"),
        call("look", extra=1), call("put", object=["mug"], place="table"), call("go", place="garage"),
        call("go", place="x" * 100_000), call("take", object="banana", place="table"),
        call("take", object="", place="table"), call("open", place="table"), call("put", object="mug", place="table"),
        call("clean", object="mug"), call("heat", object="x" * 100_000),
    ]


def test_bad_calls_are_error_observations():
    env = HouseholdEnv()
    task = env.task_at("test", 1)
    calls = bad_calls()
    results = play(env, task, calls)
    for c, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, c
        assert len(result.observation) < 2100  # a huge argument is cut
    assert not env.done and env.info["tool_errors"] == len(calls)
    final = [env.step(c) for c in env.oracle(task)][-1]  # still playable (the budget is 30 calls)
    assert final.done and env.info["success"]
    after = env.step(call("look"))
    assert after.observation.startswith("Error: ") and "finished" in after.observation


def test_invalid_world_actions_explain_themselves():
    env = HouseholdEnv(closed=True, auto_walk=True)
    goal = {"type": "mug", "place": "table", "state": None, "count": 1}
    task = custom_task(env, goal, [("mug", "cabinet", True, "room"), ("cup", "counter")], closed=["cabinet", "fridge"])
    results = play(env, task, [
        call("take", object="mug", place="cabinet"), call("open", place="cabinet"), call("open", place="cabinet"),
        call("take", object="cup", place="cabinet"), call("take", object="mug", place="cabinet"),
        call("take", object="cup", place="counter"), call("put", object="mug", place="fridge"),
        call("put", object="cup", place="table")])
    assert [r.observation for r in results] == [
        'Error: the "cabinet" is closed; open it first', 'You open the "cabinet". "cabinet": dirty "mug".',
        'Error: the "cabinet" is already open', 'Error: there is no "cup" in the "cabinet"; "cabinet": dirty "mug"',
        'You take the dirty "mug" from the "cabinet".',
        'Error: you already hold a dirty "mug"; put it somewhere first',
        'Error: the "fridge" is closed; open it first', 'Error: you are not holding a "cup"; you hold a dirty "mug"']
    assert play(env, task, [call("go", place="garage")])[0].observation.startswith(
        'Error: unknown tool \'go\'')  # auto_walk: no go tool
    assert play(HouseholdEnv(), task, [call("go", place="Garage")])[0].observation == (
        'Error: there is no "garage"; places: "table", "counter", "shelf", "drawer", "cabinet", "fridge", "sink", '
        '"stove"')
    assert not env.done


def test_budget_counts_bad_calls_too():
    env = HouseholdEnv(**EASY)
    task = env.task_at("test", 0)
    results = play(env, task, [call("nope")] * 6)
    assert [r.done for r in results] == [False] * 5 + [True] and results[-1].reward == 0.0
    assert not env.info["success"]


def test_constructor_checks_its_arguments():
    for bad in ({"kinds": []}, {"kinds": ["fly"]}, {"objects": -1}, {"objects": 16}, {"max_actions": 0}):
        with pytest.raises(ValueError):
            HouseholdEnv(**bad)
    with pytest.raises(ValueError, match="take_place=False needs auto_walk=True"):
        HouseholdEnv(take_place=False)
    assert isinstance(make_env(PATH, **EASY), HouseholdEnv)


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(EnvService(env_factories([(PATH, EASY)]), threads=4)) as address:
        yield address


def test_oracle_episodes_through_remote_env_match_in_process(url):
    assert_served_like_in_process(url, "household", lambda: HouseholdEnv(**EASY), HouseholdEnv(**EASY).tasks("test", 5),
                                  [call("nosuch"), call("take", bogus=[1, {"a": None}])], [call("put")])