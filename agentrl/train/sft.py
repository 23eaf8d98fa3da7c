"""SFT warm start: teach a from-scratch model the tool-call format on environments' oracle traces.

Uses trl's SFTTrainer on a ``datasets`` dataset of ``{"messages", "tools"}`` rows with loss on assistant
tokens only (trl swaps in its Qwen2.5 training template, which marks the assistant spans).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from datasets import Dataset, Features, Json, List
from tqdm import tqdm
from transformers import TrainerCallback

from agentrl.config import ConfigError, SFTConfig
from agentrl.rollout.traces import oracle_conversation
from agentrl.train.prefix import head_split
from agentrl.train.setup import EnvSuite

DONE_MARKER = "sft_done.json"
ORACLE_THREADS = 8  # episodes of a blocking environment played at once while building the SFT set (web, 2-core
# CPU: 0.49 s a trace with 8, 0.57 s with 4, 0.66 s with 2; the browser waits more than it computes)


def oracle_dataset(suite: EnvSuite, examples_per_env: int | dict[str, int], start: int | dict[str, int] = 0,
                   envs: list[str] | None = None, progress: bool = False) -> Dataset:
    """Oracle conversations from train-split tasks ``start .. start+examples_per_env``; every one must succeed.

    ``examples_per_env`` and ``start`` are one number for every environment or a number per name.
    """
    names = envs or list(suite.prototypes)
    counts = _per_env(examples_per_env, names)
    starts = _per_env(start, names)
    rows = []
    with tqdm(total=sum(counts.values()), desc="oracle traces", disable=not progress) as bar, \
            ThreadPoolExecutor(ORACLE_THREADS) as pool:
        for name in names:
            bar.set_postfix_str(name)
            tasks = suite.prototypes[name].tasks("train", counts[name], start=starts[name]) if counts[name] else []

            def play(task, name=name):
                return oracle_conversation(suite.make(name), task)

            # An environment that waits on a browser or subprocesses plays several episodes at once; map keeps
            # the task order, so the dataset does not depend on which episode finished first.
            plays = pool.map(play, tasks) if suite.prototypes[name].blocking else map(play, tasks)
            for task, conversation in zip(tasks, plays):
                if not conversation.success:
                    raise RuntimeError(f"oracle failed on {task.id}: an SFT trace must be a correct one")
                rows.append({"messages": conversation.messages, "tools": conversation.tools})
                bar.update()
    # Json features keep each message and schema exactly as written: Arrow structs would merge the argument
    # schemas of different environments and add null-valued keys to every tool call.
    features = Features({"messages": List(Json()), "tools": Json()})
    return Dataset.from_list(rows, features=features)


def _per_env(value: int | dict[str, int], names: list[str]) -> dict[str, int]:
    return {name: value[name] for name in names} if isinstance(value, dict) else dict.fromkeys(names, value)


def sft_examples(suite: EnvSuite, config: SFTConfig) -> dict[str, int]:
    """Oracle traces per environment in the warm start: ``envs.N.sft_examples``, else ``sft.examples_per_env``."""
    return {name: suite.sft_examples.get(name, config.examples_per_env) for name in suite.prototypes}


def check_early_stop(config: SFTConfig) -> None:
    if not 0.0 <= config.stop_at_accuracy <= 1.0:
        raise ConfigError(f"sft.stop_at_accuracy: {config.stop_at_accuracy} is not a fraction in [0, 1] (0 = off)")
    for key in ("eval_every", "eval_examples"):
        if getattr(config, key) < 1:
            raise ConfigError(f"sft.{key}: {getattr(config, key)} must be at least 1")


@torch.no_grad()
def oracle_accuracy(model, batches: list[dict]) -> float:
    """Fraction of episodes whose every loss-carrying token is the model's argmax given the true prefix.

    ``batches`` are collated SFT batches (``input_ids``, ``attention_mask``, ``labels`` with -100 where there is
    no loss). An episode counts only if all its assistant tokens are right: that is the episode greedy decoding
    would reproduce, so it tracks greedy success far better than the loss does.
    """
    was_training = model.training
    model.eval()
    exact = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = labels != -100
        exact += int(((predicted == labels) | ~scored).all(dim=1).sum())
        total += labels.shape[0]
    model.train(was_training)
    return exact / total


class EarlyStopOnOracleAccuracy(TrainerCallback):
    """Ends SFT once every environment's held-out oracle accuracy reaches ``threshold``.

    Every rank scores the same full validation set with the same weights, so all ranks take the same
    decision (a per-rank shard could stop one rank and hang the others).
    """

    def __init__(self, batches: dict[str, list[dict]], threshold: float, every: int) -> None:
        self.batches, self.threshold, self.every = batches, threshold, every
        self.history: list[dict] = []
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return control
        device = next(model.parameters()).device
        self.batches = {name: [{key: value.to(device) for key, value in batch.items()} for batch in batches]
                        for name, batches in self.batches.items()}  # a no-op after the first check
        accuracy = {name: round(oracle_accuracy(model, batches), 4) for name, batches in self.batches.items()}
        self.history.append({"step": state.global_step, "accuracy": accuracy})
        shown = "  ".join(f"{name} {value:.2f}" for name, value in accuracy.items())
        if state.is_world_process_zero:
            print(f"SFT step {state.global_step}: held-out oracle accuracy  {shown}", flush=True)
        if min(accuracy.values()) >= self.threshold:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"SFT stops at step {state.global_step}: every environment reached "
                      f"sft.stop_at_accuracy={self.threshold}", flush=True)
        return control


def validation_sets(suite: EnvSuite, config: SFTConfig) -> dict[str, Dataset]:
    """Held-out oracle episodes per environment: the train-split tasks right after the SFT data's.

    An environment left out of SFT (``sft_examples: 0``) is not checked: early stopping waits only on
    the environments the warm start trains.
    """
    starts = sft_examples(suite, config)
    return {name: oracle_dataset(suite, config.eval_examples, start=starts[name], envs=[name])
            for name in suite.prototypes if starts[name]}


def collated_batches(trainer, name: str, batch_size: int) -> list[dict]:
    """An eval set the trainer prepared (tokenized with the training template), collated as training is."""
    prepared = trainer.eval_dataset[name]
    examples = [prepared[i] for i in range(len(prepared))]
    return [{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
            for batch in (trainer.data_collator(examples[i:i + batch_size])
                          for i in range(0, len(examples), batch_size))]


def check_scheduler(config: SFTConfig) -> None:
    """Name the recipe key, before any work, rather than let transformers fail on it after the data is built."""
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if config.lr_scheduler not in schedulers:
        raise ConfigError(f"sft.lr_scheduler: {config.lr_scheduler!r} is not one of {schedulers}")


def check_same_settings(output_dir: Path, settings: dict) -> None:
    """A finished SFT model is reused only for the settings it was trained with; otherwise say what differs."""
    saved = json.loads((output_dir / DONE_MARKER).read_text()).get("settings")
    now = json.loads(json.dumps(settings))  # tuples become lists, as in the saved copy
    if saved is not None:  # a key added to SFTConfig since a run: that run did what its default does
        saved, now = _with_sft_defaults(saved), _with_sft_defaults(now)
    if saved == now:
        return
    if saved is None:
        differences = "it has no record of its settings"
    else:
        flat_saved, flat_now = _flatten(saved), _flatten(now)
        differences = ", ".join(f"{key}: {flat_saved.get(key)!r} -> {flat_now.get(key)!r}"
                                for key in sorted(flat_saved.keys() | flat_now.keys())
                                if flat_saved.get(key) != flat_now.get(key))
    raise RuntimeError(f"{output_dir} holds an SFT model trained with other settings ({differences}). "
                       "Delete it, or pick another train.output_dir.")


def _with_sft_defaults(settings: dict) -> dict:
    defaults = json.loads(json.dumps(dataclasses.asdict(SFTConfig())))
    return {**settings, "sft": {**defaults, **settings.get("sft", {})}}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class LengthBandSampler(torch.utils.data.Sampler):
    """Shuffled indices in which every run of ``batch_size`` holds conversations of about one length.

    Each epoch: shuffle, order by length band (``length // band``; the shuffle stays the order inside a band),
    cut into batches, shuffle the batches. A batch is padded to its longest conversation, so mixing a 313-token
    trace with a 620-token one in a random batch nearly doubles the short one's cost; banding keeps batches of
    every band in random order and each band's environments mixed. Every process draws the same order
    (seeded by ``seed`` and the epoch), as the batch sharding of a distributed run needs.

    Example:
        >>> sampler = LengthBandSampler([10, 300, 12, 310, 11, 305], batch_size=3, band=128, seed=0)
        >>> order = list(sampler)
        >>> sorted(sorted(order[i:i + 3]) for i in (0, 3))
        [[0, 2, 4], [1, 3, 5]]
    """

    def __init__(self, lengths: list[int], batch_size: int, band: int, seed: int) -> None:
        if band < 1 or batch_size < 1:
            raise ValueError(f"band ({band}) and batch_size ({batch_size}) must be positive")
        self.lengths, self.batch_size, self.band, self.seed = list(lengths), batch_size, band, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a trainer that never calls set_epoch still gets a new order each epoch
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        banded = sorted(shuffled, key=lambda i: self.lengths[i] // self.band)  # stable: random within a band
        batches = [banded[i:i + self.batch_size] for i in range(0, len(banded), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]


# Batch keys the lean loss knows how to pass on; anything else (packing's position ids, ...) takes the plain path.
_LEAN_INPUTS = {"input_ids", "attention_mask", "labels"}


def _trainer_class(fused_lm_head: bool, length_band: int = 0):
    from transformers import Trainer
    from trl import SFTTrainer

    class BandedSFTTrainer(SFTTrainer):
        """trl's SFTTrainer, with batches of about one length when ``length_band`` > 0 (:class:`LengthBandSampler`)."""

        def _get_train_sampler(self, train_dataset=None):
            if not length_band:
                return super()._get_train_sampler(train_dataset)
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return LengthBandSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                     length_band, self.args.seed)

    if fused_lm_head:
        return BandedSFTTrainer

    class LeanLossSFTTrainer(BandedSFTTrainer):
        """trl's SFTTrainer, with the loss computed only where there is one: the assistant tokens.

        trl computes the loss through a chunked, fused lm-head kernel that saves memory on large vocabularies.
        On a CPU with the tiny model it made each step 1.46x slower (0.68 s against 0.47 s, batch 8; measured).
        The model's own loss is no better suited: it projects every position onto the vocabulary, and in an
        agent trace most positions are the system prompt, tool schemas and tool output, which carry no loss.
        Here the decoder runs as usual and only the positions with a label reach the vocabulary projection
        (``agentrl/train/prefix.py`` checks once that the model's logits are that projection; otherwise, and
        for a DDP-wrapped model, the plain ``Trainer`` loss is used). Loss and gradients equal trl's
        (tests/test_sft.py); trl's entropy and token-accuracy logs are skipped.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            split = None if return_outputs or set(inputs) - _LEAN_INPUTS else head_split(model)
            if split is None:
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            decoder, head = split
            targets = inputs["labels"][:, 1:]
            scored = targets != -100
            hidden = decoder(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state[:, :-1]
            logits = head(hidden[scored]).float()
            if num_items_in_batch is None:
                return torch.nn.functional.cross_entropy(logits, targets[scored])
            loss = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="sum")
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
            if self.args.average_tokens_across_devices:  # as Trainer.compute_loss does
                loss = loss * self.accelerator.num_processes
            return loss

    return LeanLossSFTTrainer


def run_sft(base_dir: Path, output_dir: Path, suite: EnvSuite, config: SFTConfig, seed: int) -> Path:
    """Fully fine-tune the base model on oracle traces; save model + tokenizer to ``output_dir``.

    Skipped when ``output_dir`` already holds a finished SFT model (so a resumed run does not redo it).
    """
    check_scheduler(config)
    check_early_stop(config)
    counts = sft_examples(suite, config)
    if not any(counts.values()):
        raise ConfigError("SFT has no oracle traces: every environment's sft_examples (or sft.examples_per_env) "
                          "is 0. Set sft.enabled: false to skip the warm start.")
    settings = {"sft": dataclasses.asdict(config), "base": str(base_dir), "seed": seed,
                "envs": {name: env.task_version for name, env in suite.prototypes.items()}}
    # Counts other than sft.examples_per_env (already in the record); none: no key, so older SFT models match.
    own_counts = {name: count for name, count in counts.items() if count != config.examples_per_env}
    if own_counts:
        settings["sft_examples"] = own_counts
    if (output_dir / DONE_MARKER).exists():
        check_same_settings(output_dir, settings)
        return output_dir
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TrlSFTConfig

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    dataset = oracle_dataset(suite, counts, progress=PartialState().is_main_process).shuffle(seed=seed)
    args = TrlSFTConfig(
        output_dir=str(output_dir / "trainer"), assistant_only_loss=True, max_length=config.max_length,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
        num_train_epochs=config.epochs, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=10, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=False,
        # trl defaults to bf16 autocast and gradient checkpointing; on a tiny fp32 model the first slows
        # learning to copy (it had not emerged after 600 steps) and the second only costs time.
        bf16=False, gradient_checkpointing=False,
    )
    trainer_class = _trainer_class(config.fused_lm_head, config.length_band)
    # Held-out sets go in as eval datasets so trl tokenizes them exactly like the training data; the trainer
    # never evaluates them itself (eval_strategy stays "no"), the early-stop callback does.
    eval_sets = validation_sets(suite, config) if config.stop_at_accuracy > 0 else None
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, eval_dataset=eval_sets,
                            processing_class=tokenizer)
    early_stop = None
    if eval_sets:
        batches = {name: collated_batches(trainer, name, config.batch_size) for name in eval_sets}
        early_stop = EarlyStopOnOracleAccuracy(batches, config.stop_at_accuracy, config.eval_every)
        trainer.add_callback(early_stop)
    result = trainer.train()
    trainer.save_model(str(output_dir))
    # a fresh copy, in case the trainer swapped in its training chat template
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(output_dir)
    if trainer.accelerator.is_main_process:
        summary = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(dataset),
                   "settings": settings}
        if early_stop is not None:
            summary["stopped_early_at"] = early_stop.stopped_at  # None: the threshold was not reached
            summary["oracle_accuracy"] = early_stop.history
            if early_stop.stopped_at is None:
                print(f"SFT ran all {result.global_step} steps without every environment reaching "
                      f"sft.stop_at_accuracy={config.stop_at_accuracy}", flush=True)
        (output_dir / DONE_MARKER).write_text(json.dumps(summary))
    trainer.accelerator.wait_for_everyone()
    return output_dir
