"""What the family's contrastive techniques (RCAL, SBCL) share: a second, augmented view of a
batch through the module, and a pass over the training set. The view and the contrastive
log-likelihoods themselves are in the core, :mod:`reglab.nn.contrastive` (the PEFT claims'
contrastive pretraining uses them too).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader

from reglab.mixins import StepOutput
from reglab.nn.contrastive import augmented_view
from reglab.technique import Technique


def second_view_features(technique: Technique, out: StepOutput, module: L.LightningModule, seed: int) -> Tensor:
    """Features of an augmented view of the step's batch: a second forward pass of the module."""
    try:
        view = augmented_view(out.batch["input"], module.global_step, seed)
    except ValueError as error:
        problem, _, fix = str(error).partition(". Fix: ")
        raise technique.fail(problem, fix) from None
    features = module.forward_step({**out.batch, "input": view}).features
    if features is None:
        raise technique.fail(
            f"{type(module).__name__}.forward_step returns no features", "return the penultimate features in StepOutput"
        )
    return features


@torch.no_grad()
def training_set_features(trainer: L.Trainer, module: L.LightningModule, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``(features (N, D) fp32, labels (N,))`` of the whole training set in index order, from the
    module in eval mode (restored afterwards). Every DDP rank runs the whole set with the same
    weights, so every rank gets the same features without a collective."""
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        dataset = trainer.train_dataloader.dataset
    was_training = module.training
    module.eval()
    features, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            batch: dict[str, Any] = move_data_to_device(batch, module.device)
            out = module.forward_step(batch)
            features.append(out.features.float())
            labels.append(out.labels)
    finally:
        module.train(was_training)
    return torch.cat(features), torch.cat(labels)
