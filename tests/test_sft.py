"""The SFT warm start's loss: the dense loss agentrl uses on CPU must equal trl's fused one, gradients included."""

from __future__ import annotations

import json

import pytest
import torch

from agentrl.config import load_recipe
from agentrl.train.setup import build_envs
from agentrl.train.sft import _trainer_class, oracle_dataset


def test_dense_loss_and_gradients_equal_trls_fused_ones(micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    recipe = load_recipe(None, ["--envs=[{name: calculator}, {name: lookup}]"])
    dataset = oracle_dataset(build_envs(recipe), 2)
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, per_device_train_batch_size=4,
                     use_cpu=True, bf16=False, report_to=[])
    losses, grads = [], []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
        trainer = _trainer_class(fused)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert (batch["labels"] == -100).float().mean() > 0.5  # the prompt and tool turns carry no loss
        loss = trainer.compute_loss(model, batch, num_items_in_batch=(batch["labels"] != -100).sum())
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():  # the tied embedding / lm-head weight included
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_a_finished_sft_model_is_reused_only_for_its_own_settings(tmp_path):
    from agentrl.train.sft import DONE_MARKER, check_same_settings

    settings = {"sft": {"lr": 0.003, "epochs": 3}, "base": "runs/tiny-model", "seed": 0, "envs": {"lookup": "v1"}}
    (tmp_path / DONE_MARKER).write_text(json.dumps({"steps": 10, "settings": settings}))
    check_same_settings(tmp_path, settings)
    changed = {**settings, "sft": {"lr": 0.005, "epochs": 3}}
    with pytest.raises(RuntimeError, match=r"other settings \(sft.lr: 0.003 -> 0.005\)"):
        check_same_settings(tmp_path, changed)
    (tmp_path / DONE_MARKER).write_text(json.dumps({"steps": 10}))  # written by an older agentrl
    with pytest.raises(RuntimeError, match="no record of its settings"):
        check_same_settings(tmp_path, settings)
