"""KaLM-Embedding-V2's fine-tuning loss: focal-style reweighting and online hard-negative mixing
(Zhao et al., "KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile
Embedding Model", 2025), for the InfoNCE fine-tune of :class:`reglab.tasks.DenseRetrievalModule`.

The paper fine-tunes with InfoNCE over in-batch and mined hard negatives (the module's loss) and
adds two things, both here:

* **Focal-style reweighting**: with ``p_i`` the softmax probability InfoNCE gives query ``i``'s
  positive, the per-query loss ``-log p_i`` is weighted by ``(1 - p_i)^γ`` (the focal loss of Lin
  et al. 2017 applied to the contrastive softmax): queries already answered with confidence count
  little, hard ones nearly fully. ``γ = 0`` is plain InfoNCE. As in the focal loss, the weight is
  part of the loss (it is differentiated, not a detached coefficient).
* **Online hard-negative mixing**: more hard negatives, made in embedding space each step instead
  of mined offline: of the query's own mined hard negatives the ``top_k`` most similar to it are
  taken, and ``pair_mixes`` new negatives ``normalize(λ·n_a + (1 - λ)·n_b)`` (two distinct of
  them, ``λ ~ U(0, 1)``) and ``query_mixes`` harder ones ``normalize(β·q + (1 - β)·n_a)`` (``β ~
  U(0, 0.5)``, closer to the query than any real negative while still mostly negative) are added
  to that query's denominator only. The construction is MoCHi's (Kalantidis et al. 2020), which
  the paper's description — synthesizing hard negatives by mixing the hardest ones online —
  follows; as in MoCHi the synthetic points carry no gradient (only the query is moved by them).

The third part of the paper's recipe, a model soup of fine-tuned checkpoints, is
``reglab soup`` (:mod:`reglab.soups`) over runs with this technique; the ``dense_soup`` claims
protocol (:mod:`reglab.dense_retrieval_claims`) makes and tests one.

Source: the paper's method text. Its official repository (HITsz-TMG/KaLM-Embedding) holds the
V1 training code (InfoNCE with in-batch and hard negatives, ``train/losses.py``), with neither
reweighting nor mixing, so the defaults here are ours: ``γ = 2`` (Lin et al.'s), 4 + 4 mixes
from all of the query's mined negatives. The draws come from the global torch RNG, which the step
contract checkpoints, so resume is exact; the technique keeps no state.

Method card (what it does, when it helps, what it costs): ``kalm_embedding_v2.card.yaml``.

Example:
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> focal_infonce(logits, torch.tensor([0, 0]), gamma=0.0)  # plain cross-entropy
    tensor([0.1269, 2.1269])
    >>> focal_infonce(logits, torch.tensor([0, 0]), gamma=1.0)  # the easy query counts far less
    tensor([0.0151, 1.8734])
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.step import StepOutput
from reglab.tasks import DenseRetrievalModule
from reglab.technique import Technique


def focal_infonce(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """``(N,)`` focal-weighted InfoNCE ``-(1 - p_i)^γ log p_i``, ``p_i`` the softmax of row ``i`` of
    ``logits`` at column ``target[i]`` (``-inf`` entries are left out of the softmax)."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    return -(1.0 - log_p.exp()).clamp_min(0.0).pow(gamma) * log_p


def hardest_negatives(queries: Tensor, negatives: Tensor, k: int) -> Tensor:
    """``(N, k, D)``: of each query's ``(K, D)`` negatives the ``k`` most similar to it, most similar first."""
    order = torch.einsum("nd,nkd->nk", queries, negatives).topk(k, dim=1).indices
    return negatives.gather(1, order.unsqueeze(-1).expand(-1, -1, negatives.shape[-1]))


def interpolate(points: Tensor, first: Tensor, second: Tensor, weight: Tensor) -> Tensor:
    """``(N, H, D)`` unit vectors ``normalize(w·points[n, first] + (1 - w)·points[n, second])`` for
    ``(N, H)`` indices into each row's ``(M, D)`` points and ``(N, H)`` weights ``w``."""
    def pick(index: Tensor) -> Tensor:
        return points.gather(1, index.unsqueeze(-1).expand(-1, -1, points.shape[-1]))

    return F.normalize(weight.unsqueeze(-1) * pick(first) + (1 - weight.unsqueeze(-1)) * pick(second), dim=-1)


def mix_hard_negatives(queries: Tensor, hardest: Tensor, pair_mixes: int, query_mixes: int) -> Tensor:
    """``(N, pair_mixes + query_mixes, D)`` synthetic negatives (module docstring), drawn from the
    global torch RNG: mixes of two distinct of each query's ``(k, D)`` hardest negatives, then
    mixes of the query itself with one of them (its weight below 0.5)."""
    num, k = hardest.shape[:2]
    device = hardest.device
    points = torch.cat([hardest, queries.unsqueeze(1)], 1)  # index k is the query
    first = torch.randint(0, k, (num, pair_mixes), device=device)
    # a uniform draw among the k - 1 others: shift the ones at or after `first` up by one
    second = torch.randint(0, max(k - 1, 1), (num, pair_mixes), device=device)
    second = second + (second >= first).long() if k > 1 else first
    pairs = interpolate(points, first, second, torch.rand(num, pair_mixes, device=device))
    negative = torch.randint(0, k, (num, query_mixes), device=device)
    with_query = interpolate(points, torch.full_like(negative, k), negative,
                             0.5 * torch.rand(num, query_mixes, device=device))
    return torch.cat([pairs, with_query], 1)


class KaLMEmbeddingV2(Technique):
    """Replaces the dense retriever's InfoNCE by its focal-weighted form over the batch's candidates
    plus synthetic hard negatives mixed online (module docstring).

    Args:
        gamma: the focusing exponent ``γ`` (0: no reweighting).
        pair_mixes: negatives mixed from two hard negatives, per query and step.
        query_mixes: negatives mixed from the query and a hard negative, per query and step.
        top_k: how many of the query's hardest mined negatives are mixed (``None``: all of them).

    Example:
        >>> KaLMEmbeddingV2(gamma=2.0, pair_mixes=4, query_mixes=4).name
        'kalm_embedding_v2'
    """

    name = "kalm_embedding_v2"

    def __init__(self, gamma: float = 2.0, pair_mixes: int = 4, query_mixes: int = 4,
                 top_k: Optional[int] = None) -> None:
        if gamma < 0:
            raise ValueError(f"KaLMEmbeddingV2: gamma must be >= 0, got {gamma}. Fix: use 0 (no reweighting) or e.g. 2.")
        if pair_mixes < 0 or query_mixes < 0:
            raise ValueError(f"KaLMEmbeddingV2: pair_mixes and query_mixes must be >= 0, got {pair_mixes}, "
                             f"{query_mixes}. Fix: give counts such as 4 (0 turns that mixing off).")
        if top_k is not None and top_k < 1:
            raise ValueError(f"KaLMEmbeddingV2: top_k must be >= 1 or None (all), got {top_k}. Fix: use e.g. None.")
        self.gamma, self.pair_mixes, self.query_mixes, self.top_k = gamma, pair_mixes, query_mixes, top_k

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not isinstance(pl_module, DenseRetrievalModule):
            raise self.fail(f"{type(pl_module).__name__} is no dense bi-encoder with hard negatives",
                            "use it with reglab.tasks.DenseRetrievalModule (configs/experiment/text_dense_retrieval.yaml)")
        data = trainer.datamodule
        available = getattr(data, "num_hard_negatives", None)
        if self.pair_mixes + self.query_mixes and not available:
            raise self.fail("hard-negative mixing needs mined hard negatives, and the DataModule has none",
                            "set data.init_args.num_hard_negatives >= 1, or pair_mixes: 0 and query_mixes: 0")
        if self.pair_mixes and available == 1:
            raise self.fail("pair mixing needs two hard negatives per query, and the DataModule mines one",
                            "set data.init_args.num_hard_negatives >= 2, or pair_mixes: 0")
        if self.top_k is not None and available is not None and self.top_k > available:
            raise self.fail(f"top_k={self.top_k} is more than the {available} hard negatives mined per query",
                            f"set top_k <= {available}, or None (all of them)")

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        logits = out.logits
        if self.pair_mixes + self.query_mixes:
            queries, negatives = out.features, out.extras["hard_negatives"]
            k = negatives.shape[1] if self.top_k is None else self.top_k
            with torch.no_grad():
                mixed = mix_hard_negatives(queries, hardest_negatives(queries, negatives, k),
                                           self.pair_mixes, self.query_mixes)
            logits = torch.cat([logits, torch.einsum("nd,nhd->nh", queries, mixed) / out.extras["temperature"]], 1)
        return focal_infonce(logits, out.target, self.gamma)
