"""LoRA-SB — a trainable r x r core between factors of the first gradients (Ponkshe et al., 2024, paper 55).

LoRA-XS's architecture, ``W' = W + B R A`` with ``B`` (``out x r``) and ``A`` (``r x in``) frozen
and only ``R`` (``r x r``) trained, initialised so that the first update is the best rank-r
approximation of a full fine-tuning step. Following the official code
(``utils/gradient_utils.py`` of github.com/RaghavSinghal10/lora-sb), at setup:

    G      = sum of the loss gradients w.r.t. W over the first ``gradient_samples`` training
             samples (under DDP each rank takes its share of its own shard of the data and the
             sums are all-reduced, so every rank gets the same G as one process would)
    -sign(G) = U S V^T  (SVD),      B = U_r,  A = V_r^T

The paper also sets ``R0`` from ``S_r`` and subtracts ``B R0 A`` from ``W``; here the update is
written as ``B (R - R0) A`` with ``R0 = 0``, which gives the same outputs and gradients, so ``W``
stays untouched. The gradients are taken in eval mode (no dropout draws, no BatchNorm statistic
updates) and before the other techniques' stages.

Method card:
    what it does: trains r^2 numbers per layer inside the subspace of the first gradients;
    when it helps: about LoRA's accuracy with far fewer parameters (r^2 vs r * (in + out));
    what it costs: forward/backward passes over ``gradient_samples`` samples and one SVD per
        layer at setup (on the device the model is on at setup: the CPU under Lightning); the
        factors are stored in checkpoints (they depend on the data, not only on the weights).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.frozen_factors import FrozenFactorsTuning, effective_rank


def lora_sb_factors(gradient: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, A, R0)`` from an ``out x in`` accumulated gradient: the top-r singular vectors of the
    sign-SGD step ``-sign(G)`` and a zero ``r x r`` core."""
    u, _, vh = torch.linalg.svd(-torch.sign(gradient.float()), full_matrices=False)
    r = effective_rank(rank, gradient)
    return u[:, :r], vh[:r], gradient.new_zeros(r, r, dtype=torch.float32)


def accumulated_gradients(module: nn.Module, layer_names: list[str], trainer: L.Trainer, num_samples: int) -> dict[str, Tensor]:
    """Loss gradients w.r.t. the target layers' weights, summed over batches covering
    ``num_samples`` training samples in total, as ``out x in`` matrices.

    The DataModule's training loader is sharded over the ranks, so each rank covers
    ``ceil(num_samples / world_size)`` of its own samples and the per-rank sums are all-reduced:
    the work is split and the result is the sum over the union of the shards' samples."""
    weights = {name: module.get_submodule(name).weight for name in layer_names}
    sums = {name: torch.zeros_like(w, dtype=torch.float32).reshape(w.shape[0], -1) for name, w in weights.items()}
    was_training = module.training
    module.eval()
    seen, per_rank = 0, math.ceil(num_samples / trainer.world_size)
    for batch in trainer.datamodule.train_dataloader():
        if seen >= per_rank:
            break
        module.zero_grad(set_to_none=True)
        out = module.forward_step(batch)
        module.task_loss(out).mean().backward()
        for name, weight in weights.items():
            sums[name] += weight.grad.float().reshape(weight.shape[0], -1)
        seen += len(out.logits)
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    return {name: trainer.strategy.reduce(total, reduce_op="sum") for name, total in sums.items()}


class LoRASB(FrozenFactorsTuning):
    """LoRA-SB: train an r x r core per target layer (see the module docstring).

    Args:
        rank: r.
        gradient_samples: training samples whose gradients initialise the factors, over all ranks
            together (official: 170).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "lora_sb"
    fsdp_unsupported = "it initialises its cores from full weight gradients it computes itself, which FSDP shards"

    persistent_factors = True

    def __init__(self, rank: int = 8, gradient_samples: int = 170, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if rank < 1 or gradient_samples < 1:
            raise ValueError(f"LoRASB: rank and gradient_samples must be >= 1, got {rank} and {gradient_samples}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.rank, self.gradient_samples = rank, gradient_samples

    def factors(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        if trainer is None or trainer.ckpt_path is not None:
            # rebuilding from a checkpoint, which holds the factors: only the shapes matter here
            shapes = {name: module.get_submodule(name).weight for name in layer_names}
            return {name: lora_sb_factors(torch.zeros(w.shape[0], w[0].numel()), self.rank) for name, w in shapes.items()}
        if trainer.datamodule is None:
            raise self.fail("it estimates the first gradients from the DataModule's training loader, "
                            "but the trainer has no DataModule", "pass datamodule= to trainer.fit")
        with torch.enable_grad():
            gradients = accumulated_gradients(module, layer_names, trainer, self.gradient_samples)
        return {name: lora_sb_factors(gradient, self.rank) for name, gradient in gradients.items()}
