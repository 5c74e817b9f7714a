"""L2-SP — an L2 pull towards the starting point of fine-tuning (Li, Grandvalet & Davoine, ICML 2018).

Fine-tuning every parameter, the weights ``w_S`` shared with the pretrained model are pulled back
to their starting point ``w0_S`` and the new weights ``w_new`` (the task head) to zero:

    loss = task loss + alpha / 2 * ||w_S - w0_S||^2 + beta / 2 * ||w_new||^2

The penalty replaces weight decay (leave the optimizer's ``weight_decay`` at 0). The starting point is
the weights when the fit starts: the ``pretrained_checkpoint``, which this technique loads first (as the
PEFT techniques do, so the ``finetune`` protocol passes it the same way), or whatever the module holds
(weights a ``PretrainedWeights`` callback or the user copied in). It is kept as state, so a resumed run
keeps pulling towards the original starting point. New weights are those inside a module named one of
``new_modules`` (the head); with a checkpoint whose head does not fit (another number of classes) the
head keeps its initialisation. Defaults ``alpha = 0.1``, ``beta = 0.01``: the paper's setting (its
hyper-parameters were chosen per dataset around these values; no official code could be read here).
The squared distance is :func:`reglab.anchors.quadratic_penalty`, shared with the continual family's
L2 to the previous task.

Method card (what it does, when it helps, what it costs): ``l2_sp.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import L2SP
    >>> l2_sp = L2SP(alpha=0.1, beta=0.01, pretrained_checkpoint=None)   # anchored to the weights at fit start
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.anchors import flatten_state, quadratic_penalty, tensors_on, trainable_parameters, unflatten_state
from reglab.checkpoints import load_state_dict_file
from reglab.mixins import StepOutput
from reglab.technique import Technique


class L2SP(Technique):
    """``alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2`` (see the module docstring).

    Args:
        alpha: weight of the pull of the shared weights towards the starting point.
        beta: weight of the plain L2 penalty on the new weights.
        new_modules: names of the modules whose parameters are new (any component of a
            parameter's dotted name); ``[]`` = every parameter is anchored.
        pretrained_checkpoint: Lightning checkpoint (or state dict) to start from; every shared
            parameter must be in it with its shape.
    """

    name = "l2_sp"
    stateful = True
    fsdp_unsupported = ("it compares every full parameter with its starting point, and FSDP may hold only this "
                        "rank's shard of a parameter when the loss is computed")

    def __init__(self, alpha: float = 0.1, beta: float = 0.01, new_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"L2SP: alpha and beta must be >= 0, got {alpha} and {beta}")
        self.alpha, self.beta = alpha, beta
        self.new_modules = ["head", "classifier", "score"] if new_modules is None else list(new_modules)
        self.pretrained_checkpoint = pretrained_checkpoint
        self.anchor: dict[str, Tensor] = {}
        self.parameter_counts: dict[str, int] = {}

    def is_new(self, name: str) -> bool:
        return any(part in self.new_modules for part in name.split(".")[:-1])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = list(trainable_parameters(pl_module))
        if self.new_modules and not any(self.is_new(name) for name in names):
            raise self.fail(
                f"no trainable parameter is inside a module named one of new_modules={self.new_modules}; the "
                f"module's trainable parameters are {_listing(names)}",
                "name the new layers (the task head) in new_modules, or set new_modules: [] to anchor every parameter",
            )
        # a later fit of the same model continues from where it is: the starting point is taken once
        if self.pretrained_checkpoint and not self.anchor:
            self.load_starting_point(pl_module, [name for name in names if not self.is_new(name)])
        parameters = list(pl_module.parameters())
        self.parameter_counts = {"trainable": sum(p.numel() for p in parameters if p.requires_grad),
                                 "total": sum(p.numel() for p in parameters)}

    def load_starting_point(self, module: nn.Module, shared: list[str]) -> None:
        """Load the entries of the pretrained checkpoint that fit ``module``; every shared parameter must."""
        state, own = load_state_dict_file(self.pretrained_checkpoint), module.state_dict()
        fitting = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
        missing = [name for name in shared if name not in fitting]
        if missing:
            raise self.fail(
                f"the pretrained checkpoint {self.pretrained_checkpoint} has no entry of the same shape for the "
                f"shared parameters {_listing(missing)}",
                "start from a checkpoint of the same backbone, or name the layers that are new in new_modules",
            )
        module.load_state_dict(fitting, strict=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after DDP has broadcast rank 0's weights and after a resume restored the anchor
        if not self.anchor:
            self.anchor = {name: p.detach().float().clone() for name, p in trainable_parameters(pl_module).items()
                           if not self.is_new(name)}

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        parameters = trainable_parameters(module)
        device = out.logits.device
        self.anchor = tensors_on(self.anchor, device)
        new = [p for name, p in parameters.items() if self.is_new(name)]
        starting_point = quadratic_penalty(parameters, self.anchor, None) if self.anchor else torch.zeros((), device=device)
        new_weights = sum((p.float().pow(2).sum() for p in new), torch.zeros((), device=device))
        return {"starting_point": 0.5 * self.alpha * starting_point, "new_weights": 0.5 * self.beta * new_weights}

    def state_dict(self) -> dict[str, Any]:
        return flatten_state("anchor", self.anchor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchor = unflatten_state("anchor", state_dict)


def _listing(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
