"""Mixup (Zhang et al., ICLR 2018) — a batch-mixing baseline.

Every training input is replaced by a convex combination with a random partner from the same
batch, and its target by the same combination of the two targets:

    lam ~ Beta(alpha, alpha),  perm = a random permutation of the batch
    x'  = lam * x + (1 - lam) * x[perm]
    t'  = lam * t + (1 - lam) * t[perm]

alpha = 1.0 (lam uniform on [0, 1]) is the default of the official code
(github.com/facebookresearch/mixup-cifar10, ``train.py``), which mixes every batch with one lam.
The shared mechanics (drawing, target mixing, composition with other target transforms) are in
:mod:`reglab.callbacks.baselines.mixing`.

Method card (what it does, when it helps, what it costs): ``mixup.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import Mixup
    >>> Mixup(alpha=1.0).name
    'mixup'
"""

from __future__ import annotations

from torch import Tensor

from reglab.callbacks.baselines.mixing import BatchMixing


def mixup_inputs(inputs: Tensor, permutation: Tensor, lam: float) -> Tensor:
    """``lam * x + (1 - lam) * x[perm]``."""
    return lam * inputs + (1.0 - lam) * inputs[permutation]


class Mixup(BatchMixing):
    """Mix inputs and targets of random pairs within the batch (formula in the module docstring).

    Args:
        alpha: concentration of Beta(alpha, alpha) for the mixing share.
        probability: chance that a batch is mixed (the official code mixes every batch).
    """

    name = "mixup"

    def blend_inputs(self, inputs: Tensor, permutation: Tensor, lam: float) -> tuple[Tensor, float]:
        return mixup_inputs(inputs, permutation, lam), lam
