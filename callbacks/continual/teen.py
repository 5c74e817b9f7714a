"""TEEN — training-free calibration of new-class prototypes (paper 47, "Few-Shot Class-Incremental
Learning via Training-Free Prototype Calibration"; official code github.com/wangkiw/TEEN,
``models/teen/Network.py``).

Few-shot class-incremental learning: a base session with many samples per class, then sessions of
N new classes with K samples each. New classes get the mean feature of their K samples as
prototype (a cosine classifier's weight); those prototypes are biased towards base classes, so new
samples are often predicted as base classes. TEEN moves each new prototype towards the base
prototypes it resembles, with no gradient step:

    p_b     <- p_b / ||p_b||,   p_new <- p_new / ||p_new||
    w_b      = softmax_b( tau * <p_new, p_b> )            (over the base classes b)
    delta    = normalize( sum_b w_b p_b )
    p_new'   = alpha * p_new + (1 - alpha) * delta

Defaults as in the official code: ``tau = 16`` (``softmax_t``), ``alpha = 0.5`` (its
``shift_weight`` w = 1 - alpha = 0.5 is the train.py default and the CUB-200 script's; the CIFAR-100
script uses w = 0.1), and a cosine classifier with temperature 16 (``-temperature 16``) trained in
the base session. ``alpha = 1`` gives the uncalibrated prototypes (the baseline of the claim).
The official code normalizes ``delta`` as above (the paper writes the sum without it).

The recipe, in a task sequence of ``reglab fit-tasks`` (``TaskSequenceDataModule`` with
``first_task_classes`` and ``shots``):

* the module's head is a cosine classifier from the start (``ClassificationModule(...,
  cosine_head_temperature=16)``): TEEN trains its base session with one. It is a module option,
  not a head swap inside the technique, because the task runner loads a boundary checkpoint into
  the module before any trainer (and so any technique ``setup``) exists: a swapped head would
  not match the checkpoint. TEEN checks the head at setup in a task sequence;
* end of the base session: the base classes' weights become the mean features of their
  training samples (official ``replace_base_fc``);
* start of every later session: the new classes' weights become their calibrated prototypes
  from the session's K-shot samples, and the session trains on zero batches (training-free).

In a plain fit (no task hooks) TEEN changes nothing.

Method card (what it does, when it helps, what it costs): ``teen.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import TEEN
    >>> teen = TEEN(alpha=0.5, tau=16.0)
    >>> new, base = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    >>> calibrate_prototypes(new, base, alpha=1.0, tau=16.0)  # alpha = 1: only normalized
    tensor([[1., 0.]])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.tasks.classification import CosineClassifier
from reglab.technique import Technique, dataset_features


def calibrate_prototypes(new: Tensor, base: Tensor, alpha: float, tau: float) -> Tensor:
    """TEEN's calibration of ``new`` ``(N, D)`` prototypes with ``base`` ``(B, D)`` prototypes (see
    the module docstring); returns ``(N, D)``."""
    new, base = F.normalize(new.float(), dim=-1), F.normalize(base.float(), dim=-1)
    weights = torch.softmax(tau * new @ base.T, dim=-1)
    delta = F.normalize(weights @ base, dim=-1)
    return alpha * new + (1.0 - alpha) * delta


def class_means(features: Tensor, labels: Tensor, classes: list[int]) -> Tensor:
    """``(len(classes), D)``: the mean feature of every class in ``classes``."""
    return torch.stack([features[labels == c].mean(0) for c in classes])


class TEEN(Technique):
    """Training-free prototype calibration for few-shot sessions (see the module docstring).

    Args:
        alpha: weight of the new prototype itself (1 - the official ``shift_weight``).
        tau: temperature of the softmax over prototype similarities (``softmax_t``).
    """

    name = "teen"
    fsdp_unsupported = "it writes class prototypes into the head's weight at a task's end, where FSDP holds only this rank's shard"

    def __init__(self, alpha: float = 0.5, tau: float = 16.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise self.fail(f"alpha must lie in [0, 1], got {alpha}", "pass 0 <= alpha <= 1 (1: no calibration)")
        if tau <= 0:
            raise self.fail(f"tau must be > 0, got {tau}", "pass a positive softmax temperature")
        self.alpha, self.tau = alpha, tau
        self.base_classes: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and getattr(trainer.datamodule, "tasks", None) is not None:
            self._check_head(pl_module)

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        if task == 0:
            self.base_classes = list(self._tasks(trainer)[0])
            self._set_weights(trainer, pl_module, self.base_classes, calibrate=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The session's work happens here, not in on_task_start: only inside fit does the trainer
        # hold the DataModule, and fit_loop reads limit_train_batches after this hook.
        data = trainer.datamodule
        if getattr(data, "tasks", None) is None or data.task == 0:
            return
        if not self.base_classes:
            raise self.fail(f"session {data.task} starts but the base session's prototypes are unknown",
                            "run the base session (task 0) with TEEN attached, or resume from its checkpoint")
        self._set_weights(trainer, pl_module, list(data.tasks[data.task]), calibrate=True)
        trainer.limit_train_batches = 0  # training-free session: the fit runs no step

    def _check_head(self, module: L.LightningModule) -> None:
        head = getattr(module, "head", None)
        if not isinstance(head, CosineClassifier):
            raise self.fail(f"it sets class prototypes as the weights of a cosine classifier, but "
                            f"{type(module).__name__}.head is {type(head).__name__}",
                            "build ClassificationModule with cosine_head_temperature (16 in the official code)")

    @torch.no_grad()
    def _set_weights(self, trainer: L.Trainer, module: L.LightningModule, classes: list[int], calibrate: bool) -> None:
        self._check_head(module)
        features, labels = dataset_features(module, trainer.datamodule.train_dataset)
        prototypes = class_means(features, labels, classes)
        if calibrate:
            base = module.head.weight[self.base_classes]
            prototypes = calibrate_prototypes(prototypes, base, self.alpha, self.tau)
        module.head.weight[classes] = prototypes.to(module.head.weight.dtype)

    def _tasks(self, trainer: L.Trainer) -> list[list[int]]:
        tasks = getattr(trainer.datamodule, "tasks", None)
        if tasks is None:
            raise self.fail(f"its task hooks need the sessions' classes, but {type(trainer.datamodule).__name__} "
                            "has no `tasks`", "run it in a task sequence (reglab.datamodules.TaskSequenceDataModule)")
        return tasks

    def state_dict(self) -> dict[str, Any]:
        return {"base_classes": list(self.base_classes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_classes = list(state_dict["base_classes"])
