"""Turn trajectories into padded training tensors, straight from their recorded token ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentrl.types import Trajectory


@dataclass
class SequenceBatch:
    """Right-padded sequences; position t of ``loss_mask``/``behaviour_logprobs`` refers to ``input_ids[:, t]``.

    Shapes: ``input_ids``, ``attention_mask``, ``loss_mask``, ``behaviour_logprobs``: [B, L];
    ``advantages``: [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "SequenceBatch":
        rows = slice(start, stop)
        width = int(self.attention_mask[rows].sum(dim=1).max().item())  # trim padding this slice does not need
        return SequenceBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                             self.loss_mask[rows, :width], self.behaviour_logprobs[rows, :width],
                             self.advantages[rows])


def collate(trajectories: list[Trajectory], advantages: list[float], pad_id: int) -> SequenceBatch:
    """Pad trajectories' token views into one batch (longest first, so micro-batches trim well)."""
    views = [traj.token_view() for traj in trajectories]
    order = sorted(range(len(views)), key=lambda i: -len(views[i][0]))
    width = max((len(v[0]) for v in views), default=0)
    shape = (len(views), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    behaviour = torch.zeros(shape, dtype=torch.float32)
    for row, i in enumerate(order):
        ids, mask, logprobs = views[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.float32)
        behaviour[row, : len(ids)] = torch.tensor(logprobs)
    adv = torch.tensor([advantages[i] for i in order], dtype=torch.float32)
    return SequenceBatch(input_ids, attention, loss_mask, behaviour, adv)
