"""Retrieval metrics of metric learning: every sample queries all the others, same class = relevant.

:class:`RecallAtK` reports what PyTorch Metric Learning's ``AccuracyCalculator`` and the metric
learning papers report (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020), with the
query set equal to the gallery and the query itself left out of its own ranking:

* ``recall_at_<k>``: share of queries with at least one same-class sample among their ``k``
  nearest neighbours (the "Recall@k" of the deep metric learning papers; torchmetrics calls it the
  hit rate); ``recall_at_1`` is PML's ``precision_at_1``;
* ``map_at_r``: mean over queries of the average precision over their first ``R`` neighbours,
  ``R`` the number of other samples of the query's class (PML's ``mean_average_precision_at_r``);
* ``mrr``: mean reciprocal rank of the first same-class neighbour (PML's ``mean_reciprocal_rank``).

Queries whose class has no other sample are left out (PML's "lone query labels").

Written by hand rather than with torchmetrics' ``RetrievalHitRate`` / ``RetrievalMAP``: those take
one flat list of (query, document, score) rows, N² of them here, and their MAP is not MAP@R (its
cut-off is one ``top_k`` for all queries, MAP@R's is each query's own ``R``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

#: queries ranked at once; bounds the (chunk, N) similarity block in memory
QUERY_CHUNK = 1024


class EmbeddingStore(Metric):
    """A metric over every embedding of the split at once: ``update(embeddings, labels, index)``
    stores the batch, :meth:`samples` hands ``compute`` each sample once.

    Under DDP the states are gathered (``dist_reduce_fx="cat"``) and samples are de-duplicated by
    ``index``: a distributed evaluation sampler pads the ranks with repeated samples, and a repeat
    would be a perfect same-class neighbour of itself.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for state in ("embeddings", "labels", "index"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor, index: Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach())
        self.index.append(index.detach())

    def samples(self) -> tuple[Tensor, Tensor]:
        """The stored ``(embeddings, labels)``, each sample (by ``index``) once."""
        embeddings, labels, index = (dim_zero_cat(state) for state in (self.embeddings, self.labels, self.index))
        _, first = unique_first(index)
        return embeddings[first], labels[first]


class RecallAtK(EmbeddingStore):
    """Recall@k, MAP@R and MRR of cosine-similarity retrieval among the samples seen (module docstring).

    ``update(embeddings, labels, index)`` stores the batch; ``compute()`` ranks every sample
    against all the others, each sample once under DDP (:class:`EmbeddingStore`).

    Args:
        ks: the cut-offs of ``recall_at_<k>``.

    Example:
        >>> metric = RecallAtK(ks=(1, 2))
        >>> embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.6, -0.8], [0.2, 0.9]])
        >>> metric.update(embeddings, torch.tensor([0, 0, 1, 1, 1]), torch.arange(5))
        >>> {name: round(value.item(), 3) for name, value in metric.compute().items()}
        {'recall_at_1': 0.2, 'recall_at_2': 0.6, 'map_at_r': 0.2, 'mrr': 0.517}
    """

    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"RecallAtK: ks must be positive cut-offs, got {list(ks)}. Fix: e.g. ks=[1, 2, 4, 8].")
        self.ks = sorted({int(k) for k in ks})

    def compute(self) -> dict[str, Tensor]:
        return retrieval_scores(*self.samples(), self.ks)


def unique_first(values: Tensor) -> tuple[Tensor, Tensor]:
    """The unique values and the position of each one's first occurrence."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(len(values), device=values.device)
    first = torch.full((len(unique),), len(values), device=values.device, dtype=positions.dtype)
    return unique, first.scatter_reduce(0, inverse, positions, reduce="amin")


def retrieval_scores(embeddings: Tensor, labels: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """``recall_at_<k>`` for each ``k``, ``map_at_r`` and ``mrr`` of the samples against each other."""
    embeddings = F.normalize(embeddings.float(), dim=-1)
    n = len(labels)
    relevant_counts = (labels[:, None] == labels[None, :]).sum(1) - 1
    depth = min(n - 1, max(max(ks), int(relevant_counts.max().clamp(min=1))))
    hits, average_precision, reciprocal_rank = [], [], []
    for start in range(0, n, QUERY_CHUNK):
        rows = torch.arange(start, min(start + QUERY_CHUNK, n), device=labels.device)
        similarity = embeddings[rows] @ embeddings.T
        similarity[torch.arange(len(rows)), rows] = -float("inf")  # a query does not retrieve itself
        neighbours = similarity.topk(depth, dim=1).indices
        match = labels[neighbours] == labels[rows, None]
        hits.append(torch.stack([match[:, :k].any(1) for k in ks], dim=1))
        r = relevant_counts[rows]
        ranks = torch.arange(1, depth + 1, device=labels.device)
        within_r = ranks[None, :] <= r[:, None]
        precision = match.cumsum(1) / ranks
        average_precision.append((precision * match * within_r).sum(1) / r.clamp(min=1))
        # the first relevant neighbour's rank counts every other-class sample more similar than the
        # query's most similar same-class one: exact at any depth
        same = labels[None, :] == labels[rows, None]
        best_relevant = similarity.masked_fill(~same, -float("inf")).amax(1, keepdim=True)
        reciprocal_rank.append(1.0 / (1 + ((similarity > best_relevant) & ~same).sum(1)))
    keep = relevant_counts > 0
    if not keep.any():
        raise ValueError("RecallAtK: no class has two samples, so no query has a relevant neighbour. Fix: evaluate "
                         "on a split with at least two samples of some class.")
    hit = torch.cat(hits)[keep].float().mean(0)
    scores = {f"recall_at_{k}": hit[i] for i, k in enumerate(ks)}
    scores["map_at_r"] = torch.cat(average_precision)[keep].mean()
    scores["mrr"] = torch.cat(reciprocal_rank)[keep].mean()
    return scores
