"""Fish — inter-domain gradient matching by a first-order meta-update (Shi et al., ICLR 2022; DomainBed's ``Fish``).

Each optimizer step clones the network, trains the clone one optimizer step on each training
domain in turn, and moves the network part of the way towards the clone:

    theta_tilde = theta
    for each domain d of the step's batch:  theta_tilde <- inner_step(theta_tilde, loss_d)
    theta       <- theta + meta_lr * (theta_tilde - theta)

To first order this follows the gradient of the average loss plus the inner products of the
domains' gradients (the paper's gradient matching) at the cost of one extra forward and backward
per domain. Followed: DomainBed's ``Fish.update`` (``domainbed/algorithms.py``) and its default
``meta_lr = 0.5`` (``hparams_registry.py``): the clone starts from the network's weights and
buffers at every step, its inner optimizer is DomainBed's Adam with the run's ``lr`` and
``weight_decay`` and keeps its moments from step to step, and buffers (batch-norm statistics) are
moved like the weights. The paper's Algorithm 1 uses SGD inner steps; DomainBed (and this) use
the run's optimizer.

How it fits the step contract. Fish replaces the optimizer step, so it is a technique with no loss
stage that works in Lightning's hooks:

* ``on_train_batch_start`` keeps the step's batches (every micro-batch under gradient accumulation:
  the inner loop sees the whole step, one inner step per domain on the domain's samples of all of
  them, as a batch that many times larger would be).
* ``on_before_optimizer_step`` (once per optimizer step, after accumulation) runs the inner loop:
  the clone is a set of tensors that ``torch.func.functional_call`` substitutes for the module's
  parameters and buffers, and the inner loss of a domain is the module's whole step contract on
  that domain's samples (``regularized_step``: the task loss and every other technique's terms), so
  Fish stacks with loss-changing techniques (one whose loss term also updates its state, as ELR's
  targets, updates it in every inner pass too, besides the module's own pass). The inner
  optimizer is a new instance of the module's own optimizer class with its parameter groups'
  current hyper-parameters (a learning-rate schedule applies), loaded with the inner state of the
  previous step. Then the meta-update moves
  the module's weights and the gradients are set to ``None``, so the module's optimizer leaves
  them as they are: the module's own forward and backward of the step only feed logging and the
  ``on_train_batch_end`` of other techniques.
* Under DDP every rank gathers the step's batches of all ranks and runs the same inner loop on
  them, so all ranks make the same update and hold the same inner state (no speed-up over one rank
  for the inner loop; the result is that of the global batch).

State: the inner optimizer's state (Adam's moments and step count), checkpointed, so resume is
exact. Refused at setup: 16-mixed precision (the inner loop has no gradient scaler; bf16 works),
FSDP, and SAM-style techniques (the ``perturb_weights`` stage), whose gradient Fish would discard.
The trainer's gradient clipping does not reach the inner steps.

Method card: ``fish.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import Fish
    >>> fish = Fish(meta_lr=0.5)   # DomainBed's default; the inner optimizer is the module's own
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call

from reglab.technique import Technique


class ContractLoss(nn.Module):
    """``forward(batch)`` = the module's step-contract loss, for :func:`torch.func.functional_call`."""

    def __init__(self, module: L.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.module.regularized_step(batch)[0]


def concatenate(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of several: tensors joined along the sample dimension, other entries from the first."""
    return {key: torch.cat([b[key] for b in batches]) if isinstance(value, Tensor) else value
            for key, value in batches[0].items()}


def select(batch: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """The samples ``rows`` (a boolean mask) of a batch."""
    return {key: value[rows] if isinstance(value, Tensor) else value for key, value in batch.items()}


class Fish(Technique):
    """Fish's inner loop over domains and meta-update, in place of the optimizer step (module docstring).

    Args:
        meta_lr: share of the way from the weights to the clone's that the meta-update moves (DomainBed's ``meta_lr``).
    """

    name = "fish"
    needs = frozenset({"domain"})
    stateful = True
    fsdp_unsupported = "its inner loop substitutes a whole copy of every trained parameter into the module"
    fp16_unsupported = "its inner loop's backward passes run outside 16-mixed's gradient scaler"

    def __init__(self, meta_lr: float = 0.5) -> None:
        if not 0.0 < meta_lr <= 1.0:
            raise ValueError(f"Fish: meta_lr must lie in (0, 1], got {meta_lr}")
        self.meta_lr = meta_lr
        self.inner_state: dict[int, dict[str, Any]] = {}
        self._window: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # SAM-style techniques (the `perturb_weights` stage) turn the step's gradient into another one, which Fish discards
        movers = [type(t).__name__ for t in trainer.callbacks if isinstance(t, Technique) and "perturb_weights" in t.stages]
        if movers:
            raise self.fail(f"it replaces the optimizer step, whose gradient {movers[0]} takes at moved weights",
                            "remove one of the two techniques")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = []  # batches of a step an interrupted earlier fit never took

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._window.append(batch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        batch, self._window = concatenate(self._window), []
        if trainer.world_size > 1:
            batch = {k: v.flatten(0, 1) if isinstance(v, Tensor) else v for k, v in pl_module.all_gather(batch).items()}
        clones, buffers = self.inner_loop(trainer, pl_module, optimizer, batch)
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name in clones:
                    p.lerp_(clones[name], self.meta_lr)
            for name, b in pl_module.named_buffers():
                if b.is_floating_point():
                    b.lerp_(buffers[name], self.meta_lr)
                else:  # counters (batch-norm's num_batches_tracked) take the clone's value
                    b.copy_(buffers[name])
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the module's optimizer skips every parameter: this step is done

    def inner_loop(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any,
                   batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The clone's parameters (those ``optimizer`` trains) and buffers after one step of a new
        instance of ``optimizer``'s class per domain of ``batch``, in domain order."""
        names = {id(p): name for name, p in module.named_parameters()}
        clones = {names[id(p)]: p.detach().clone().requires_grad_(p.requires_grad)
                  for group in optimizer.param_groups for p in group["params"]}
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        inner = type(optimizer)([{**group, "params": [clones[names[id(p)]] for p in group["params"]]}
                                 for group in optimizer.param_groups])
        if self.inner_state:
            inner.load_state_dict({"state": self.inner_state, "param_groups": inner.state_dict()["param_groups"]})
        tensors = {f"module.{name}": t for name, t in {**clones, **buffers}.items()}
        step = ContractLoss(module)
        with torch.enable_grad(), trainer.precision_plugin.forward_context():
            for domain in batch["domain"].unique():
                loss = functional_call(step, tensors, (select(batch, batch["domain"] == domain),))
                inner.zero_grad()
                loss.backward()
                inner.step()
        self.inner_state = inner.state_dict()["state"]
        return clones, buffers

    def state_dict(self) -> dict[str, Any]:
        return {f"{index}.{key}": value.detach().cpu().clone() if isinstance(value, Tensor) else value
                for index, entries in self.inner_state.items() for key, value in entries.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner_state = {}
        for flat, value in state_dict.items():
            index, key = flat.split(".", 1)
            self.inner_state.setdefault(int(index), {})[key] = value
