"""One policy update: micro-batched forward/backward of the clipped loss, then an optimizer step.

The loss of every micro-batch is divided by the *global* number of trained tokens (all micro-batches, all
processes), so micro-batch size, gradient accumulation and process count do not change the gradient.

With ``algo.importance_sampling`` the proximal policy of the decoupled loss is the weights before the
update: in the first epoch those are the weights of the very forward pass (so its detached logprobs cost
nothing extra); later epochs reuse the first epoch's values.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from agentrl.algo.losses import policy_loss
from agentrl.config import AlgoConfig
from agentrl.train.batch import SequenceBatch
from agentrl.train.prefix import sequence_logprobs


def _micro_loss(model, reference, mb: SequenceBatch, config: AlgoConfig, temperature: float,
                normalizer: float, proximal: torch.Tensor | None,
                lean: bool) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The micro-batch's loss and stats, and the proximal logprobs it used (this forward's when none given)."""
    logprobs = sequence_logprobs(model, mb, temperature, lean)
    if proximal is None:
        proximal = logprobs.detach()
    ref = None
    if config.kl_coef > 0:
        with torch.no_grad(), reference.disable_adapter():
            ref = sequence_logprobs(reference, mb, temperature, lean)
    loss, stats = policy_loss(logprobs, mb.behaviour_logprobs[:, 1:], mb.advantages, mb.loss_mask[:, 1:],
                              clip_low=config.clip_low, clip_high=config.clip_high, ref_logprobs=ref,
                              kl_coef=config.kl_coef, normalizer=normalizer,
                              proximal_logprobs=proximal if config.importance_sampling else None,
                              is_cap=config.is_cap)
    return loss, stats, proximal


def _idle_pass(model, pad_id: int) -> torch.Tensor:
    """A zero loss through the wrapped model, so a process with fewer micro-batches still joins every
    gradient all-reduce (DDP hangs when processes run different numbers of backward passes)."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=next(model.parameters()).device)
    return model(input_ids=ids).logits.sum() * 0.0


def policy_update(model, reference, optimizer, scheduler, accelerator: Accelerator, batch: SequenceBatch,
                  config: AlgoConfig, temperature: float, pad_id: int) -> dict[str, float]:
    """Run ``config.epochs`` optimizer steps on ``batch`` (this process's share); return mean stats.

    ``reference`` is the unwrapped peft model (``disable_adapter()`` gives the reference policy).
    Returns an empty dict when no process has anything to train on (all groups uninformative).
    """
    device = accelerator.device
    counts = torch.tensor([batch.loss_mask[:, 1:].sum().item(), math.ceil(len(batch) / config.micro_batch_size)],
                          dtype=torch.float64, device=device)
    gathered = accelerator.gather(counts.unsqueeze(0)).view(-1, 2)
    global_tokens, n_micro = gathered[:, 0].sum().item(), int(gathered[:, 1].max().item())
    if global_tokens == 0:
        return {}
    normalizer = global_tokens / accelerator.num_processes  # DDP averages gradients over processes
    params = [p for p in model.parameters() if p.requires_grad]
    # Shared openings are computed once per micro-batch and only trained positions are projected onto the
    # vocabulary (agentrl/train/prefix.py). That calls the model in parts, which a DDP-wrapped model does not
    # allow (two forward calls per backward, or a bypassed wrapper), so several processes run the plain forward.
    lean = accelerator.num_processes == 1
    totals: dict[str, float] = {}
    proximal: dict[int, torch.Tensor] = {}  # micro-batch -> logprobs before the update (first epoch)
    for _ in range(config.epochs):
        for i in range(n_micro):
            start = i * config.micro_batch_size
            if start < len(batch):
                mb = batch.slice(start, start + config.micro_batch_size)
                loss, stats, proximal[i] = _micro_loss(model, reference, mb, config, temperature, normalizer,
                                                       proximal.get(i), lean)
                weight = stats["n_tokens"] / max(global_tokens, 1.0)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + (value if key in ("loss", "n_tokens") else value * weight)
            else:
                loss = _idle_pass(model, pad_id)
            accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm)
    out = {f"train/{k}": v / config.epochs for k, v in totals.items() if k not in ("ratio_max",)}
    out["train/lr"] = scheduler.get_last_lr()[0]
    return out


def param_sync_gap(model, accelerator: Accelerator) -> float:
    """Largest difference between processes of a fingerprint of the trainable parameters (0.0 in sync).

    Data-parallel processes must hold identical adapters; a gap means gradients were not all-reduced.
    """
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    fingerprint = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params),
                               sum((p * (i + 1)).sum() for i, p in enumerate(params))])
    gathered = accelerator.gather(fingerprint.to(accelerator.device).unsqueeze(0))
    return float((gathered - gathered[0]).abs().max().item())
