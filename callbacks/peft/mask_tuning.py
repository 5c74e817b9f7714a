"""Regularized Mask Tuning — binary masks over the pretrained weights (ICCV 2023, paper 36).

Every chosen pretrained weight ``W`` stays frozen; a real-valued mask ``M`` of the same shape
(initialised at ``mask_init`` = 1e-2) trains, and the layer uses

    W' = binarize(M) * W,      binarize(M) = 1[M > threshold]   (threshold 5e-3)

with a straight-through estimator (the gradient w.r.t. ``binarize(M)`` is passed to ``M`` as is).
The masks start above the threshold, so ``W' = W`` at the start. The loss adds

    L_mask = mask_weight * sum over layers of ||M||_2          (mask_weight 1e-4)

— the plain (not squared) L2 norm, as the official code (``loss/reg_loss.py``, ``RegLoss(param, 2)``).

Gradient dropout (the paper's "GDR", ``graddrop_backward_and_update`` of the official code,
github.com/wuw2019/R-AMT): with ``a`` the gradient w.r.t. a mask of the whole training loss (task
loss, mask penalty and the terms of stacked techniques) and ``b`` that of the distillation loss to
the pretrained model,

    b = d/dM  KL-term,   KL-term = mean_n  -sum_c softmax(z0_n)_c log softmax(z_n)_c
    P = (sign(a) * (a + b) / (|a| + |b| + eps) + 1) / 2          (per element, eps = 1e-8)
    grad_M = a * 1[P > U],   U ~ Uniform(0, 1)

``z0`` are the pretrained model's logits (masks off) on the same batch, ``z`` the masked model's.
The KL term is the official code's (``KLLoss`` at T = 1: cross-entropy to the pretrained model's
probabilities, which differs from KL(pretrained ‖ model) by a constant); it only decides which
elements of ``a`` survive, it is never added to the loss. An element is kept surely when both
gradients agree in sign (or ``b = 0``: at the start, where the model is the pretrained one) and
dropped more often the more the KL gradient opposes it. The drop is applied by a gradient hook on
each mask (before accumulation and before DDP averages gradients), so no ``requires_grad`` changes.

The pretrained model's forward runs in the same mode as the training forward (so dropout and
batch statistics match), under ``no_grad``, without updating the BatchNorm running statistics.

Method card:
    what it does: selects, per task, which pretrained weights to switch off (binary masks),
        steered away from updates that move the model from its pretrained predictions;
    when it helps: adapting a strong pretrained model with little data while keeping what it knew
        (paper: beats a linear probe and forgets less than full fine-tuning);
    what it costs: one mask per weight (stored as bits after training: ``merge`` folds them in),
        one extra forward (pretrained model) and one extra backward (KL gradient) per step.

Example:
    >>> from reglab.callbacks.peft import RegularizedMaskTuning
    >>> masks = RegularizedMaskTuning(target_modules=["qkv"])   # masks on the attention projections
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.mixins import StepOutput
from reglab.peft_surgery import replace_module

#: keeps the sign-agreement ratio finite when both gradients are zero (official value)
GRADIENT_EPS = 1e-8


def binarize(mask: Tensor, threshold: float) -> Tensor:
    """``1[mask > threshold]`` in the forward pass, identity gradient (straight-through)."""
    hard = (mask > threshold).to(mask.dtype)
    return mask + (hard - mask).detach()


def keep_probability(task_grad: Tensor, kl_grad: Tensor, eps: float = GRADIENT_EPS) -> Tensor:
    """``P = (sign(a) (a + b) / (|a| + |b| + eps) + 1) / 2``: 1 where the gradients agree in
    sign, falling towards 0 the more the KL gradient ``b`` opposes the task gradient ``a``."""
    agreement = torch.sign(task_grad) * (task_grad + kl_grad) / (task_grad.abs() + kl_grad.abs() + eps)
    return (agreement + 1) / 2


def soft_cross_entropy(logits: Tensor, reference_logits: Tensor) -> Tensor:
    """``mean_n -sum_c softmax(reference)_c log softmax(logits)_c`` in fp32."""
    return -(reference_logits.float().softmax(-1) * logits.float().log_softmax(-1)).sum(-1).mean()


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers leave their running statistics alone inside the block (in training mode
    they still normalise with the batch's): a forward pass of the frozen reference model must not
    move them. No buffer is written, so the training forward's autograd graph, which saved them,
    stays valid."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


class MaskedLayer(nn.Module):
    """``base_layer`` with its weight replaced by ``binarize(mask) * weight`` (see the module
    docstring). Offers ``merge()`` / ``get_base_layer()`` like peft's layers, so
    :func:`reglab.peft_surgery.merge_adapters` folds the binary mask into the weight."""

    def __init__(self, base_layer: nn.Module, mask_init: float, threshold: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mask = nn.Parameter(torch.full_like(base_layer.weight, mask_init, dtype=torch.float32))
        self.threshold = threshold
        #: off while the pretrained model's outputs are computed
        self.masking = True
        self.merged = False

    def masked_weight(self) -> Tensor:
        weight = self.base_layer.weight
        return binarize(self.mask, self.threshold).to(weight.dtype) * weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.masking:
            return self.base_layer(x)
        return functional_call(self.base_layer, {"weight": self.masked_weight()}, (x,))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.copy_(self.masked_weight())
            self.merged = True

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


class RegularizedMaskTuning(ParameterEfficientFineTuning):
    """Train binary masks over the chosen pretrained weights with gradient dropout (see the
    module docstring). The task head trains as usual.

    Args:
        mask_init: initial value of every real-valued mask (official 1e-2).
        threshold: a weight is kept where its mask exceeds this (official 5e-3).
        mask_weight: weight of the masks' L2-norm penalty (official 1e-4).
        gradient_dropout: drop mask-gradient elements against the KL gradient (official: on).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "mask_tuning"
    fsdp_unsupported = "its gradient hooks pair each mask with a gradient of the full layer, which FSDP shards"

    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, mask_init: float = 1e-2, threshold: float = 5e-3, mask_weight: float = 1e-4,
                 gradient_dropout: bool = True, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if mask_init <= threshold:
            raise ValueError(
                f"RegularizedMaskTuning: mask_init ({mask_init}) must exceed threshold ({threshold}), or every "
                "weight starts switched off. Fix: use the official 1e-2 and 5e-3"
            )
        if mask_weight < 0:
            raise ValueError(f"RegularizedMaskTuning: mask_weight must be >= 0, got {mask_weight}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.mask_init, self.threshold, self.mask_weight = mask_init, threshold, mask_weight
        self.gradient_dropout = gradient_dropout
        self.layers: list[MaskedLayer] = []
        #: KL gradients of the current step, consumed by the mask hooks in the next backward
        self._kl_grads: dict[int, Tensor] = {}

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        self.layers = []
        for name in layer_names:
            layer = MaskedLayer(module.get_submodule(name), self.mask_init, self.threshold)
            replace_module(module, name, layer)
            layer.mask.register_hook(functools.partial(self._drop_gradient, len(self.layers)))
            self.layers.append(layer)

    def _drop_gradient(self, position: int, task_grad: Tensor) -> Tensor:
        kl_grad = self._kl_grads.pop(position, None)
        if kl_grad is None:  # no KL gradient this step (dropout off, or a backward outside training)
            return task_grad
        keep = keep_probability(task_grad, kl_grad) > torch.rand_like(task_grad)
        return task_grad * keep

    @contextmanager
    def masks_off(self) -> Iterator[None]:
        for layer in self.layers:
            layer.masking = False
        try:
            yield
        finally:
            for layer in self.layers:
                layer.masking = True

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        self._kl_grads.clear()
        if self.gradient_dropout:
            with torch.no_grad(), self.masks_off(), running_stats_kept(module):
                reference_logits = module.forward_step(out.batch).logits
            kl = soft_cross_entropy(out.logits, reference_logits)
            masks = [layer.mask for layer in self.layers]
            grads = torch.autograd.grad(kl, masks, retain_graph=True, allow_unused=True)
            # set after autograd.grad, whose pass runs the hooks too: they must let it through
            self._kl_grads = {i: g for i, g in enumerate(grads) if g is not None}
            module.log(f"train/{self.name}/kl_to_pretrained", kl.detach())
        norms = torch.stack([layer.mask.float().norm(2) for layer in self.layers])
        return {"mask_l2": self.mask_weight * norms.sum()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._kl_grads.clear()  # e.g. a step whose backward was skipped
