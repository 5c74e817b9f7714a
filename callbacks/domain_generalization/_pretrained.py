"""What the family's fine-tuning techniques (DR-Tune, Core-tuning) share: starting from a
``pretrained_checkpoint`` the way the PEFT techniques, NoiseFiT and L2-SP do, so the ``finetune``
claims protocol passes it to every arm alike; and the head the techniques run on other features."""

from __future__ import annotations

import lightning as L
from torch import Tensor, nn

from reglab.checkpoints import copy_pretrained_weights, load_state_dict_file
from reglab.technique import Technique


def load_pretrained(technique: Technique, module: nn.Module, checkpoint: str) -> None:
    """Copy every entry of ``checkpoint`` into ``module`` (the same architecture: each entry must fit;
    a compiled module's ``_orig_mod.`` names match the plain ones of a checkpoint taken without compile)."""
    names = {key.replace("_orig_mod.", ""): key for key in module.state_dict()}
    state = {names.get(key, key): value for key, value in load_state_dict_file(checkpoint).items()}
    try:
        copy_pretrained_weights(module, state, sorted({key.split(".")[0] for key in module.state_dict()}))
    except ValueError as error:
        raise technique.fail(f"pretrained_checkpoint {checkpoint}: {error}",
                             "pretrain the same architecture and number of classes") from None


def linear_head(technique: Technique, module: L.LightningModule, why: str) -> nn.Module:
    """``module.head``, which must hold a ``(classes, features)`` weight; fails naming ``why`` it is needed."""
    head = getattr(module, "head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise technique.fail(f"{why}, but {type(module).__name__} has no `head` with a (classes, features) weight",
                             "use a module with a separate linear head (ClassificationModule with a backbone that has none)")
    return head


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (the ``finetune`` protocol reports them per arm)."""
    parameters = list(module.parameters())
    return {"trainable": sum(p.numel() for p in parameters if p.requires_grad), "total": sum(p.numel() for p in parameters)}
