"""The SFT warm start's loss: the dense loss agentrl uses on CPU must equal trl's fused one."""

from __future__ import annotations

import pytest
import torch

from agentrl.config import load_recipe
from agentrl.train.setup import build_envs
from agentrl.train.sft import _trainer_class, oracle_dataset


def test_dense_loss_equals_trls_fused_loss_on_assistant_tokens(micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    recipe = load_recipe(None, ["--envs=[{name: calculator}, {name: lookup}]"])
    dataset = oracle_dataset(build_envs(recipe), 2)
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, per_device_train_batch_size=4,
                     use_cpu=True, bf16=False, report_to=[])
    losses = []
    for fused in (True, False):
        trainer = _trainer_class(fused)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert (batch["labels"] == -100).float().mean() > 0.5  # the prompt and tool turns carry no loss
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
