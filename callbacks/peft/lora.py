"""LoRA — low-rank adapters (Hu et al., ICLR 2022), injected with peft.

Every adapted layer with weight ``W`` (``out x in``) computes

    W' = W + (alpha / r) * B @ A,      A: r x in (Kaiming-uniform init),  B: out x r (zeros)

so ``W' = W`` at the start; ``A``, ``B`` (and the task head) train, ``W`` stays frozen. The
injection, the layers (``nn.Linear``, ``nn.Conv2d``, ...) and merging are peft's
(:func:`reglab.peft_surgery.inject_peft`); reglab picks the layers, freezes the rest and handles
checkpoints. Defaults are peft's ``LoraConfig`` (r = 8, alpha = 8, no dropout).
:meth:`LoRA.save_pretrained` exports the trained adapters (and the task head) with peft's own
``PeftModel.save_pretrained``, so peft alone reloads them: ``PeftModel.from_pretrained(base, path)``.

Method card (what it does, when it helps, what it costs): ``lora.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import LoRA
    >>> lora = LoRA(r=4, target_modules=["qkv", "fc1"])   # regexes over module names
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.peft_surgery import inject_peft, is_task_head, peft_targets, replace_module


class LoRA(ParameterEfficientFineTuning):
    """Low-rank adapters through peft (see the module docstring).

    Args:
        r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter's input.
        target_modules, pretrained_checkpoint: see :class:`ParameterEfficientFineTuning`.
    """

    name = "lora"

    #: nn.MultiheadAttention through peft's own attention layer, which adapts its input and output
    #: projections together (the attention reads them by weight, so wrapping them cannot work)
    layer_types = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)

    def __init__(self, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if r < 1:
            raise ValueError(f"LoRA: r must be >= 1, got {r}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout

    def peft_config(self, layer_names: list[str], **extra: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=peft_targets(layer_names), **extra)

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        inject_peft(self.peft_config(layer_names), module)

    def save_pretrained(self, module: nn.Module, directory: str | Path, root: str = "") -> None:
        """Export the trained adapters and task head of ``module`` as a peft adapter directory.

        Args:
            module: the fine-tuned module (this technique has operated on it).
            directory: where peft writes ``adapter_config.json`` and ``adapter_model.safetensors``.
            root: the submodule to export, e.g. ``"backbone.model"`` for the transformers model
                inside an ``hf:`` backbone, so that the adapter loads onto
                ``AutoModelForSequenceClassification.from_pretrained(...)``; ``""`` = the whole module.

        A copy of ``root`` with the adapters taken out becomes a ``PeftModel`` (peft injects the same
        layers under the same names, the head as ``modules_to_save``), the trained adapter weights
        are copied in, and peft writes the directory. ``module`` itself is not changed.
        """
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        base = copy.deepcopy(module.get_submodule(root))
        layers = [name for name, layer in base.named_modules() if isinstance(layer, LoraLayer)]
        # the out_proj adapter inside peft's attention layer belongs to it: peft recreates both
        adapted = [name for name in layers if not any(name.startswith(f"{outer}.") for outer in layers)]
        if not adapted:
            raise self.fail(f"the module {root or 'given'} holds no LoRA layer", "pass the module this LoRA fine-tuned")
        adapter_weights = {name: value for name, value in base.state_dict().items() if ".lora_" in name}
        for name in adapted:
            layer = base.get_submodule(name)
            unload = getattr(layer, "unload_and_optionally_merge_module", None)
            replace_module(base, name, unload(merge=False, safe_merge=False, adapter_names=None) if unload
                           else layer.get_base_layer())
        base.__dict__.pop("peft_config", None)  # left by the injection; the copy is a plain model again
        heads = [name for name, _ in base.named_modules()
                 if name and is_task_head(name) and not is_task_head(name.rpartition(".")[0])]
        peft_model = get_peft_model(base, self.peft_config(adapted, modules_to_save=heads or None))
        missing_adapter = set(adapter_weights) - set(peft_model.base_model.model.state_dict())
        if missing_adapter:
            raise RuntimeError(f"LoRA: peft named the exported adapters differently: {sorted(missing_adapter)[:5]}")
        peft_model.base_model.model.load_state_dict(adapter_weights, strict=False)
        peft_model.save_pretrained(str(directory))
