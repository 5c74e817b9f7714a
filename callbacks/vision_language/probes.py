"""Linear evaluation at test time: a head fitted in closed form (or by a convex solver) on the frozen
features of the training set replaces the module's own head in validate / test / predict runs.

What paper 37 (Zheng et al., "Revisiting Discriminative vs. Generative Classifiers: Theory and
Implications", ICML 2023) compares: Gaussian naive Bayes (:mod:`.naive_bayes_probe`) against
logistic regression (:mod:`.logistic_regression_probe`) as the linear-evaluation head of a
pretrained model. Both follow the official code (github.com/ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers,
``main_train_offline.py`` run as its scripts run it, ``--minmax``): the features are min-max scaled to
[0, 1] by the probe's training samples (scikit-learn's ``MinMaxScaler``: a constant feature keeps
scale 1), then the head is fitted on them. The official sweep draws ``m`` training samples at
random (redrawing until every class is present); here :func:`few_shot_positions` draws ``shots``
per class, the balanced form of the same sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique, dataset_features

Head = Callable[[Tensor], Tensor]


def few_shot_positions(labels: Tensor, shots: int | None, seed: int) -> Tensor:
    """Sorted positions of ``shots`` samples of every class present in ``labels`` (all of a class
    with fewer; every sample for ``None``), drawn with a generator seeded by ``seed``.

    Example:
        >>> few_shot_positions(torch.tensor([0, 0, 0, 1, 1]), shots=1, seed=0).numel()
        2
    """
    if shots is None:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = [positions[torch.randperm(len(positions), generator=generator)[:shots]]
              for positions in (torch.nonzero(labels == c).flatten() for c in labels.unique())]
    return torch.cat(picked).sort().values


def minmax_scaler(features: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> (x - min) / (max - min)`` with the training features' per-dimension range (a constant
    dimension keeps scale 1, as ``sklearn.preprocessing.MinMaxScaler``), in float64."""
    features = features.double()
    low = features.min(0).values
    span = features.max(0).values - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return lambda x: (x.double() - low.to(x.device)) / span.to(x.device)


class FrozenFeatureProbe(Technique):
    """Base of the linear-evaluation heads: at the start of each run of ``predict_in`` it reads the
    features of the DataModule's training set (``forward_step(batch).features``, eval mode, no
    gradient), keeps ``shots_per_class`` of each class (seeded), fits the head, and the run reports
    the head's logits on the evaluated samples' features. The module's weights are not touched.

    A subclass implements :meth:`fit_head`. Classes without a training sample get logit ``-inf``.
    Under DDP every rank fits the head on rank 0's features (broadcast), so all ranks predict alike.

    Args:
        shots_per_class: training samples per class the head is fitted on; ``None``: all.
        seed: the draw of those samples.
        minmax: scale the features to [0, 1] by the fitted samples' range first (official default).
        predict_in: the evaluation runs that use the probe.
    """

    def __init__(self, shots_per_class: int | None = None, seed: int = 0, minmax: bool = True,
                 predict_in: Sequence[str] = ("validate", "test", "predict")) -> None:
        if shots_per_class is not None and shots_per_class < 1:
            raise self.fail(f"shots_per_class={shots_per_class} fits the head on no sample",
                            "pass shots_per_class >= 1, or None for the whole training set")
        self.shots_per_class, self.seed, self.minmax = shots_per_class, seed, minmax
        self.predict_in = tuple(predict_in)
        self._head: Head | None = None

    def fit_head(self, features: Tensor, labels: Tensor, num_classes: int) -> Head:
        """A function from ``(N, D)`` float64 features (already scaled) to ``(N, num_classes)`` logits."""
        raise NotImplementedError(f"{type(self).__name__} must implement fit_head(features, labels, num_classes)")

    def fit(self, features: Tensor, labels: Tensor, num_classes: int) -> Head:
        """Subsample (``shots_per_class``), scale (``minmax``) and fit: the head on raw features."""
        positions = few_shot_positions(labels, self.shots_per_class, self.seed).to(labels.device)
        features, labels = features[positions], labels[positions]
        scale = minmax_scaler(features) if self.minmax else (lambda x: x.double())
        head = self.fit_head(scale(features), labels, num_classes)
        return lambda x: head(scale(x))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        provides = getattr(pl_module, "provides", None)
        if provides is not None and "features" not in provides:
            raise self.fail(f"it fits a head on features, and {type(pl_module).__name__}.forward_step provides "
                            f"{sorted(provides)}", "use a module whose forward_step returns features "
                            "(ClassificationModule does)")

    def _start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn is None or trainer.state.fn.value not in self.predict_in:
            return
        dataset = getattr(trainer.datamodule, "train_dataset", None)
        num_classes = getattr(module, "num_classes", None) or getattr(trainer.datamodule, "num_classes", None)
        if dataset is None or num_classes is None:
            raise self.fail("it fits its head on the DataModule's training set and cannot find it (or the class count)",
                            "evaluate with a reglab DataModule (it has train_dataset and num_classes)")
        features, labels = dataset_features(module, dataset)
        if trainer.world_size > 1:
            # the ranks' batch-norm statistics differ by their own last training update: one head for all, rank 0's
            features = trainer.strategy.broadcast(features, src=0)
        self._head = self.fit(features, labels.to(features.device), int(num_classes))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def transform_predictions(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        if out.features is None:
            raise self.fail(f"{type(module).__name__}.forward_step returned no features",
                            "use a module whose forward_step returns features (ClassificationModule does)")
        return dataclasses.replace(out, logits=self._head(out.features).float())
