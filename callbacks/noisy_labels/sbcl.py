"""SBCL — subclass-balancing contrastive learning (Hou et al., ICCV 2023, paper 13).

Supervised contrastive learning pulls every head-class sample towards many more positives than
a tail-class sample has. SBCL splits each head class into subclasses of about tail-class size
by k-means in the representation space (re-clustered every few epochs as the representation
changes) and trains with a bi-granularity contrastive loss over two views of each sample: a
sample should be closer to its own subclass than to everything else, and closer to the other
subclasses of its class than to other classes' subclasses:

    L_sub_i = mean_{j: same subclass} log p_ij,     denominator: all j != i,          temperature tau
    L_cls_i = mean_{j: same class, other subclass, or i's other view} log p'_ij,
              denominator: all j outside i's subclass, and i's other view,             temperature tau_c(i)
    loss    = mean_i [ -(tau / tau_base) L_sub_i - gamma L_cls_i ]

(``log p`` as in :mod:`reglab.nn.contrastive`). The class term's
temperature depends on the anchor's class: ``tau_c = tau * d_c / mean(d)`` with ``d_c`` the mean
distance of the class's features to their centre divided by ``log(n_c + 10)``, clipped to its
20th-80th percentiles over classes (``tau`` for classes with one subclass).

Follows the official code (github.com/JackHck/SBCL, ``SimCLR/main.py``, ``SimCLR/loss.py``:
``SupConLoss_rank``, the default ``train_rule``): tau = 0.1, tau_base = 0.07, gamma = 0.25, plain
supervised contrastive loss with class labels (temperature and base temperature 0.1) during the
warm-up epochs, re-clustering every ``step`` epochs, and ``n_c // max(min_c n_c, 10)`` subclasses
for class ``c`` (at least one; the floor of the official code, so a subclass holds at least the
tail count, rather than a ceiling). Departures, scaled to a small CPU run in one fit:

* the official code trains the encoder with the contrastive loss alone and fits a classifier in
  a second stage (LDAM-DRW or class-balanced); here the loss is added, with weight ``lam``, to the
  task loss of the same fit (stack a long-tail task loss, e.g. :class:`ClassBalancedLoss`, for the
  balanced classifier of the second stage);
* the contrastive features are the module's penultimate features, L2-normalised, not the
  output of an extra projection MLP (a technique that added parameters to the module would change
  its checkpoints' keys);
* the first view is the step's own (unaugmented) forward pass and the second an augmented one
  (:func:`~reglab.nn.contrastive.augmented_view`), where the code uses two
  augmented views: one extra forward pass per step instead of two;
* clustering is scikit-learn's k-means on the normalised features (seeded k-means++), where the
  code runs its own GPU k-means with cosine distance; defaults ``warmup_epochs = 2`` and
  ``recluster_every = 5`` scale the code's 10 and 10 of 1000 epochs down to a 40-epoch run.

Clustering runs at the start of an epoch on the features of the whole training set in eval
mode; every DDP rank computes them from the same weights and clusters them with the same seed,
so every rank holds the same subclasses. The subclass of every sample, the class temperatures and
the epoch of the last clustering are the technique's state (a run resumed in the middle of an
epoch does not re-cluster).

Method card (what it does, when it helps, what it costs): ``sbcl.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import SBCL
    >>> sbcl = SBCL(lam=1.0)   # add to Trainer(callbacks=[sbcl]) with a RegularizedMixin module
    >>> subclass_counts(torch.tensor([100, 40, 12, 5])).tolist()
    [10, 4, 1, 1]
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.callbacks.noisy_labels._contrastive import second_view_features, training_set_features
from reglab.mixins import StepOutput
from reglab.nn.contrastive import mean_positive_log_prob, two_view_masks
from reglab.technique import Technique, training_set_shape


def subclass_counts(class_counts: Tensor, min_subclass_size: int = 10) -> Tensor:
    """Subclasses per class: ``n_c // max(min_c n_c, min_subclass_size)``, at least 1 (official code)."""
    size = max(int(class_counts[class_counts > 0].min()), min_subclass_size)
    return (class_counts // size).clamp_min(1)


def supcon_loss(view1: Tensor, view2: Tensor, labels: Tensor, temperature: float, base_temperature: float) -> Tensor:
    """Supervised contrastive loss over two views (Khosla et al.): positives share the label."""
    not_self, _ = two_view_masks(len(labels), view1.device)
    labels2 = labels.repeat(2)
    positives = (labels2[:, None] == labels2[None, :]) & not_self
    term = mean_positive_log_prob(torch.cat([view1, view2]), positives, not_self, temperature)
    return -(temperature / base_temperature) * term.mean()


def sbcl_loss(
    view1: Tensor,
    view2: Tensor,
    labels: Tensor,
    subclasses: Tensor,
    class_temperatures: Tensor,
    temperature: float,
    base_temperature: float,
    gamma: float,
) -> Tensor:
    """The bi-granularity loss of the module docstring (``subclasses`` are global subclass ids)."""
    not_self, other_view = two_view_masks(len(labels), view1.device)
    labels2, subclasses2 = labels.repeat(2), subclasses.repeat(2)
    same_subclass = subclasses2[:, None] == subclasses2[None, :]
    same_class = labels2[:, None] == labels2[None, :]
    features = torch.cat([view1, view2])
    subclass_term = mean_positive_log_prob(features, same_subclass & not_self, not_self, temperature)
    outside_subclass = ~same_subclass & not_self
    class_term = mean_positive_log_prob(
        features,
        (same_class & outside_subclass) | other_view,
        outside_subclass | other_view,
        class_temperatures.to(features.device)[labels2].unsqueeze(1),
    )
    return (-(temperature / base_temperature) * subclass_term - gamma * class_term).mean()


def cluster_subclasses(
    features: Tensor, labels: Tensor, counts: Tensor, num_classes: int, seed: int
) -> Tensor:
    """``(N,)`` long global subclass ids: class ``c``'s samples are split by k-means into
    ``counts[c]`` subclasses numbered from ``sum(counts[:c])``."""
    from sklearn.cluster import KMeans

    normalised = F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float64)
    labels_np = labels.cpu().numpy()
    subclasses = np.zeros(len(labels_np), dtype=np.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]]).tolist()
    for cls in range(num_classes):
        members = np.flatnonzero(labels_np == cls)
        k = min(int(counts[cls]), len(members))
        if k > 1:
            assignment = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(normalised[members])
        else:
            assignment = np.zeros(len(members), dtype=np.int64)
        subclasses[members] = offsets[cls] + assignment
    return torch.from_numpy(subclasses)


def class_temperatures(
    features: Tensor, labels: Tensor, counts: Tensor, num_classes: int, temperature: float
) -> Tensor:
    """``(C,)`` ``tau * d_c / mean(d)`` (module docstring), ``tau`` for classes with one subclass."""
    normalised = F.normalize(features.float(), dim=-1).cpu()
    labels = labels.cpu()
    density = np.zeros(num_classes)
    for cls in range(num_classes):
        members = normalised[labels == cls]
        if len(members):
            distance = (members - members.mean(0)).norm(dim=1).mean() / np.log(len(members) + 10)
            density[cls] = float(distance)
    density = density.clip(np.percentile(density, 20), np.percentile(density, 80))
    # features that all coincide (an untrained network) have no spread: every class gets tau
    temperatures = torch.tensor(temperature * density / max(density.mean(), 1e-12), dtype=torch.float32)
    return torch.where(counts.cpu() > 1, temperatures, torch.full_like(temperatures, temperature))


class SBCL(Technique):
    """Subclass-balancing contrastive loss as a loss term (see the module docstring).

    Args:
        lam: weight of the contrastive loss added to the task loss.
        temperature: tau of the subclass term (and the base of the class temperatures).
        base_temperature: tau_base of the subclass term's scale.
        gamma: weight of the class term.
        warmup_epochs: epochs of plain supervised contrastive loss on class labels before the
            first clustering.
        recluster_every: epochs between clusterings.
        min_subclass_size: the smallest subclass size the counts aim for (the code's ``cluster``).
        seed: seed of the views and of k-means.
        num_samples, num_classes: size of the subclass table; taken from the DataModule when not given.
    """

    name = "sbcl"

    needs = frozenset({"index", "features"})
    stateful = True

    def __init__(
        self,
        lam: float = 1.0,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        gamma: float = 0.25,
        warmup_epochs: int = 2,
        recluster_every: int = 5,
        min_subclass_size: int = 10,
        seed: int = 0,
        num_samples: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        for arg, value in (("lam", lam), ("gamma", gamma), ("warmup_epochs", warmup_epochs)):
            if value < 0:
                raise ValueError(f"SBCL: {arg} must be >= 0, got {value}")
        for arg, value in (("temperature", temperature), ("base_temperature", base_temperature),
                           ("recluster_every", recluster_every), ("min_subclass_size", min_subclass_size)):
            if value <= 0:
                raise ValueError(f"SBCL: {arg} must be > 0, got {value}")
        self.lam, self.gamma = lam, gamma
        self.temperature, self.base_temperature = temperature, base_temperature
        self.warmup_epochs, self.recluster_every, self.min_subclass_size = warmup_epochs, recluster_every, min_subclass_size
        self.seed, self.num_samples, self.num_classes = seed, num_samples, num_classes
        self.subclasses: Tensor | None = None
        self.class_temperatures: Tensor | None = None
        self.clustered_epoch = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.num_samples, self.num_classes = training_set_shape(self, trainer, self.num_samples, self.num_classes)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.recluster_every == 0
        if due and self.clustered_epoch < epoch:  # not again when resumed inside this epoch
            self.recluster(trainer, pl_module)
            self.clustered_epoch = epoch

    def recluster(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Cluster every class of the training set into its subclasses (and set the class temperatures)."""
        features, labels = training_set_features(trainer, module)
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes)
        per_class = subclass_counts(counts, self.min_subclass_size)
        self.subclasses = cluster_subclasses(features, labels, per_class, self.num_classes, self.seed).to(module.device)
        self.class_temperatures = class_temperatures(features, labels, per_class, self.num_classes, self.temperature)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        view2 = second_view_features(self, out, module, self.seed)
        if self.subclasses is None:
            loss = supcon_loss(out.features, view2, out.labels, self.temperature, self.temperature)
        else:
            self.subclasses = self.subclasses.to(out.index.device)  # once after a load, then a no-op
            loss = sbcl_loss(out.features, view2, out.labels, self.subclasses[out.index], self.class_temperatures,
                             self.temperature, self.base_temperature, self.gamma)
        return {"contrastive": self.lam * loss}

    def state_dict(self) -> dict[str, Any]:
        return {
            "subclasses": None if self.subclasses is None else self.subclasses.cpu().clone(),
            "class_temperatures": None if self.class_temperatures is None else self.class_temperatures.clone(),
            "clustered_epoch": self.clustered_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.subclasses = state_dict.get("subclasses")
        self.class_temperatures = state_dict.get("class_temperatures")
        self.clustered_epoch = int(state_dict.get("clustered_epoch", -1))
