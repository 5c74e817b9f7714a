"""ECAML: energy confusion, trained adversarially with the metric loss (Chen and Deng, "Energy Confused
Adversarial Metric Learning for Zero-Shot Image Retrieval and Clustering", AAAI 2019).

A metric loss makes the embedding discriminate the *seen* classes, and it does so with the few
features that separate them most easily; on unseen classes those features are not enough. ECAML
adds a term that does the opposite to the metric alone: the *energy* of a batch is half the mean
squared distance between embeddings of different classes, and the energy confusion term is its
logarithm, minimised, so it pulls the classes together ("confuses" the metric)::

    E    = 1/2 * mean_{i<j, y_i != y_j} || W h_i + b - (W h_j + b) ||^2
    loss = L_metric + weight * log E

where ``h`` are the backbone's features, *detached*, and ``W, b`` the embedding layer (the
module's ``projection``). The two terms are adversaries over the embedding layer only: the metric
loss trains the backbone and ``W`` to separate the classes, the confusion term trains ``W`` to
mix them, so ``W`` cannot rest on one easily separating direction and the backbone is pushed to
provide others. Because the energy enters through its log, its scale does not matter: the
gradient is ``weight * dE / E``.

Source: the official Caffe code (github.com/chenbinghui1/ECAML): ``src/energy_confusion.cpp``
(the energy, the ``1/E`` factor of the backward pass: the log) and ``examples/car/
train_confusion.prototxt`` (the term on a second inner-product layer that shares the embedding
layer's weights, over the *un-normalised* embedding, with ``propagate_down: 0`` into the backbone,
loss weight 0.13: this technique's defaults). Where the code and the paper differ:

* pairs: the paper's energy is among *different* classes; the code sums over sampled pairs of
  both kinds, each kind divided by its number of pairs in the batch. ``include_positives=True``
  adds the same-class pairs' mean, as the code does.
* sampling: the code draws 10 partners per anchor (batches of 130 on GoogLeNet); here every pair
  of the batch counts, which the sampled sum estimates (and the step stays deterministic).

Written by hand: neither pytorch-metric-learning nor any other library has the energy confusion
term. Needs a module with a ``projection`` linear layer whose step output carries the backbone's
output in ``extras["backbone_features"]`` (:class:`reglab.tasks.EmbeddingModule`).

Method card (what it does, when it helps, what it costs): ``ecaml.card.yaml``.

Example:
    >>> import torch
    >>> from reglab.callbacks.metric_learning import ECAML
    >>> ECAML(weight=0.13).name
    'ecaml'
    >>> points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    >>> energy(points, torch.tensor([0, 1, 1])).item()  # pairs (0, 1), (0, 2): (25 + 0) / 2 / 2
    6.25
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.technique import Technique


def energy(embeddings: Tensor, labels: Tensor, include_positives: bool = False) -> Tensor:
    """Half the mean squared distance over the pairs ``i < j`` of different classes (plus, with
    ``include_positives``, half that over the same-class pairs, when there are any); ``nan`` when the
    batch has no pair of different classes. Computed in fp32."""
    total, defined = energy_where_defined(embeddings, labels, include_positives)
    return torch.where(defined, total, torch.full_like(total, float("nan")))


def energy_where_defined(embeddings: Tensor, labels: Tensor, include_positives: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`energy` without the ``nan``: the energy (0 where undefined) and whether the batch has a pair
    of different classes, both tensors, so a caller can branch on the device (no host sync)."""
    z = embeddings.float()
    squared_norms = z.pow(2).sum(1)
    # from the Gram matrix: no (N, N, D) difference tensor; the clamp removes round-off below zero
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * z @ z.T).clamp_min(0)
    upper = torch.ones_like(distances).triu(1)
    same = (labels[:, None] == labels[None, :]).float()
    # masked means rather than boolean indexing: no data-dependent shapes (no device sync)
    negatives = upper * (1 - same)
    pairs = negatives.sum()
    total = 0.5 * (distances * negatives).sum() / pairs.clamp_min(1)
    if include_positives:
        positives = upper * same
        total = total + 0.5 * (distances * positives).sum() / positives.sum().clamp_min(1)
    return total, pairs > 0


class ECAML(Technique):
    """Adds ``weight * log E``, the energy confusion of the embedding layer on detached backbone
    features (module docstring).

    Args:
        weight: the term's weight (0.13: the official code's ``loss_weight``).
        include_positives: also count same-class pairs, each kind averaged over its pairs (the
            official code); ``False`` counts pairs of different classes only (the paper).
    """

    name = "ecaml"

    def __init__(self, weight: float = 0.13, include_positives: bool = False) -> None:
        if not weight > 0:
            raise self.fail(f"weight must be positive, got {weight}",
                            "pass weight > 0 (0.13 is the official code's), or leave the technique out")
        self.weight, self.include_positives = weight, include_positives

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(getattr(pl_module, "projection", None), nn.Linear):
            raise self.fail(f"{type(pl_module).__name__} has no `projection` linear layer (the embedding layer the "
                            "energy confusion trains)",
                            "use reglab.tasks.EmbeddingModule, or a module whose embedding layer is `projection`")

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        features = out.extras.get("backbone_features")
        if features is None:
            raise self.fail(f"{type(module).__name__}.forward_step puts no `backbone_features` in the step output's "
                            "extras", "use reglab.tasks.EmbeddingModule, whose step output carries them")
        # detached: the confusion reaches the embedding layer only, as the official code's propagate_down: 0
        metric = module.projection(features.detach())
        e, defined = energy_where_defined(metric, out.labels, self.include_positives)
        # one class in the batch: nothing to confuse, a zero term; chosen on the device (no host sync per step),
        # and the log never sees the undefined 0, so no nan reaches the gradient either
        confusion = self.weight * torch.where(defined, e, torch.ones_like(e)).log()
        return {"energy_confusion": torch.where(defined, confusion, torch.zeros_like(confusion))}
