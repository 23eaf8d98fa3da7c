"""token_logprobs and policy_loss against hand-computed values and autograd."""

import math

import pytest
import torch

from agentrl.algo.losses import policy_loss, token_logprobs


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_token_logprobs_temperature_two():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 0.0, 2.0]]])  # / 2 -> [0.5, 1, 1.5], [1, 0, 1]
    targets = torch.tensor([[2, 1]])
    # row 0: 1.5 - logsumexp(0.5, 1, 1.5) = -log(1 + e^-0.5 + e^-1) = -0.6802697
    # row 1: 0 - log(2e + 1) = -1.8619948
    out = token_logprobs(logits, targets, temperature=2.0)
    close(out, [[-0.6802697, -1.8619948]])
    assert out.dtype == torch.float32
    out_bf16 = token_logprobs(logits.to(torch.bfloat16), targets, temperature=2.0)
    assert out_bf16.dtype == torch.float32
    close(out_bf16, [[-0.6802697, -1.8619948]])  # these logits are exact in bf16


def test_ratio_one_is_plain_policy_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.2]], requires_grad=True)
    blp = lp.detach().clone()
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = policy_loss(lp, blp, adv, mask)
    # -(1 + 1 - 0.5) / 3
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    # d/dlp = -A * mask / n
    close(lp.grad, [[-1 / 3, -1 / 3, 0.0], [0.5 / 3, 0.0, 0.0]])
    assert stats["clip_frac"] == 0.0
    assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["kl"] == 0.0 and stats["n_tokens"] == 3.0
    assert stats["loss"] == pytest.approx(-0.5)


def test_clipping_zeroes_gradient():
    blp = torch.zeros(2, 2)
    # row 0 (A = +1): ratios 1.5 (above 1.28, clipped), 1.1; row 1 (A = -1): ratios 0.5 (below 0.8, clipped), 1.5
    lp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(lp, blp, adv, torch.ones(2, 2, dtype=torch.bool), clip_low=0.2, clip_high=0.28)
    # per token: -1.28, -1.1, +0.8, +1.5 -> sum -0.08, / 4
    assert loss.item() == pytest.approx(-0.02, abs=1e-6)
    loss.backward()
    # d(-r A)/dlp = -r A / n where unclipped
    close(lp.grad, [[0.0, -0.275], [0.0, 0.375]])
    assert stats["clip_frac"] == 0.5
    assert stats["ratio_mean"] == pytest.approx(1.15)
    assert stats["ratio_max"] == pytest.approx(1.5)


def test_clip_frac_counts_only_masked_tokens():
    lp = torch.log(torch.tensor([[1.5, 1.5, 1.0]]))
    mask = torch.tensor([[1, 0, 1]])
    _, stats = policy_loss(lp, torch.zeros(1, 3), torch.tensor([1.0]), mask)
    assert stats["clip_frac"] == 0.5  # one clipped of two masked tokens
    assert stats["n_tokens"] == 2.0


def test_kl_zero_when_ref_equals_logprobs():
    lp = torch.tensor([[-1.0, -2.0]])
    loss_no_ref, _ = policy_loss(lp, lp, torch.tensor([0.7]), torch.ones(1, 2))
    loss, stats = policy_loss(lp, lp, torch.tensor([0.7]), torch.ones(1, 2), ref_logprobs=lp.clone(), kl_coef=0.5)
    assert stats["kl"] == 0.0
    assert loss.item() == loss_no_ref.item()


def test_kl_hand_computed_one_token():
    lp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2.0)]])  # ref - lp = log 2
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_coef=0.1)
    # k3 = 2 - log 2 - 1 = 0.3068528
    assert stats["kl"] == pytest.approx(0.3068528, abs=1e-6)
    assert loss.item() == pytest.approx(0.03068528, abs=1e-7)
    loss.backward()
    # d k3 / d lp = 1 - exp(ref - lp) = -1, times kl_coef
    close(lp.grad, [[-0.1]])
    ref_below = torch.tensor([[-1.0 - math.log(2.0)]])  # k3 = 0.5 + log 2 - 1 = 0.1931472 > 0
    _, stats = policy_loss(lp.detach(), lp.detach(), torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref_below)
    assert stats["kl"] == pytest.approx(0.1931472, abs=1e-6)


def test_global_normalizer_makes_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 5, generator=g)).requires_grad_(True)
    blp = lp.detach() + 0.3 * (torch.rand(4, 5, generator=g) - 0.5)
    ref = lp.detach() + 0.2 * (torch.rand(4, 5, generator=g) - 0.5)
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    kw = dict(ref_logprobs=ref, kl_coef=0.05)
    full, _ = policy_loss(lp, blp, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, lp)
    n = float(mask.sum())
    parts = [
        policy_loss(lp[s], blp[s], adv[s], mask[s], ref_logprobs=ref[s], kl_coef=0.05, normalizer=n)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    total = parts[0] + parts[1]
    (total_grad,) = torch.autograd.grad(total, lp)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(total_grad, full_grad)


def test_padding_with_inf_logprobs_is_harmless():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    blp = torch.tensor([[-1.0, -math.inf]])
    loss, stats = policy_loss(lp, blp, torch.tensor([1.0]), torch.tensor([[1, 0]]), ref_logprobs=blp, kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1].item() == 0.0
    assert stats["ratio_max"] == 1.0


def test_all_masked_gives_zero_loss():
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, stats = policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 0.0 and stats["n_tokens"] == 0.0
    assert lp.grad.tolist() == [[0.0, 0.0]]


def test_truncated_importance_weights_by_hand():
    """Proximal anchor: ratio 1 at the proximal point, each token weighted by min(pi_prox / pi_behav, cap)."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    proximal = lp.detach().clone()
    behaviour = torch.tensor([[-1.0, -2.0 - math.log(3.0), -0.5 + math.log(2.0)]])  # weights 1, 3 -> 2 (cap), 0.5
    adv, mask = torch.tensor([2.0]), torch.ones(1, 3)
    loss, stats = policy_loss(lp, behaviour, adv, mask, proximal_logprobs=proximal, is_cap=2.0)
    loss.backward()
    close(lp.grad, [[-2.0 * 1.0 / 3, -2.0 * 2.0 / 3, -2.0 * 0.5 / 3]])  # d/dlp of -w * A * exp(lp - prox)
    close(loss.detach(), -2.0 * (1.0 + 2.0 + 0.5) / 3)
    assert stats["is_truncated_frac"] == pytest.approx(1 / 3)
    assert stats["is_weight_mean"] == pytest.approx(3.5 / 3)
    assert stats["clip_frac"] == 0.0  # clipping is around the proximal policy, where the ratio is 1
    # k3 of KL(behaviour || proximal), per token: e^d - d - 1 with d = prox - behav = 0, ln 3, -ln 2
    expected_kl = (0.0 + (3.0 - math.log(3.0) - 1.0) + (0.5 + math.log(2.0) - 1.0)) / 3
    assert stats["offpolicy_kl"] == pytest.approx(expected_kl)


def test_on_policy_samples_give_the_same_loss_with_or_without_importance_sampling():
    torch.manual_seed(0)
    lp = (torch.randn(3, 5) - 2.0).requires_grad_()
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), (torch.rand(3, 5) > 0.3).float()
    plain, _ = policy_loss(lp, lp.detach(), adv, mask)
    (grad_plain,) = torch.autograd.grad(plain, lp)
    decoupled, stats = policy_loss(lp, lp.detach(), adv, mask, proximal_logprobs=lp.detach())
    (grad_decoupled,) = torch.autograd.grad(decoupled, lp)
    close(decoupled.detach(), plain.item())
    torch.testing.assert_close(grad_decoupled, grad_plain)
    assert stats["is_weight_mean"] == pytest.approx(1.0) and stats["offpolicy_kl"] == pytest.approx(0.0)


def test_a_stale_sample_is_clipped_without_a_proximal_anchor_but_trained_with_one():
    """Behaviour far below the current policy: the old loss clips every token (no gradient); the decoupled
    loss still trains on it, with the weight capped."""
    lp = torch.tensor([[-0.5, -0.7]], requires_grad=True)
    behaviour = lp.detach() - 1.0  # ratio e to the behaviour policy: beyond 1 + clip_high
    old, old_stats = policy_loss(lp, behaviour, torch.tensor([1.0]), torch.ones(1, 2))
    assert old_stats["clip_frac"] == 1.0
    assert torch.autograd.grad(old, lp)[0].abs().sum() == 0
    new, new_stats = policy_loss(lp, behaviour, torch.tensor([1.0]), torch.ones(1, 2),
                                 proximal_logprobs=lp.detach(), is_cap=2.0)
    close(torch.autograd.grad(new, lp)[0], [[-1.0, -1.0]])  # weight min(e, 2) = 2, / 2 tokens
    assert new_stats["is_truncated_frac"] == 1.0
