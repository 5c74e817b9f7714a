"""LoCA — location-aware cosine adaptation (Du et al., ICLR 2025, paper 18).

Each adapted weight ``W`` (``out x in``; a convolution's kernel read as ``out x in*kh*kw``) gets an
update that is the inverse 2-D DCT of a sparse spectrum: ``n`` coefficients ``a`` at ``n`` learnable
frequency locations ``l = (rows, columns)``,

    W' = W + alpha * C_out^T S(a, round(l)) C_in,       S = the out x in matrix with a_k at l_k,

where ``C_m`` is the orthonormal DCT-II matrix of size m (``C_m x`` is ``scipy.fft.dct(x, norm="ortho")``),
so ``C_out^T S C_in`` is ``scipy.fft.idctn(S, norm="ortho")``. Coefficients start at zero (``W' = W``),
locations uniformly at random. A location is discrete, so its gradient is the paper's central
finite difference on the DCT of the weight gradient ``K = C_out G C_in^T`` (``G = dL/dW'``):
``dL/da_k = K[l_k]`` and ``dL/drow_k = a_k (K[row+1, col] - K[row-1, col]) / 2`` (clamped to
[-1, 1]; at an edge the neighbour is the edge itself), likewise for the column.

Training alternates (the paper's Section 4.4): ``coefficient_phase`` optimizer steps train the
coefficients (locations fixed), then ``location_phase`` steps move the locations (coefficients
fixed), until ``location_until`` steps, after which the locations stay where they are and only
the coefficients train. The task head trains throughout.

Source: the official code (github.com/TL-UESTC/LoCA, ``peft/src/peft/tuners/loca/``: ``layer.py``
and ``dct_utils.py``), read through a vendored copy, since the repository itself could not be
fetched here. Its defaults: ``n_frequency=1000`` per layer and ``scale=1`` (RoBERTa-base GLUE),
location learning rate ``1e-4`` (a parameter group of its own), phases of 10 / 20 steps,
locations stored in [0, 1], clamped to [0, 0.999] and scaled by ``(out - 1, in - 1)``, and learnt
for the first 10 % of the training steps (the paper's Appendix E; ``location_until=None`` here).
Where this implementation departs from it, and why:

* The schedule counts optimizer steps (``trainer.global_step``); the official layer counts its own
  forward calls in training, which under gradient accumulation are micro-batches.
* The official code switches ``requires_grad`` on and off in ``forward``. Here every parameter keeps
  ``requires_grad`` (DDP's reducer needs a fixed set of parameters with gradients) and the
  technique drops the gradient of the phase's frozen half before the optimizer step; an optimizer
  skips a parameter without gradient, which is what the official code gets from ``requires_grad=False``.
* The module owns its optimizer (one Adam over every parameter), so the locations cannot be a
  parameter group with their own rate. The technique moves them itself with torch's Adam
  (``torch.optim.adam.adam``, no weight decay) at ``location_lr``, with the moments as buffers of
  each layer (they go into checkpoints, so resume is exact), and hides their gradient from the
  module's optimizer. The official code gives the location group the training script's AdamW.
* ``n_frequency`` larger than a layer's ``out * in`` is capped there (the official layer would put
  several coefficients on one location).

The paper counts only the ``n`` coefficients as parameters; ``parameter_counts`` here counts what
trains: ``3n`` per layer (the locations too).

Method card (what it does, when it helps, what it costs): ``loca.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import LoCA
    >>> loca = LoCA(n_frequency=256, target_modules=["query", "value"])   # regexes over module names
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import numpy as np
import scipy.fft
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.adam import adam

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.nn.weight_delta import WeightDeltaAdapter
from reglab.peft_surgery import replace_module

#: the official clamp of the stored locations, so that ``round(0.999 * (m - 1))`` stays inside
LOCATION_MAX = 0.999


@functools.lru_cache(maxsize=None)
def dct_matrix(size: int, device: torch.device) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` (``C @ x`` is ``scipy.fft.dct(x, norm="ortho")``), fp32."""
    # built outside inference mode: validation may ask first, and training saves it for backward
    with torch.inference_mode(False):
        return torch.from_numpy(scipy.fft.dct(np.eye(size), norm="ortho", axis=0)).float().to(device)


def sparse_idct2(coefficients: Tensor, rows: Tensor, columns: Tensor, shape: tuple[int, int]) -> Tensor:
    """``C_out^T S C_in`` for the spectrum ``S`` holding ``coefficients`` at ``(rows, columns)``
    (repeated locations add up); an ``out x in`` fp32 matrix."""
    c_out, c_in = dct_matrix(shape[0], coefficients.device), dct_matrix(shape[1], coefficients.device)
    return (c_out.T[:, rows] * coefficients.float()) @ c_in[columns]


def dct2(matrix: Tensor) -> Tensor:
    """``C_out M C_in^T``: the orthonormal 2-D DCT of an ``out x in`` matrix."""
    return dct_matrix(matrix.shape[0], matrix.device) @ matrix.float() @ dct_matrix(matrix.shape[1], matrix.device).T


class InverseDCTWithLocationGradient(torch.autograd.Function):
    """``sparse_idct2`` at the rounded ``locations`` (``2 x n``, in pixels), with the paper's
    finite-difference gradient for the locations (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, coefficients: Tensor, locations: Tensor, shape: tuple[int, int]) -> Tensor:
        rows, columns = locations.detach().round().long()
        ctx.save_for_backward(coefficients, rows, columns)
        ctx.shape = shape
        return sparse_idct2(coefficients, rows, columns, shape)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        coefficients, rows, columns = ctx.saved_tensors
        spectrum_gradient = dct2(grad_output)
        grad_coefficients = spectrum_gradient[rows, columns].to(coefficients.dtype)
        grad_locations = None
        if ctx.needs_input_grad[1]:
            out_features, in_features = ctx.shape
            a = coefficients.float()
            up, down = (rows + 1).clamp(max=out_features - 1), (rows - 1).clamp(min=0)
            right, left = (columns + 1).clamp(max=in_features - 1), (columns - 1).clamp(min=0)
            grad_rows = 0.5 * a * (spectrum_gradient[up, columns] - spectrum_gradient[down, columns])
            grad_columns = 0.5 * a * (spectrum_gradient[rows, right] - spectrum_gradient[rows, left])
            grad_locations = torch.stack([grad_rows, grad_columns]).clamp(-1.0, 1.0)
        return grad_coefficients, grad_locations, None


class LocaLayer(WeightDeltaAdapter):
    """Wraps a layer with a ``weight`` (``nn.Linear``, ``nn.Conv2d``) as ``W + scale * iDCT2(S(a, l))``.

    A :class:`~reglab.nn.weight_delta.WeightDeltaAdapter` (``base_layer``, ``merge()``,
    ``get_base_layer()``), as :class:`~reglab.nn.core_adapter.CoreAdapter`.

    Args:
        base_layer: the pretrained layer; its parameters are left to the caller to freeze.
        n_frequency: number of coefficients (at most ``out * in``).
        scale: ``alpha``, the update's factor.
    """

    def __init__(self, base_layer: nn.Module, n_frequency: int, scale: float) -> None:
        super().__init__(base_layer)
        self.shape = (base_layer.weight.shape[0], base_layer.weight[0].numel())
        device = base_layer.weight.device
        self.scale = scale
        self.coefficients = nn.Parameter(torch.zeros(n_frequency, device=device))
        self.locations = nn.Parameter(torch.rand(2, n_frequency, device=device))  # the official init, in [0, 1)
        self.register_buffer("location_exp_avg", torch.zeros(2, n_frequency, device=device))
        self.register_buffer("location_exp_avg_sq", torch.zeros(2, n_frequency, device=device))

    def pixel_locations(self) -> Tensor:
        """The locations in pixels, ``2 x n`` (not rounded: the forward pass rounds)."""
        extent = torch.tensor([self.shape[0] - 1, self.shape[1] - 1], device=self.locations.device, dtype=torch.float32)
        return self.locations.float().clamp(0.0, LOCATION_MAX) * extent[:, None]

    def delta_weight(self) -> Tensor:
        """The current change of the base weight, in the base weight's shape and dtype."""
        with torch.autocast(self.coefficients.device.type, enabled=False):
            change = InverseDCTWithLocationGradient.apply(self.coefficients, self.pixel_locations(), self.shape)
        weight = self.base_layer.weight
        return (self.scale * change).reshape(weight.shape).to(weight.dtype)


class LoCA(ParameterEfficientFineTuning):
    """Inverse-DCT adapters with learnt frequency locations (see the module docstring).

    Args:
        n_frequency: coefficients per layer (the official 1000 was set for 768 x 768 weights;
            capped at a layer's ``out * in``).
        scale: ``alpha``, the update's factor.
        location_lr: the locations' Adam learning rate (in units of the [0, 1] location range).
        coefficient_phase, location_phase: optimizer steps of one cycle that train the
            coefficients, then the locations.
        location_until: optimizer step after which the locations stay fixed; ``None`` = 10 % of
            the fit's optimizer steps (the paper's rule), ``0`` = never move them.
        target_modules, pretrained_checkpoint: see :class:`ParameterEfficientFineTuning`.
    """

    name = "loca"
    layer_types = (nn.Linear, nn.Conv2d)
    fsdp_unsupported = ("it moves each layer's locations itself, outside the module's optimizer, with the "
                        "full location tensor and its gradient, which FSDP shards")

    def __init__(self, n_frequency: int = 1000, scale: float = 1.0, location_lr: float = 1e-4,
                 coefficient_phase: int = 10, location_phase: int = 20, location_until: int | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if n_frequency < 1:
            raise ValueError(f"LoCA: n_frequency must be >= 1, got {n_frequency}")
        if coefficient_phase < 1 or location_phase < 0:
            raise ValueError(f"LoCA: coefficient_phase must be >= 1 and location_phase >= 0, got "
                             f"{coefficient_phase} and {location_phase}")
        if location_lr < 0 or (location_until is not None and location_until < 0):
            raise ValueError(f"LoCA: location_lr and location_until must be >= 0, got {location_lr} and {location_until}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.n_frequency, self.scale, self.location_lr = n_frequency, scale, location_lr
        self.coefficient_phase, self.location_phase, self.location_until = coefficient_phase, location_phase, location_until
        self._location_until = location_until

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        capped = []
        for name in layer_names:
            layer = module.get_submodule(name)
            entries = layer.weight[0].numel() * layer.weight.shape[0]
            if entries < self.n_frequency:
                capped.append(f"{name} ({entries})")
            replace_module(module, name, LocaLayer(layer, min(self.n_frequency, entries), self.scale))
        if capped:
            rank_zero_info(f"LoCA: n_frequency={self.n_frequency} capped at the number of weight entries of {', '.join(capped)}")

    def layers(self, module: nn.Module) -> list[LocaLayer]:
        return [layer for layer in module.modules() if isinstance(layer, LocaLayer)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.location_until is None:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise self.fail("location_until=None learns locations for 10% of the fit's steps, but this fit has "
                                "no step or epoch limit", "set trainer.max_steps or max_epochs, or give location_until")
            self._location_until = int(0.1 * total)

    def moves_locations(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 0) moves the locations rather than the coefficients."""
        cycle = self.coefficient_phase + self.location_phase
        return step < self._location_until and step % cycle >= self.coefficient_phase

    def location_steps_before(self, step: int) -> int:
        """How many of the steps ``0 .. step-1`` moved the locations (Adam's bias correction needs it)."""
        steps = min(step, self._location_until)
        cycles, within = divmod(steps, self.coefficient_phase + self.location_phase)
        return cycles * self.location_phase + max(0, within - self.coefficient_phase)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        layers = self.layers(pl_module)
        step = trainer.global_step
        if self.moves_locations(step):
            for layer in layers:
                layer.coefficients.grad = None
            self.move_locations(layers, self.location_steps_before(step))
        # the module's optimizer never sees a location gradient: the locations move only above
        for layer in layers:
            layer.locations.grad = None

    @torch.no_grad()
    def move_locations(self, layers: list[LocaLayer], steps_taken: int) -> None:
        """One Adam step of every layer's locations with their current gradients."""
        layers = [layer for layer in layers if layer.locations.grad is not None]
        if not layers:
            return
        adam(
            [layer.locations for layer in layers], [layer.locations.grad for layer in layers],
            [layer.location_exp_avg for layer in layers], [layer.location_exp_avg_sq for layer in layers], [],
            [torch.tensor(float(steps_taken)) for _ in layers], foreach=False,
            amsgrad=False, beta1=0.9, beta2=0.999, lr=self.location_lr, weight_decay=0.0, eps=1e-8, maximize=False,
        )
