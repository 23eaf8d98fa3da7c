"""Token log-probs of a training batch with each environment's shared opening computed once.

Every trajectory of an environment opens with the same system text and tool schemas, often most of its
tokens, and none of them is trained on. The plain forward pass runs them once per row. Here each group of
rows that shares an opening runs it once (a batch of one, with gradient), its keys and values are copied to
the group's rows, and the batch runs only the rest. The gradient is the same: the shared computation's
gradient is the sum of what each row's own copy would have received.

Rows are right-padded, so every row's shared part sits at slots ``[0, start)`` and the batch resumes at
``start``, the shortest shared opening of any group (a row with a longer one recomputes its tail).

The vocabulary projection then runs only where the loss needs a log-prob: the tokens the policy sampled.
The tool output and prompt text between them are most of an agent trajectory, and the ``[rows, length,
vocab]`` logits and their softmax were the largest tensors of the update.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache

from agentrl.algo.losses import token_logprobs
from agentrl.policy.decode import MIN_SHARED_PREFIX, prefix_clusters
from agentrl.train.batch import SequenceBatch


def shared_start(batch: SequenceBatch, min_shared: int = MIN_SHARED_PREFIX) -> tuple[int, list[tuple[list[int], int]]]:
    """Where the batch can resume after cached openings, and the row clusters they come from.

    Only tokens before a row's first trained token may be shared, so every trained token's log-prob comes from
    the batched part. ``start`` is 0 when some row shares nothing worth caching.
    """
    heads = []
    for ids, trained in zip(batch.input_ids.tolist(), batch.loss_mask.bool().tolist()):
        first = trained.index(True) if True in trained else len(ids)
        heads.append(ids[:first])
    if not all(heads):
        return 0, []
    clusters = prefix_clusters(heads, min_shared)
    return min(shared for _, shared in clusters), clusters


def head_split(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, lm_head)`` when the model's logits are exactly ``lm_head(decoder(...).last_hidden_state)``.

    That holds for Qwen2/Llama-style models, but not for every causal LM (some scale or soft-cap their logits),
    so it is checked once per model on a short input; ``None`` (use the full forward) when it does not hold
    or the model is wrapped (DDP exposes neither part, and must be called as a whole to sync gradients).
    """
    if model in _SPLITS:
        return _SPLITS[model]
    parts = None
    if hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings"):
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        if decoder is not None and head is not None:
            device = next(model.parameters()).device
            ids = torch.arange(1, 9, device=device)[None] % model.config.vocab_size
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    whole = model(input_ids=ids).logits.float()
                    split = head(decoder(input_ids=ids).last_hidden_state).float()
            finally:
                model.train(was_training)
            if whole.shape == split.shape and torch.allclose(whole, split, atol=1e-5, rtol=1e-5):
                parts = (decoder, head)
    _SPLITS[model] = parts
    return parts


_SPLITS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple | None]" = weakref.WeakKeyDictionary()


def _scored(model, split, inputs: dict, targets: torch.Tensor, trained: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Log-probs of ``targets`` (position t scored by the output at t) for the forward pass ``inputs``.

    Without ``split`` every position is scored from the model's logits. With it, the vocabulary projection and
    its softmax run only where ``trained`` (in agent trajectories most positions are prompt and tool output),
    and every other position holds 0.
    """
    if split is None:
        return token_logprobs(model(**inputs).logits[:, :-1], targets, temperature)
    decoder, head = split
    hidden = decoder(**inputs).last_hidden_state[:, :-1]
    picked = token_logprobs(head(hidden[trained])[None], targets[trained][None], temperature)[0]
    return hidden.new_zeros(targets.shape, dtype=torch.float32).masked_scatter(trained, picked)


def sequence_logprobs(model, batch: SequenceBatch, temperature: float, lean: bool = True) -> torch.Tensor:
    """``[B, L-1]`` log-probs of ``input_ids[:, 1:]`` under ``model``.

    ``lean`` (the model is called directly, not through a DDP wrapper): shared openings are computed once, and
    only positions the loss trains on (``loss_mask[:, 1:]``) are projected onto the vocabulary; every other
    position holds 0. Without it, one plain forward gives every position's log-prob.
    """
    split = head_split(model) if lean else None
    start, clusters = shared_start(batch) if lean else (0, [])
    if start == 0:
        return _scored(model, split, dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
                       batch.input_ids[:, 1:], batch.loss_mask[:, 1:].bool(), temperature)
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    which = [0] * rows  # each row's cluster
    heads = []
    for c, (members, _) in enumerate(clusters):
        for row in members:
            which[row] = c
        head = batch.input_ids[members[0]: members[0] + 1, :start]
        out = model(input_ids=head, attention_mask=torch.ones_like(head), past_key_values=DynamicCache(),
                    use_cache=True, logits_to_keep=1)
        heads.append(out.past_key_values)
    index = torch.tensor(which, device=device)
    layers = []
    for layer in range(len(heads[0].layers)):
        keys = torch.cat([h.layers[layer].keys for h in heads]).index_select(0, index)
        values = torch.cat([h.layers[layer].values for h in heads]).index_select(0, index)
        layers.append((keys, values))
    positions = torch.arange(start, length, device=device).expand(rows, -1)
    inputs = dict(input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                  position_ids=positions, past_key_values=DynamicCache(layers), use_cache=True)
    tail = _scored(model, split, inputs, batch.input_ids[:, start + 1:], batch.loss_mask[:, start + 1:].bool(),
                   temperature)
    return torch.cat([tail.new_zeros((rows, start)), tail], dim=1)
