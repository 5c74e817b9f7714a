"""LoRA — low-rank adapters (Hu et al., ICLR 2022), injected with peft.

Every adapted layer with weight ``W`` (``out x in``) computes

    W' = W + (alpha / r) * B @ A,      A: r x in (Kaiming-uniform init),  B: out x r (zeros)

so ``W' = W`` at the start; ``A``, ``B`` (and the task head) train, ``W`` stays frozen. The
injection, the layers (``nn.Linear``, ``nn.Conv2d``, ...) and merging are peft's
(``peft.inject_adapter_in_model``); reglab picks the layers, freezes the rest and handles
checkpoints. Defaults are peft's ``LoraConfig`` (r = 8, alpha = 8, no dropout).

Method card:
    what it does: learns a rank-r update of each adapted weight;
    when it helps: fine-tuning with little memory; the reference PEFT baseline (#05, #11, #18,
        #23, #28, #33, #41, #46, #55, #60, #69 compare against it);
    what it costs: r * (in + out) parameters per layer, one extra low-rank product per layer in
        training, nothing after :meth:`merge`.

Example:
    >>> from callbacks.peft import LoRA
    >>> lora = LoRA(r=4, target_modules=["qkv", "fc1"])   # regexes over module names
"""

from __future__ import annotations

import lightning as L
from torch import nn

from callbacks.peft.base import ParameterEfficientFineTuning


class LoRA(ParameterEfficientFineTuning):
    """Low-rank adapters through peft (see the module docstring).

    Args:
        r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter's input.
        target_modules, pretrained_checkpoint: see :class:`ParameterEfficientFineTuning`.
    """

    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if r < 1:
            raise ValueError(f"LoRA: r must be >= 1, got {r}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=layer_names)
        inject_adapter_in_model(config, module)
