"""Shared prompt prefixes computed once: the lean sampler against transformers' generate and a full forward
pass, and the training forward (log-probs and gradients) against the plain one."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from agentrl.policy.decode import draw, prefix_clusters, sample
from agentrl.policy.hf import merged_lora
from agentrl.train.batch import SequenceBatch
from agentrl.train.prefix import sequence_logprobs, shared_start

VOCAB, PAD = 300, 0


@pytest.fixture(scope="module")
def model():
    """A random Qwen2 with GQA, one 16-token sliding-window layer, and a LoRA adapter with nonzero weights."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    base = Qwen2ForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def prompts_with_structure() -> list[list[int]]:
    """Two families sharing long openings (a system preamble each), repeated prompts (a GRPO group), a prompt
    that is a prefix of another, and short prompts that share nothing."""
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    family_a, family_b = tokens(60), tokens(45)
    a1, a2, b1 = family_a + tokens(7), family_a + tokens(19), family_b + tokens(3)
    return [a1, a1, a1, a2, b1, b1, a1[:40], a2 + tokens(30), tokens(5), tokens(11), [7]]


def reference(model, prompts, max_new_tokens, eos_id):
    """Greedy ids and logprobs from transformers' generate, rows left-padded into one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out.sequences[:, width:]
    logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, new[..., None])[..., 0]
    rows = []
    for row in range(len(prompts)):
        seq = new[row].tolist()
        end = seq.index(eos_id) + 1 if eos_id in seq else len(seq)
        rows.append((seq[:end], logprobs[row, :end].tolist()))
    return rows


def test_prefix_clusters_share_the_longest_common_opening():
    prompts = prompts_with_structure()
    clusters = {tuple(sorted(members)): shared for members, shared in prefix_clusters(prompts, min_shared=16)}
    assert clusters[(0, 1, 2, 3, 6, 7)] == 39  # family a: capped one short of its shortest member (40 tokens)
    assert clusters[(4, 5)] == 47  # identical prompts: all but the last token
    assert clusters[(8,)] == 0 and clusters[(10,)] == 0  # too short to be worth sharing
    assert sorted(i for members in clusters for i in members) == list(range(len(prompts)))


def test_greedy_equals_transformers_generate(model):
    prompts = prompts_with_structure()
    free = sample(model, prompts, 12, 0.0, eos_id=VOCAB + 1, pad_id=PAD)  # an eos that cannot occur
    # make a token the model actually produces the eos, so rows end at different steps and leave the batch
    eos = free[0].ids[4]
    ours = sample(model, prompts, 12, 0.0, eos_id=eos, pad_id=PAD)
    theirs = reference(model, prompts, 12, eos)
    assert [s.ids for s in ours] == [ids for ids, _ in theirs]
    assert {s.finished for s in ours} == {True, False}  # both ways of ending are exercised
    assert all(s.finished == (s.ids[-1] == eos) for s in ours)
    for s, (_, logprobs) in zip(ours, theirs):
        assert s.logprobs == pytest.approx(logprobs, abs=1e-5)


def test_sampled_logprobs_are_those_of_a_full_forward_pass(model):
    torch.manual_seed(1)
    prompts = prompts_with_structure()
    temperature = 0.7
    for prompt, s in zip(prompts, sample(model, prompts, 10, temperature, eos_id=VOCAB + 1, pad_id=PAD)):
        assert len(s.ids) == 10 and not s.finished
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + s.ids])).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(s.ids)[:, None])[:, 0]
        assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_sampling_with_the_adapter_merged_matches_the_unmerged_model(model):
    prompts = prompts_with_structure()
    base = {name: (p, p.detach().clone()) for name, p in model.named_parameters() if "base_layer" in name}
    unmerged = sample(model, prompts, 10, 0.0, eos_id=VOCAB + 1, pad_id=PAD)
    with merged_lora(model) as plain:
        assert plain  # every projection is now a plain linear: the written-out decode step applies
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert not torch.equal(q_proj.base_layer.weight, base[next(n for n in base if "q_proj" in n)][1])
        merged = sample(model, prompts, 10, 0.0, eos_id=VOCAB + 1, pad_id=PAD, plain_weights=plain)
    assert [s.ids for s in merged] == [s.ids for s in unmerged]
    for a, b in zip(merged, unmerged):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    for name, p in model.named_parameters():  # the same parameter objects, bit for bit, adapter active again
        if name in base:
            assert p is base[name][0] and torch.equal(p, base[name][1])
    assert [s.ids for s in sample(model, prompts, 10, 0.0, eos_id=VOCAB + 1, pad_id=PAD)] == [s.ids for s in unmerged]


def test_an_adapter_variant_is_sampled_unmerged():
    torch.manual_seed(4)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    dora = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    weight = dora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.data_ptr()
    with merged_lora(dora) as plain:
        assert weight.data_ptr() == before  # DoRA's update is not a plain W + BA: left to peft
        assert not plain  # and the decode step must go through peft's forward


def test_repeated_prompts_get_independent_samples(model):
    torch.manual_seed(2)
    prompt = prompts_with_structure()[0]
    completions = {tuple(s.ids) for s in sample(model, [prompt] * 8, 10, 1.0, eos_id=VOCAB + 1, pad_id=PAD)}
    assert len(completions) > 4  # a random model at temperature 1: copies of a prompt are not copies of a sample


def test_draw_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logp = probs.log().expand(20000, 4)
    counts = torch.bincount(draw(logp), minlength=4).float() / 20000
    assert counts[1] == 0  # probability 0 is never drawn
    assert torch.allclose(counts, probs, atol=0.015)  # 4+ standard errors at n = 20000


def training_batch() -> SequenceBatch:
    """Right-padded rows from two families of openings; each row trains on its tokens after the opening."""
    rng = random.Random(3)
    tokens = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    family_a, family_b = tokens(50), tokens(70)
    rows = [(family_a + tokens(5), 12), (family_a + tokens(5), 3), (family_b + tokens(9), 20), (family_a, 7)]
    width = max(len(head) + n for head, n in rows)
    ids = torch.full((len(rows), width), PAD)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros((len(rows), width))
    for row, (head, n) in enumerate(rows):
        seq = head + tokens(n)
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        loss_mask[row, len(head):len(seq)] = 1
    return SequenceBatch(ids, attention, loss_mask, torch.zeros((len(rows), width)), torch.ones(len(rows)))


def test_training_forward_with_shared_openings_matches_the_plain_one(model):
    batch = training_batch()
    start, clusters = shared_start(batch)
    assert start == 49 and len(clusters) == 2  # family a's opening, one short of the row that is only the opening
    trained = batch.loss_mask[:, 1:].bool()
    weights = torch.randn(trained.shape, generator=torch.Generator().manual_seed(0)) * trained
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for share in (False, True):
        model.zero_grad()
        logprobs = sequence_logprobs(model, batch, temperature=0.7, lean=share)
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in params]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.allclose(shared[trained], plain[trained], atol=1e-5)
    assert (shared[:, :start] == 0).all()  # untrained opening positions are not computed
    for a, b in zip(plain_grads, shared_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_a_row_with_nothing_shared_falls_back_to_the_plain_forward(model):
    batch = training_batch()
    batch.loss_mask[1, 10:] = 1  # this row now trains from token 10: too little before it to share
    assert shared_start(batch)[0] == 0
    trained = batch.loss_mask[:, 1:].bool()
    plain = sequence_logprobs(model, batch, 1.0, lean=False)
    lean = sequence_logprobs(model, batch, 1.0, lean=True)
    assert torch.allclose(lean[trained], plain[trained], atol=1e-5)
    assert (lean[~trained] == 0).all() and (plain[~trained] != 0).all()  # only trained positions are projected


def test_a_model_whose_logits_are_not_the_plain_head_is_scored_whole():
    """Some causal LMs transform ``lm_head``'s output (Gemma soft-caps it); the lean path must notice and
    use the model's own logits rather than project the hidden states itself."""
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)

    class SoftCapped(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = SoftCapped(config).eval()
    batch = training_batch()
    trained = batch.loss_mask[:, 1:].bool()
    logits = capped(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    got = sequence_logprobs(capped, batch, 1.0, lean=True)
    assert torch.allclose(got[trained], expected[trained], atol=1e-5)
