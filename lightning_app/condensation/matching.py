"""Gradient matching, the optimisation loop shared by DC (Zhao et al., 2021) and DCC (paper 42).

Follows the official DC code (github.com/VICO-UoE/DatasetCondensation, ``main.py`` and
``utils.py``): for every iteration a freshly initialised network; ``outer_loop`` times: freeze the
batch-norm statistics on 16 real images per class, compute the matching loss between the
gradients of the network's loss on real and on synthetic images, one SGD step on the synthetic
images (momentum 0.5), then ``inner_loop`` SGD steps (lr 0.01) of the network on the
synthetic set; the loops per ``ipc`` are the code's ``get_loops`` (1: 1/1, 10: 10/50, 20: 20/25,
30: 30/20, 40: 40/15, 50: 50/10). The distance is the code's default ``dis_metric='ours'``
(:func:`layerwise_distance`). What changes between the methods is :meth:`GradientMatching.matching_loss`.

Deviations, for 8x8 digits on a CPU: 200 iterations instead of 1000 (``iterations``); the network
is reglab's small CNN (two conv blocks with batch norm) instead of the 128-wide ConvNet with
instance norm; images are in [0, 1] rather than standardised, so the noise initialisation is
``U(0, 1)`` rather than ``N(0, 1)``; the synthetic images' learning rate is 0.001 instead of 0.1
(measured on the digits, seed 0, 60 iterations: at 0.1 and 0.01 the matching loss rises from one
fresh network to the next and the pixels leave [0, 1] (up to 11 at 0.1); at 0.001 it falls
steadily); the frozen batch-norm statistics are exactly the real batch's (:func:`freeze_batch_norm`).

Example:
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(float(layerwise_distance([a], [a])), 4)  # identical gradients (up to the 1e-6 guard)
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.condensation.pipeline import (
    CHANNELS,
    CondensationError,
    CondensationMethod,
    CondensedSet,
    class_labels,
    network,
    per_class,
    sample,
)

#: the official code's (outer_loop, inner_loop) per images per class
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
#: real images per class that set the frozen batch-norm statistics (the code's BNSizePC)
BN_IMAGES_PER_CLASS = 16


def layerwise_distance(gw_syn: Sequence[Tensor], gw_real: Sequence[Tensor]) -> Tensor:
    """DC's gradient distance: for each weight tensor, reshaped to (outputs, rest), the sum over
    outputs of ``1 - cos(real row, synthetic row)``; 1-d tensors (biases, norm scales) add nothing,
    as in the official code."""
    total = gw_real[0].new_zeros(())
    for syn, real in zip(gw_syn, gw_real):
        if real.dim() == 1:
            continue
        syn, real = syn.reshape(len(syn), -1), real.reshape(len(real), -1)
        total = total + (1 - (syn * real).sum(-1) / (syn.norm(dim=-1) * real.norm(dim=-1) + 1e-6)).sum()
    return total


def class_gradients(net: nn.Module, params: list[Tensor], images: Tensor, label: int, create_graph: bool) -> tuple[Tensor, ...]:
    """Gradients of the mean cross-entropy of ``images`` (all of class ``label``) w.r.t. ``params``."""
    loss = F.cross_entropy(net(images), torch.full((len(images),), label, dtype=torch.long))
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return grads if create_graph else tuple(g.detach() for g in grads)


def gradients_per_class(net: nn.Module, params: list[Tensor], real: list[Tensor], synthetic: list[Tensor]
                        ) -> tuple[list[tuple[Tensor, ...]], list[tuple[Tensor, ...]]]:
    """Each class's gradients on its synthetic images (differentiable) and on its real ones (detached)."""
    return ([class_gradients(net, params, s, c, create_graph=True) for c, s in enumerate(synthetic)],
            [class_gradients(net, params, r, c, create_graph=False) for c, r in enumerate(real)])


def classwise_distance(syn: list[Sequence[Tensor]], real: list[Sequence[Tensor]]) -> Tensor:
    """DC's loss: the sum over classes of the distance between each class's two gradients."""
    return sum(layerwise_distance(s, r) for s, r in zip(syn, real))


class GradientMatching(CondensationMethod):
    """The gradient-matching loop (see the module docstring); subclasses define :meth:`matching_loss`.

    Args:
        iterations: outer iterations, each with a fresh network (official: 1000).
        lr_img, momentum_img: SGD on the synthetic images (official 0.1, 0.5; see above for 0.001).
        lr_net: SGD of the network on the synthetic set in the inner loop (official 0.01).
        batch_real: real images per class per matching step (official 256).
        init: ``noise`` (official default) or ``real`` (randomly drawn real images).
        channels: the small CNN's widths (the pipeline evaluates on the same network).
    """

    def __init__(self, iterations: int = 200, lr_img: float = 0.001, momentum_img: float = 0.5, lr_net: float = 0.01,
                 batch_real: int = 256, init: str = "noise", channels: Sequence[int] = CHANNELS) -> None:
        if init not in ("noise", "real"):
            raise CondensationError(f"{type(self).__name__}: init={init!r}. Fix: use 'noise' or 'real'.")
        if iterations < 1:
            raise CondensationError(f"{type(self).__name__}: iterations={iterations}. Fix: use 1 or more.")
        self.iterations, self.lr_img, self.momentum_img, self.lr_net = iterations, lr_img, momentum_img, lr_net
        self.batch_real, self.init, self.channels = batch_real, init, tuple(channels)

    def matching_loss(self, net: nn.Module, params: list[Tensor], real: list[Tensor], synthetic: list[Tensor],
                      iteration: int) -> Tensor:
        """The loss whose gradient moves the synthetic images (``real``/``synthetic``: one tensor per class)."""
        raise NotImplementedError

    def initial_images(self, classes: list[Tensor], ipc: int, generator: torch.Generator) -> Tensor:
        if self.init == "real":
            return torch.cat([sample(images, ipc, generator) for images in classes])
        return torch.rand((len(classes) * ipc, *classes[0].shape[1:]), generator=generator)

    def condense(self, images: Tensor, labels: Tensor, ipc: int, seed: int) -> CondensedSet:
        self.check_ipc(self.name, labels, ipc)
        if ipc not in LOOPS:
            raise CondensationError(f"{self.name}: the official loop lengths exist for ipc in {sorted(LOOPS)}, got "
                                    f"{ipc}. Fix: pick one of those.")
        outer_loop, inner_loop = LOOPS[ipc]
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the fresh networks' initialisations
        classes = per_class(images, labels)
        synthetic = self.initial_images(classes, ipc, generator).requires_grad_(True)
        synthetic_labels = class_labels(len(classes), ipc)
        optimizer = torch.optim.SGD([synthetic], lr=self.lr_img, momentum=self.momentum_img)
        for iteration in range(self.iterations):
            net = network(tuple(images.shape[1:]), len(classes), self.channels)
            params = list(net.parameters())
            net_optimizer = torch.optim.SGD(params, lr=self.lr_net)
            for step in range(outer_loop):
                freeze_batch_norm(net, torch.cat([sample(c, BN_IMAGES_PER_CLASS, generator) for c in classes]))
                real = [sample(c, self.batch_real, generator) for c in classes]
                loss = self.matching_loss(net, params, real, list(synthetic.split(ipc)), iteration)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step == outer_loop - 1:
                    break
                net.train()
                for _ in range(inner_loop):  # the whole synthetic set is one batch (<= 256 images)
                    net_optimizer.zero_grad()
                    F.cross_entropy(net(synthetic.detach()), synthetic_labels).backward()
                    net_optimizer.step()
        return CondensedSet(synthetic.detach(), synthetic_labels, self.name, ipc)


def freeze_batch_norm(net: nn.Module, images: Tensor) -> None:
    """Set the batch-norm statistics to those of ``images`` and freeze them (the official code's
    BN_flag branch: one or ten synthetic images per class are too few for batch statistics). The
    statistics are the batch's exactly (a cumulative average over the one pass), where the code's
    single pass at momentum 0.1 keeps 90% of the freshly initialised 0/1 statistics."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    net.train()
    with torch.no_grad():
        net(images)
    for module in norms:
        module.eval()
