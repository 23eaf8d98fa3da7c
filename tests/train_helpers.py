"""Helpers for trainer tests (importable by dotted path from a recipe)."""

from agentrl.types import Task, Trajectory


def random_adapter(model_dir, path, seed: int, r: int = 16):
    """Save a LoRA adapter of rank ``r`` with non-zero B (peft starts B at 0), so it changes the outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from agentrl.config import LoRAConfig
    from agentrl.train.setup import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoRAConfig(r=r))
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


def token_sum_reward(trajectory: Trajectory, task: Task) -> float:
    """A reward a random-init model varies on: the sum of its sampled token ids, modulo 3."""
    return float(sum(sum(turn.completion_ids) for turn in trajectory.turns) % 3)


def constant_reward(trajectory: Trajectory, task: Task) -> float:
    """The same reward for every episode: no group ever has a learning signal."""
    return 0.0
