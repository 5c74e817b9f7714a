"""AdaLoRA — adaptive budget allocation for LoRA (Zhang et al., ICLR 2023), through peft.

Each adapted weight gets an SVD-shaped update ``W + B · diag(E) · A`` (peft's ``AdaLoraLayer``).
After every optimizer step peft's ``RankAllocator`` scores each singular triplet by the
sensitivity ``|p · ∇p|`` (smoothed by two EMAs, ``beta1`` / ``beta2``) and, on a cubic schedule
from ``init_r`` down to ``target_r`` per layer between ``tinit`` and ``total_step − tfinal``,
zeroes the least important entries of ``E`` every ``deltaT`` steps (peft's
``AdaLoraModel.update_and_allocate``, called here in ``on_train_batch_end`` once per optimizer
step, while the step's gradients are still there). The orthogonality regularizer
``orth_reg_weight · mean ‖PᵀP − I‖_F`` over the ``A`` and ``B`` factors is added as a loss term
of the step contract: peft adds it only inside ``AdaLoraModel.forward`` to a transformers output's
``loss``, which the contract does not produce, so these few lines are written here
(:func:`adalora_orthogonality`, the same formula).

Defaults are peft's ``AdaLoraConfig`` (init_r 12, target_r 8, beta1 = beta2 = 0.85, orth_reg_weight
0.5, deltaT 1); ``total_step`` is the run's number of optimizer steps
(``trainer.estimated_stepping_batches``) unless the config sets it. The importance statistics and
the rank pattern are this technique's state: checkpoints hold them, so a resumed run reallocates
exactly as an uninterrupted one, and every DDP rank computes the same ones (they come from the
all-reduced gradients).

Method card (what it does, when it helps, what it costs): ``adalora.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import AdaLoRA
    >>> adalora = AdaLoRA({"init_r": 8, "target_r": 4, "tinit": 10, "tfinal": 10})
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.peft_adapter import PeftAdapter
from reglab.mixins import StepOutput

#: the importance statistics of peft's RankAllocator (per parameter name)
STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_orthogonality(module: nn.Module, adapter: str = "default") -> Tensor:
    """``mean ‖P Pᵀ − I‖_F`` over the ``lora_A`` factors (r x in, rows orthonormal) and
    ``‖Pᵀ P − I‖_F`` over the ``lora_B`` factors (out x r, columns orthonormal) of ``adapter``."""
    covariances = [p @ p.T if "lora_A" in name else p.T @ p for name, p in module.named_parameters()
                   if ("lora_A" in name or "lora_B" in name) and adapter in name]
    terms = [torch.linalg.matrix_norm(c - torch.eye(len(c), device=c.device, dtype=c.dtype)) for c in covariances]
    return torch.stack(terms).mean() if terms else torch.zeros(())


class AdaLoRA(PeftAdapter):
    """peft's AdaLoRA with its per-step rank reallocation and orthogonality term.

    Args:
        config: fields of peft's ``AdaLoraConfig`` (``init_r``, ``target_r``, ``tinit``,
            ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``, ``lora_alpha``,
            ``total_step``, ...).
        target_modules, pretrained_checkpoint: see :class:`PeftAdapter`.
    """

    name = "adalora"
    method_name = "ADALORA"
    stateful = True

    def __init__(self, config: dict[str, Any] | None = None, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        super().__init__("adalora", config, target_modules, pretrained_checkpoint)
        self.tuner: Any = None
        self.allocated_at = 0
        self._pending: dict[str, Any] | None = None

    def peft_config(self, targets: str) -> Any:
        # before setup knows the run's length, the shortest total_step peft accepts for this
        # schedule (a budgeting phase of one step) lets peft check the rest of the config
        shortest = self.config.get("tinit", 0) + self.config.get("tfinal", 0) + 1
        return super().peft_config(targets, total_step=shortest)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and "total_step" not in self.config:
            self.config["total_step"] = int(trainer.estimated_stepping_batches)
        super().setup(trainer, pl_module, stage)

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        self.tuner = self.inject_with_peft(module, layer_names)
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        weight = self.tuner.peft_config["default"].orth_reg_weight
        return {"orthogonality": weight * adalora_orthogonality(module)} if weight else {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # once per optimizer step (not per accumulated micro-batch), before the next zero_grad;
        # peft numbers steps from 0 (the index of the step just taken), so a run's first step scores
        # the triplets before any allocation reads the scores, even in a one-step run
        if trainer.global_step != self.allocated_at:
            self.allocated_at = trainer.global_step
            self.tuner.update_and_allocate(trainer.global_step - 1)

    def state_dict(self) -> dict[str, Any]:
        """Flat: ``<statistic>/<parameter>`` tensors, ``rank_pattern/<layer>`` bool tensors (which
        singular triplets each layer keeps), ``allocated_at``."""
        if self.tuner is None:
            return {}
        allocator = self.tuner.rankallocator
        state: dict[str, Any] = {f"{key}/{name}": t.detach().cpu().clone()
                                 for key in STATISTICS for name, t in getattr(allocator, key).items()}
        rank_pattern = self.tuner.peft_config["default"].rank_pattern or {}
        state.update({f"rank_pattern/{name}": torch.tensor(kept, dtype=torch.bool) for name, kept in rank_pattern.items()})
        return {**state, "allocated_at": self.allocated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.tuner is None:  # restored before setup injected the layers
            self._pending = state_dict
            return
        allocator, self._pending = self.tuner.rankallocator, None
        device = next(self.tuner.model.parameters()).device
        for key in STATISTICS:
            setattr(allocator, key, {name[len(key) + 1:]: t.to(device) for name, t in state_dict.items()
                                     if name.startswith(f"{key}/")})
        rank_pattern = {name[len("rank_pattern/"):]: t.tolist() for name, t in state_dict.items()
                        if name.startswith("rank_pattern/")}
        self.allocated_at = state_dict["allocated_at"]
        self.tuner.peft_config["default"].rank_pattern = rank_pattern or None
