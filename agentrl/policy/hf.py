"""The embedded policy backend: an in-process transformers (+ peft) model, batched across episodes.

Concurrent episodes each ``await generate(...)``; requests that arrive together are left-padded into one
``model.generate`` call, run in a worker thread so the event loop keeps stepping environments meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from agentrl.policy.base import Generation, SamplingParams


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
        max_batch: most sequences per ``generate`` call.
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
        self.generate_calls = 0  # how many batched model.generate calls ran (for batching stats/tests)
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

    @torch.no_grad()
    def _generate_locked(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        self.generate_calls += 1
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: generation continues at the right edge
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention[row, width - len(prompt):] = 1
        greedy = sampling.temperature <= 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_k=None, top_p=None,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True,
        )
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                  generation_config=config)
        self.model.train(was_training)
        new_ids = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, steps, V], raw (unprocessed)
        if not greedy:
            logits = logits / sampling.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
        results = []
        for row in range(len(prompts)):
            ids = new_ids[row].tolist()
            finished = self.eos_id in ids
            length = ids.index(self.eos_id) + 1 if finished else len(ids)
            results.append(Generation(ids=ids[:length], logprobs=logprobs[row, :length].tolist(),
                                      version=self.version, finished=finished))
        return results
