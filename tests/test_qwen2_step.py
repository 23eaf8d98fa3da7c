"""The written-out Qwen2 decode step against the model's own forward, and the cases where it must stand aside."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import agentrl.policy.qwen2_step as qwen2_step_module
from agentrl.policy.decode import sample
from agentrl.policy.qwen2_step import Qwen2Step, qwen2_step

VOCAB, PAD = 300, 0


def config(**overrides) -> Qwen2Config:
    """GQA, a 16-token sliding window on two of three layers, so prompts below outrun the window."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    use_sliding_window=True, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Qwen2Config(**{**settings, **overrides})


def random_model(seed: int, cls=Qwen2ForCausalLM, **overrides):
    torch.manual_seed(seed)
    model = cls(config(**overrides)).eval()
    with torch.no_grad():  # transformers initialises biases to zero; q/k/v biases must count in the check
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def prompts(seed: int) -> list[list[int]]:
    """Left-padded lengths from 3 to 70 tokens (past the window), a repeated prompt among them."""
    rng = random.Random(seed)
    rows = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (70, 41, 3, 17, 55)]
    return rows + [rows[1]]


def count_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = Qwen2Step.__call__

    def counted(self, *args):
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(Qwen2Step, "__call__", counted)
    return calls


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_through_the_written_out_step_matches_the_module_forward(monkeypatch, temperature):
    model = random_model(0)
    calls = count_calls(monkeypatch)
    torch.manual_seed(5)
    ours = sample(model, prompts(0), 24, temperature, eos_id=VOCAB + 1, pad_id=PAD, plain_weights=True)
    decode_steps = calls[0]
    torch.manual_seed(5)
    theirs = sample(model, prompts(0), 24, temperature, eos_id=VOCAB + 1, pad_id=PAD, plain_weights=False)
    assert decode_steps >= 23 and calls[0] == decode_steps  # the step ran every token, and only when allowed
    assert [s.ids for s in ours] == [s.ids for s in theirs]
    for a, b in zip(ours, theirs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_rows_that_finish_leave_the_batch_and_the_rest_decode_on(monkeypatch):
    model = random_model(0)
    free = sample(model, prompts(1), 16, 0.0, eos_id=VOCAB + 1, pad_id=PAD)
    # a token some rows produce and others never do: those rows finish early, the rest decode on
    eos = next(t for s in free for t in s.ids if any(t not in other.ids for other in free))
    ours = sample(model, prompts(1), 16, 0.0, eos_id=eos, pad_id=PAD, plain_weights=True)
    theirs = sample(model, prompts(1), 16, 0.0, eos_id=eos, pad_id=PAD)
    assert any(s.finished for s in ours) and not all(s.finished for s in ours)
    assert [(s.ids, s.finished) for s in ours] == [(s.ids, s.finished) for s in theirs]


def test_a_model_whose_forward_differs_keeps_its_forward(monkeypatch, caplog):
    class SoftCapped(Qwen2ForCausalLM):  # qwen2 by config, but its logits are not lm_head's output
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    model = random_model(1, SoftCapped)
    assert Qwen2Step.supports(model)
    calls = count_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=qwen2_step_module.__name__):
        assert qwen2_step(model) is None
    assert "differ from its forward" in caplog.text
    ours = sample(model, prompts(2), 8, 0.0, eos_id=VOCAB + 1, pad_id=PAD, plain_weights=True)
    theirs = sample(model, prompts(2), 8, 0.0, eos_id=VOCAB + 1, pad_id=PAD)
    assert calls[0] == 2  # only the probe's two steps
    assert [s.logprobs for s in ours] == [s.logprobs for s in theirs]


def test_the_probe_catches_a_step_that_is_slightly_wrong(monkeypatch):
    model = random_model(2)
    monkeypatch.setattr(qwen2_step_module, "_rotate_half", lambda x: torch.cat((x[..., 1:], x[..., :1]), -1))
    assert qwen2_step(model) is None  # a rotary mistake shifts logits far past the tolerance


def test_architectures_it_does_not_write_out_are_not_claimed():
    assert not Qwen2Step.supports(random_model(3, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0}))
    assert not Qwen2Step.supports(random_model(3, hidden_act="gelu"))
