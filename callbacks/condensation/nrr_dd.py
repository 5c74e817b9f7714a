"""NRR-DD: non-critical region refinement dataset distillation (Tran et al., paper 45).

A teacher (the same small CNN, trained on the real training set) does three things:

1. **representative selection** (as RDED, the method NRR-DD builds on): for each class the ``ipc``
   real images the teacher classifies with the lowest cross-entropy;
2. **non-critical region refinement**: the teacher's Grad-CAM map of its last conv block marks the
   ``critical_fraction`` most activated pixels of each image as critical (instance-specific
   detail, kept as they are); the other pixels are optimised (Adam, ``refine_steps`` steps at
   ``refine_lr``, clamped to [0, 1]) to carry class-general information: the teacher's
   cross-entropy on the image plus ``bn_weight`` times the distance of the batch's feature
   statistics to the teacher's batch-norm statistics (SRe2L's BN matching, which the NRR-DD paper
   uses as its class-general objective);
3. **distance-based representative (DBR) transfer**: each image keeps the distance between the
   teacher's prediction and its one-hot label, and the student adds
   :class:`reglab.condensation.distance_transfer.DistanceTransfer` to its cross-entropy, in place of
   stored soft labels.

Source: the paper's method text (abstract and method section); the official code
(github.com/tmtuan1307/NRR-DD) could not be fetched here. Deviations: whole 8x8 images instead of
RDED's multi-patch crops (an 8x8 digit has no room for patches); one stored distance per image
where the paper stores two (one per view of its augmentation pipeline, which the student here
does not use); the teacher trains ``teacher_epochs`` epochs with Adam.

Example:
    >>> import torch
    >>> images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    >>> condensed = NRRDD(teacher_epochs=1, refine_steps=2).condense(images, labels, ipc=2, seed=0)
    >>> condensed.images.shape, sorted(condensed.extras)
    (torch.Size([4, 1, 8, 8]), ['label_distance'])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.condensation.distance_transfer import KEY, DistanceTransfer, label_distance
from reglab.condensation.pipeline import (
    CHANNELS,
    CondensationError,
    CondensationMethod,
    CondensedSet,
    class_labels,
    fit_classifier,
)
from reglab.datamodules.base import DictDataset
from reglab.technique import Technique


def grad_cam(net: nn.Module, layer: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Grad-CAM maps of ``labels``' logits at ``layer``, upsampled to the images' size and scaled to
    [0, 1] per image: ``relu(sum_k mean(dlogit/dA_k) A_k)``."""
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = net(images)
    finally:
        handle.remove()
    activation = captured[0]
    (grads,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), activation)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return cam / peak


def critical_mask(cam: Tensor, fraction: float) -> Tensor:
    """1 on each map's ``fraction`` highest pixels (at least one), 0 elsewhere."""
    flat = cam.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    return (flat >= threshold).float().view_as(cam)


def batch_norm_matching(net: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's logits on ``images`` and the sum over its batch-norm layers of
    ``||mean - running_mean||_2 + ||var - running_var||_2`` of the layers' inputs (SRe2L)."""
    losses: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        losses.append((x.mean(dims) - module.running_mean).norm() + (x.var(dims, unbiased=False) - module.running_var).norm())

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        logits = net(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, sum(losses)


class NRRDD(CondensationMethod):
    """Representative selection, non-critical region refinement and DBR transfer (module docstring).

    Args:
        critical_fraction: share of each image's pixels kept as the critical region.
        refine_steps, refine_lr: Adam on the non-critical pixels.
        bn_weight: weight of the batch-norm statistics term in the refinement.
        dbr_weight: weight of the student's distance-transfer term.
        teacher_epochs, teacher_lr: the teacher's training on the real set (Adam, batches of 256).
        channels: the small CNN's widths (teacher and student).
    """

    name = "nrr_dd"

    def __init__(self, critical_fraction: float = 0.5, refine_steps: int = 100, refine_lr: float = 0.05,
                 bn_weight: float = 0.01, dbr_weight: float = 1.0, teacher_epochs: int = 30, teacher_lr: float = 3e-3,
                 channels: Sequence[int] = CHANNELS) -> None:
        if not 0.0 <= critical_fraction <= 1.0:
            raise CondensationError(f"NRRDD: critical_fraction={critical_fraction} is not a share of pixels. "
                                    "Fix: use a value in [0, 1].")
        self.critical_fraction, self.refine_steps, self.refine_lr = critical_fraction, refine_steps, refine_lr
        self.bn_weight, self.dbr_weight = bn_weight, dbr_weight
        self.teacher_epochs, self.teacher_lr, self.channels = teacher_epochs, teacher_lr, tuple(channels)

    def teacher(self, images: Tensor, labels: Tensor, seed: int) -> nn.Module:
        model = fit_classifier(DictDataset(images, labels), seed, self.teacher_epochs, self.teacher_lr, self.channels)
        return model.eval().requires_grad_(False)

    def condense(self, images: Tensor, labels: Tensor, ipc: int, seed: int) -> CondensedSet:
        self.check_ipc(self.name, labels, ipc)
        teacher = self.teacher(images, labels, seed)
        with torch.no_grad():
            losses = F.cross_entropy(teacher(images), labels, reduction="none")
        num_classes = int(labels.max()) + 1
        chosen = torch.cat([torch.nonzero(labels == c).flatten()[losses[labels == c].argsort()[:ipc]]
                            for c in range(num_classes)])
        start, targets = images[chosen], class_labels(num_classes, ipc)
        last_conv = [m for m in teacher.backbone.modules() if isinstance(m, nn.ReLU)][-1]
        keep = critical_mask(grad_cam(teacher, last_conv, start.clone().requires_grad_(True), targets),
                             self.critical_fraction)
        free = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([free], lr=self.refine_lr)
        for _ in range(self.refine_steps):
            logits, statistics = batch_norm_matching(teacher, keep * start + (1 - keep) * free)
            loss = F.cross_entropy(logits, targets) + self.bn_weight * statistics
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                free.clamp_(0.0, 1.0)
        refined = (keep * start + (1 - keep) * free).detach()
        with torch.no_grad():
            distances = label_distance(teacher(refined).softmax(-1), targets)
        return CondensedSet(refined, targets, self.name, ipc, {KEY: distances})

    def student_techniques(self, condensed: CondensedSet) -> list[Technique]:
        return [DistanceTransfer(self.dbr_weight)]
