"""The step contract between LightningModules and techniques.

Lightning callbacks cannot change the loss under automatic optimization: hook return values are
discarded, and the tensor seen in ``on_before_backward`` is already divided by
``accumulate_grad_batches`` (and scaled under 16-mixed). So the module owns the loss:

* a module mixes in :class:`RegularizedMixin` and implements ``forward_step(batch) -> StepOutput``;
* :meth:`RegularizedMixin.training_step` runs every :class:`~reglab.technique.Technique`
  attached to the trainer through the stages below, in the order they appear in
  ``trainer.callbacks`` (the order of the config), and returns ``task_loss + sum(terms)``;
* Lightning then applies accumulation, precision scaling and DDP gradient sync uniformly.

Stages, each an optional method of a technique::

    batch      = technique.transform_batch(batch, module)      # mixup, cutmix, input noise
    out        = module.forward_step(batch)                    # -> StepOutput
    out        = technique.transform_outputs(out, module)      # logit masking, feature scaling
    out.target = technique.transform_targets(out, module)      # soft targets, label correction
    per_sample = technique.task_loss(out, module)              # at most one technique replaces CE
    offsets    = technique.perturb_weights(out, module)        # SAM-style: the task loss trained on
                                                               # is then the one at w + offsets
    terms      = technique.loss_terms(out, module)             # additive, already weighted, at w

Every term is logged as ``train/<technique>/<term>``. After the step, techniques read the same
forward pass in ``on_train_batch_end(..., outputs, ...)`` as ``outputs["step_output"]`` (detached).

Example:
    >>> import torch
    >>> from lightning import LightningModule
    >>> class MyModule(RegularizedMixin, LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(4, 3)
    ...     def forward_step(self, batch):
    ...         return StepOutput(logits=self.net(batch["input"]), target=batch["target"],
    ...                           index=batch.get("index"))
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> module = MyModule()
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from reglab.checkpoints import run_restore_hooks
from reglab.step import StepOutput, cross_entropy_per_sample
from reglab.technique import Technique, check_contract_ran, eval_forward, run_stages

__all__ = ["RegularizedMixin", "StepOutput", "cross_entropy_per_sample"]


def _rng_state() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                   "has_gauss": has_gauss, "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_first_step_ran_contract(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``training_step``: until a step ran with a loss-changing technique
    attached, check after each step that it ran the contract (the check reads flags, no sync)."""

    @functools.wraps(step)
    def training_step(self: RegularizedMixin, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_reglab_contract_checked", False):
            return step(self, *args, **kwargs)
        self._reglab_contract_ran = False
        result = step(self, *args, **kwargs)
        self._reglab_contract_checked = check_contract_ran(self)
        return result

    training_step._reglab_checked = True
    return training_step


class RegularizedMixin:
    """Owns ``training_step`` and runs the attached techniques through the step contract.

    Mix it in *before* ``LightningModule`` and implement :meth:`forward_step`. Override
    :meth:`task_loss` to change the default cross-entropy, and :meth:`on_step_output` to update
    metrics from any stage's output.

    The mixin also saves the global RNG states (torch, CUDA, numpy, python) in every checkpoint
    and restores them on resume, so that random techniques (mixup, dropout, noise injection)
    continue exactly where an uninterrupted run would be.

    Two mistakes are caught when they happen: the mixin listed after ``LightningModule`` (whose
    hooks would then hide the mixin's) fails when the class is defined; a subclass's own
    ``training_step`` is checked after its first step with a loss-changing technique attached, and
    fails unless it ran the contract (``regularized_step``, or the mixin's ``training_step``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if LightningModule in mro and mro.index(LightningModule) < mro.index(RegularizedMixin):
            bases = ", ".join(["RegularizedMixin"] + [b.__name__ for b in cls.__bases__ if b is not RegularizedMixin])
            raise TypeError(
                f"{cls.__name__}: RegularizedMixin comes after LightningModule in its bases, so "
                "LightningModule's training_step and checkpoint hooks hide the mixin's. Fix: list the "
                f"mixin first: class {cls.__name__}({bases})"
            )
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_reglab_checked", False):
            cls.training_step = _check_first_step_ran_contract(step)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        """Run the model on ``batch`` and describe the result (implemented by the module)."""
        raise NotImplementedError(
            f"{type(self).__name__} mixes in RegularizedMixin but does not implement "
            "forward_step(batch) -> StepOutput; add it (see reglab.mixins)."
        )

    def task_loss(self, out: StepOutput) -> Tensor:
        """Per-sample task loss; cross-entropy with hard or soft targets by default."""
        return cross_entropy_per_sample(out.logits, out.target)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        """Called with every step's output (``stage`` is train/val/test); update metrics here."""

    @property
    def techniques(self) -> list[Technique]:
        """The techniques attached to the trainer, in config order."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, Technique)]

    def regularized_step(self, batch: dict[str, Any]) -> tuple[Tensor, StepOutput, dict[str, Tensor]]:
        """Run the contract on one batch: returns (total loss, step output, named terms)."""
        return run_stages(self, self.techniques, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        total, out, terms = self.regularized_step(batch)
        batch_size = out.logits.shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.on_step_output(out, "train")
        # the terms ride along so that reglab.nonfinite.NonFiniteGuard can name the one that diverged
        terms = {name: value.detach() for name, value in terms.items()}
        return {"loss": total, "step_output": out.detached(), "terms": terms}

    def eval_forward(self, batch: dict[str, Any]) -> StepOutput:
        """``forward_step`` of a validation / test / predict step; an attached test-time adaptation
        technique (:class:`reglab.technique.EvalTimeAdaptation`) adapts the model on the batch first."""
        return eval_forward(self, self.techniques, batch)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        out = self.eval_forward(batch)
        loss = self.task_loss(out).mean()
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=out.logits.shape[0])
        self.on_step_output(out, stage)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.eval_forward(batch).logits.softmax(-1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reglab_rng_state"] = _rng_state()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "reglab_rng_state" in checkpoint:
            _set_rng_state(checkpoint["reglab_rng_state"])
        # e.g. a parameter-efficient fine-tuning checkpoint holds only the trained weights: the
        # hook it names redoes the surgery before Lightning loads them (load_from_checkpoint)
        run_restore_hooks(self, checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
