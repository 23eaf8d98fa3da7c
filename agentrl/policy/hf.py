"""The embedded policy backend: an in-process transformers (+ peft) model, batched across episodes.

Concurrent episodes each ``await generate(...)``; requests that arrive together are sampled as one batch
(:func:`agentrl.policy.decode.sample`, which computes shared prompt prefixes once), in a worker thread so the
event loop keeps stepping environments meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import PreTrainedModel

from agentrl.policy.base import Generation, SamplingParams
from agentrl.policy.decode import sample


def _mergeable(layer: LoraLinear) -> bool:
    """A plain LoRA linear (no DoRA or other variant, no bias on B, an unquantised base) not merged already."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    return (type(layer.base_layer) is torch.nn.Linear and not layer.merged
            and all(a not in layer.lora_variant and layer.lora_B[a].bias is None for a in active))


@contextlib.contextmanager
def merged_lora(model) -> Iterator[bool]:
    """Run ``model`` with each LoRA linear's update folded into its weight, ``W + scale * B @ A``.

    Decoding calls every projection once per token, and the unmerged adapter adds two small matmuls, a scale
    and an add to each. Merged, sampling is one matmul per projection. The base weights are not modified: each
    layer's weight is pointed at a merged copy and back, so no rounding accumulates across steps. The result
    equals the unmerged model's up to float rounding (the trainer's importance ratio absorbs that).
    Anything else (DoRA, quantised layers) runs unchanged.

    Yields whether every projection is now a plain linear (a model without peft, or every LoRA layer folded):
    the condition for :mod:`agentrl.policy.qwen2_step`'s decode step.
    """
    if not isinstance(model, PeftModel):
        yield True
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers or not all(_mergeable(layer) for layer in layers):
        yield False
        return
    swapped = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.base_layer.weight
                merged = weight.detach().clone()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged += layer.get_delta_weight(adapter).to(merged.dtype)
                swapped.append((weight, weight.data))
                weight.data = merged
        with model.disable_adapter():
            yield True
    finally:
        for weight, data in swapped:
            weight.data = data


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future


class HFPolicy:
    """Serve a transformers causal LM (optionally a peft model) as a :class:`~agentrl.policy.base.Policy`.

    Args:
        model: the model. In synchronous training it is the very module being optimised (weights are
            shared, so a new adapter version needs no copy: ``load_adapter(None, v)`` only advances the
            version); in asynchronous training it is a copy that :meth:`set_weights` refreshes.
        eos_id: token id that ends an assistant turn.
        pad_id: padding token id.
        max_batch: most sequences per batch.
        num_threads: torch intra-op threads for generation (set in the generating thread only; ``None``
            leaves torch's setting). Small models decode faster on one thread, and in asynchronous training
            the other cores are left to the update.

    Example:
        >>> policy = HFPolicy(model, tokenizer.eos_token_id, tokenizer.pad_token_id)  # doctest: +SKIP
        >>> gen = asyncio.run(policy.generate(prompt_ids, SamplingParams(max_new_tokens=32)))  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, eos_id: int, pad_id: int, max_batch: int = 64,
                 version: int = 0, num_threads: int | None = None) -> None:
        self.model = model
        self.num_threads = num_threads
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_batch = max_batch
        self.version = version
        self._pending: list[_Request] = []
        self._worker: asyncio.Task | None = None
        self.generate_calls = 0  # how many batched sampling calls ran (for batching stats/tests)
        self._weights_lock = threading.Lock()  # a batch and a weight refresh never overlap

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        if not prompt_ids:
            raise ValueError("empty prompt")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(list(prompt_ids), sampling, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def load_adapter(self, path: str | None, version: int) -> None:
        """Serve adapter ``version``: with shared weights (``path=None``) only the version moves; otherwise the
        PEFT adapter saved at ``path`` is loaded into the (peft) model as ``v<version>`` and made active."""
        if path is not None:
            name = f"v{version}"
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
            self.model.set_adapter(name)
        self.version = version

    def set_weights(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Copy ``{parameter name: tensor}`` (e.g. the trainer's LoRA weights) into the served model and serve
        them as ``version``; waits for a batch being generated to finish, and the next batch uses them."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise KeyError(f"the served model has no parameters {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
        with self._weights_lock, torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
            self.version = version

    async def _drain(self) -> None:
        while self._pending:
            await self._settle()
            first = self._pending[0].sampling
            batch = [r for r in self._pending if r.sampling == first][: self.max_batch]
            self._pending = [r for r in self._pending if not any(r is b for b in batch)]
            batch = [r for r in batch if not r.future.done()]  # episodes cancelled while waiting
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._generate_batch, [r.prompt_ids for r in batch], first)
            except Exception as exc:  # every waiting episode gets the failure as a policy_error
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request, result in zip(batch, results):
                if not request.future.done():  # an episode cancelled mid-batch (engine stopped) is skipped
                    request.future.set_result(result)

    async def _settle(self) -> None:
        """Yield to the loop until no new request arrives, so episodes waking together share one batch."""
        while True:
            before = len(self._pending)
            for _ in range(3):
                await asyncio.sleep(0)
            if len(self._pending) == before:
                return

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)  # per thread: the trainer's thread keeps its own setting
        with self._weights_lock:
            return self._generate_locked(prompts, sampling)

    def _generate_locked(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        self.generate_calls += 1
        was_training = self.model.training
        self.model.eval()
        try:
            with merged_lora(self.model) as plain:
                out = sample(self.model, prompts, sampling.max_new_tokens, sampling.temperature, self.eos_id,
                             self.pad_id, plain_weights=plain)
        finally:
            self.model.train(was_training)
        return [Generation(ids=s.ids, logprobs=s.logprobs, version=self.version, finished=s.finished) for s in out]
