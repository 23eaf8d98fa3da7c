"""Tool schemas derived from typed methods, argument checking, and observation truncation."""

from __future__ import annotations

from typing import Literal

import pytest

from agentrl.envs import ToolEnvironment, check_arguments, function_schema, tool
from agentrl.envs.base import TRUNCATION_MARKER
from agentrl.types import Task, ToolCall


def everything(n: int, x: float, s: str, flag: bool, mode: Literal["fast", "slow"], ids: list[int],
               limit: int | None = None) -> str:
    """Exercise every supported type.

    This second paragraph is not part of the summary.

    Args:
        n: how many.
        x (float): a real number.
        s: some text
            over two lines.
        flag: a switch.
        mode: the speed.
        ids: item ids.
        limit: optional cap.

    Returns:
        nothing useful.
    """
    return ""


def no_annotation(a) -> str:  # noqa: ANN001
    """Untyped."""
    return ""


def no_docstring(a: int) -> str:
    return ""


def bad_type(a: dict) -> str:
    """A dict cannot be described.

    Args:
        a: a mapping.
    """
    return ""


SPEC = function_schema(everything)
GOOD = {"n": 3, "x": 1.5, "s": "hi", "flag": True, "mode": "fast", "ids": [1, 2]}


def test_schema_types_and_descriptions():
    fn = SPEC["function"]
    assert SPEC["type"] == "function" and fn["name"] == "everything"
    assert fn["description"] == "Exercise every supported type."
    assert fn["parameters"] == {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "description": "how many."},
            "x": {"type": "number", "description": "a real number."},
            "s": {"type": "string", "description": "some text over two lines."},
            "flag": {"type": "boolean", "description": "a switch."},
            "mode": {"type": "string", "enum": ["fast", "slow"], "description": "the speed."},
            "ids": {"type": "array", "items": {"type": "integer"}, "description": "item ids."},
            "limit": {"type": "integer", "description": "optional cap."},
        },
        "required": ["n", "x", "s", "flag", "mode", "ids"],
    }


def test_schema_of_bound_method_skips_self_and_takes_name():
    class Thing:
        def act(self, k: int) -> str:
            """Act.

            Args:
                k: times.
            """
            return ""

    fn = function_schema(Thing().act, "do_it")["function"]
    assert fn["name"] == "do_it" and list(fn["parameters"]["properties"]) == ["k"]


@pytest.mark.parametrize("fn, words", [(no_annotation, "annotation"), (no_docstring, "docstring"),
                                       (bad_type, "unsupported")])
def test_schema_rejects_undescribable_functions(fn, words):
    with pytest.raises(TypeError, match=words):
        function_schema(fn)


def test_check_arguments_accepts_good_calls():
    assert check_arguments(SPEC, GOOD) is None
    assert check_arguments(SPEC, {**GOOD, "x": 2, "limit": 5, "ids": []}) is None  # int is a number


@pytest.mark.parametrize("arguments, words", [
    ({**GOOD, "color": "red"}, "unknown argument(s) ['color']"),
    ({k: v for k, v in GOOD.items() if k != "mode"}, "missing required argument(s) ['mode']"),
    ({**GOOD, "n": "3"}, "'n' must be integer"),
    ({**GOOD, "n": True}, "'n' must be integer"),
    ({**GOOD, "n": 2.5}, "'n' must be integer"),
    ({**GOOD, "x": "1.5"}, "'x' must be number"),
    ({**GOOD, "x": False}, "'x' must be number"),
    ({**GOOD, "flag": 1}, "'flag' must be boolean"),
    ({**GOOD, "mode": "medium"}, "'mode' must be string in ['fast', 'slow']"),
    ({**GOOD, "ids": [1, "2"]}, "'ids[1]' must be integer, got '2'"),  # the item at fault is named
    ({**GOOD, "ids": [1, True]}, "'ids[1]' must be integer"),
    ({**GOOD, "ids": 1}, "'ids' must be array"),
    ([1, 2], "must be a JSON object, got list"),
    ('{"n": 1}', "must be a JSON object, got str"),
])
def test_check_arguments_names_the_problem(arguments, words):
    problem = check_arguments(SPEC, arguments)
    assert problem is not None and words in problem


class Dump(ToolEnvironment):
    name, version, system_prompt = "dump", "dump-v1", "Dump."
    max_observation_chars = 50

    @tool
    def dump(self, n: int) -> str:
        """Return n characters.

        Args:
            n: length.
        """
        return "x" * n


def test_long_observations_are_truncated_with_marker():
    env = Dump()
    env.reset(Task(env="dump", split="test", index=0, prompt="go", data={}, version="dump-v1"))
    assert env.step(ToolCall("dump", {"n": 50})).observation == "x" * 50
    assert env.step(ToolCall("dump", {"n": 51})).observation == "x" * 50 + TRUNCATION_MARKER
    assert env.step(ToolCall("dump", {"n": 5000})).observation == "x" * 50 + TRUNCATION_MARKER
    assert [t["function"]["name"] for t in env.tools()] == ["dump"]
