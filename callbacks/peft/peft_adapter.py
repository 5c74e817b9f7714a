"""Any peft method as a technique: DoRA, rsLoRA, PiSSA, OLoRA, VeRA, FourierFT, IA3, LoHa, LoKr, OFT, BOFT, ...

``PeftAdapter(method, config)`` builds peft's config class for ``method`` (a ``peft.PeftType``
name, any case) from the ``config`` mapping, exactly as ``peft.<Method>Config(**config)`` would,
and lets peft inject its layers (:func:`reglab.peft_surgery.inject_peft`). Nothing of the methods
themselves is written here: the layers, their initialisations (PiSSA's and OLoRA's rewrite the
frozen weight into a residual) and merging are peft's. What reglab adds is what every PEFT
technique of the family gets (:class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`):
injection at ``setup`` (before optimizers, DDP and checkpoint restore), layer choice by regex over
reglab's module names (``target_modules``; default every ``nn.Linear`` / ``nn.Conv2d`` but the task
head), freezing everything but the adapters and the head, trimmed checkpoints that
``load_from_checkpoint`` rebuilds, exact resume, and stacking with the regularizers of the step
contract.

Refused when built, with the reason: unknown methods or config keys (with the close names),
``target_modules`` inside ``config`` (use the technique's own argument, which speaks reglab's
module names), peft's prompt-learning methods (prompt / prefix / p-tuning, X-LoRA, Poly, ...: they
wrap a transformers model instead of replacing layers), and AdaLoRA, which has per-step work
(its rank reallocation) and a loss term: that is :class:`~reglab.callbacks.peft.AdaLoRA`. A method that cannot adapt a chosen layer (most take ``nn.Linear`` only; BOFT needs
block sizes that divide the layer) fails at setup with peft's reason and the fix.

Method card (what it does, when it helps, what it costs): ``peft_adapter.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import PeftAdapter
    >>> dora = PeftAdapter("lora", {"r": 4, "use_dora": True})
    >>> pissa = PeftAdapter("lora", {"r": 4, "init_lora_weights": "pissa"})
    >>> vera = PeftAdapter("vera", {"r": 16}, target_modules=["layers"])
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import lightning as L
from torch import nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.peft_surgery import inject_peft, peft_targets

#: methods with work beyond the injection, and the technique that does it
OWN_TECHNIQUE = {"ADALORA": "reglab.callbacks.AdaLoRA (its rank reallocation after every optimizer step and "
                            "its orthogonality term)"}


def peft_config_class(method: str) -> tuple[Any, type]:
    """``(peft.PeftType, config class)`` of a peft method name (any case): a clear error otherwise."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {peft_type.value: (peft_type, config) for peft_type, config in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    key = method.upper()
    if key not in by_name:
        close = difflib.get_close_matches(key, list(by_name), n=4, cutoff=0.5)
        raise ValueError(f"peft has no method {method!r} (close: {close or sorted(by_name)[:8]})")
    return by_name[key]


class PeftAdapter(ParameterEfficientFineTuning):
    """One peft method, configured from YAML (see the module docstring).

    Args:
        method: a ``peft.PeftType`` name: ``"lora"`` (with ``use_dora``, ``use_rslora``,
            ``init_lora_weights: pissa | olora | ...``), ``"vera"``, ``"fourierft"``, ``"ia3"``,
            ``"loha"``, ``"lokr"``, ``"oft"``, ``"boft"``, ``"hra"``, ...
        config: keyword arguments of that method's peft config class (``LoraConfig``, ...), in
            peft's own names and meanings; peft's defaults for the rest.
        target_modules: regexes over reglab's module names (``"qkv"``, ``"^backbone\\."``);
            ``None`` = every ``nn.Linear`` and ``nn.Conv2d`` outside the task head (and, for LoRA,
            ``nn.MultiheadAttention``, through peft's attention layer).
        pretrained_checkpoint: Lightning checkpoint (or state dict) of the same module to start from.
    """

    name = "peft_adapter"
    #: the one method a subclass is for (its peft type name); None = any method
    method_name: str | None = None

    def __init__(self, method: str = "lora", config: dict[str, Any] | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        super().__init__(target_modules, pretrained_checkpoint)
        self.method, self.config = method, dict(config or {})
        try:
            peft_type, config_class = peft_config_class(method)
        except ValueError as error:
            raise self.fail(str(error), "name one of peft's methods, as in peft.PeftType") from None
        fields = {f.name for f in dataclasses.fields(config_class) if f.init}
        if "target_modules" not in fields:
            raise self.fail(f"peft's {peft_type.value} is a prompt-learning method (it wraps a transformers "
                            "model instead of replacing layers)", "pick a method that adapts layers (lora, vera, ...)")
        if peft_type.value in OWN_TECHNIQUE and type(self).method_name != peft_type.value:
            raise self.fail(f"peft's {peft_type.value} needs more than an injection",
                            f"use {OWN_TECHNIQUE[peft_type.value]}")
        if "target_modules" in self.config:
            raise self.fail("config sets target_modules, which peft would match against its own module names",
                            "pass target_modules to PeftAdapter itself (regexes over reglab's module names)")
        unknown = sorted(set(self.config) - fields)
        if unknown:
            close = {key: difflib.get_close_matches(key, sorted(fields), n=2) for key in unknown}
            raise self.fail(f"{config_class.__name__} has no field(s) {unknown} (close: {close})",
                            f"use fields of peft's {config_class.__name__}")
        self.peft_type, self.config_class = peft_type, config_class
        self.peft_config("")  # peft's own checks of the values, now rather than at setup
        self.layer_types = ((nn.Linear, nn.Conv2d, nn.MultiheadAttention) if peft_type.value == "LORA"
                            else (nn.Linear, nn.Conv2d))

    def peft_config(self, targets: str, **defaults: Any) -> Any:
        """peft's config object for the layers ``targets`` (``defaults`` fill fields the config omits)."""
        try:
            return self.config_class(**{**defaults, **self.config}, target_modules=targets)
        except (TypeError, ValueError) as error:
            raise self.fail(f"peft's {self.config_class.__name__} refuses the config {self.config}: {error}",
                            "change the config as peft's message says") from None

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        self.inject_with_peft(module, layer_names)

    def inject_with_peft(self, module: nn.Module, layer_names: list[str]) -> Any:
        """Let peft adapt ``layer_names`` of ``module``; returns peft's tuner."""
        config = self.peft_config(peft_targets(layer_names))
        try:
            return inject_peft(config, module)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise self.fail(f"peft's {self.peft_type.value} cannot adapt the chosen layers {layer_names}: {error}",
                            "set target_modules to layers the method supports (most take nn.Linear only), or "
                            "change the config as peft's message says") from None

    def injected(self, module: nn.Module, existing: set[int]) -> set[str]:
        # by peft's parameter prefix: PiSSA / OLoRA give the frozen weight new storage (its residual)
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        prefix = PEFT_TYPE_TO_TUNER_MAPPING[self.peft_type].prefix
        return {name for name, _ in module.named_parameters() if prefix in name}
