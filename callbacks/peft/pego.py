"""PEGO — a group of LoRAs with orthogonality regularization (paper 11, domain generalization).

Every adapted layer with frozen weight ``W`` (``out x in``; a convolution's kernel read as
``out x (in*kh*kw)``) gets ``N`` LoRA adapters whose updates add up:

    W' = W + sum_i dW_i,      dW_i = B_i A_i      (rank r each; A_i Kaiming-uniform, B_i = 0)

and the loss adds, summed over the adapted layers (official ``PEGO.update`` in
``domainbed/algorithms/algorithms.py`` of github.com/JudgingH/PEGO):

    L_orth = lam * [ sum_i ||W dW_i^T||_1  +  sum_{i<j} ||dW_i dW_j^T||_1 ]

where ``||.||_1`` is the sum of absolute entries: the first part keeps each update orthogonal to
the pretrained weight (so the generalizable pretrained features are not overwritten), the second
keeps the adapters of a group orthogonal to each other (so they learn different things). Defaults
are the official scripts' (``run.sh``): ``N = 4`` adapters of rank ``r = 4``, ``lam = 1e-3``; the
official adapters have no scaling (``B A x``), hence ``lora_alpha = r``. The official code adapts
the query and value projections of a CLIP ViT (``target_modules``); the penalty there uses the
query / value rows of the fused ``qkv`` weight, here the whole weight of each adapted layer.

The adapters are peft's LoRA layers (``N`` named adapters per layer, all active at once), so
merging folds all of them into ``W``; the penalty is computed in fp32 with autocast off.

Method card:
    what it does: LoRA with several adapters per layer kept orthogonal to each other and to the
        pretrained weights;
    when it helps: domain generalization — better accuracy on unseen domains than one LoRA (paper);
    what it costs: N times LoRA's parameters, and per layer N + N(N-1)/2 products of ``out x in``
        matrices for the penalty (no inference cost after :meth:`merge`).

Example:
    >>> from reglab.callbacks.peft import PEGO
    >>> pego = PEGO(num_adapters=4, r=4, lam=1e-3, target_modules=["qkv"])
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.lora import LoRA
from reglab.mixins import StepOutput
from reglab.peft_surgery import peft_targets


def orthogonality_penalty(weight: Tensor, updates: list[Tensor]) -> Tensor:
    """``sum_i |W dW_i^T|_1 + sum_{i<j} |dW_i dW_j^T|_1`` for one layer (``out x in`` matrices)."""
    total = sum(torch.mm(weight, update.T).abs().sum() for update in updates)
    for i, first in enumerate(updates):
        for second in updates[i + 1:]:
            total = total + torch.mm(first, second.T).abs().sum()
    return total


class PEGO(LoRA):
    """N LoRA adapters per layer with orthogonality penalties (see the module docstring).

    Args:
        num_adapters: N, the adapters per layer (official 4).
        r: rank of each adapter (official 4).
        lam: weight of the orthogonality penalty (official 1e-3).
        lora_alpha: each update is scaled by ``lora_alpha / r``; ``None`` = ``r`` (no scaling, official).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "pego"
    fsdp_unsupported = "its loss term reads the adapters' weights directly (not through their forward), and FSDP may hold only this rank's shard of them"

    #: it reads each adapted layer's own weight and factors, which peft's attention layer
    #: (in and out projections together) does not have as one matrix
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, num_adapters: int = 4, r: int = 4, lam: float = 1e-3, lora_alpha: float | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if num_adapters < 1 or lam < 0:
            raise ValueError(f"PEGO: num_adapters must be >= 1 and lam >= 0, got {num_adapters} and {lam}")
        super().__init__(r=r, lora_alpha=float(r if lora_alpha is None else lora_alpha),
                         target_modules=target_modules, pretrained_checkpoint=pretrained_checkpoint)
        self.num_adapters, self.lam = num_adapters, lam
        self.adapter_names = [f"pego_{i}" for i in range(num_adapters)]
        self.layers: list[nn.Module] = []

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=peft_targets(layer_names))
        with warnings.catch_warnings():
            # peft warns that a second adapter is being added to the model: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for adapter in self.adapter_names:
                inject_adapter_in_model(config, module, adapter_name=adapter)
        self.layers = [module.get_submodule(name) for name in layer_names]
        for layer in self.layers:
            layer.set_adapter(self.adapter_names)  # every adapter of the group is active at once

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        device = out.logits.device
        with torch.autocast(device.type, enabled=False):
            total = torch.zeros((), device=device)
            for layer in self.layers:
                weight = layer.get_base_layer().weight.float()
                weight = weight.reshape(weight.shape[0], -1)
                updates = [layer.get_delta_weight(name).float().reshape(weight.shape) for name in self.adapter_names]
                total = total + orthogonality_penalty(weight, updates)
        return {"orthogonality": self.lam * total}
