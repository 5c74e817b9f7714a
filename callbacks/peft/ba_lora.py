"""BA-LoRA — LoRA with consistency, diversity and SVD regularizers (Chang et al., paper 23).

LoRA (peft, see :mod:`reglab.callbacks.peft.lora`) plus three terms on the outputs ``F`` (``n x d``, one
row per sample of the batch) of the adapted network, with ``F0`` the frozen base model's outputs
on the same batch (the adapters switched off):

    L_CR  = mean over entries of (F/||F|| - F0/||F0||)^2          rows L2-normalised (consistency)
    L_DR  = (1/d) sum_{i != j} C_ij^2,   C = (F - mean F)^T (F - mean F) / (n - 1)     (diversity)
    L_SVD = - (sum_{i<=k} s_i) / (sum_i s_i),   s = singular values of F, descending   (top-k ratio)

    loss = task loss + lam_consistency * L_CR + lam_diversity * L_DR + lam_svd * L_SVD

These are the paper's natural-language-understanding forms (the official ``CustomTrainer`` of
github.com/cyp-jlu-ai/BA-LoRA, ``task_type="nlu"``); defaults are its weights, ``lam = 1e-4,
3e-4, 1e-4`` and ``k = 3``. The official ``svd_regularization`` indexes the singular values as
``s[:, :k]`` and ``s.size(1)`` — as if there were one row of singular values per sample — but
the SVD of the ``n x d`` output matrix has one vector ``s``, so the code fails on 2-D outputs;
this follows the paper: the top-k share of the output matrix's singular values.

The outputs are the features the task head reads (``StepOutput.features``): in the paper the
network's output layer belongs to the frozen base model, here the task head is new and trains,
so the adapted part's output — what the frozen base model's can be compared with — is the
features. The official script starts the adapters from PiSSA; here they start as LoRA's (B = 0),
so the frozen base model's outputs are exactly those with the adapters off. The base model's
forward runs in training mode (dropout and batch statistics as in the training forward) under
``no_grad``, without updating BatchNorm running statistics; the terms are computed in fp32.

Method card (what it does, when it helps, what it costs): ``ba_lora.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import BALoRA
    >>> ba_lora = BALoRA(r=8, k=3)   # regularizer weights default to the paper's
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.callbacks.peft.lora import LoRA
from reglab.callbacks.peft.mask_tuning import running_stats_kept
from reglab.mixins import StepOutput

#: keeps the singular-value ratio finite for an all-zero output matrix (official value)
RATIO_EPS = 1e-10


def consistency_loss(outputs: Tensor, base_outputs: Tensor) -> Tensor:
    """Mean squared difference of the row-normalised outputs."""
    return F.mse_loss(F.normalize(outputs, dim=-1), F.normalize(base_outputs, dim=-1))


def diversity_loss(outputs: Tensor) -> Tensor:
    """Sum of the squared off-diagonal entries of the outputs' covariance, divided by ``d``."""
    n, d = outputs.shape
    centered = outputs - outputs.mean(0)
    covariance = centered.T @ centered / (n - 1)
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    return off_diagonal.pow(2).sum() / d


def top_k_singular_loss(outputs: Tensor, k: int) -> Tensor:
    """``-(sum of the k largest singular values) / (sum of all)`` of the ``n x d`` outputs."""
    singular_values = torch.linalg.svdvals(outputs)  # descending
    return -singular_values[:k].sum() / (singular_values.sum() + RATIO_EPS)


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its frozen base model: every peft adapter layer passes through.

    Sets the flag peft's layers read in ``forward`` directly: peft's own ``enable_adapters``
    also switches ``requires_grad`` of the adapters, which must not change in the middle of a run.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    states = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer._disable_adapters = state


class BALoRA(LoRA):
    """LoRA with BA-LoRA's three output regularizers (see the module docstring).

    Args:
        r, lora_alpha, lora_dropout: LoRA's (see :class:`~reglab.callbacks.peft.lora.LoRA`).
        lam_consistency, lam_diversity, lam_svd: weights of L_CR, L_DR, L_SVD (official 1e-4, 3e-4, 1e-4).
        k: singular values in the top-k ratio (official 3).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "ba_lora"

    needs = frozenset({"features"})

    def __init__(self, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 lam_consistency: float = 1e-4, lam_diversity: float = 3e-4, lam_svd: float = 1e-4, k: int = 3,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if k < 1 or min(lam_consistency, lam_diversity, lam_svd) < 0:
            raise ValueError(f"BALoRA: k must be >= 1 and the weights >= 0, got k={k}, "
                             f"lam=({lam_consistency}, {lam_diversity}, {lam_svd})")
        super().__init__(r, lora_alpha, lora_dropout, target_modules, pretrained_checkpoint)
        self.lam_consistency, self.lam_diversity, self.lam_svd, self.k = lam_consistency, lam_diversity, lam_svd, k

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if len(out.features) < 2:
            raise self.fail("the diversity term needs a covariance over at least 2 samples per batch",
                            "use a batch size of 2 or more")
        with torch.no_grad(), adapters_off(module), running_stats_kept(module):
            base_features = module.forward_step(out.batch).features
        with torch.autocast(out.features.device.type, enabled=False):
            features = out.features.float().flatten(1)
            base_features = base_features.float().flatten(1)
            return {
                "consistency": self.lam_consistency * consistency_loss(features, base_features),
                "diversity": self.lam_diversity * diversity_loss(features),
                "svd": self.lam_svd * top_k_singular_loss(features, self.k),
            }
