"""CAFA: class-aware feature alignment for test-time adaptation (Jung et al., ICCV 2023; paper 03).

Before adaptation, the source class-conditional feature distributions are summarised as Gaussians
from the training split: for every class ``c`` the count ``N_c``, the mean ``mu_c`` and the
covariance ``Sigma_c`` of the backbone's features ``g(x)`` (the input of the classifier head). At
test time, with the squared Mahalanobis distance ``D(x; mu, Sigma) = (g(x) - mu)^T Sigma^-1 (g(x) - mu)``
and the prediction ``y^ = argmax f(x)`` as the pseudo label, every batch takes a step on

    L_CAFA = 1/N sum_i log( D(x_i; mu_{y^_i}, Sigma_{y^_i}) / sum_c D(x_i; mu_c, Sigma_c) ),

which pulls a test feature towards its predicted class's source distribution (intra-class
distance down) and, through the denominator, away from the other classes' (inter-class distance
up), with no weight between the two: the paper's point that the loss has no hyper-parameter.

Source: the paper. No official code was found (GitHub searched by title, authors and the loss's
names), and the paper's method section could not be retrieved here: its abstract and published
summaries describe the parts (source class-conditional Gaussians, pseudo labels, the Mahalanobis
intra-class distance minimised and the inter-class distances maximised, no hyper-parameter, batch
norms updated as in TENT, a small subset of training samples enough for the statistics) but not
the equation, so the log-ratio above is this implementation's reading of it: check it against the
paper's equation before relying on its exact form. Followed: per-class covariances, the pseudo
label from the model's prediction, TENT's parameterization and optimizer (batch-norm affine
parameters, test-batch normalisation, Adam 1e-3, one step per batch). Chosen here: the inverse is
taken of ``Sigma_c + ridge * mean(diag Sigma) * I`` (a feature constant on the source data makes a
covariance singular), ``covariance="shared"`` offers the pooled within-class covariance (Lee et
al.'s tied Gaussian) instead, and all training samples are used (the embedded data are small).

The statistics are technique state, so they are in every checkpoint: they are recomputed (one
pass over the training split, eval mode, no gradients) whenever a checkpoint is written after the
weights changed, and at the end of the fit, so a checkpoint always holds those of its own weights;
``trainer.test(ckpt_path=...)`` restores them with the weights. A model fitted without CAFA gets
them from its DataModule's training split at the start of the test run. Under DDP every rank
computes them on the whole training split (every rank holds it) and takes rank 0's: the ranks'
batch-norm running statistics differ by their own last step until DDP's next buffer broadcast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.step import StepOutput
from reglab.technique import EVAL_RUNS, EvalTimeAdaptation, dataset_features

log = logging.getLogger(__name__)
COVARIANCES = ("class", "shared")


def class_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(counts (C,), means (C, D), covariances (C, D, D))`` of the features of each class, fp64;
    the covariance is the maximum-likelihood one (divided by ``N_c``)."""
    features = features.double()
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    covariances = torch.zeros(num_classes, features.shape[1], features.shape[1], dtype=torch.float64,
                              device=features.device)
    for c in range(num_classes):
        members = features[labels == c]
        if len(members):
            means[c] = members.mean(0)
            centred = members - means[c]
            covariances[c] = centred.T @ centred / len(members)
    return counts, means, covariances


def precision_matrices(counts: Tensor, covariances: Tensor, covariance: str, ridge: float) -> Tensor:
    """Inverse covariances, ``(C, D, D)`` per class or ``(1, D, D)`` shared (the pooled within-class
    covariance), each of ``Sigma + ridge * mean(diag Sigma_pooled) * I``."""
    covariances = covariances.double()
    weights = counts.double() / counts.sum()
    pooled = (weights[:, None, None] * covariances).sum(0)
    chosen = pooled[None] if covariance == "shared" else covariances
    eye = torch.eye(pooled.shape[0], dtype=torch.float64, device=pooled.device)
    return torch.linalg.inv(chosen + ridge * pooled.diagonal().mean() * eye)


def mahalanobis_distances(features: Tensor, means: Tensor, precisions: Tensor) -> Tensor:
    """``(N, C)`` squared Mahalanobis distance of every feature to every class (``precisions``
    ``(C, D, D)``, or ``(1, D, D)`` shared by all classes)."""
    diff = features[:, None, :] - means[None]
    if precisions.shape[0] == 1:
        return torch.einsum("ncd,de,nce->nc", diff, precisions[0], diff)
    return torch.einsum("ncd,cde,nce->nc", diff, precisions, diff)


def cafa_loss(features: Tensor, logits: Tensor, means: Tensor, precisions: Tensor) -> Tensor:
    """``mean_i log(D_{i, y^_i} / sum_c D_{i, c})`` with ``y^ = argmax logits`` (see the module docstring)."""
    distances = mahalanobis_distances(features.float(), means, precisions).clamp_min(torch.finfo(torch.float32).tiny)
    intra = distances.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    return (intra.log() - distances.sum(1).log()).mean()


class CAFA(EvalTimeAdaptation):
    """Class-aware feature alignment to source class statistics, adapting while the model tests.

    Attach it to the fit (it computes the source statistics of the fitted model and keeps them in
    the checkpoints; training itself is untouched) and to the test run (with ``reglab``: ``fit
    ... --config configs/technique/cafa.yaml --test_after_fit true``, or ``test --ckpt_path ...``
    with the same config). A test run leaves the model as it was unless ``keep_adapted``.

    Args:
        covariance: ``"class"`` (one covariance per class, the paper's) or ``"shared"`` (the pooled
            within-class covariance).
        ridge: added to the covariances' diagonal, as a share of the mean feature variance.
        lr, optimizer, momentum, weight_decay, steps, episodic, keep_adapted, batch_statistics, adapt_in:
            see :class:`reglab.technique.EvalTimeAdaptation` (defaults: TENT's, which the paper follows).

    Example:
        >>> from reglab.registry import example_data, example_trainer
        >>> from reglab.tasks import ClassificationModule
        >>> module = ClassificationModule("mlp", num_classes=10, input_shape=(64,),
        ...                               backbone_kwargs={"hidden_sizes": (32,), "norm": "batch"})
        >>> cafa = CAFA()
        >>> example_trainer(max_steps=2, callbacks=[cafa]).fit(module, datamodule=example_data())
        >>> cafa.means.shape, cafa.covariances.shape
        (torch.Size([10, 32]), torch.Size([10, 32, 32]))
        >>> _ = example_trainer(callbacks=[cafa]).test(module, datamodule=example_data(), verbose=False)
    """

    name = "cafa"
    needs = frozenset({"features"})
    stateful = True

    def __init__(
        self,
        covariance: str = "class",
        ridge: float = 0.01,
        lr: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        steps: int = 1,
        episodic: bool = False,
        keep_adapted: bool = False,
        batch_statistics: bool = True,
        adapt_in: Sequence[str] = EVAL_RUNS,
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, steps=steps,
                         episodic=episodic, keep_adapted=keep_adapted, batch_statistics=batch_statistics,
                         adapt_in=adapt_in)
        if covariance not in COVARIANCES:
            raise self.fail(f"covariance {covariance!r} is not one of {COVARIANCES}", "pass covariance='class' or 'shared'")
        if ridge < 0:
            raise self.fail(f"ridge={ridge} is negative", "pass ridge >= 0 (a share of the mean feature variance)")
        self.covariance, self.ridge = covariance, ridge
        self.counts: Tensor | None = None
        self.means: Tensor | None = None
        self.covariances: Tensor | None = None
        self.statistics_step = -1  # the global step of the weights the statistics describe
        self._precisions: Tensor | None = None

    # -- source statistics ----------------------------------------------------------------------
    def compute_statistics(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """The class statistics of the module's features on the DataModule's training split."""
        data = trainer.datamodule
        dataset = getattr(data, "train_dataset", None)
        num_classes = getattr(data, "num_classes", None) or getattr(module, "num_classes", None)
        if dataset is None or num_classes is None:
            raise self.fail("it needs the source class statistics, and has none: neither a checkpoint with them "
                            "nor a DataModule with a train_dataset and num_classes to compute them from",
                            "fit with CAFA attached (its checkpoints keep the statistics) and test from such a "
                            "checkpoint (ckpt_path=...), or test with the reglab DataModule the model was fitted on")
        features, labels = dataset_features(module, dataset)
        counts, means, covariances = class_statistics(features, labels.long(), int(num_classes))
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise self.fail(f"classes {missing} have no training sample, so they have no source statistics",
                            "fit on a training split with samples of every class")
        statistics = (counts.cpu(), means.float().cpu(), covariances.float().cpu())
        if trainer.world_size > 1:
            # the checkpoint is rank 0's; the other ranks' batch-norm buffers differ from its by their
            # last step's update (DDP broadcasts buffers at the next forward), so they take rank 0's
            statistics = trainer.strategy.broadcast(statistics, src=0)
        self.counts, self.means, self.covariances = statistics
        self.statistics_step = trainer.global_step

    def _refresh(self, trainer: L.Trainer, module: L.LightningModule) -> bool:
        if self.means is not None and self.statistics_step == trainer.global_step:
            return False
        self.compute_statistics(trainer, module)
        return True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning collected state_dict() before this hook: write the refreshed statistics over it
        if trainer.state.fn is not None and trainer.state.fn.value == "fit" and self._refresh(trainer, pl_module):
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        if self.means is None:
            return {}
        return {"counts": self.counts, "means": self.means, "covariances": self.covariances,
                "statistics_step": self.statistics_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.counts, self.means, self.covariances = state_dict["counts"], state_dict["means"], state_dict["covariances"]
            self.statistics_step = int(state_dict["statistics_step"])

    # -- adaptation ------------------------------------------------------------------------------
    def on_adaptation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.means is None:
            log.info("CAFA: no source statistics in the checkpoint; computing them from the training split")
            self.compute_statistics(trainer, module)
        self._precisions = precision_matrices(self.counts, self.covariances, self.covariance, self.ridge).float().to(module.device)

    def adaptation_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        if out.features is None:
            raise self.fail(f"{type(module).__name__}.forward_step returns no features, which it aligns",
                            "use a module whose forward_step returns the penultimate features (ClassificationModule does)")
        means = self.means.to(out.features.device)
        return cafa_loss(out.features, out.logits, means, self._precisions)
