"""Tools from a plain object's methods and from explicit JSON schemas: binding, checks, errors, the env server."""

from __future__ import annotations

import copy

import pytest

from agentrl.envs import (ToolEnvironment, ToolError, check_arguments, function_schema, object_tools, schema_tools,
                          tool)
from agentrl.envs.client import RemoteEnvironment
from agentrl.envs.schema import checkable_spec, check_tool_spec
from agentrl.envs.server import serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import Task, ToolCall


def task(env, index: int = 0) -> Task:
    return Task(env.name, "test", index, "go", {"index": index}, env.version)


def play(env, calls):
    env.reset(task(env))
    return [env.step(call) for call in calls]


# --- (a) a plain object's typed methods -------------------------------------------------------------
class Counter:
    """A plain object: no agentrl base class, no decorator."""

    def __init__(self) -> None:
        self.total = 0

    def bump(self, by: int, note: str = "") -> str:
        """Add to the counter.

        Args:
            by: how much.
            note: ignored.
        """
        self.total += by
        return str(self.total)

    def reset_to(self, value: int) -> str:
        """Set the counter.

        Args:
            value: the new total.
        """
        self.total = value
        return str(value)

    def _private(self) -> str:
        return "never offered"


class CountEnv(ToolEnvironment):
    name, version, system_prompt = "count", "count-v1", "Count."

    def __init__(self, names=None) -> None:
        self.counter = Counter()
        super().__init__(tools=object_tools(self.counter, names))

    @tool
    def done(self) -> str:
        """End the episode."""
        self.finish(reward=float(self.counter.total), success=True)
        return "bye"


def test_object_methods_become_tools():
    env = CountEnv()
    counter = env.counter
    assert env.tools() == [function_schema(CountEnv.done, "done"), function_schema(counter.bump),
                           function_schema(counter.reset_to)]
    results = play(env, [ToolCall("bump", {"by": 2}), ToolCall("bump", {"by": 3, "note": "x"}),
                         ToolCall("bump", {"by": "3"}), ToolCall("bump", {}), ToolCall("_private", {}),
                         ToolCall("done", {})])
    assert [r.observation for r in results[:2]] == ["2", "5"]
    assert [r.observation for r in results[2:5]] == [
        "Error: bump: argument 'by' must be integer, got '3'", "Error: bump is missing required argument(s) ['by']",
        "Error: unknown tool '_private'; available tools: ['bump', 'done', 'reset_to']"]
    assert results[-1].done and results[-1].reward == 5.0 and results[-1].info["tool_errors"] == 3
    assert [t["function"]["name"] for t in CountEnv(["reset_to"]).tools()] == ["done", "reset_to"]


def test_object_tools_refuse_what_they_cannot_describe():
    class Untyped:
        def go(self, x):
            """Go."""
            return ""

    with pytest.raises(TypeError, match="tool 'go': parameter 'x' has no type annotation"):
        object_tools(Untyped())
    with pytest.raises(ValueError, match="Counter has no method 'nope'"):
        object_tools(Counter(), ["bump", "nope"])

    class Clash(CountEnv):
        def __init__(self) -> None:
            super().__init__()
            self.add_tools(object_tools(Counter(), ["bump"]))

    with pytest.raises(ValueError, match="two tools are named 'bump'"):
        Clash()


# --- (b) explicit schemas and a handler --------------------------------------------------------------
def spec(name: str, properties: dict, required: list, **more) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
        "type": "object", "properties": properties, "required": required, **more}}}


TOOLS = [
    spec("order", {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "required": ["sku", "qty"], "additionalProperties": False, "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$", "title": "SKU"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
        "shipping": {"type": "string", "enum": ["standard", "express"], "default": "standard"},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "gift": {"type": "boolean"},
        "price": {"type": "number", "exclusiveMinimum": 0},
    }, ["items"]),
    spec("tag", {
        "labels": {"type": "object", "patternProperties": {"^x-": {"type": "string"}},
                   "additionalProperties": {"type": "integer"}},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": {"const": 0}},
        "level": {"type": ["integer", "null"]},
    }, []),
    spec("refuse", {}, []),
    spec("crash", {}, []),
]


class Shop:
    """A suite's own implementation of TOOLS (a handler that is not the environment)."""

    def __init__(self) -> None:
        self.orders: list = []

    def order(self, items, shipping="standard", note=None, gift=False, price=1.0):
        self.orders.append(items)
        return f"ordered {len(items)} line(s), {shipping}"

    def tag(self, labels=None, pair=None, level=None):
        return f"tagged {labels} {pair} {level}"

    def refuse(self):
        raise ToolError("the shop is closed")

    def crash(self):
        raise RuntimeError("the till is on fire")


class ShopEnv(ToolEnvironment):
    name, version, system_prompt = "shop", "shop-v1", "Shop."

    def __init__(self) -> None:
        self.shop = Shop()
        super().__init__(tools=schema_tools(TOOLS, self.shop))

    @tool
    def done(self) -> str:
        """End the episode."""
        correct = self.shop.orders == [[{"sku": "TEA-001", "qty": self.task.data["index"] + 1}]]
        self.finish(reward=float(correct), success=correct)
        return "bye"

    def make_task(self, rng, split, index):
        return Task(self.name, split, index, f"Order {index + 1} TEA-001.", {"index": index}, self.version)

    def oracle(self, task):
        return [ToolCall("order", {"items": [{"sku": "TEA-001", "qty": task.data["index"] + 1}]}),
                ToolCall("done", {})]


GOOD = {"items": [{"sku": "TEA-001", "qty": 2}], "shipping": "express", "note": None, "gift": True, "price": 2}


def test_schema_tools_run_good_calls():
    env = ShopEnv()
    assert env.tools()[1:] == TOOLS and env.tools()[1] is not TOOLS[0]  # a copy: the caller's list stays theirs
    results = play(env, [ToolCall("order", GOOD), ToolCall("order", {"items": [{"sku": "CUP-002", "qty": 9}]}),
                         ToolCall("tag", {"labels": {"x-a": "s", "n": 3}, "pair": ["a", 1, 0, 0], "level": None}),
                         ToolCall("tag", {"level": 4})])
    assert [r.observation for r in results] == ["ordered 1 line(s), express", "ordered 1 line(s), standard",
                                                "tagged {'x-a': 's', 'n': 3} ['a', 1, 0, 0] None",
                                                "tagged None None 4"]
    assert env.info["tool_errors"] == 0


@pytest.mark.parametrize("tool_name, arguments, message", [
    ("order", {}, "order is missing required argument(s) ['items']"),
    ("order", {**GOOD, "coupon": "X"}, "order got unknown argument(s) ['coupon']; it takes "
                                       "['gift', 'items', 'note', 'price', 'shipping']"),
    ("order", {"items": []}, "order: argument 'items' must have at least 1 items, got 0"),
    ("order", {"items": [GOOD["items"][0]] * 4}, "order: argument 'items' must have at most 3 items, got 4"),
    ("order", {"items": "TEA-001"}, "order: argument 'items' must be array, got 'TEA-001'"),
    ("order", {"items": [{"sku": "TEA-001"}]}, "order: argument 'items[0]' is missing required key(s) ['qty']"),
    ("order", {"items": [{"sku": "TEA-001", "qty": 1, "size": "L"}]},
     "order: argument 'items[0]' has unknown key(s) ['size']; allowed: ['qty', 'sku']"),
    ("order", {"items": [{"sku": "tea", "qty": 1}]},
     "order: argument 'items[0].sku' must match the pattern '^[A-Z]{3}-[0-9]{3}$', got 'tea'"),
    ("order", {"items": [{"sku": "TEA-001", "qty": 0}]}, "order: argument 'items[0].qty' must be >= 1, got 0"),
    ("order", {"items": [{"sku": "TEA-001", "qty": 10}]}, "order: argument 'items[0].qty' must be <= 9, got 10"),
    ("order", {"items": [{"sku": "TEA-001", "qty": 1.5}]},
     "order: argument 'items[0].qty' must be integer, got 1.5"),
    ("order", {**GOOD, "shipping": "drone"},
     "order: argument 'shipping' must be string in ['standard', 'express'], got 'drone'"),
    ("order", {**GOOD, "note": 5}, "order: argument 'note' must be string or null, got 5"),
    ("order", {**GOOD, "note": "x" * 11}, "order: argument 'note' must be string or null, got 'xxxxxxxxxxx'"),
    ("order", {**GOOD, "gift": 1}, "order: argument 'gift' must be boolean, got 1"),
    ("order", {**GOOD, "price": 0}, "order: argument 'price' must be > 0, got 0"),
    ("order", {**GOOD, "price": True}, "order: argument 'price' must be number, got True"),
    ("tag", {"labels": {"x-a": 1}}, "tag: argument 'labels.x-a' must be string, got 1"),
    ("tag", {"labels": {"n": "3"}}, "tag: argument 'labels.n' must be integer, got '3'"),
    ("tag", {"pair": [1, 1]}, "tag: argument 'pair[0]' must be string, got 1"),
    ("tag", {"pair": ["a", 1, 2]}, "tag: argument 'pair[2]' must be 0, got 2"),
    ("tag", {"level": "high"}, "tag: argument 'level' must be integer or null, got 'high'"),
    ("tag", ["level"], "arguments of tag must be a JSON object, got list"),
    ("refuse", {}, "the shop is closed"),  # ToolError raised by the handler
])
def test_bad_calls_are_error_observations_naming_the_argument(tool_name, arguments, message):
    env = ShopEnv()
    result = play(env, [ToolCall(tool_name, arguments)])[0]
    assert result.observation == f"Error: {message}" and result.info == {"tool_error": message}
    assert not result.done and env.info["tool_errors"] == 1 and env.shop.orders == []


def test_other_exceptions_from_a_handler_propagate():
    with pytest.raises(RuntimeError, match="the till is on fire"):
        play(ShopEnv(), [ToolCall("crash", {})])


def with_params(**params) -> dict:
    return {"type": "function", "function": {"name": "f", "description": "F.", "parameters": {"type": "object",
                                                                                              **params}}}


@pytest.mark.parametrize("bad, message", [
    ({"name": "f", "parameters": {"type": "object"}}, "a tool schema must look like"),
    ({"type": "function", "function": {"name": "get weather", "description": "W.", "parameters": {"type": "object"}}},
     "name must be 1-64 letters"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
     "tool 'f': 'description' must be a non-empty string"),
    ({"type": "function", "function": {"name": "f", "description": "F.", "params": {}}},
     "tool 'f': unknown field(s) ['params']"),
    ({"type": "function", "function": {"name": "f", "description": "F.", "parameters": {"type": "array"}}},
     "tool 'f': 'parameters' must be a JSON schema with \"type\": \"object\""),
    (with_params(properties={"x": {"type": "int"}}), "tool 'f': parameters.properties.x: 'type' must be one of"),
    (with_params(properties={"x": {"$ref": "#/$defs/X"}}),
     "tool 'f': parameters.properties.x: unsupported keyword(s) ['$ref']"),
    (with_params(properties={"x": {"type": "object", "properties": {"y": {"oneOf": []}}}}),
     "tool 'f': parameters.properties.x.properties.y: unsupported keyword(s) ['oneOf']"),
    (with_params(properties={"x": {"type": "string"}}, required=["y"]),
     "tool 'f': parameters: 'required' names ['y'], which 'properties' does not declare"),
    (with_params(properties={"x": {"enum": []}}), "'enum' must be a non-empty list"),
    (with_params(properties={"x": {"type": "string", "pattern": "("}}), "'(' is not a regular expression"),
    (with_params(properties={"x": {"type": "string", "minLength": -1}}), "'minLength' must be a non-negative"),
    (with_params(properties={"x": {"type": "array", "items": [{"type": "string"}]}}),
     "parameters.properties.x.items must be a JSON schema (an object)"),
    (with_params(properties={"x": {"type": "object", "additionalProperties": "no"}}),
     "parameters.properties.x.additionalProperties must be a JSON schema"),
])
def test_malformed_schemas_are_refused_naming_the_tool_and_field(bad, message):
    with pytest.raises(ValueError) as refused:
        schema_tools([bad], Shop())
    assert message in str(refused.value)


def test_handlers_that_cannot_run_the_schema_are_refused():
    class Handler:
        def f(self, x):
            return ""

        def g(self, x, y):
            return ""

        def h(self, **anything):
            return ""

    x = {"x": {"type": "integer"}}
    problems = [
        ([spec("nope", x, ["x"])], "tool 'nope': Handler has no method 'nope' to run it"),
        ([spec("f", {**x, "z": {"type": "string"}}, ["x"])],
         "tool 'f': method Handler.f does not take the argument(s) ['z'] that the schema declares"),
        ([spec("g", {**x, "y": {"type": "string"}}, ["x"])],
         "tool 'g': method Handler.g has no default for ['y'], which the schema does not require"),
        ([spec("f", x, ["x"], additionalProperties=True)],
         "tool 'f': method Handler.f needs **kwargs: the schema allows arguments it does not declare"),
        ([spec("f", x, ["x"]), spec("f", x, ["x"])], "two tool schemas are named 'f'"),
    ]
    for schemas, message in problems:
        with pytest.raises(ValueError) as refused:
            schema_tools(schemas, Handler())
        assert str(refused.value) == message
    # **kwargs takes anything; an open schema lets undeclared arguments through to it
    [h] = schema_tools([spec("h", x, [], additionalProperties={"type": "string"})], Handler())
    assert check_arguments(h.spec, {"x": 1, "y": "s"}) is None
    assert check_arguments(h.spec, {"x": 1, "y": 2}) == "h: argument 'y' must be string, got 2"


def test_checkable_spec_keeps_what_it_can_check_of_a_foreign_schema():
    # What pydantic (and so an MCP server written with the SDK) produces for optional and nested arguments.
    foreign = {"type": "function", "function": {"name": "f", "description": "", "parameters": {
        "type": "object", "title": "fArguments", "$defs": {"Item": {"type": "object"}},
        "properties": {"item": {"$ref": "#/$defs/Item"}, "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}],
                                                                   "default": None, "title": "Limit"},
                       "mode": {"oneOf": [{"const": "a"}, {"const": "b"}]}, "tags": {"type": "array",
                                                                                    "items": {"type": "string"}}},
        "required": ["item", "ghost"]}}}
    original = copy.deepcopy(foreign)
    checked = checkable_spec(foreign)
    assert foreign == original  # untouched: the model is shown the server's schema as it is
    assert checked["function"]["parameters"] == {
        "type": "object", "title": "fArguments", "required": ["item"],
        "properties": {"item": {}, "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None,
                                             "title": "Limit"},
                       "mode": {}, "tags": {"type": "array", "items": {"type": "string"}}}}
    assert check_arguments(checked, {"item": {"anything": 1}, "mode": "zzz", "limit": None}) is None
    assert check_arguments(checked, {"item": 1, "limit": "9"}) == "f: argument 'limit' must be integer or null, got '9'"
    assert check_arguments(checked, {"item": 1, "tags": [1]}) == "f: argument 'tags[0]' must be string, got 1"
    assert check_arguments(checked, {}) == "f is missing required argument(s) ['item']"
    with pytest.raises(ValueError, match="'type' must be one of"):
        checkable_spec({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "int"}}}}})
    check_tool_spec(TOOLS[0])  # the explicit schemas above are fully checkable


# --- through the env server --------------------------------------------------------------------------
def test_schema_environment_served_matches_in_process():
    with serve_in_thread(EnvService({"shop": ShopEnv}, threads=2)) as url:
        remote = RemoteEnvironment(url, "shop")
        local = ShopEnv()
        assert remote.tools() == local.tools()
        for the_task in local.tasks("test", 3):
            assert oracle_conversation(remote.clone(), the_task) == oracle_conversation(ShopEnv(), the_task)
        env, here = remote.clone(), ShopEnv()
        the_task = local.task_at("test", 0)
        assert env.reset(the_task) == here.reset(the_task)
        calls = [ToolCall("order", {"items": [{"sku": "tea", "qty": 0}]}), ToolCall("order", {"coupon": 1}),
                 ToolCall("refuse", {}), ToolCall("tag", {"labels": {"n": "3"}}), *local.oracle(the_task)]
        for call in calls:
            assert env.step(call) == here.step(call), call
        env.close()
