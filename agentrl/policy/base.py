"""The Policy protocol: token ids in, sampled token ids + behaviour logprobs + adapter version out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn.

    ``temperature == 0`` is greedy. Behaviour logprobs are those of the distribution sampled from,
    ``log_softmax(logits / temperature)`` (plain ``log_softmax`` when greedy); the trainer recomputes them
    the same way, so the importance ratio compares like with like. No top-k/top-p: truncated sampling
    would make the behaviour distribution differ from the one the trainer scores.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0


@dataclass
class Generation:
    """One sampled completion: ``ids`` end with eos when ``finished``."""

    ids: list[int]
    logprobs: list[float]
    version: int
    finished: bool


@runtime_checkable
class Policy(Protocol):
    """What the rollout engine needs from a policy backend."""

    version: int

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation: ...

    async def load_adapter(self, path: str | None, version: int) -> None: ...
