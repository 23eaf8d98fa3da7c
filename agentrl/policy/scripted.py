"""ScriptedPolicy: a Policy that replies with given texts — for tests, debugging and oracle replays."""

from __future__ import annotations

import json
from typing import Iterable

from agentrl.policy.base import Generation, SamplingParams
from agentrl.types import ToolCall


def tool_call_text(call: ToolCall) -> str:
    """The assistant text for one call, as the Qwen2.5 template renders it."""
    return f'<tool_call>\n{{"name": "{call.name}", "arguments": {json.dumps(call.arguments)}}}\n</tool_call>'


class ScriptedPolicy:
    """Reply to successive ``generate`` calls with successive ``replies`` (text), encoded by ``tokenizer``.

    Each reply gets the eos token appended (unless ``finish=False``) and log-probs of 0.0; every request's
    prompt and reply ids are recorded in ``requests`` so tests can compare them with trajectories.

    Example:
        >>> policy = ScriptedPolicy(tokenizer, ["<tool_call>...</tool_call>"])  # doctest: +SKIP
    """

    def __init__(self, tokenizer, replies: Iterable[str], finish: bool = True, version: int = 0) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.finish = finish
        self.version = version
        self.requests: list[tuple[list[int], list[int]]] = []

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        if not self.replies:
            raise RuntimeError("ScriptedPolicy ran out of replies")
        ids = self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"][: sampling.max_new_tokens]
        finished = self.finish and len(ids) < sampling.max_new_tokens
        if finished:
            ids = ids + [self.tokenizer.eos_token_id]
        self.requests.append((list(prompt_ids), list(ids)))
        return Generation(ids=ids, logprobs=[0.0] * len(ids), version=self.version, finished=finished)

    async def load_adapter(self, path: str | None, version: int) -> None:
        self.version = version
