"""SaRA — progressive sparse low-rank adaptation (Hu et al., ICLR 2025, paper 33).

The pretrained weights of smallest magnitude (``|W| < threshold``) are the ones SaRA trains; every
other weight stays frozen. Per target layer, with ``P`` the sparse matrix of the trained entries
(their current values, zero elsewhere):

    W' = W outside the selection,  W'[selection] = values         (values start at W[selection])
    L  = L_task + lambda_rank * ||P||_*       (nuclear norm of one random eligible layer per step)

**Progressive parameter adjustment**: at optimizer step ``progressive_step`` the selection is
re-made with the same threshold over the current weights. Entries outside the first selection never
moved, so this keeps the entries that are still below the threshold training and
freezes, at their learned values, those that grew past it (became "effective"); the optimizer
state of the trained values is reset there, as the official optimizer does by re-creating itself.

Follows the official code (github.com/sjtuplayer/SaRA, ``optim/adamw.py``, the default
"unstructural backpropagation" path, and ``optim/adamw2.py``, its masked variant) and its example
script ``finetune.sh``: ``threshold = 2e-3`` (absolute), ``lambda_rank = 5e-4``, the re-selection
at step 2500 (``progressive_step``; of 5005 there), the nuclear norm only on 2-D weights whose
smaller side exceeds 64 (``rank_min_dim``), one such layer drawn per step. Where this differs:

* ``fraction`` (not in the code): the threshold chosen so that this share of the targeted weights
  trains. The paper reports the smallest 10-20 % of Stable Diffusion's weights as ineffective;
  2e-3 is a threshold for SD's weight scale, and a small model's weights are on another scale.
* The code writes ``|values|`` into the weights before the first step (``trainable.abs()``), which
  flips the sign of every small negative weight for one step; here the weights start exactly at
  the pretrained ones.
* The code's default path back-propagates the nuclear norm into the original parameter objects,
  which its optimizer no longer holds, so the constraint has no effect there; the masked variant
  (``adamw2.py``) and the paper apply it, and so does this (as a loss term).
* The code skips the optimizer update at the re-selection step; here that step updates as usual.
* The code selects among every parameter of the model (biases and norms too); here among the
  weights of the target layers (``nn.Linear`` / ``nn.Conv2d``, the task head trains fully).
* The layer drawn for the nuclear norm comes from a generator seeded by the optimizer step (not
  Python's global ``random``), so every DDP rank draws the same one and a resumed run the same.

**Memory.** The trained values are one 1-D parameter per layer (``k`` entries), written into the
frozen weight's own storage in the forward pass (the official "unstructural backpropagation"), so
gradients and optimizer state exist for the ``k`` selected entries only, not for the full weights
(full fine-tuning with Adam: gradient + two moments = 3 floats per weight; here 3 floats per
selected entry, plus its int64 position, a stage flag and the value it is frozen at after the
re-selection: 4 + 4 + 8 + 8 + 1 + 4 = 29 bytes per selected entry). Each layer's dense weight
gradient still exists transiently in the backward pass before it is gathered to the selection.

Method card (what it does, when it helps, what it costs): ``sara.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import SaRA
    >>> sara = SaRA(fraction=0.1)   # the smallest 10% of the weights train, official schedule
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.autograd import Function
from torch.func import functional_call

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.mixins import StepOutput
from reglab.peft_surgery import replace_module


class WriteSelection(Function):
    """Write ``values`` into ``weight`` at the flat positions ``index`` (in place, no copy) and
    return the weight; the gradient of ``values`` is the weight's gradient at those positions."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, values: Tensor, index: Tensor, write: bool) -> Tensor:
        if write:
            weight.view(-1).index_copy_(0, index, values.to(weight.dtype))
        ctx.save_for_backward(index)
        return weight.detach()

    @staticmethod
    def backward(ctx: Any, grad_weight: Tensor) -> tuple[None, Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return None, grad_weight.reshape(-1).index_select(0, index), None, None


def nuclear_norm(matrix: Tensor) -> Tensor:
    """Sum of the singular values, in fp32 (its gradient is ``U V^T``)."""
    return torch.linalg.svdvals(matrix.float()).sum()


class SparseUpdateLayer(nn.Module):
    """``base_layer`` whose weight entries at ``index`` (flat positions) are the trainable
    ``values``. After the re-selection, entries with ``active`` off stay at ``frozen_values``.
    Offers ``merge()`` / ``get_base_layer()``, so :func:`reglab.peft_surgery.merge_adapters`
    puts the base layer back with the trained values in its weight."""

    def __init__(self, base_layer: nn.Module, index: Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.values = nn.Parameter(weight.detach().reshape(-1)[index].float().clone())
        self.register_buffer("index", index)
        self.register_buffer("active", torch.ones_like(index, dtype=torch.bool))
        self.register_buffer("frozen_values", torch.zeros_like(self.values))
        #: storage and version of the values, the stage flags and the weight after the last write:
        #: rewriting unchanged values would bump the weight's version and invalidate the graphs of
        #: earlier forwards of the step; any change (an optimizer step, a loaded checkpoint, a move
        #: to another device) makes the next forward write
        self._written: tuple[int, ...] | None = None

    def _stamp(self) -> tuple[int, ...]:
        weight = self.base_layer.weight
        return (self.values.data_ptr(), self.values._version, self.active._version, weight.data_ptr(), weight._version)

    def current(self) -> Tensor:
        return torch.where(self.active, self.values, self.frozen_values)

    def sparse_matrix(self) -> Tensor:
        """``P``: the trained entries (their current values) in an otherwise zero matrix shaped
        like the weight (flattened to ``out x rest`` for a convolution)."""
        weight = self.base_layer.weight
        trained = torch.where(self.active, self.values, torch.zeros_like(self.values))
        flat = torch.zeros(weight.numel(), device=weight.device, dtype=trained.dtype).index_put((self.index,), trained)
        return flat.view(weight.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        write = self._stamp() != self._written
        weight = WriteSelection.apply(self.base_layer.weight, self.current(), self.index, write)
        if write:
            self._written = self._stamp()
        return functional_call(self.base_layer, {"weight": weight}, (x,))

    @torch.no_grad()
    def reselect(self, threshold: float) -> None:
        """Keep training the selected entries whose current magnitude is still below
        ``threshold``; freeze the others at their current values."""
        current = self.current()
        self.frozen_values.copy_(current)
        self.active &= current.abs() < threshold

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base_layer.weight
        weight.view(-1).index_copy_(0, self.index, self.current().to(weight.dtype))

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


class SaRA(ParameterEfficientFineTuning):
    """Train the smallest-magnitude pretrained weights as a sparse update, with the nuclear-norm
    constraint and the progressive re-selection (see the module docstring).

    Args:
        threshold: weights with ``|W| < threshold`` train (official 2e-3); give this or ``fraction``.
        fraction: instead, the share of the targeted weights that trains (the threshold is that
            quantile of ``|W|`` over all of them, so the same rule as ``threshold`` applies).
        lambda_rank: weight of the nuclear norm of the sparse update matrix (official 5e-4; 0 = off).
        progressive_step: the optimizer step at which the selection is re-made (official 2500, about
            half of its 5005 steps; a step, not a share of the run, so that a run stopped early and
            resumed with a larger budget re-selects where an uninterrupted one does); ``None`` = never.
        rank_min_dim: the nuclear norm applies to 2-D weights whose smaller side exceeds this
            (official 64).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "sara"
    fsdp_unsupported = "it writes the trained entries into each full weight at flat positions, which FSDP shards"

    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, threshold: float | None = 2e-3, fraction: float | None = None, lambda_rank: float = 5e-4,
                 progressive_step: int | None = 2500, rank_min_dim: int = 64,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if fraction is not None:
            threshold = None
            if not 0 < fraction < 1:
                raise ValueError(f"SaRA: fraction must be in (0, 1), got {fraction}. Fix: e.g. 0.1 (the smallest 10%)")
        elif threshold is None or threshold <= 0:
            raise ValueError(f"SaRA: threshold must be > 0, got {threshold}. Fix: give threshold (official 2e-3) "
                             "or fraction")
        if lambda_rank < 0:
            raise ValueError(f"SaRA: lambda_rank must be >= 0, got {lambda_rank}")
        if progressive_step is not None and progressive_step < 1:
            raise ValueError(f"SaRA: progressive_step must be >= 1 or None, got {progressive_step}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.threshold, self.fraction, self.lambda_rank = threshold, fraction, lambda_rank
        self.progressive_step, self.rank_min_dim = progressive_step, rank_min_dim
        #: the threshold in use (``threshold``, or the one ``fraction`` gives on the pretrained weights)
        self.cutoff: float | None = threshold
        self.layers: dict[str, SparseUpdateLayer] = {}

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        weights = {name: module.get_submodule(name).weight.detach() for name in layer_names}
        if self.fraction is not None:
            magnitudes = torch.cat([w.abs().reshape(-1).float() for w in weights.values()])
            k = max(1, int(self.fraction * magnitudes.numel()))
            # strictly below the cutoff: the k-th smallest magnitude's successor
            self.cutoff = float(torch.kthvalue(magnitudes, k).values.nextafter(torch.tensor(math.inf)))
        self.layers = {}
        for name, weight in weights.items():
            index = torch.nonzero(weight.abs().reshape(-1) < self.cutoff).reshape(-1)
            if len(index):
                layer = SparseUpdateLayer(module.get_submodule(name), index)
                replace_module(module, name, layer)
                self.layers[name] = layer
        if not self.layers:
            raise self.fail(f"no weight of the layers {layer_names} is below the threshold {self.cutoff:g}",
                            "raise threshold, or give fraction (the share of weights to train)")

    def rank_eligible(self) -> list[SparseUpdateLayer]:
        return [layer for layer in self.layers.values()
                if layer.base_layer.weight.dim() == 2 and min(layer.base_layer.weight.shape) > self.rank_min_dim]

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        eligible = self.rank_eligible()
        if not self.lambda_rank or not eligible:
            return {}
        # one layer per optimizer step, drawn from the step number: the same on every rank and on resume
        generator = torch.Generator().manual_seed(module.trainer.global_step)
        layer = eligible[int(torch.randint(len(eligible), (1,), generator=generator))]
        return {"nuclear_norm": self.lambda_rank * nuclear_norm(layer.sparse_matrix())}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if trainer.global_step != self.progressive_step:
            return
        for layer in self.layers.values():
            layer.reselect(self.cutoff)
            if layer.values.grad is not None:  # this step's gradient must not move the frozen entries
                layer.values.grad.mul_(layer.active)
            optimizer.state.pop(layer.values, None)
        trained = sum(int(layer.active.sum()) for layer in self.layers.values())
        selected = sum(len(layer.index) for layer in self.layers.values())
        rank_zero_info(f"SaRA: re-selection at step {trainer.global_step}: {trained:,} of {selected:,} entries keep training")
