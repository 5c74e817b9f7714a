"""GLAD — Generalizable LoRA tuning with RegulArized GraDient (Peng et al., 2025, arXiv 2507.13089,
paper 05): LoRA on a vision-language model, trained on a regularised gradient that steers the
optimisation towards flat regions, so that few-shot tuning on one domain keeps the others.

Source: the paper only (its code "will be publicly available" and is not, at the time of writing); the
stored text here holds its abstract and its first figure's caption, which names the mechanism: the
gradient at SAM's perturbed weights is a reference signal that steers the ordinary gradient. This
module implements that as a gradient-norm penalty in its first-order, two-pass form (Zhao et al.,
"Penalizing Gradient Norm for Efficiently Improving Generalization", ICML 2022), whose update is exactly
an interpolation between the gradient and SAM's:

    g   = grad L(w)                          (the task loss, this micro-batch, over the trainable weights)
    e   = rho * g / ||g||                    (SAM's ascent; one norm over all trainable weights)
    term = alpha * (L(w + e) - L(w))         (~ alpha * rho * ||g||: the penalty lambda ||grad L|| with
                                              lambda = alpha * rho, to first order)
    grad (L(w) + term) = (1 - alpha) grad L(w) + alpha grad L(w + e)

``alpha = 0`` is plain LoRA; ``alpha = 1`` is SAM. The trainable weights are LoRA's adapters (and any
head), so the regularisation acts on the low-rank update only, as in the paper. Defaults: ``rho = 0.05``
(SAM's) and ``alpha = 0.8`` (within GNP's reported good range); the paper's own values could not be read.

How it runs: the penalty is a loss term. It takes ``g`` with ``torch.autograd.grad`` (no ``.grad``
written, no DDP hook fired: every process and micro-batch perturbs with its own gradient, SAM's
m-sharpness) and evaluates the task loss at ``w + e`` with the core's
:func:`~reglab.technique.perturbed_output` (``e`` detached, nothing moved in place), so the step's one
ordinary backward applies the interpolated gradient; gradient accumulation and DDP average it. Unlike
the ``perturb_weights`` stage (SAM), the task loss at ``w`` keeps its weight and the term is logged
(``train/glad/gradient_penalty``), so other techniques' terms stack unchanged. Refused with SAM (the two
mixes would compound), under ``16-mixed`` and FSDP (the reasons of the ``perturb_weights`` stage).

LoRA is another family's technique: GLAD owns one passed as ``lora`` (a
:class:`~reglab.callbacks.peft.LoRA`, by class path in a config) and runs its hooks, so GLAD alone is the
whole method; or it is stacked beside one.

Method card (what it does, when it helps, what it costs): ``glad.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import LoRA
    >>> from reglab.callbacks.vision_language import GLAD
    >>> glad = GLAD(rho=0.05, alpha=0.8, lora=LoRA(r=4, lora_alpha=4))   # LoRA with GLAD's gradient
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import (PERTURBED_FP16, PERTURBED_FSDP, Technique, ascent_offsets, perturbed_output,
                              trainable_parameters)


class GLAD(Technique):
    """LoRA's update trained on ``(1 - alpha) grad L(w) + alpha grad L(w + rho g/||g||)`` (module docstring).

    Args:
        rho: radius of the ascent step (SAM's rho).
        alpha: the SAM gradient's share of the update, in ``(0, 1]`` (the penalty weight is ``alpha * rho``).
        lora: the LoRA technique GLAD owns and runs (its setup, first-step check and checkpoint recipe);
            when not given, stack GLAD beside one.
    """

    name = "glad"
    conflicts_with = ("SAM",)
    fp16_unsupported = PERTURBED_FP16
    fsdp_unsupported = PERTURBED_FSDP

    def __init__(self, rho: float = 0.05, alpha: float = 0.8, lora: Technique | None = None) -> None:
        if not rho > 0 or not 0 < alpha <= 1:
            raise self.fail(f"rho={rho} and alpha={alpha}", "use rho > 0 and 0 < alpha <= 1 (alpha 0 is plain LoRA)")
        self.rho, self.alpha, self.lora = rho, alpha, lora

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lora is not None:  # owned: set up at every stage, as the trainer would
            self.lora.setup(trainer, pl_module, stage)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        at_w = out.task_loss.mean()
        offsets = ascent_offsets(at_w, trainable_parameters(module), self.rho)
        if not offsets:  # nothing trainable reaches the loss: no gradient to steer
            return {"gradient_penalty": at_w.detach() * 0.0}
        moved = perturbed_output(module, module.techniques, out, offsets)
        owner = next((t for t in module.techniques if "task_loss" in t.stages), None)
        at_moved = (owner.task_loss(moved, module) if owner else module.task_loss(moved)).mean()
        return {"gradient_penalty": self.alpha * (at_moved - at_w)}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.lora is not None:
            self.lora.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.lora is not None:  # LoRA's recipe, so loading the checkpoint redoes the surgery
            self.lora.on_save_checkpoint(trainer, pl_module, checkpoint)
