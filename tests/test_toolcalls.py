"""Tool-call parsing, including every malformed shape a sampled model produces."""

from agentrl.rollout.toolcalls import parse_completion
from agentrl.types import ToolCall


def test_single_call_and_free_text():
    parsed = parse_completion('thinking <tool_call>\n{"name": "get", "arguments": {"key": "a1"}}\n</tool_call>')
    assert parsed.calls == [ToolCall("get", {"key": "a1"})]
    assert parsed.errors == []
    assert parsed.content == "thinking"


def test_several_calls_keep_order_with_errors_in_between():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "b", "arguments": </tool_call>'
            '<tool_call>{"name": "c", "arguments": {"x": 1}}</tool_call>')
    items = parse_completion(text).items
    assert [type(i).__name__ for i in items] == ["ToolCall", "str", "ToolCall"]
    assert items[0].name == "a" and items[2].arguments == {"x": 1}
    assert "not valid JSON" in items[1]


def test_openai_style_string_arguments_are_decoded():
    parsed = parse_completion('<tool_call>{"name": "get", "arguments": "{\\"key\\": \\"z\\"}"}</tool_call>')
    assert parsed.calls == [ToolCall("get", {"key": "z"})]


def test_malformed_shapes_become_errors():
    cases = {
        '<tool_call>{"name": "get", "arguments": {"key": "a"}}': "not closed",
        '<tool_call>[1, 2]</tool_call>': "JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': "no 'name'",
        '<tool_call>{"name": "get", "arguments": [1]}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "get", "arguments": "not json"}</tool_call>': "not valid JSON",
        'answer is </tool_call>': "without a matching",
    }
    for text, fragment in cases.items():
        parsed = parse_completion(text)
        assert parsed.calls == [], text
        assert len(parsed.errors) == 1 and fragment in parsed.errors[0], (text, parsed.errors)


def test_plain_text_has_no_items():
    parsed = parse_completion("The answer is 42.")
    assert parsed.items == [] and parsed.content == "The answer is 42."


def test_json_the_decoder_gives_up_on_is_an_error_not_an_exception():
    # json.loads raises RecursionError on deep nesting and ValueError on 4300+ digit integers
    cases = {'<tool_call>' + "[" * 100_000 + '</tool_call>': "RecursionError",
             '<tool_call>{"name": "a", "arguments": {"v": ' + "7" * 5000 + '}}</tool_call>': "digits",
             '<tool_call>{"name": "a", "arguments": "' + "[" * 100_000 + '"}</tool_call>': "not valid JSON",
             '<tool_call>{"name": "a", "arguments": "' + "7" * 5000 + '"}</tool_call>': "not valid JSON"}
    for text, fragment in cases.items():
        parsed = parse_completion(text)
        assert parsed.calls == [] and len(parsed.errors) == 1 and fragment in parsed.errors[0], parsed.errors
        assert len(parsed.errors[0]) < 500
