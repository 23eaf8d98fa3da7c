"""Chat rendering at the token level: the opening prompt, and the tokens of tool results appended later.

Only the opening prompt and the environment's observations are ever rendered and tokenised; what the policy
sampled is kept as the exact ids it produced, so a multi-turn episode never drifts from what was generated.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from agentrl.types import Message, ToolSpec

# A stand-in conversation whose rendering is cut away to isolate the text a tool message adds.
_STANDIN = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


class ChatFormat:
    """Token-level view of a chat template.

    Args:
        tokenizer: a tokenizer with a chat template whose assistant turns end with ``eos_token``.

    Example:
        >>> chat = ChatFormat(tokenizer)  # doctest: +SKIP
        >>> ids = chat.prompt_ids(messages, tools)  # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token

    def render(self, messages: list[Message], tools: list[ToolSpec] | None, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[Message], tools: list[ToolSpec] | None) -> list[int]:
        """Token ids of the opening messages followed by the assistant generation prompt."""
        return self.encode(self.render(messages, tools, generation_prompt=True))

    def observation_ids(self, tool_messages: list[Message]) -> list[int]:
        """Token ids that follow an assistant turn's final eos token: the tool results, then the next
        assistant generation prompt."""
        before = self.render(_STANDIN, None, generation_prompt=False)
        after = self.render(_STANDIN + tool_messages, None, generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("chat template does not render tool messages as a pure suffix")
        # The policy's completion ends at its eos token; the template's trailing text after it (a newline
        # for Qwen) belongs to the observation.
        cut = before.rindex(self.eos_text) + len(self.eos_text)
        return self.encode(after[cut:])

    def decode(self, ids: list[int]) -> str:
        """Text of a completion, without the final eos token."""
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)
