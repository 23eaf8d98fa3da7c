"""Policy update invariants: LoRA-only training, micro-batch equivalence, zero-advantage batches."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from agentrl.config import AlgoConfig, LoRAConfig
from agentrl.envs import make_env
from agentrl.policy.base import SamplingParams
from agentrl.policy.hf import HFPolicy
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episodes
from agentrl.train.batch import collate
from agentrl.train.setup import add_lora
from agentrl.train.update import policy_update


@pytest.fixture(scope="module")
def lora_model(micro_model_dir):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(micro_model_dir), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():  # peft starts B at zero; move it so the adapter is not a no-op in these tests
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def trajectories(lora_model, tokenizer):
    torch.manual_seed(1)
    policy = HFPolicy(lora_model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    tasks = make_env("lookup").tasks("train", 4)
    return asyncio.run(run_episodes(policy, make_env, tasks, [0, 0, 1, 1], ChatFormat(tokenizer),
                                    SamplingParams(max_new_tokens=10), EpisodeLimits(max_turns=2)))


def run_update(model, batch, pad_id, **algo):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    config = AlgoConfig(max_grad_norm=1e9, **algo)
    return policy_update(model, model, optimizer, scheduler, Accelerator(cpu=True), batch, config, 1.0, pad_id)


def test_lora_changes_and_base_stays_frozen(lora_model, trajectories, tokenizer):
    model = copy.deepcopy(lora_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate(trajectories, [1.0, -1.0, 0.5, -0.5], tokenizer.pad_token_id)
    stats = run_update(model, batch, tokenizer.pad_token_id)
    assert stats["train/n_tokens"] == batch.loss_mask[:, 1:].sum().item()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_micro_batching_does_not_change_the_update(lora_model, trajectories, tokenizer):
    batch = collate(trajectories, [1.0, -1.0, 0.5, -0.5], tokenizer.pad_token_id)
    whole, split = copy.deepcopy(lora_model), copy.deepcopy(lora_model)
    run_update(whole, batch, tokenizer.pad_token_id, micro_batch_size=4)
    run_update(split, batch, tokenizer.pad_token_id, micro_batch_size=1)
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_first_step_ratio_is_one(lora_model, trajectories, tokenizer):
    """Behaviour logprobs from generation match the trainer's recomputation (on-policy ⇒ ratio 1)."""
    batch = collate(trajectories, [1.0, -1.0, 0.5, -0.5], tokenizer.pad_token_id)
    stats = run_update(copy.deepcopy(lora_model), batch, tokenizer.pad_token_id)
    assert abs(stats["train/ratio_mean"] - 1.0) < 1e-3 and stats["train/clip_frac"] == 0.0


def test_empty_batch_is_a_no_op(lora_model, tokenizer):
    model = copy.deepcopy(lora_model)
    before = [p.detach().clone() for p in model.parameters()]
    assert run_update(model, collate([], [], tokenizer.pad_token_id), tokenizer.pad_token_id) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hf_policy_loads_a_saved_adapter_by_version(lora_model, micro_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    lora_model.save_pretrained(tmp_path / "adapter")
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_model_dir), tmp_path / "adapter")
    with torch.no_grad():  # make the served adapter differ, so loading v7 must change the logits back
        for name, p in served.named_parameters():
            if "lora_B" in name:
                p.zero_()
    policy = HFPolicy(served, tokenizer.eos_token_id, tokenizer.pad_token_id)
    asyncio.run(policy.load_adapter(str(tmp_path / "adapter"), 7))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-5)
    assert policy.version == 7 and served.active_adapter == "v7"
