"""SoMA — singular value decomposed minor components adaptation (Yun et al., CVPR 2025, paper 46).

Each adapted weight ``W`` (``out x in``; a convolution's kernel read as ``out x in*kh*kw``) is
split once, at setup, by an SVD ``W = U diag(sigma) V^T`` into its ``r`` *minor* singular
components (the smallest singular values) and a frozen residual:

    B = U_r sqrt(diag(sigma_r)),   A = sqrt(diag(sigma_r)) V_r^T        (r smallest sigma)
    W_res = W - B A                                                     (frozen)
    W' = W_res + B A                                                    (A, B train; W' = W at start)

The principal components — which the paper finds carry the domain-generalizable knowledge of the
pretrained model — stay untouched in ``W_res``, and only the least important directions are
re-learned for the task. Two more pieces, from the paper and its official code
(github.com/ysj9909/SoMA, ``rein/peft/sora.py`` and ``configs/sora/*.py``):

* **earlier blocks frozen**: layers of the first third of the blocks are not adapted at all
  (official ``start_lora_idx = 8`` of DINOv2-L's 24 blocks). A block is the first numbered
  module on a layer's path (``backbone.blocks.0``; each conv of the built-in CNN is its own
  block); layers outside numbered blocks (a patch embedding) are never adapted, as in the
  official code. The biases of the adapted layers train too (official ``bias="all"``);
* **cosine-annealed weight decay**: decoupled (AdamW-style) weight decay on every trainable
  parameter that got a gradient, annealed per optimizer step ``t`` of ``T``:

      wd_t = wd_min + (wd_0 - wd_min) * (1 + cos(pi * t / T)) / 2,    theta <- theta - lr * wd_t * theta

  with the official ``wd_0 = 0.05`` (AdamW), ``wd_min = 1e-5`` (``CosineAnnealingParamScheduler``
  over all iterations). The technique applies the decay itself, just before each optimizer step
  with the optimizer's current learning rate, so it works the same with Adam, AdamW or SGD; the
  optimizer's own ``weight_decay`` must therefore be 0 (checked at fit start).

Official defaults: ``r = 16``, ``lora_alpha = r`` (scale 1), full SVD ("sora" init),
``first_eigen=False`` (minor components). The layers are peft's LoRA layers (``lora_A = A``,
``lora_B = B``, base weight ``W_res``), so merging is peft's. Unlike the official code (``nn.Linear``
only), convolutions are adapted too, so the technique also runs on CNNs.

Method card:
    what it does: re-learns the smallest singular directions of the later blocks' weights, keeps
        the principal ones and the early blocks as they were pretrained, and anneals weight decay;
    when it helps: fine-tuning a pretrained model on one domain and testing on unseen ones
        (domain generalization); about LoRA's cost;
    what it costs: r * (in + out) trainable numbers per adapted layer, one SVD per layer at setup
        (recomputed on resume, not stored), nothing extra after :meth:`merge`.

Example:
    >>> from reglab.callbacks.peft import SoMA
    >>> soma = SoMA(r=16, target_modules=["attn", "mlp"])   # blocks.0 .. first third stay frozen
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.frozen_factors import weight_matrix
from reglab.callbacks.peft.lora import LoRA

#: the first numbered module on a dotted path, e.g. ``backbone.blocks.3`` of ``backbone.blocks.3.mlp.fc1``
BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def minor_components(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, A, W_res)`` of an ``out x in`` matrix: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``
    over the ``rank`` smallest singular values, and the residual ``W - B A`` (all fp32)."""
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = sigma[-rank:].sqrt()
    b = u[:, -rank:] * root
    a = root[:, None] * vh[-rank:]
    return b, a, weight.float() - b @ a


def block_of(name: str) -> str | None:
    """The first numbered module on ``name``'s path, or ``None`` outside numbered blocks."""
    match = BLOCK.match(name)
    return match.group(1) if match else None


def later_block_layers(layer_names: list[str], frozen_block_fraction: float) -> list[str]:
    """The layers of ``layer_names`` in numbered blocks after the first ``frozen_block_fraction``
    of those blocks (rounded half up), in the blocks' order of appearance."""
    blocks = list(dict.fromkeys(b for b in map(block_of, layer_names) if b is not None))
    frozen = set(blocks[: math.floor(frozen_block_fraction * len(blocks) + 0.5)])
    return [name for name in layer_names if block_of(name) is not None and block_of(name) not in frozen]


def cosine_weight_decay(step: int, total_steps: int, initial: float, final: float) -> float:
    """``final + (initial - final) * (1 + cos(pi * step / total_steps)) / 2`` (``step`` capped at the end)."""
    progress = min(step, total_steps) / max(total_steps, 1)
    return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


class SoMA(LoRA):
    """Minor singular components of the later blocks' layers train (see the module docstring).

    Args:
        r: minor components per layer (at most the smaller side of every adapted weight).
        frozen_block_fraction: share of the numbered blocks, from the input side, left frozen.
        weight_decay, final_weight_decay: the cosine schedule's start and end (decoupled decay).
        total_steps: optimizer steps the schedule spans; ``None`` = the trainer's estimate of the
            run's steps (give it when a run is split over several fits with different limits).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "soma"

    #: it reads each adapted layer's own weight and factors, which peft's attention layer
    #: (in and out projections together) does not have as one matrix
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, r: int = 16, frozen_block_fraction: float = 1 / 3, weight_decay: float = 0.05,
                 final_weight_decay: float = 1e-5, total_steps: int | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if not 0.0 <= frozen_block_fraction < 1.0:
            raise ValueError(f"SoMA: frozen_block_fraction must be in [0, 1), got {frozen_block_fraction}")
        if weight_decay < 0 or final_weight_decay < 0:
            raise ValueError(f"SoMA: weight decays must be >= 0, got {weight_decay} and {final_weight_decay}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"SoMA: total_steps must be >= 1 or None, got {total_steps}")
        super().__init__(r=r, lora_alpha=float(r), target_modules=target_modules, pretrained_checkpoint=pretrained_checkpoint)
        self.frozen_block_fraction = frozen_block_fraction
        self.weight_decay, self.final_weight_decay = weight_decay, final_weight_decay
        self.total_steps = total_steps
        self.adapted_layers: list[str] = []

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        self.adapted_layers = later_block_layers(layer_names, self.frozen_block_fraction)
        if not self.adapted_layers:
            raise self.fail(
                f"no target layer lies in a numbered block after the first {self.frozen_block_fraction:.2f} "
                f"of the blocks (targets: {layer_names[:8]})",
                "lower frozen_block_fraction, or target layers inside numbered blocks (e.g. blocks.N.*)",
            )
        super().inject(module, self.adapted_layers, trainer)
        with torch.no_grad():
            for name in self.adapted_layers:
                self._start_from_minor_components(module.get_submodule(name))

    def _start_from_minor_components(self, layer: nn.Module) -> None:
        base, lora_a, lora_b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
        weight = weight_matrix(base)
        if min(weight.shape) < self.r:
            raise self.fail(f"r={self.r} exceeds the smaller side {min(weight.shape)} of a target layer's weight",
                            "lower r or leave that layer out of target_modules")
        # peft's scale is lora_alpha / r = 1 here, so B A enters unscaled and W' = W at the start
        b, a, residual = minor_components(weight, self.r)
        lora_a.weight.copy_(a.reshape(lora_a.weight.shape))
        lora_b.weight.copy_(b.reshape(lora_b.weight.shape))
        base.weight.copy_(residual.reshape(base.weight.shape).to(base.weight.dtype))

    def trains(self, name: str, parameter: nn.Parameter) -> bool:
        return any(name == f"{layer}.base_layer.bias" for layer in self.adapted_layers)

    def save_pretrained(self, module: nn.Module, directory: str | Path, root: str = "") -> None:
        """Not offered: a peft adapter is loaded onto the pretrained weights ``W``, but SoMA's
        factors act on the residual ``W - B0 A0``."""
        raise self.fail("a peft adapter directory would apply its factors to the pretrained weights, but SoMA's "
                        "act on the residual W - B0 A0",
                        "fold them in with merge(module) and save the module, or reload a SoMA checkpoint with "
                        "reglab.callbacks.peft.load_finetuned")

    # -- the annealed, decoupled weight decay -----------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            if any(group.get("weight_decay", 0.0) for group in optimizer.param_groups):
                raise self.fail(
                    f"{type(optimizer).__name__} has its own weight_decay, and SoMA applies its annealed "
                    "weight decay itself",
                    "set the optimizer's weight_decay to 0 (ClassificationModule(weight_decay=0.0))",
                )

    def current_weight_decay(self, trainer: L.Trainer) -> float:
        total = self.total_steps or trainer.estimated_stepping_batches
        return cosine_weight_decay(trainer.global_step, total, self.weight_decay, self.final_weight_decay)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        decay = self.current_weight_decay(trainer)
        for group in optimizer.param_groups:
            parameters = [p for p in group["params"] if p.requires_grad and p.grad is not None]
            if parameters:
                torch._foreach_mul_(parameters, 1.0 - group["lr"] * decay)
