"""Clustering accuracy of category discovery: the best one-to-one map of clusters to classes
(Hungarian), scored on all samples and on the old (known) and new (novel) classes apart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric


def cluster_to_class(contingency: Tensor) -> Tensor:
    """The Hungarian map of clusters to classes on a ``(clusters, classes)`` count matrix: each
    cluster's class, ``-1`` for a cluster left unmatched (more clusters than classes).

    Example:
        >>> cluster_to_class(torch.tensor([[0, 5], [4, 1], [1, 1]])).tolist()
        [1, 0, -1]
    """
    clusters, classes = linear_sum_assignment(contingency.cpu().numpy(), maximize=True)
    mapping = torch.full((contingency.shape[0],), -1, dtype=torch.long)
    mapping[torch.as_tensor(clusters, dtype=torch.long)] = torch.as_tensor(classes, dtype=torch.long)
    return mapping


def align_clusters(preds: Tensor, target: Tensor, num_clusters: int, num_classes: int) -> Tensor:
    """``preds`` (cluster ids) mapped to the classes of :func:`cluster_to_class` on their counts
    against ``target``: the predictions whose plain accuracy is the clustering accuracy.

    Example:
        >>> align_clusters(torch.tensor([1, 1, 0, 0, 2]), torch.tensor([0, 0, 1, 1, 1]), 3, 2).tolist()
        [0, 0, 1, 1, -1]
    """
    cells = preds.long().cpu() * num_classes + target.long().cpu()
    counts = torch.bincount(cells, minlength=num_clusters * num_classes).view(num_clusters, num_classes)
    return cluster_to_class(counts).to(preds.device)[preds.long()]


class ClusteringAccuracy(Metric):
    """Hungarian clustering accuracy on all / old / new classes, as GCD and SimGCD evaluate.

    The variant is ``split_cluster_acc_v2`` of the official code (CVMI-Lab/SimGCD,
    ``util/cluster_and_log_utils.py``, the same as sgvaze/generalized-category-discovery's): *one*
    assignment of clusters to classes over all samples (``scipy.optimize.linear_sum_assignment``
    on the cluster-by-class counts, maximizing the matched samples), then the accuracy of that one
    assignment on every sample (``all``), on the samples whose true class is old (``old``) and on
    those whose true class is new (``new``). Not the ``v1`` variant (separate assignments for old
    and new), nor ``v2b`` (the mean of per-class accuracies).

    The state is the ``(num_clusters, num_classes)`` contingency matrix, summed over processes
    (``dist_reduce_fx="sum"``), and the assignment is made once on the merged matrix: under DDP
    the result equals one process's over all samples. The official code instead assigns on each
    process's own matrix and sums the matched counts, which can differ from the single-process
    value; here it cannot. A cluster count above the class count leaves the extra clusters
    unmatched (their samples count as wrong), which is what the official code's square padding
    does. A group without samples (no new class seen yet) gives ``nan``.

    Args:
        num_classes: number of true classes (old and new).
        old_classes: the old (known, labelled) classes: their indices, or an ``int`` k meaning
            classes ``0..k-1`` (the convention of :class:`~reglab.datamodules.DiscoveryDataModule`).
        num_clusters: number of cluster ids the predictions use (default ``num_classes``).

    Example:
        >>> metric = ClusteringAccuracy(num_classes=4, old_classes=2)
        >>> metric.update(torch.tensor([3, 3, 2, 0, 1, 1]), torch.tensor([0, 0, 1, 2, 3, 3]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'all': 1.0, 'old': 1.0, 'new': 1.0}
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, old_classes: int | Sequence[int], num_clusters: Optional[int] = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        num_clusters = num_classes if num_clusters is None else num_clusters
        if num_classes < 1 or num_clusters < 1:
            raise ValueError(f"ClusteringAccuracy: num_classes ({num_classes}) and num_clusters ({num_clusters}) must "
                             "be at least 1. Fix: pass the class count of the data and the head's cluster count.")
        old = list(range(old_classes)) if isinstance(old_classes, int) else sorted(set(int(c) for c in old_classes))
        if any(not 0 <= c < num_classes for c in old):
            raise ValueError(f"ClusteringAccuracy: old classes {old} are not all in [0, {num_classes}). Fix: name "
                             "classes by their index among the num_classes.")
        self.num_classes, self.num_clusters = num_classes, num_clusters
        is_old = torch.zeros(num_classes, dtype=torch.bool)
        is_old[old] = True
        self.register_buffer("is_old", is_old, persistent=False)
        self.add_state("contingency", torch.zeros(num_clusters, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count ``(N,)`` cluster ids ``preds`` against ``(N,)`` true classes ``target``."""
        preds, target = preds.flatten().long(), target.flatten().long()
        if preds.shape != target.shape:
            raise ValueError(f"ClusteringAccuracy: {preds.numel()} predictions for {target.numel()} targets. Fix: "
                             "pass one cluster id per sample.")
        for name, values, bound in (("cluster ids", preds, self.num_clusters), ("classes", target, self.num_classes)):
            if values.numel() and (values.min() < 0 or values.max() >= bound):
                raise ValueError(f"ClusteringAccuracy: {name} outside [0, {bound}) (got {int(values.min())}.."
                                 f"{int(values.max())}). Fix: pass true classes, not the -1 of unlabelled samples, "
                                 "and cluster ids below num_clusters.")
        cells = preds * self.num_classes + target
        counts = torch.bincount(cells, minlength=self.num_clusters * self.num_classes).view_as(self.contingency)
        # not in place: under ddp_spawn the processes receive the state in shared memory, and an
        # in-place add would write every rank's counts (and the parent's copy) into one tensor
        self.contingency = self.contingency + counts

    def compute(self) -> dict[str, Tensor]:
        """``{"all", "old", "new"}`` accuracies of the one assignment over all samples."""
        counts = self.contingency.cpu()
        mapping = cluster_to_class(counts)
        clusters = (mapping >= 0).nonzero().flatten()
        matched = torch.zeros(self.num_classes, dtype=torch.float64)
        matched[mapping[clusters]] = counts[clusters, mapping[clusters]].double()
        per_class = counts.sum(0).double()
        is_old = self.is_old.cpu()

        def accuracy(members: Tensor) -> Tensor:
            total = per_class[members].sum()
            return (matched[members].sum() / total if total > 0 else torch.tensor(float("nan"))).float()

        return {"all": accuracy(torch.ones_like(is_old)), "old": accuracy(is_old), "new": accuracy(~is_old)}
