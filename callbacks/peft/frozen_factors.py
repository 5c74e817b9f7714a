"""The common half of SVFit, LoLDU and LoRA-SB: wrap each target layer in a
:class:`~reglab.nn.core_adapter.CoreAdapter` built from factors of a matrix.

Each technique only says which matrix is factorised and how (:meth:`FrozenFactorsTuning.factors`);
this class reads weights as matrices (a convolution's kernel as ``out x in*kh*kw``), wraps the
layers, and lets the cores (and the task head) train.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.nn.core_adapter import CoreAdapter
from reglab.peft_surgery import replace_module


def weight_matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as an ``out x in`` fp32 matrix (detached)."""
    weight = layer.weight.detach().float()
    return weight.reshape(weight.shape[0], -1)


class FrozenFactorsTuning(ParameterEfficientFineTuning):
    """Wraps every target layer as ``W + left @ (s*C - s0*C0) @ right``; only ``C`` (and ``s``) train.

    Subclasses implement :meth:`factors` and set ``persistent_factors`` (whether the factors
    must go into checkpoints because they cannot be recomputed from the frozen weights) and
    ``scale_init`` (a trainable scalar's initial value, or ``None``).
    """

    layer_types = (nn.Linear, nn.Conv2d)
    persistent_factors = False

    def scale_init(self, rank: int) -> float | None:
        return None

    def factors(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``{layer name: (left, right, core_init)}`` for the layers to wrap."""
        raise NotImplementedError

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        with torch.no_grad():
            factors = self.factors(module, layer_names, trainer)
        for name, (left, right, core_init) in factors.items():
            layer = module.get_submodule(name)
            adapter = CoreAdapter(layer, left, right, core_init, scale_init=self.scale_init(core_init.shape[0]),
                                  persistent_factors=self.persistent_factors)
            replace_module(module, name, adapter.to(layer.weight.device))


def effective_rank(rank: int | None, matrix: Tensor) -> int:
    """``rank`` capped by the matrix's smaller side; ``None`` = full rank."""
    full = min(matrix.shape)
    return full if rank is None else min(rank, full)
