"""The surgery every parameter-efficient fine-tuning technique shares, and full fine-tuning.

A PEFT technique is a :class:`~reglab.technique.Technique` that changes the model at
``setup`` — after the reglab CLI has built the complete model, before Lightning creates the
optimizers and before it restores a checkpoint:

1. load the pretrained weights (``pretrained_checkpoint``), if given;
2. pick the layers to adapt (``target_modules``: regexes over module names; default every layer
   type the technique supports — ``nn.Linear`` and ``nn.Conv2d`` — except the task head) and
   inject adapters into them (:meth:`ParameterEfficientFineTuning.inject`);
3. freeze every parameter except the ones the injection created, the ones the technique names
   (:meth:`ParameterEfficientFineTuning.trains`) and the task head's;
4. report trainable / total parameters (``technique.parameter_counts``, also printed).

A target pattern that matches no layer, or a surgery that would train nothing (no task head),
fails here naming what it looked for and the module's names; after the first backward pass a
warning names every trainable parameter that received no gradient (one the forward never uses).

Because the adapters exist before Lightning restores a checkpoint, ``trainer.fit(ckpt_path=...)``
resumes exactly. With a ``pretrained_checkpoint``, checkpoints hold only the trainable parameters
and the buffers (the frozen ones are rebuilt from the pretrained weights at setup), so the
module's ``strict_loading`` is turned off. The checkpoint records the technique and its arguments,
so ``ClassificationModule.load_from_checkpoint(path)`` redoes the surgery and yields a working
model (:func:`reglab.peft_surgery.restore_surgery`), and
:meth:`ParameterEfficientFineTuning.merge` folds the adapters into the weights for inference.

"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from reglab.checkpoints import add_restore_hook
from reglab.peft_surgery import (
    OPERATED_BY,
    RECIPE_KEY,
    TASK_HEAD_NAMES,
    count_parameters,
    freeze_all_except,
    is_task_head,
    keep_adapters_in_eval,
    load_pretrained,
    merge_adapters,
    name_listing,
    select_layers,
    technique_recipe,
    trainable_state,
    trainable_without_gradient,
)
from reglab.technique import Technique, is_sharded

class ParameterEfficientFineTuning(Technique):
    """Base of the PEFT techniques (see the module docstring for what ``setup`` does).

    Subclasses set ``layer_types`` (what :meth:`inject` can adapt; empty = no injection) and
    override :meth:`inject` and/or :meth:`trains`. They store every ``__init__`` argument as an
    attribute of the same name, which is how a checkpoint records how to redo the surgery.

    Args:
        target_modules: regexes searched in module names (``"qkv"``, ``"^backbone\\."``); ``None``
            = every layer of ``layer_types`` outside the task head. For the built-in MLP that is
            every hidden ``nn.Linear``; for the built-in CNN every ``nn.Conv2d``; for the ViT every
            attention and MLP projection (and the patch embedding, a ``Conv2d``).
        pretrained_checkpoint: Lightning checkpoint (or state dict) of the same module to start from.
    """

    layer_types: tuple[type[nn.Module], ...] = ()

    def __init__(self, target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        self.target_modules = target_modules
        self.pretrained_checkpoint = pretrained_checkpoint
        self.parameter_counts: dict[str, int] = {}
        self._gradients_checked = False

    # -- what subclasses change -----------------------------------------------------------------
    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        """Replace the layers ``layer_names`` of ``module`` by adapters (new parameters train).
        ``trainer`` is ``None`` when a checkpoint is being reloaded outside a run."""

    def trains(self, name: str, parameter: nn.Parameter) -> bool:
        """Whether an existing (not injected) parameter keeps training."""
        return False

    def injected(self, module: nn.Module, existing: set[int]) -> set[str]:
        """Names of the parameters :meth:`inject` created (they train): by default every parameter
        whose storage (``data_ptr``) did not exist before the injection — by storage, not identity,
        because peft's attention layer re-registers the frozen weights it wraps."""
        return {name for name, p in module.named_parameters() if p.data_ptr() not in existing}

    # -- surgery --------------------------------------------------------------------------------
    def prepare(self, module: nn.Module, trainer: L.Trainer | None = None) -> None:
        """Load the pretrained weights, inject, freeze and count (once per module)."""
        operated_by = getattr(module, OPERATED_BY, None)
        if operated_by is self:
            return
        if operated_by is not None:
            raise self.fail(
                f"{type(operated_by).__name__} has already changed this module's layers",
                "attach only one parameter-efficient fine-tuning technique",
            )
        if self.pretrained_checkpoint:
            load_pretrained(module, self.pretrained_checkpoint)
        existing = {p.data_ptr() for p in module.parameters()}
        injected: set[str] = set()
        if self.layer_types:
            try:
                layer_names = select_layers(module, self.target_modules, self.layer_types)
            except ValueError as error:
                raise self.fail(str(error), "give target_modules regexes that match the names of layers "
                                "listed above, or leave target_modules unset to adapt all of them") from None
            self.inject(module, layer_names, trainer)
            injected = self.injected(module, existing)
            injected_storage = {p.data_ptr() for name, p in module.named_parameters() if name in injected}
            keep_adapters_in_eval(module, lambda p: p.data_ptr() in injected_storage)
        freeze_all_except(module, lambda name, p: name in injected or is_task_head(name) or self.trains(name, p))
        if not any(p.requires_grad for p in module.parameters()):
            raise self.fail(
                f"it would train no parameter of {type(module).__name__}: it found no task head (a module "
                f"named one of {sorted(TASK_HEAD_NAMES)}, or inside one) among its modules "
                f"{name_listing([name for name, _ in module.named_modules() if name])}",
                "name the module's output layer `head` (or `classifier` / `score`)",
            )
        # checkpoints hold only what trains; the frozen rest comes from the pretrained weights
        module.strict_loading = False
        setattr(module, OPERATED_BY, self)
        self.parameter_counts = count_parameters(module)
        rank_zero_info(
            f"{type(self).__name__}: {self.parameter_counts['trainable']:,} trainable of "
            f"{self.parameter_counts['total']:,} parameters"
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.prepare(pl_module, trainer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # once, at the first step: a trainable parameter without a gradient is one the forward
        # pass never used (an adapter on a layer whose forward is bypassed)
        if self._gradients_checked:
            return
        self._gradients_checked = True
        if is_sharded(trainer):  # FSDP gives a rank's empty shard of a parameter no gradient
            return
        unused = trainable_without_gradient(pl_module)
        if unused:
            rank_zero_warn(
                f"{type(self).__name__}: {len(unused)} trainable parameters received no gradient in the first "
                f"step, so they do not train: {name_listing(unused)}. The forward "
                "pass does not use them; leave their layers out of target_modules"
            )

    def merge(self, module: nn.Module) -> int:
        """Fold the adapters into the base weights (inference); returns how many were merged."""
        return merge_adapters(module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the frozen weights can be dropped only when they can be rebuilt from a pretrained checkpoint
        if self.pretrained_checkpoint:
            checkpoint["state_dict"] = trainable_state(pl_module, checkpoint["state_dict"])
        checkpoint[RECIPE_KEY] = technique_recipe(self)
        add_restore_hook(checkpoint, "reglab.peft_surgery:restore_surgery")
