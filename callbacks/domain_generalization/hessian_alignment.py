"""Hessian alignment — align the classifier head's Hessians and gradients across training domains
(Hemati, Zhang, Estiri & Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV 2023).

For every training domain ``e`` of the batch (``batch["domain"]``), with ``L_e`` the cross-entropy of
its samples, ``g_e = dL_e/dw`` and ``H_e = d^2 L_e/dw^2`` over the classifier head's parameters ``w``
only, and ``ḡ``, ``H̄`` their means over the batch's domains::

    loss = task loss + (1/E) sum_e [ alpha * ||c_e - c̄||^2 + beta * ||g_e - ḡ||^2 ]

where the Hessian is never formed: ``c_e`` stands for it through

* ``estimator="hgp"`` (Hessian-gradient product): ``c_e = H_e g_e``, the gradient of
  ``||g_e||^2 / 2``, and ``c̄ = H̄ ḡ``;
* ``estimator="hutchinson"``: ``c_e = mean_s z_s * (H_e z_s)``, Hutchinson's estimate of the
  diagonal of ``H_e`` from ``samples`` Rademacher probes ``z_s`` (``E[z * Hz] = diag(H)``), and
  ``c̄ = mean_e c_e``.

``c̄`` and ``ḡ`` are constants of the penalty (detached), as in the official code; ``c_e`` and ``g_e``
are differentiated again, so the final backward is a double backward through the head's gradients
(``torch.autograd.grad(..., create_graph=True)``), which reaches the backbone through the features.

**Around the Triton kernel.** The step's task loss takes soft targets (label smoothing, mixup stacked
before this technique) through :func:`reglab.kernels.soft_cross_entropy`, whose fused Triton backward
runs once and cannot be differentiated again. The per-domain losses here are computed separately with
``cross_entropy_per_sample(..., implementation="torch")`` (``F.cross_entropy`` for hard targets, the
torch reference for soft ones; both have a double backward), so the task loss keeps the kernel on a
GPU and only the penalty's losses avoid it.

Source followed: the official code, ``huawei-noah/Federated-Learning``, ``HessianAlignment/domainbed/
algorithms.py`` (classes ``HGP``, ``Hutchinson``) and ``hparams_registry.py`` (defaults: HGP
``alpha = 1e-4``, ``beta = 5e-3``; Hutchinson ``alpha = 1e-3``, ``beta = 5e-3``, 300 probes, from
``calc_hessian_diag(..., repeat=300)``). Where this differs:

* HGP: the official code writes ``H g`` as ``||g|| * d||g||/dw`` (with ``1e-16`` added to every
  gradient entry); here it is ``d(||g||^2/2)/dw``, the same vector without the square root's
  singularity at ``g = 0``.
* Hutchinson: one set of probes for every domain of the step (the official code draws new ones per
  call), so ``c_e - c̄`` estimates ``diag(H_e - H̄)`` with less variance, and ``c̄`` is the mean of the
  ``c_e`` instead of one more estimate.
* One forward over the whole batch (the step contract's), not one per domain: batch-norm statistics
  are the batch's, not each domain's.
* The cross-entropy is the classification loss whose Hessians are aligned even if another technique
  replaces the task loss (the paper's analysis is of the cross-entropy's head Hessian).

A batch with fewer than two domains has nothing to align: both terms are 0 for it. Logs
``train/hessian_alignment/hessian`` and ``train/hessian_alignment/gradient`` (both weighted).

Method card (what it does, when it helps, what it costs): ``hessian_alignment.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import HessianAlignment
    >>> HessianAlignment().alpha, HessianAlignment("hutchinson").alpha
    (0.0001, 0.001)
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.nn.domain_groups import domain_masks
from reglab.step import cross_entropy_per_sample
from reglab.technique import Technique

#: (alpha, beta) of the official hparams_registry per estimator
DEFAULTS = {"hgp": (1e-4, 5e-3), "hutchinson": (1e-3, 5e-3)}


def flat_grad(output: Tensor, params: Sequence[Tensor], create_graph: bool) -> Tensor:
    """``d output / d params`` as one flat vector (the graph kept for later derivatives)."""
    grads = torch.autograd.grad(output, params, create_graph=create_graph, retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def hessian_gradient_product(grad: Tensor, params: Sequence[Tensor], create_graph: bool = True) -> Tensor:
    """``H g`` for ``g = grad`` (a flat gradient built with ``create_graph=True``): the gradient of
    ``||g||^2 / 2``, since ``d(g.g/2)/dw = (dg/dw)^T g = H g``."""
    return flat_grad(0.5 * grad.square().sum(), params, create_graph)


def hutchinson_diagonal(grad: Tensor, params: Sequence[Tensor], probes: Tensor, create_graph: bool = True) -> Tensor:
    """Hutchinson's estimate ``mean_s z_s * (H z_s)`` of ``diag(H)`` for the ``(S, P)`` ``probes``,
    ``H`` the Jacobian of the flat gradient ``grad``. All ``S`` Hessian-vector products in one batched
    backward (``is_grads_batched``); ``H z`` is the vector-Jacobian product ``z^T H`` (``H`` symmetric)."""
    products = torch.autograd.grad(grad, params, grad_outputs=probes, is_grads_batched=True,
                                   create_graph=create_graph, retain_graph=True)
    return (probes * torch.cat([p.flatten(1) for p in products], dim=1)).mean(0)


def rademacher(samples: int, like: Tensor) -> Tensor:
    """``(samples, like.numel())`` random signs ±1 in ``like``'s dtype and device (global RNG, which
    the step contract checkpoints, so a resumed run draws the same probes)."""
    return torch.randint(0, 2, (samples, like.numel()), device=like.device).to(like.dtype).mul_(2).sub_(1)


class HessianAlignment(Technique):
    """Penalize the spread of the head's Hessians (HGP or Hutchinson) and gradients across the
    batch's domains (see the module docstring).

    Args:
        estimator: ``"hgp"`` (Hessian-gradient products) or ``"hutchinson"`` (Hessian diagonals).
        alpha: weight of the Hessian term; default the official one of the estimator.
        beta: weight of the gradient term.
        samples: Rademacher probes per step for ``"hutchinson"``.
        head: the module's attribute holding the classifier head (``ClassificationModule.head``).
    """

    name = "hessian_alignment"
    needs = frozenset({"domain"})

    def __init__(self, estimator: str = "hgp", alpha: float | None = None, beta: float = 5e-3,
                 samples: int = 300, head: str = "head") -> None:
        if estimator not in DEFAULTS:
            raise ValueError(f"HessianAlignment: estimator must be one of {sorted(DEFAULTS)}, got {estimator!r}")
        alpha = DEFAULTS[estimator][0] if alpha is None else alpha
        if alpha < 0 or beta < 0:
            raise ValueError(f"HessianAlignment: alpha and beta must be >= 0, got {alpha} and {beta}")
        if samples < 1:
            raise ValueError(f"HessianAlignment: samples must be >= 1, got {samples}")
        self.estimator, self.alpha, self.beta, self.samples, self.head = estimator, alpha, beta, samples, head

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.head_parameters(pl_module)

    def head_parameters(self, module: nn.Module) -> list[Tensor]:
        """The trainable parameters of the module's head; a clear error if there is none."""
        head = getattr(module, self.head, None)
        params = [p for p in head.parameters() if p.requires_grad] if isinstance(head, nn.Module) else []
        if not params:
            children = [name for name, _ in module.named_children()]
            raise self.fail(
                f"{type(module).__name__}.{self.head} is not a module with trainable parameters (its children: {children})",
                "pass head=<the attribute of the classifier layer> (ClassificationModule's is `head`; a backbone "
                "that brings its own head has none)",
            )
        return params

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        groups = domain_masks(out.batch["domain"])[0].bool()
        if len(groups) < 2:
            zero = out.logits.new_zeros((), dtype=torch.float32)
            return {"hessian": zero, "gradient": zero}
        params = self.head_parameters(module)
        per_sample = cross_entropy_per_sample(out.logits, out.target, implementation="torch")
        try:
            grads = [flat_grad(per_sample[group].mean(), params, create_graph=True) for group in groups]
        except RuntimeError as error:
            if "not have been used in the graph" not in str(error):
                raise
            raise self.fail(
                f"the step's logits do not depend on {type(module).__name__}.{self.head}, so its Hessian says nothing "
                "about them", "pass head=<the layer that computes the logits>") from error
        mean_grad = torch.stack(grads).mean(0)
        if self.estimator == "hgp":
            curvatures = [hessian_gradient_product(g, params) for g in grads]
            target = hessian_gradient_product(mean_grad, params, create_graph=False)
        else:
            probes = rademacher(self.samples, mean_grad)
            curvatures = [hutchinson_diagonal(g, params, probes) for g in grads]
            target = torch.stack(curvatures).mean(0).detach()
        mean_grad = mean_grad.detach()
        hessian = torch.stack([(c - target).square().sum() for c in curvatures]).mean()
        gradient = torch.stack([(g - mean_grad).square().sum() for g in grads]).mean()
        return {"hessian": self.alpha * hessian, "gradient": self.beta * gradient}
