"""Typed recipe sections and ``load_recipe``: YAML + ``--section.key=value`` overrides, strict about keys.

Every key a recipe may hold is a dataclass field below; an unknown key is an error that names it (with a
close match when there is one), so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


@dataclass
class ModelConfig:
    path: str = "runs/tiny-model"  # a from_pretrained directory; built here when missing and `build` is set
    build: str | None = "tiny"  # tiny-model size to build at `path` if it does not exist (None: never build)
    # environments whose oracle conversations train a built model's tokenizer (empty: the recipe's environments)
    tokenizer_envs: list[str] = field(default_factory=list)


@dataclass
class EnvConfig:
    name: str = "calculator"  # name in the environments table, or "module:Class"
    weight: float = 1.0  # share of sampled task instances
    reward: str = "env_reward"  # name in the rewards table, or "module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments
    url: str = ""  # an `agentrl serve-env` server that runs it (name: as served there; kwargs: given to the server)
    # Subtracted from the reward of an episode that ran out of turns or tokens, so that in GRPO running out
    # scores below a wrong answer instead of level with it (training only; evaluation reports the env's reward).
    truncation_penalty: float = 0.0
    # Oracle traces of this environment in the SFT warm start; None: sft.examples_per_env. Lets a recipe give the
    # environments a from-scratch model finds hard a larger share of SFT steps than those it learns at once.
    sft_examples: int | None = None

    def __post_init__(self) -> None:
        if self.sft_examples is not None and self.sft_examples < 0:
            raise ConfigError(f"envs[{self.name}].sft_examples must be >= 0 (0 leaves it out of SFT), "
                              f"got {self.sft_examples}")
        if self.truncation_penalty < 0:
            raise ConfigError(f"envs[{self.name}].truncation_penalty must be >= 0 (it is subtracted from the reward), "
                              f"got {self.truncation_penalty}")


@dataclass
class SFTConfig:
    enabled: bool = True
    examples_per_env: int = 1000  # oracle traces per environment (train split)
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 3e-3
    lr_scheduler: str = "cosine"  # any transformers scheduler name, e.g. "constant", "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 1024
    fused_lm_head: bool = False  # trl's chunked loss kernel: saves memory on large vocabularies, slow on CPU
    # > 0: each batch draws its conversations from one band of this many tokens of length (bands in random
    # order, a band's conversations shuffled), so short traces are not padded to the longest in a random batch.
    # 0: plain shuffled batches. Mixed environments differ a lot in length; docs/multitask.md has the saving.
    length_band: int = 0
    # Early stop for a warm start: > 0 ends SFT once, in every environment, at least this fraction of held-out
    # oracle episodes (train-split tasks the SFT data does not use) is reproduced token for token by greedy
    # teacher-forced decoding. Checked every `eval_every` steps on `eval_examples` episodes per environment.
    stop_at_accuracy: float = 0.0
    eval_every: int = 25
    eval_examples: int = 32
    # Environments whose oracle traces join the warm start's data only: GRPO and evaluation use `envs`. A broader
    # mix can teach a from-scratch model skills (reading, copying) that `envs` alone do not within the budget.
    extra_envs: list[EnvConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.length_band < 0:
            raise ConfigError(f"sft.length_band must be >= 0 tokens (0: plain shuffled batches), "
                              f"got {self.length_band}")


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])


POLICY_BACKENDS = ("hf", "vllm")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


@dataclass
class PolicyConfig:
    """Where rollouts are sampled: in process (``hf``) or by a vLLM server over HTTP (``vllm``)."""

    backend: str = "hf"  # "hf" (embedded, the default) or "vllm"
    url: str = ""  # a running vLLM OpenAI-compatible server (vllm backend, unless `launch`)
    launch: bool = False  # start a vLLM server for the run and stop it at the end (vllm backend)
    python: str = ".venv-vllm/bin/python"  # the python of the vLLM environment (launch/setup_vllm.sh)
    port: int = 0  # port of a launched server (0: a free one)
    dtype: str = "float32"  # a launched server's dtype; float32 matches the trainer's logprobs to ~1e-5
    server_args: list[str] = field(default_factory=list)  # extra arguments for a launched server
    startup_timeout: float = 600.0  # seconds for a launched server to answer /health
    request_timeout: float = 300.0  # seconds per completion request before the episode fails
    max_loras: int = 2  # adapters a launched server keeps on the device at once

    def __post_init__(self) -> None:
        if self.backend not in POLICY_BACKENDS:
            raise ConfigError(f"policy.backend must be one of {POLICY_BACKENDS}, got {self.backend!r}")
        if self.backend == "vllm" and bool(self.url) == self.launch:
            raise ConfigError("policy.backend=vllm needs exactly one of policy.url (a running server) "
                              "and policy.launch=true (start one)")
        if self.max_loras < 1:
            raise ConfigError(f"policy.max_loras must be >= 1, got {self.max_loras}")


@dataclass
class RolloutConfig:
    tasks_per_step: int = 8  # task instances per step (each sampled group_size times)
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64  # per assistant turn
    max_turns: int = 6
    max_total_tokens: int = 1024
    max_batch: int = 64  # sequences per batched generate call
    generation_threads: int = 0  # hf backend: torch threads of the generating thread (0: torch's default)
    max_error_rate: float = 0.5  # abort when more than this share of a step's episodes are env/policy errors
    # Asynchronous rollouts: the groups of the next `max_staleness` steps are sampled while the trainer updates;
    # a group more than this many adapter versions behind the trainer is dropped (counted). 0 = synchronous.
    max_staleness: int = 0
    max_inflight: int = 256  # episodes running at once (a GRPO group starts whole)
    # > 0: sample environments where GRPO still learns. Each environment's weight is scaled by the running
    # fraction of its groups whose rewards differ (all-success and all-failure groups carry no gradient), never
    # below this floor; `informative_momentum` is how far one step moves that estimate. 0: fixed weights.
    informative_floor: float = 0.0
    informative_momentum: float = 0.3

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.generation_threads < 0:
            raise ConfigError(f"rollout.generation_threads must be >= 0, got {self.generation_threads}")
        if not 0.0 <= self.informative_floor <= 1.0:
            raise ConfigError(f"rollout.informative_floor must be in [0, 1] (0: fixed weights), "
                              f"got {self.informative_floor}")
        if not 0.0 < self.informative_momentum <= 1.0:
            raise ConfigError(f"rollout.informative_momentum must be in (0, 1], got {self.informative_momentum}")
        if self.max_inflight < self.group_size:
            raise ConfigError(f"rollout.max_inflight={self.max_inflight} is below rollout.group_size="
                              f"{self.group_size}: a group's episodes start together")


@dataclass
class AlgoConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # k3 KL to the reference (the same model with the adapter disabled)
    scale_by_std: bool = False  # divide group advantages by the group's std (original GRPO)
    task_norm: bool = True  # per-task advantage normalization with running statistics
    task_norm_momentum: float = 0.1  # 1.0 = per-batch statistics only
    micro_batch_size: int = 16  # sequences per forward/backward
    epochs: int = 1  # optimisation passes over each step's batch
    # Decoupled loss for off-policy samples: clip around the trainer's own pre-update logprobs and weight each
    # token by min(pi_proximal / pi_behaviour, is_cap) (truncated importance sampling). Off: clip around the
    # behaviour logprobs, unweighted (identical when samples are exactly on-policy).
    importance_sampling: bool = True
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.is_cap <= 0:
            raise ConfigError(f"algo.is_cap must be positive, got {self.is_cap}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/quickstart"
    steps: int = 20
    seed: int = 0
    save_every: int = 10
    eval_every: int = 0  # 0: only at the end
    log_every: int = 1
    resume: str | None = None  # a checkpoint dir, or "auto" for the latest under output_dir


@dataclass
class EvalConfig:
    limit: int = 100  # test tasks per environment
    temperature: float = 0.0
    at_end: bool = True  # evaluate the final adapter when training ends


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    envs: list[EnvConfig] = field(default_factory=lambda: [EnvConfig()])
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "5e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation)
                                                       and not (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {names}"
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown recipe key {full!r}{hint}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()})


def _apply_override(data: dict, override: str) -> None:
    text = override[2:] if override.startswith("--") else override
    if "=" not in text:
        raise ConfigError(f"override {override!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a recipe YAML (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: the YAML file.
        overrides: strings like ``"--rollout.group_size=4"`` or ``"envs.0.weight=2"``; values are YAML.

    Example:
        >>> load_recipe(None, ["--train.steps=3"]).train.steps
        3
    """
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections")
    for override in overrides:
        _apply_override(data, override)
    return _build(Recipe, data, "")


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
