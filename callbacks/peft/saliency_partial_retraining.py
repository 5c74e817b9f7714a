"""Saliency-aware partial retraining of a low-bit model (Cao & Aref, 2025, paper 26).

Every target layer's weight ``W`` (``out x in``; a convolution's kernel read as
``out x (in*kh*kw)``) is replaced, in the forward pass, by its ``bits``-bit fake-quantized copy,
and the model is then retrained *partially*: ``W`` stays frozen, and only the quantizer's
clipping factors, a LoRA adapter on each layer and the task head train — ApiQ's partial training,
which the paper builds on. The quantizer is ApiQ's (OmniQuant's learnable weight clipping),
asymmetric, one scale per output channel:

    w_max = sigmoid(g_up) * max_j W_ij,  w_min = sigmoid(g_low) * min_j W_ij   (g init 4.0)
    s = (w_max - w_min) / (2^bits - 1),   z = round(-w_min / s)
    Q(W) = (clamp(round(W / s) + z, 0, 2^bits - 1) - z) * s

with ``round`` a straight-through estimator (identity gradient), so the task loss and the
regularizer train ``g_up``, ``g_low``. A layer computes ``Q(W) x + (alpha / r) B A x``
(peft's LoRA layer around the quantized base layer).

The paper's addition is the saliency-aware regularizer (official ``calculate_regularization_term``
in ``apiq/utils.py`` of github.com/TokuyuSou/ULB-SAPR, ``reg_method=before_lora`` with
``weighted_reg``): the quantized weights are pulled towards the full-precision ones, weighted by
each weight's saliency, the squared gradient of the full-precision model's loss (the diagonal of
the empirical Fisher information, computed per sample as SqueezeLLM's gradient script does):

    L_reg = lam * sum_layers sum_ij F_ij (Q(W)_ij - W_ij)^2,     F_ij = sum_n (dL_n / dW_ij)^2

``saliency=False`` gives the unweighted regularizer (``F = 1``) and ``lam=0`` plain partial
retraining (ApiQ). Where this departs from the official code, and why:

* F is measured at setup on the first ``calibration_samples`` training samples of the fit (the
  official code reads gradients precomputed on calibration text) and divided by its mean over
  all target weights: raw squared gradients scale with the model and the loss, so the same
  ``lam`` would not carry over; normalised, ``lam`` means the same with and without saliency and
  the layers keep the official relative weighting.
* one scale per output channel (the paper uses groups of 64 input weights); the paper's
  output-preserving calibration of LoRA (ApiQ's block-wise MSE to the full-precision outputs)
  is not built: the adapters start at zero (B = 0) and train on the task.

Why not ``torch.ao.quantization.FakeQuantize``: it runs at 2-3 bits (``quant_min=0``,
``quant_max=2**bits - 1``), but its scale comes from an observer and receives no gradient, and
torch's learnable fake-quantization (``torch._fake_quantize_learnable_per_channel_affine``, private)
learns the scale and zero point directly (LSQ+), not ApiQ's clipping factors. So the quantizer
is the few lines of :func:`fake_quantize` (written here), the adapters are peft's LoRA, and the
quantization is a ``torch.nn.utils.parametrize`` parametrization of the base layer's weight.

Layers: ``nn.Linear`` and ``nn.Conv2d`` outside the task head (the CNN's convolutions, the ViT's
projections, MiniLM's query / key / value / dense). :meth:`merge` writes ``Q(W) + B A`` into the
weights (full precision again, for inference without the adapters' extra products).

Method card (what it does, when it helps, what it costs): ``saliency_partial_retraining.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import SaliencyAwarePartialRetraining
    >>> sapr = SaliencyAwarePartialRetraining(bits=2, lam=0.1, r=4)            # saliency-aware
    >>> plain = SaliencyAwarePartialRetraining(bits=2, lam=0.0, r=4)           # plain partial retraining
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from reglab.callbacks.peft.lora import LoRA
from reglab.mixins import StepOutput

#: ApiQ's initial clipping factor: sigmoid(4.0) = 0.982 of each channel's range
CLIP_INIT = 4.0


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


def fake_quantize(weight: Tensor, bits: int, up: Tensor, low: Tensor) -> Tensor:
    """``Q(W)`` of the module docstring: asymmetric ``bits``-bit quantization per output channel
    (dim 0) with clipping factors ``sigmoid(up)``, ``sigmoid(low)`` (shape ``(out, 1, ...)``)."""
    levels = 2 ** bits - 1
    rows = weight.flatten(1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w_max = torch.sigmoid(up) * rows.amax(1).view(shape)
    w_min = torch.sigmoid(low) * rows.amin(1).view(shape)
    scale = ((w_max - w_min) / levels).clamp(1e-5, 1e4)
    zero = round_ste(-w_min / scale)
    return (torch.clamp(round_ste(weight / scale) + zero, 0, levels) - zero) * scale


class LowBitWeight(nn.Module):
    """Parametrization of a layer's ``weight``: its fake-quantized copy (learnable clipping), and
    the saliency of each weight (a buffer, so a checkpoint keeps it and a resumed run uses it)."""

    def __init__(self, bits: int, weight: Tensor, saliency: Tensor | None = None) -> None:
        super().__init__()
        self.bits = bits
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.up = nn.Parameter(torch.full(shape, CLIP_INIT, device=weight.device))
        self.low = nn.Parameter(torch.full(shape, CLIP_INIT, device=weight.device))
        self.register_buffer("saliency", torch.ones_like(weight) if saliency is None else saliency.to(weight))

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quantize(weight, self.bits, self.up, self.low)


def saliency_penalty(weight: Tensor, quantized: Tensor, saliency: Tensor) -> Tensor:
    """``sum_ij F_ij (Q(W)_ij - W_ij)^2`` for one layer, in fp32."""
    return (saliency.float() * (quantized.float() - weight.float()).pow(2)).sum()


def sample(batch: Any, i: int) -> Any:
    """Sample ``i`` of a batch (tensors sliced along the batch dimension, nested dicts followed)."""
    if isinstance(batch, Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {key: sample(value, i) for key, value in batch.items()}
    return batch


def samples(module: L.LightningModule, batches: Any, num_samples: int) -> Any:
    """The first ``num_samples`` samples of ``batches``, one at a time, on the module's device."""
    seen = 0
    for batch in batches:
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        for i in range(min(len(batch["target"]), num_samples - seen)):
            yield sample(batch, i)
        seen += len(batch["target"])
        if seen >= num_samples:
            return


def fisher_diagonal(module: L.LightningModule, layer_names: list[str], batches: Any, num_samples: int) -> dict[str, Tensor]:
    """``F = sum_n (dL_n / dW)^2`` over the first ``num_samples`` samples of ``batches``, for each
    layer's weight, with the module in eval mode (no dropout, batch-norm statistics untouched)."""
    weights = [module.get_submodule(name).weight for name in layer_names]
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            for one in samples(module, batches, num_samples):
                grads = torch.autograd.grad(module.task_loss(module.forward_step(one)).sum(), weights, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.float().pow(2)
    finally:
        module.train(was_training)
    return dict(zip(layer_names, fisher))


class SaliencyAwarePartialRetraining(LoRA):
    """Low-bit fake-quantized layers, partially retrained with the saliency-weighted regularizer
    (see the module docstring).

    Args:
        bits: weight bit width (the paper: 2 to 4).
        lam: weight of the regularizer (official README example 0.1; ``0`` = plain partial retraining).
        saliency: weight the regularizer by the Fisher saliency (``False`` = every weight alike).
        calibration_samples: training samples the saliency is measured on (ApiQ's 128 calibration samples).
        r, lora_alpha: the LoRA adapters' rank and scale (``lora_alpha / r``).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "saliency_partial_retraining"
    fsdp_unsupported = "its loss term reads the layers' weights directly (not through their forward), and FSDP may hold only this rank's shard of them"

    #: the quantizer and the penalty read each layer's own weight matrix
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, bits: int = 2, lam: float = 0.1, saliency: bool = True, calibration_samples: int = 128,
                 r: int = 4, lora_alpha: float = 8.0, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if not 1 <= bits <= 8 or lam < 0 or calibration_samples < 1:
            raise ValueError(f"SaliencyAwarePartialRetraining: bits must be in 1..8, lam >= 0 and calibration_samples "
                             f">= 1, got {bits}, {lam} and {calibration_samples}")
        super().__init__(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                         pretrained_checkpoint=pretrained_checkpoint)
        self.bits, self.lam, self.saliency, self.calibration_samples = bits, lam, saliency, calibration_samples
        self.quantizers: list[tuple[nn.Module, LowBitWeight]] = []

    def measure_saliency(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> dict[str, Tensor]:
        """The normalised Fisher saliency of each target weight (empty when not needed: a reload
        outside a run takes it from the checkpoint)."""
        if trainer is None or not self.saliency or self.lam == 0:
            return {}
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            raise self.fail("it measures the saliency on the training data at setup, but the fit has no DataModule",
                            "pass the data as `trainer.fit(module, datamodule=...)`, or set saliency=False")
        fisher = fisher_diagonal(module, layer_names, datamodule.train_dataloader(), self.calibration_samples)
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
        if not mean > 0:
            raise self.fail("the full-precision model's loss has no gradient on the calibration samples, so every "
                            "saliency is 0", "start from a model whose target layers the loss depends on")
        return {name: f / mean for name, f in fisher.items()}

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        saliency = self.measure_saliency(module, layer_names, trainer)
        super().inject(module, layer_names, trainer)
        self.quantizers = []
        for name in layer_names:
            base = module.get_submodule(name).get_base_layer()
            quantizer = LowBitWeight(self.bits, base.weight, saliency.get(name))
            parametrize.register_parametrization(base, "weight", quantizer)
            self.quantizers.append((base, quantizer))

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if self.lam == 0:
            return {}
        with torch.autocast(out.logits.device.type, enabled=False):
            total = sum(saliency_penalty(base.parametrizations.weight.original, base.weight, quantizer.saliency)
                        for base, quantizer in self.quantizers)
        return {"saliency_reg": self.lam * total}

    def merge(self, module: nn.Module) -> int:
        """Bake ``Q(W)`` into each base layer, then fold the adapters in (``Q(W) + B A``)."""
        for base, _ in self.quantizers:
            parametrize.remove_parametrizations(base, "weight", leave_parametrized=True)
        self.quantizers = []
        return super().merge(module)
