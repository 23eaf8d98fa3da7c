"""Token log-probabilities and the clipped policy-gradient loss.

The loss is GRPO's clipped surrogate (Shao et al. 2024, DeepSeekMath) with DAPO's token-level aggregation
and asymmetric "clip-higher" range (Yu et al. 2025), plus an optional k3 KL penalty to a reference policy
(Schulman 2020, "Approximating KL divergence"). For off-policy samples (asynchronous rollouts, or a
serving engine whose numerics differ from the trainer's) the ratio is clipped around the *proximal*
policy, the trainer's own logprobs before the update, and each token is weighted by the truncated
importance ratio proximal / behaviour (decoupled PPO, Hilton et al. 2022; AReaL, Fu et al. 2025;
truncated IS, Yao et al. 2025).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token under ``softmax(logits / temperature)``, in float32.

    Args:
        logits: ``[B, T, V]`` (any float dtype); position t scores ``targets[:, t]``.
        targets: ``[B, T]`` long token ids.
        temperature: the sampling temperature, so log-probs match the behaviour policy's.

    Returns:
        ``[B, T]`` float32 log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    # gather - logsumexp never builds the full [B, T, V] log_softmax tensor.
    picked = scaled.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def policy_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
    proximal_logprobs: Tensor | None = None,
    is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss with token-level aggregation (GRPO, Shao et al. 2024; DAPO, Yu et al. 2025).

    Per token: ``-w * min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3``, with
    ``r = exp(logprobs - anchor)`` and ``k3 = exp(ref - lp) - (ref - lp) - 1`` (Schulman 2020). Without
    ``proximal_logprobs`` the anchor is the behaviour policy and ``w = 1`` (plain GRPO). With them the anchor
    is the proximal policy and ``w = min(exp(proximal - behaviour), is_cap)``, the truncated importance
    weight that corrects for the samples coming from another policy. The loss is
    ``sum(per_token * mask) / normalizer``.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (differentiable).
        behaviour_logprobs: ``[B, T]`` log-probs of the policy that sampled the tokens.
        advantages: ``[B]`` one advantage per sequence.
        mask: ``[B, T]`` bool or 0/1; which tokens are trained on.
        clip_low, clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]`` (DAPO clip-higher).
        ref_logprobs: ``[B, T]`` reference-policy log-probs, or None for no KL.
        kl_coef: weight of the k3 KL term.
        normalizer: token count to divide by; defaults to ``mask.sum()``. The trainer passes the global
            token count of the step so that micro-batches summed equal the full-batch loss.
        proximal_logprobs: ``[B, T]`` log-probs of the weights before this update (no gradient), or None.
        is_cap: upper bound of the importance weight (truncated IS); only used with ``proximal_logprobs``.

    Returns:
        ``(loss scalar, stats)``; stats (python floats): ``loss``, ``clip_frac`` (masked tokens whose
        clipped term is active, i.e. with zero gradient), ``ratio_mean``, ``ratio_max``, ``kl`` (mean k3
        over masked tokens, 0 without ref), ``n_tokens``; with ``proximal_logprobs`` also ``is_weight_mean``,
        ``is_truncated_frac`` (tokens whose weight hit ``is_cap``) and ``offpolicy_kl`` (k3 estimate of
        KL(behaviour || proximal) over masked tokens: how far the samples are from the trained policy).
    """
    if not (logprobs.shape == behaviour_logprobs.shape == mask.shape) or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"shapes: logprobs {tuple(logprobs.shape)}, behaviour {tuple(behaviour_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    keep = mask.bool()
    n_tokens = int(keep.sum().item())
    if normalizer is None:
        normalizer = float(max(n_tokens, 1))  # an all-masked batch gives loss 0, not NaN
    elif normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")

    if proximal_logprobs is not None and proximal_logprobs.shape != logprobs.shape:
        raise ValueError(f"shapes: logprobs {tuple(logprobs.shape)}, proximal {tuple(proximal_logprobs.shape)}")
    if is_cap <= 0:
        raise ValueError(f"is_cap must be positive, got {is_cap}")

    zeros = torch.zeros_like(logprobs)
    behaviour = behaviour_logprobs.to(logprobs.dtype)
    anchor = behaviour if proximal_logprobs is None else proximal_logprobs.detach().to(logprobs.dtype)
    # Zero the log-ratio off-mask so padding (possibly -inf behaviour log-probs) can't make inf/NaN
    # that would leak through backward even when multiplied by a zero mask.
    log_ratio = torch.where(keep, logprobs - anchor, zeros)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    weight = None
    if proximal_logprobs is not None:
        offpolicy = torch.where(keep, anchor - behaviour, zeros)
        weight = torch.exp(offpolicy).clamp(max=is_cap)
        per_token = per_token * weight

    kl = zeros
    if ref_logprobs is not None:
        ref_diff = torch.where(keep, ref_logprobs.to(logprobs.dtype) - logprobs, zeros)
        kl = torch.exp(ref_diff) - ref_diff - 1.0
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl

    loss = torch.where(keep, per_token, zeros).sum() / normalizer

    with torch.no_grad():
        # Clipping is active (gradient zero) where the clamped term is the smaller one and differs.
        is_clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
        denom = max(n_tokens, 1)
        stats = {
            "loss": loss.item(),
            "clip_frac": (is_clipped & keep).sum().item() / denom,
            "ratio_mean": ratio[keep].sum().item() / denom,
            "ratio_max": ratio[keep].max().item() if n_tokens else 0.0,
            "kl": kl[keep].sum().item() / denom if ref_logprobs is not None else 0.0,
            "n_tokens": float(n_tokens),
        }
        if weight is not None:
            stats["is_weight_mean"] = weight[keep].sum().item() / denom
            stats["is_truncated_frac"] = ((weight >= is_cap) & keep).sum().item() / denom
            k3 = torch.exp(offpolicy) - offpolicy - 1.0  # KL(behaviour || proximal), sampled from behaviour
            stats["offpolicy_kl"] = k3[keep].sum().item() / denom
    return loss, stats
