"""Distance-based representative (DBR) knowledge transfer, NRR-DD's student loss (paper 45).

Instead of a teacher's soft labels for every image (what soft-label distillation stores), each
condensed image keeps one number: the distance ``d_i = ||softmax(teacher(x_i)) - onehot(y_i)||_2``
between the teacher's prediction and its label. The student trained on the condensed set adds
``weight * (||softmax(student(x_i)) - onehot(y_i)||_2 - d_i)^2`` to its cross-entropy, so it learns
how far from certain the teacher is on each image without storing the teacher's distribution.

Example:
    >>> import torch
    >>> probabilities = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> label_distance(probabilities, torch.tensor([0, 0]))
    tensor([0.0000, 0.7071])
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.step import StepOutput
from reglab.technique import Technique

#: the per-image extra of a condensed set that holds the teacher's distances
KEY = "label_distance"


def label_distance(probabilities: Tensor, target: Tensor) -> Tensor:
    """``||p_i - onehot(y_i)||_2`` per row."""
    return (probabilities - F.one_hot(target, probabilities.shape[-1]).to(probabilities)).norm(dim=-1)


class DistanceTransfer(Technique):
    """The DBR term: the student's distance to the one-hot label pulled to the stored teacher's
    (batches carry ``label_distance``, an extra of the condensed set)."""

    name = "distance_transfer"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if KEY not in out.batch:
            raise self.fail(f"training batches have no {KEY!r}", "train on a condensed set made by NRR-DD "
                            "(reglab.callbacks.condensation.nrr_dd), whose images carry the teacher's distances")
        student = label_distance(out.logits.float().softmax(-1), out.target)
        return {"dbr": self.weight * (student - out.batch[KEY].float()).square().mean()}
