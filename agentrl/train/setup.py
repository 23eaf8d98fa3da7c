"""Builders: the only code that reads the recipe to make tokenizer, model, LoRA, environments and rewards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentrl.config import EnvConfig, LoRAConfig, ModelConfig, Recipe
from agentrl.envs import env_factory
from agentrl.resolve import resolve


def ensure_base_model(config: ModelConfig, env_names: list[str] | None = None) -> Path:
    """The base model directory, built with ``agentrl tiny-model`` first when it is missing.

    A built tokenizer learns its merges from the oracle conversations of ``config.tokenizer_envs``, else of
    ``env_names`` (the recipe's environments), else of every environment in the name table. A directory that an
    older agentrl built (another ``BUILD_FORMAT``), or that was built at another size or for other environments,
    is refused rather than reused.
    """
    from agentrl.model import BUILD_FORMAT, BUILD_STAMP

    path = Path(config.path)
    if (path / "config.json").exists():
        if config.build is not None:
            stamp = path / BUILD_STAMP
            if not stamp.exists():  # format 1 wrote none, and neither does SFT or a merge
                raise RuntimeError(
                    f"{path} has no stamp of an `agentrl tiny-model` build: an older agentrl built it (tiny-model "
                    f"format 1; this version builds format {BUILD_FORMAT}), or it is another kind of checkpoint (an "
                    "SFT output, say). Delete it to rebuild, or set model.build: null to use it as it is.")
            built = json.loads(stamp.read_text())
            if built.get("format") != BUILD_FORMAT:
                raise RuntimeError(
                    f"{path} was built by an older agentrl (tiny-model format {built.get('format')}; this version "
                    f"builds format {BUILD_FORMAT}). Delete it to rebuild, or set model.build: null to use it as it is.")
            # A model built for other environments has another tokenizer: reusing it silently would train a
            # different model than the recipe describes.
            wanted = {"size": config.build, "tokenizer_envs": list(config.tokenizer_envs) or env_names}
            differ = [f"{key} {built.get(key)!r} (this recipe builds {value!r})" for key, value in wanted.items()
                      if value is not None and built.get(key) != value]
            if differ:
                raise RuntimeError(f"{path} was built with other settings: {'; '.join(differ)}. Delete it to "
                                   "rebuild, or set model.build: null to use it as it is.")
        return path
    if config.build is None:
        raise FileNotFoundError(f"model.path={config.path} has no model and model.build is null")
    from agentrl.model import build_tiny_model

    return build_tiny_model(path, size=config.build, env_names=list(config.tokenizer_envs) or env_names)


def load_model(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model, tokenizer


def add_lora(model, config: LoRAConfig):
    """Wrap ``model`` with a fresh LoRA adapter; the base weights are frozen by peft."""
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@dataclass
class EnvSuite:
    """The recipe's environments: a factory per name, their rewards, weights and train-split sizes."""

    factories: dict[str, Callable[[], Any]]
    rewards: dict[str, Callable]
    weights: dict[str, float]
    prototypes: dict[str, Any]  # one instance each, for task generation
    truncation_penalties: dict[str, float] = field(default_factory=dict)  # by name; absent means 0.0
    sft_examples: dict[str, int] = field(default_factory=dict)  # by name; absent means sft.examples_per_env

    def make(self, name: str):
        return self.factories[name]()


def build_envs(recipe: Recipe) -> EnvSuite:
    return add_envs(EnvSuite({}, {}, {}, {}), recipe.envs)


def add_envs(suite: EnvSuite, specs: list[EnvConfig]) -> EnvSuite:
    """A copy of ``suite`` with the environments of ``specs`` added; a name already in it is an error."""
    from rewards import REWARDS

    out = EnvSuite(dict(suite.factories), dict(suite.rewards), dict(suite.weights), dict(suite.prototypes),
                   dict(suite.truncation_penalties), dict(suite.sft_examples))
    for spec in specs:
        env, factory = env_factory(spec.name, spec.kwargs, spec.url)
        name = env.name
        if name in out.factories:
            raise ValueError(f"environment {name!r} appears twice in the recipe")
        out.factories[name] = factory
        out.rewards[name] = resolve(spec.reward, REWARDS, "reward")
        out.weights[name] = spec.weight
        out.prototypes[name] = env
        out.truncation_penalties[name] = spec.truncation_penalty
        if spec.sft_examples is not None:
            out.sft_examples[name] = spec.sft_examples
    return out
