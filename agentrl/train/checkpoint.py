"""Checkpoints: the LoRA adapter (PEFT format) plus everything needed to continue the run exactly."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

TRAINER_STATE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, model, state: dict[str, Any], rank: int, is_main: bool, keep: int = 2) -> None:
    """Write ``path/adapter/`` (main process), ``path/trainer_state.pt`` (main) and ``path/rng_<rank>.pt``.

    ``state`` holds step, optimizer, scheduler, sampler and task statistics. Older checkpoints beyond
    ``keep`` are removed.
    """
    path.mkdir(parents=True, exist_ok=True)
    if is_main:
        model.save_pretrained(path / "adapter")
        torch.save(state, path / TRAINER_STATE)
        (path / "step.json").write_text(json.dumps({"step": state["step"]}))
    torch.save(rng_state(), path / f"rng_{rank}.pt")
    if is_main:
        for old in list_checkpoints(path.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a step.json), oldest first."""
    found = [p for p in root.glob("step_*") if (p / "step.json").exists()]
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``"auto"`` → latest checkpoint under ``output_dir/checkpoints`` (or None); a path → that path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"--train.resume={resume}: no {TRAINER_STATE} there")
    return path


def load_checkpoint(path: Path, model, rank: int) -> dict[str, Any]:
    """Load adapter weights into ``model`` (a peft model) and this rank's RNG; return the trainer state."""
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} has adapter keys this model lacks: {result.unexpected_keys[:5]}")
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / TRAINER_STATE, weights_only=False)
