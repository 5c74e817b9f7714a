"""SI — synaptic intelligence (Zenke, Poole & Ganguli 2017), a regularization baseline of the
continual family.

While a task trains, every parameter accumulates its share of the decrease of the loss along the
optimisation path (a path integral), one optimizer step at a time:

    omega_i  += -g_i * (theta_i(after the step) - theta_i(before the step))

At the end of task t, with Delta_i = theta_i(end of t) - theta_i(start of t), the path integral
becomes importance, the running sum restarts and the parameters become the anchor theta*:

    Omega_i  <- Omega_i + omega_i / (Delta_i^2 + xi),     omega <- 0,     theta* <- theta(end of t)
    loss      = CE + c * sum_i Omega_i (theta_i - theta*_i)^2

g is the gradient of the loss *without* SI's own penalty, as in the paper and the official code
(which takes it from a second backward pass). Here SI's penalty gradient 2 c Omega (theta - theta*)
is subtracted from the gradient the optimizer sees, which gives the same g without the second
pass; terms of other stacked techniques stay in g (they shape the path too). xi = 0.1 is the
damping of the GT-RIPL Continual-Learning-Benchmark code that paper 40 builds on; c is a
per-benchmark strength. Only the latest anchor is kept; Omega accumulates over tasks.

Method card (what it does, when it helps, what it costs): ``si.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import SI
    >>> si = SI(c=1.0, xi=0.1)    # with `reglab fit-tasks` (reglab.continual)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.continual.anchors import AnchoredParameterPenalty, flatten_state, trainable_parameters, unflatten_state

DEFAULT_C = 1.0
DEFAULT_XI = 0.1


def path_integral_importance(omega: Tensor, delta: Tensor, xi: float) -> Tensor:
    """One task's importance ``omega / (delta^2 + xi)`` (Zenke et al. 2017, eq. 5)."""
    return omega / (delta.pow(2) + xi)


class SI(AnchoredParameterPenalty):
    """Synaptic intelligence: path-integral importance, quadratic pull (see the module docstring).

    Args:
        c: strength of the penalty.
        xi: damping of the importance's denominator (> 0).

    Attributes:
        omega: the running path integral of the current task.
        task_start: the parameters when the current task's first optimizer step began.
    """

    name = "si"

    def __init__(self, c: float = DEFAULT_C, xi: float = DEFAULT_XI) -> None:
        super().__init__(c)
        if xi <= 0:
            raise ValueError(f"SI: xi must be > 0 (it keeps omega / (delta^2 + xi) finite), got {xi}")
        self.xi = xi
        self.omega: dict[str, Tensor] = {}
        self.task_start: dict[str, Tensor] = {}
        self._before_step: dict[str, tuple[Tensor, Tensor]] = {}

    # -- the path integral ----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Remember the parameters and the loss gradient without SI's own penalty."""
        parameters = trainable_parameters(pl_module)
        if not self.task_start:
            self.task_start = {name: p.detach().float().clone() for name, p in parameters.items()}
        self._before_step = {}
        for name, p in parameters.items():
            if p.grad is None:
                continue
            grad, current = p.grad.detach().float(), p.detach().float()
            if self.anchor and self.importance is not None:
                pull = self.importance[name].to(grad.device) * (current - self.anchor[name].to(grad.device))
                grad = grad - 2.0 * self.lam * pull  # d/dtheta of SI's own penalty
            self._before_step[name] = (current.clone(), grad)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step: ``omega -= g * (theta_after - theta_before)``."""
        if not self._before_step:
            return  # accumulating gradients: no step was taken
        parameters = trainable_parameters(pl_module)
        for name, (before, grad) in self._before_step.items():
            moved = parameters[name].detach().float() - before
            self.omega[name] = self.omega.get(name, torch.zeros_like(moved)).to(moved.device) - grad * moved
        self._before_step = {}

    # -- consolidation --------------------------------------------------------------------------
    def updated_importance(self, module: L.LightningModule, batches: Iterable[dict[str, Any]]) -> dict[str, Tensor]:
        """``Omega + omega / (Delta^2 + xi)``; restarts the path integral for the next task."""
        parameters = trainable_parameters(module)
        importance = {}
        for name, p in parameters.items():
            current = p.detach().float()
            start = self.task_start.get(name, current).to(current.device)
            omega = self.omega.get(name, torch.zeros_like(current)).to(current.device)
            previous = self.importance[name].to(current.device) if self.importance is not None else 0.0
            importance[name] = previous + path_integral_importance(omega, current - start, self.xi)
        self.omega = {}
        self.task_start = {name: p.detach().float().clone() for name, p in parameters.items()}
        return importance

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **flatten_state("omega", self.omega), **flatten_state("task_start", self.task_start)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.omega = unflatten_state("omega", state_dict)
        self.task_start = unflatten_state("task_start", state_dict)
