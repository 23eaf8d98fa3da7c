"""Token log-probs of a training batch with each environment's shared opening computed once.

Every trajectory of an environment opens with the same system text and tool schemas, often most of its
tokens, and none of them is trained on. The plain forward pass runs them once per row. Here each group of
rows that shares an opening runs it once (a batch of one, with gradient), its keys and values are copied to
the group's rows, and the batch runs only the rest. The gradient is the same: the shared computation's
gradient is the sum of what each row's own copy would have received.

Rows are right-padded, so every row's shared part sits at slots ``[0, start)`` and the batch resumes at
``start``, the shortest shared opening of any group (a row with a longer one recomputes its tail).
"""

from __future__ import annotations

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


def sequence_logprobs(model, batch: SequenceBatch, temperature: float, share_prefix: bool = True) -> torch.Tensor:
    """``[B, L-1]`` log-probs of ``input_ids[:, 1:]`` under ``model``.

    With ``share_prefix``, positions inside a shared opening (never trained) hold 0 instead of their log-prob.
    """
    start, clusters = shared_start(batch) if share_prefix else (0, [])
    if start == 0:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature)
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
    logits = model(input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                   position_ids=positions, past_key_values=DynamicCache(layers), use_cache=True).logits
    tail = token_logprobs(logits[:, :-1], batch.input_ids[:, start + 1:], temperature)
    return torch.cat([tail.new_zeros((rows, start)), tail], dim=1)
