"""GS-LoRA — group-sparse LoRA for continual forgetting (Zhao et al., CVPR 2024, paper 07).

A model trained on all classes must *forget* some of them (``forget_classes``) while keeping the
rest. GS-LoRA adds LoRA adapters (peft; ``A`` Kaiming-initialised, ``B`` zero, so the model starts
unchanged), trains only them, and minimises

    L = L_retain + beta * L_forget + alpha * L_structure
    L_retain    = CE over the samples of the kept classes
    L_forget    = max(0, BND - CE over the samples of the forgotten classes)      (bounded loss)
    L_structure = sum_g ||theta_g||_2,   theta_g = every LoRA matrix (A and B) of group g

The bounded forget loss raises the forgotten classes' cross-entropy up to ``BND`` and then stops
(unbounded ascent would wreck the model); the group lasso drives whole groups of adapters to
exactly zero, so the edit stays in few blocks. Where beta, BND and alpha go follows the paper and
the official code (github.com/bjzhb666/GS-LoRA, ``engine.py``: ``loss_forget * beta + loss_remain +
structure_loss * alpha`` with ``relu(BND - CE_forget)``), where CE is the batch mean.

A group is the module that holds the adapted layers: the official code groups the two LoRA
layers of each Transformer block's FFN (``fc1``, ``fc2``), and so does this class for the built-in
ViT (``backbone.blocks.N.mlp``; with attention targeted too, ``backbone.blocks.N.attn`` is a group
of its own); for layers directly inside a container (the CNN's convolutions) each layer is a group.

Defaults: ``r = 8`` and loralib's ``lora_alpha = 1`` (scale ``1/r``) as the official code; beta =
0.15 and alpha = 1e-4 as its image-classification script (``scripts/run_cl_forget_image.sh``; some
face-recognition scripts use alpha = 0.01, off for the first 20 of 100 epochs, a warm-up not
reproduced here); BND = 10, the official argparse default (the scripts use 105-110 with CosFace
logits scaled by 64; with plain softmax over C classes, CE = 10 already means p(true class) =
e^-10). The official FFN-only targeting is ``target_modules=["mlp"]`` on the built-in ViT.

Here forget and kept samples come in the same batches (the official code draws a forget batch
beside each kept batch); the per-sample task loss is the cross-entropy of the kept samples
rescaled so that its batch mean is their mean, and zero for the forgotten ones.

Method card:
    what it does: erases chosen classes from a trained model with a sparse low-rank edit;
    when it helps: deletion requests (privacy, safety) on a pretrained model, possibly several in
        a row (one GS-LoRA per request, merged after each);
    what it costs: LoRA's parameters and step cost, one extra norm per group per step; the data of
        the classes to forget and (some of) the classes to keep.

Example:
    >>> from reglab.callbacks.peft import GSLoRA
    >>> forget = GSLoRA(forget_classes=[0, 1], target_modules=["mlp"])   # FFN adapters, as the paper
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.lora import LoRA
from reglab.mixins import StepOutput


def group_lasso(groups: Iterable[Iterable[Tensor]]) -> Tensor:
    """``sum_g sqrt(sum of squares of every tensor in group g)``. ``vector_norm``'s gradient at a
    group that is exactly zero is 0 (a subgradient), where ``sqrt(sum(t**2))`` would give NaN."""
    return torch.stack([torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in group])) for group in groups]).sum()


def bounded_forget_loss(forget_cross_entropy: Tensor, bound: float) -> Tensor:
    """``max(0, bound - CE)``: pushes the forgotten classes' cross-entropy up to ``bound``, no further."""
    return torch.relu(bound - forget_cross_entropy)


def adapter_group(layer_name: str) -> str:
    """The group of an adapted layer: its parent module (``blocks.0.mlp`` for ``blocks.0.mlp.fc1``),
    or the layer itself when it sits directly in a numbered container or at the root."""
    parent, _, last = layer_name.rpartition(".")
    return layer_name if last.isdigit() or not parent else parent


def retain_and_forget_losses(per_sample_ce: Tensor, forget_mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(per-sample retain loss whose batch mean is the kept samples' mean CE, mean CE of the
    forgotten samples or ``None`` when the batch has none)."""
    kept = ~forget_mask
    retain = per_sample_ce * kept * (len(per_sample_ce) / kept.sum().clamp_min(1))
    forget = per_sample_ce[forget_mask].mean() if forget_mask.any() else None
    return retain, forget


class GSLoRA(LoRA):
    """Forget ``forget_classes`` with group-sparse LoRA (see the module docstring).

    Args:
        forget_classes: class indices to erase.
        r, lora_alpha: the adapters' rank and scale numerator (scale ``lora_alpha / r``).
        sparsity_weight: alpha, the weight of the group lasso.
        forget_weight: beta, the weight of the bounded forget loss.
        forget_bound: BND, the cross-entropy the forgotten classes are pushed up to.
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "gs_lora"
    fsdp_unsupported = "its loss term reads the adapters' weights directly (not through their forward), and FSDP may hold only this rank's shard of them"

    #: it reads each adapted layer's own weight and factors, which peft's attention layer
    #: (in and out projections together) does not have as one matrix
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, forget_classes: list[int], r: int = 8, lora_alpha: float = 1.0, sparsity_weight: float = 1e-4,
                 forget_weight: float = 0.15, forget_bound: float = 10.0, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if not forget_classes:
            raise ValueError("GSLoRA: forget_classes is empty; name at least one class to forget")
        if min(sparsity_weight, forget_weight, forget_bound) < 0:
            raise ValueError("GSLoRA: sparsity_weight, forget_weight and forget_bound must be >= 0, got "
                             f"{sparsity_weight}, {forget_weight}, {forget_bound}")
        super().__init__(r=r, lora_alpha=lora_alpha, target_modules=target_modules, pretrained_checkpoint=pretrained_checkpoint)
        self.forget_classes = list(forget_classes)
        self.sparsity_weight, self.forget_weight, self.forget_bound = sparsity_weight, forget_weight, forget_bound
        self.groups: dict[str, list[nn.Parameter]] = {}

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        num_classes = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
        if num_classes is not None and not all(0 <= c < num_classes for c in self.forget_classes):
            raise self.fail(f"forget_classes {self.forget_classes} are not all classes of the data (0..{num_classes - 1})",
                            "name class indices the DataModule has")
        super().inject(module, layer_names, trainer)
        self.groups = {}
        for name in layer_names:
            layer = module.get_submodule(name)
            self.groups.setdefault(adapter_group(name), []).extend(
                [layer.lora_A["default"].weight, layer.lora_B["default"].weight])

    @torch.no_grad()
    def group_norms(self) -> dict[str, float]:
        """``||theta_g||_2`` per group (for reporting which groups the lasso switched off)."""
        return {name: group_lasso([params]).item() for name, params in self.groups.items()}

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        retain, _ = retain_and_forget_losses(module.task_loss(out), self._forget_mask(out))
        return retain

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        _, forget = retain_and_forget_losses(module.task_loss(out), self._forget_mask(out))
        forget_term = out.logits.new_zeros((), dtype=torch.float32) if forget is None else \
            self.forget_weight * bounded_forget_loss(forget, self.forget_bound)
        return {"forget": forget_term, "group_sparsity": self.sparsity_weight * group_lasso(self.groups.values())}

    def _forget_mask(self, out: StepOutput) -> Tensor:
        return torch.isin(out.labels, torch.tensor(self.forget_classes, device=out.labels.device))
