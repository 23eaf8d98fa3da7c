"""The SFT warm start's loss: the lean loss agentrl uses on CPU must equal trl's fused one, gradients included."""

from __future__ import annotations

import json

import pytest
import torch

from agentrl.config import ConfigError, load_recipe
from agentrl.train.setup import build_envs
from agentrl.train.prefix import head_split
from agentrl.train.sft import _LEAN_INPUTS, _trainer_class, oracle_dataset


def test_lean_loss_and_gradients_equal_trls_fused_ones(micro_model_dir, tmp_path):
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
        if not fused:  # the lean path, not its fallback: the plain Trainer loss would pass too
            assert set(batch) <= _LEAN_INPUTS and head_split(model) is not None
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
    # a key added to SFTConfig later: absent from the record means that run used its default
    check_same_settings(tmp_path, {**settings, "sft": {**settings["sft"], "stop_at_accuracy": 0.0}})
    with pytest.raises(RuntimeError, match=r"sft.stop_at_accuracy: 0.0 -> 0.5"):
        check_same_settings(tmp_path, {**settings, "sft": {**settings["sft"], "stop_at_accuracy": 0.5}})
    (tmp_path / DONE_MARKER).write_text(json.dumps({"steps": 10}))  # written by an older agentrl
    with pytest.raises(RuntimeError, match="no record of its settings"):
        check_same_settings(tmp_path, settings)


class _Replay(torch.nn.Module):
    """Logits that put the argmax on a chosen next token: the true one, except where ``wrong`` says."""

    def __init__(self, vocab: int, wrong: torch.Tensor) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        target = torch.roll(input_ids, -1, dims=1)
        target = torch.where(self.wrong, (target + 1) % self.vocab, target)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, self.vocab).float()})()


def test_oracle_accuracy_counts_episodes_with_every_scored_token_right():
    from agentrl.train.sft import oracle_accuracy

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, 7, 8, -100], [-100, -100, 7, 8, -100]])
    wrong = torch.zeros_like(ids, dtype=torch.bool)
    wrong[1, 2] = True  # episode 1: predicts a wrong token at a scored position (predicting label 8)
    wrong[2, 0] = True  # episode 2: wrong only where there is no loss (the prompt), so it still counts
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert oracle_accuracy(_Replay(16, wrong), [batch]) == pytest.approx(2 / 3)


def test_length_bands_batch_conversations_of_about_one_length_in_a_fresh_order_each_epoch():
    from agentrl.train.sft import LengthBandSampler

    lengths = [300 + (i * 37) % 330 for i in range(64)]  # 300..629 tokens: bands 2, 3 and 4 of 128
    sampler = LengthBandSampler(lengths, batch_size=4, band=128, seed=0)
    epochs = [list(sampler) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(64))  # every conversation once
        bands = [{lengths[i] // 128 for i in order[j:j + 4]} for j in range(0, 64, 4)]
        # only where one band's conversations run out does a batch hold two bands
        assert sum(len(b) > 1 for b in bands) <= 2 and max(map(len, bands)) <= 2
        firsts = [min(b) for b in bands]
        assert firsts != sorted(firsts)  # the batches themselves come in random order, not by length
    assert epochs[0] != epochs[1]
    again = LengthBandSampler(lengths, batch_size=4, band=128, seed=0)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # the same order on every process for the same epoch
    padded = sum(max(lengths[i] for i in epochs[0][j:j + 4]) * 4 for j in range(0, 64, 4))
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    padded_random = sum(max(lengths[i] for i in shuffled[j:j + 4]) * 4 for j in range(0, 64, 4))
    assert padded < padded_random


def test_sft_trains_on_length_banded_batches(micro_model_dir, tmp_path):
    from agentrl.train.sft import DONE_MARKER, LengthBandSampler, run_sft

    recipe = _sft_recipe(tmp_path, micro_model_dir, "--sft.length_band=16")
    run_sft(micro_model_dir, tmp_path / "sft", build_envs(recipe), recipe.sft, 0)
    summary = json.loads((tmp_path / "sft" / DONE_MARKER).read_text())
    assert summary["steps"] == 4 and summary["settings"]["sft"]["length_band"] == 16
    with pytest.raises(ConfigError, match="sft.length_band"):
        load_recipe(None, ["--sft.length_band=-1"])
    dataset = oracle_dataset(build_envs(recipe), 4)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path / "t"), assistant_only_loss=True, per_device_train_batch_size=2,
                     use_cpu=True, bf16=False, report_to=[])
    trainer = _trainer_class(False, 16)(model=AutoModelForCausalLM.from_pretrained(micro_model_dir), args=args,
                                        train_dataset=dataset,
                                        processing_class=AutoTokenizer.from_pretrained(micro_model_dir))
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler.sampler, LengthBandSampler)
    bands = [{int(n) // 16 for n in batch["attention_mask"].sum(1)} for batch in loader]
    assert len(bands) == 4 and sum(len(b) > 1 for b in bands) <= 1  # calculator and lookup traces differ


def _sft_recipe(tmp_path, micro_model_dir, *extra):
    return load_recipe(None, [f"--model.path={micro_model_dir}", "--envs=[{name: calculator}, {name: lookup}]",
                              "--sft.examples_per_env=4", "--sft.batch_size=2", "--sft.epochs=1",
                              "--sft.eval_every=1", "--sft.eval_examples=3", *extra])


def test_sft_early_stop_scores_held_out_episodes_and_records_them(micro_model_dir, tmp_path):
    from agentrl.train.sft import DONE_MARKER, run_sft

    recipe = _sft_recipe(tmp_path, micro_model_dir, "--sft.stop_at_accuracy=1.0")
    run_sft(micro_model_dir, tmp_path / "sft", build_envs(recipe), recipe.sft, 0)
    summary = json.loads((tmp_path / "sft" / DONE_MARKER).read_text())
    assert summary["steps"] == 4  # a random micro model never reaches 1.0, so every step runs
    assert summary["stopped_early_at"] is None
    assert [h["step"] for h in summary["oracle_accuracy"]] == [1, 2, 3, 4]
    assert all(set(h["accuracy"]) == {"calculator", "lookup"} for h in summary["oracle_accuracy"])


def test_sft_stops_at_the_first_check_where_every_environment_reaches_the_threshold(micro_model_dir, tmp_path,
                                                                                     monkeypatch):
    from agentrl.train import sft

    scores = iter([0.1, 0.9, 0.9, 0.2, 0.8, 0.7])  # (calculator, lookup) at steps 1, 2, 3 of 4
    monkeypatch.setattr(sft, "oracle_accuracy", lambda model, batches: next(scores))
    recipe = _sft_recipe(tmp_path, micro_model_dir, "--sft.stop_at_accuracy=0.5")
    sft.run_sft(micro_model_dir, tmp_path / "sft", build_envs(recipe), recipe.sft, 0)
    summary = json.loads((tmp_path / "sft" / sft.DONE_MARKER).read_text())
    assert summary["stopped_early_at"] == 3 and summary["steps"] == 3


def test_held_out_oracle_episodes_are_not_in_the_sft_data(micro_model_dir, tmp_path):
    from agentrl.train.sft import validation_sets

    recipe = _sft_recipe(tmp_path, micro_model_dir)
    suite = build_envs(recipe)
    train = {json.dumps(row["messages"]) for row in oracle_dataset(suite, recipe.sft.examples_per_env)}
    held_out = validation_sets(suite, recipe.sft)
    assert sorted(held_out) == ["calculator", "lookup"]
    for rows in held_out.values():
        assert len(rows) == 3 and not train & {json.dumps(row["messages"]) for row in rows}


@pytest.mark.parametrize("override, key", [("--sft.stop_at_accuracy=1.5", "sft.stop_at_accuracy"),
                                           ("--sft.eval_every=0", "sft.eval_every")])
def test_bad_early_stop_settings_name_the_key(override, key):
    from agentrl.config import ConfigError
    from agentrl.train.sft import check_early_stop

    with pytest.raises(ConfigError, match=key):
        check_early_stop(load_recipe(None, [override]).sft)


def test_oracle_traces_of_a_blocking_environment_keep_task_order_when_played_at_once(monkeypatch):
    recipe = load_recipe(None, ["--envs=[{name: os}, {name: calculator}]"])
    suite = build_envs(recipe)
    assert suite.prototypes["os"].blocking and not suite.prototypes["calculator"].blocking
    monkeypatch.setattr("agentrl.train.sft.ORACLE_THREADS", 1)
    one_by_one = oracle_dataset(suite, 12).to_list()
    monkeypatch.setattr("agentrl.train.sft.ORACLE_THREADS", 4)
    at_once = oracle_dataset(suite, 12).to_list()
    assert len(at_once) == 24
    assert at_once == one_by_one
    prompts = [row["messages"][1]["content"] for row in at_once[:12]]
    assert prompts == [task.prompt for task in suite.prototypes["os"].tasks("train", 12)]


def test_extra_sft_environments_join_the_warm_start_only(micro_model_dir, tmp_path):
    from accelerate import Accelerator

    from agentrl.train.loop import prepare_model
    from agentrl.train.sft import DONE_MARKER

    recipe = _sft_recipe(tmp_path, micro_model_dir, "--model.build=null", f"--train.output_dir={tmp_path / 'run'}",
                         "--sft.extra_envs=[{name: kg, kwargs: {relations_tool: false}}]")
    suite = build_envs(recipe)
    assert set(suite.prototypes) == {"calculator", "lookup"}  # what GRPO trains and evaluation scores
    prepare_model(recipe, suite, Accelerator(cpu=True))
    summary = json.loads((tmp_path / "run" / "sft" / DONE_MARKER).read_text())
    assert summary["examples"] == 12  # 4 oracle traces from each of the three environments
    assert set(summary["settings"]["envs"]) == {"calculator", "lookup", "kg"}
    assert "relations_tool=False" in summary["settings"]["envs"]["kg"]
    with pytest.raises(ValueError, match="'lookup' appears twice"):  # an extra environment GRPO also trains
        prepare_model(load_recipe(None, [f"--model.path={micro_model_dir}", "--model.build=null",
                                         "--sft.extra_envs=[{name: lookup}]"]), suite, Accelerator(cpu=True))
    with pytest.raises(ConfigError, match=r"sft\.extra_envs\[0\]\.wieght"):
        load_recipe(None, ["--sft.extra_envs=[{name: kg, wieght: 2}]"])


def test_an_environment_can_set_its_own_number_of_sft_traces(micro_model_dir, tmp_path):
    from agentrl.train.sft import DONE_MARKER, run_sft, sft_examples, validation_sets

    recipe = _sft_recipe(tmp_path, micro_model_dir, "--envs=[{name: calculator, sft_examples: 1}, {name: lookup}]")
    suite = build_envs(recipe)
    assert sft_examples(suite, recipe.sft) == {"calculator": 1, "lookup": 4}
    data = oracle_dataset(suite, sft_examples(suite, recipe.sft)).to_list()
    prompts = [row["messages"][1]["content"] for row in data]
    assert prompts == [t.prompt for t in suite.prototypes["calculator"].tasks("train", 1)] + \
        [t.prompt for t in suite.prototypes["lookup"].tasks("train", 4)]
    # held-out episodes start right after each environment's own share of the train split
    held_out = validation_sets(suite, recipe.sft)
    assert held_out["calculator"][0]["messages"][1]["content"] == \
        suite.prototypes["calculator"].tasks("train", 1, start=1)[0].prompt
    run_sft(micro_model_dir, tmp_path / "sft", suite, recipe.sft, 0)
    summary = json.loads((tmp_path / "sft" / DONE_MARKER).read_text())
    assert summary["examples"] == 5 and summary["settings"]["sft_examples"] == {"calculator": 1}
    other = _sft_recipe(tmp_path, micro_model_dir, "--envs=[{name: calculator, sft_examples: 2}, {name: lookup}]")
    with pytest.raises(RuntimeError, match=r"sft_examples.calculator: 1 -> 2"):  # the saved model is not reused
        run_sft(micro_model_dir, tmp_path / "sft", build_envs(other), other.sft, 0)
    # a count equal to sft.examples_per_env trains what the plain recipe trains, and is recorded as it is
    same = _sft_recipe(tmp_path, micro_model_dir, "--envs=[{name: calculator, sft_examples: 4}, {name: lookup}]")
    run_sft(micro_model_dir, tmp_path / "same", build_envs(same), same.sft, 0)
    assert "sft_examples" not in json.loads((tmp_path / "same" / DONE_MARKER).read_text())["settings"]
    skipped = build_envs(_sft_recipe(tmp_path, micro_model_dir,
                                     "--envs=[{name: calculator, sft_examples: 0}, {name: lookup}]"))
    assert sft_examples(skipped, recipe.sft) == {"calculator": 0, "lookup": 4}
    assert list(validation_sets(skipped, recipe.sft)) == ["lookup"]  # early stop waits on trained envs only
    none = _sft_recipe(tmp_path, micro_model_dir, "--envs=[{name: calculator, sft_examples: 0}]")
    with pytest.raises(ConfigError, match="SFT has no oracle traces"):
        run_sft(micro_model_dir, tmp_path / "none", build_envs(none), none.sft, 0)
    with pytest.raises(ConfigError, match=r"envs\[lookup\].sft_examples must be >= 0"):
        load_recipe(None, ["--envs=[{name: lookup, sft_examples: -1}]"])
