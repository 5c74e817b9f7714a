"""EWC — elastic weight consolidation with an online diagonal Fisher (Kirkpatrick et al. 2017;
online form of Schwarz et al. 2018), as evaluated in paper 40.

After task t the diagonal Fisher of the model is estimated on the task's training samples and
added to the running importance; the parameters are remembered as theta*:

    F_i  <- gamma * F_i + mean_n (d/d theta_i  CE(z_n, yhat_n))^2,   yhat_n = argmax z_n
    loss  = CE + lam * sum_i F_i (theta_i - theta*_i)^2

As in the GT-RIPL Continual-Learning-Benchmark code the paper builds on: the labels of the Fisher
are the model's own predictions (not the data's labels), gradients are per sample, the Fisher
is accumulated with gamma = 1 and only the latest anchor is kept. The estimate runs in eval mode
so batch-norm statistics are not touched.

Under DDP every rank sums the squared gradients over its own shard and counts its samples; the
sums and counts are all-reduced before dividing, so every rank holds the Fisher of the union of
the shards, exactly as one process would compute it on all of them (also for unequal shards).

Method card (what it does, when it helps, what it costs): ``ewc.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import EWC
    >>> ewc = EWC(lam=100.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.callbacks.continual.anchors import AnchoredParameterPenalty, trainable_parameters

DEFAULT_LAM = 100.0


def diagonal_fisher(
    module: L.LightningModule, batches: Iterable[dict[str, Any]], max_samples: int | None = None
) -> dict[str, Tensor]:
    """Mean over samples of the squared per-sample gradient of CE against the predicted label.

    ``module`` must implement ``forward_step(batch) -> StepOutput`` (RegularizedMixin). Inside an
    initialised process group the mean runs over the samples of all ranks (``max_samples`` caps
    each rank's share).
    """
    parameters = trainable_parameters(module)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training, seen = module.training, 0
    module.eval()
    try:
        for batch in batches:
            batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logits = module.forward_step(batch).logits.float()
            losses = F.cross_entropy(logits, logits.argmax(-1), reduction="none")
            for loss in losses[: None if max_samples is None else max_samples - seen]:
                grads = torch.autograd.grad(loss, list(parameters.values()), retain_graph=True, allow_unused=True)
                for name, grad in zip(parameters, grads):
                    if grad is not None:
                        fisher[name] += grad.float().pow(2)
                seen += 1
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        module.train(was_training)
    return mean_over_ranks(fisher, seen)


def mean_over_ranks(sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """``sums / count`` where, inside a process group, both are first summed over the ranks (one
    all-reduce of the flattened sums with the count appended)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flat = torch.cat([*(s.flatten() for s in sums.values()), torch.tensor([float(count)], device=_device_of(sums))])
        torch.distributed.all_reduce(flat)
        count = int(flat[-1].item())
        totals = flat[:-1].split([s.numel() for s in sums.values()])
        sums = {name: total.view_as(s) for (name, s), total in zip(sums.items(), totals)}
    return {name: value / max(count, 1) for name, value in sums.items()}


def _device_of(tensors: dict[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")


class EWC(AnchoredParameterPenalty):
    """Fisher-weighted pull to the previous task's parameters (see the module docstring).

    Args:
        lam: weight of the penalty.
        gamma: decay of the accumulated Fisher at each task end (1 = plain sum).
        fisher_samples: training samples used per Fisher estimate (``None``: all of the task).
    """

    name = "ewc"

    def __init__(self, lam: float = DEFAULT_LAM, gamma: float = 1.0, fisher_samples: int | None = None) -> None:
        super().__init__(lam)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC: gamma must be in [0, 1], got {gamma}")
        self.gamma, self.fisher_samples = gamma, fisher_samples

    def updated_importance(self, module: L.LightningModule, batches: Iterable[dict[str, Any]]) -> dict[str, Tensor]:
        fisher = diagonal_fisher(module, batches, self.fisher_samples)
        if self.importance is None:
            return fisher
        return {name: self.gamma * self.importance[name].to(f.device) + f for name, f in fisher.items()}
