"""Per-domain groups of a batch whose samples carry ``batch["domain"]``.

DomainBed (github.com/facebookresearch/DomainBed, ``domainbed/algorithms.py``) hands every
algorithm one minibatch per training domain. Here a batch is one tensor; :func:`domain_masks`
turns its ``domain`` into a ``(G, N)`` 0/1 matrix, one row per domain present in the batch (in
increasing domain order), so a per-domain quantity is a matrix product (:func:`group_means`)
instead of a Python loop over minibatches. With the domain-balanced training loader of the
multi-domain scenario every row has the same number of samples, DomainBed's equal minibatches.
Shared by the DomainBed baselines and the domain-generalization family.

Example:
    >>> import torch
    >>> masks, ids = domain_masks(torch.tensor([2, 0, 2, 0, 2]))
    >>> ids.tolist(), masks.tolist()
    ([0, 2], [[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])
"""

from __future__ import annotations

from torch import Tensor


def domain_masks(domain: Tensor, min_size: int = 1) -> tuple[Tensor, Tensor]:
    """``(G, N)`` fp32 membership of the samples in the ``G`` domains present with at least
    ``min_size`` samples, and those domains' ids (increasing)."""
    ids, counts = domain.unique(return_counts=True)
    ids = ids[counts >= min_size]
    return (domain.unsqueeze(0) == ids.unsqueeze(1)).float(), ids


def group_means(masks: Tensor, values: Tensor) -> Tensor:
    """``(G, ...)`` mean of ``values`` (``(N, ...)``) over each group's samples."""
    sums = (masks @ values.reshape(len(values), -1)).view(len(masks), *values.shape[1:])
    return sums / masks.sum(1).view(-1, *[1] * (values.dim() - 1))
