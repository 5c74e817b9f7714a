"""RCAL — representation calibration for noisy labels on long-tailed data (Zhang et al., ICCV 2023, paper 15).

"When Noisy Labels Meet Long Tail Dilemmas: A Representation Calibration Method" assumes that,
without label noise and class imbalance, each class's representations follow a multivariate
Gaussian. It learns representations by contrastive learning (no labels, so the noise does not
reach them), recovers each class's Gaussian from the polluted data — robustly, after removing
the samples that look like outliers of their (noisy) class, and for tail classes, whose few
samples cannot estimate a covariance, borrowing the covariances of the nearest head classes —
then samples extra representations from the recovered Gaussians and trains the classifier on
real and sampled representations together.

Here, in one fit:

1. every training step adds ``lam * NT-Xent(f(x), f(view(x)))``, SimCLR's unsupervised
   contrastive loss between the step's features and those of an augmented view (temperature
   ``temperature``), to the task loss;
2. at the end of each epoch from ``calibrate_from_epoch`` on (default: the last epoch), the
   features of the whole training set are taken in eval mode and, per noisy class ``c``:
   outliers are removed with scikit-learn's Local Outlier Factor (``lof_neighbors`` neighbours),
   giving ``n_c`` inliers with mean ``mu_c`` and covariance ``S_c``. A class with fewer inliers
   than the mean class is a tail class; its covariance is recalibrated from its ``k_nearest``
   nearest head classes (by distance of means):

       S_c <- (S_c + sum_{h in N(c)} S_h) / (k + 1)

   and every covariance gets a ridge ``alpha * tr(S)/D * I``. Each class is then topped up to the
   largest class's inlier count with samples from ``N(mu_c, S_c)``;
3. the module's classifier head is retrained from its current weights on the inliers' and the
   sampled features (cross-entropy, full batch, ``head_steps`` Adam steps at ``head_lr`` with
   weight decay ``head_weight_decay``) and written back into the module, so the checkpoint holds
   the retrained head.

Sources and departures. No copy of the official code could be had here (the issue names
github.com/xiaoboxia/RCAL; no snapshot of it exists in the store, and the paper's listings in
public reading lists give no code link), nor the paper's equations (a public reading note quotes
its method text, not its formulas). What the text says and this follows: MoCo contrastive
learning (two augmented views, a 2-layer projection head, a queue and a momentum key encoder);
robust per-class Gaussians after removing Local Outlier Factor outliers; for a tail class, the
statistics of the ``q`` head classes whose means are nearest in Euclidean distance; sampling from
the recovered Gaussians to balance the training data; during classifier training an "individual
representation calibration" that keeps the representations close to the contrastive ones, and
mixup. Departures:

* one fit instead of the paper's stages (contrastive pre-training, then classifier training):
  the contrastive term (SimCLR's in-batch NT-Xent, no queue or momentum encoder) is added to the
  task loss from the first step and stays on, which is what keeps the representations close to
  contrastive ones here — there is no separately pre-trained encoder to measure a distance to;
* mixup is not part of this class: stack :class:`~reglab.callbacks.baselines.Mixup` (the claim's
  RCAL arm does);
* the tail *covariance* is the mean of its own and its ``k_nearest`` head classes' covariances
  (the few-shot distribution-calibration recipe the paper builds on, Yang et al., ICLR 2021), plus
  a relative ridge; the tail *mean* is kept, although the paper's assumption that the chosen head
  classes' means lie within ``delta_q`` of the tail mean suggests it calibrates the mean as well;
* the contrastive features are the penultimate features without a projection MLP, and the first
  view is the unaugmented step (one extra forward pass per step), as in
  :class:`~reglab.callbacks.noisy_labels.SBCL`.

Calibration is deterministic (a generator seeded with ``(seed, epoch)`` draws the samples), and
every DDP rank computes it from the same weights and the whole training set, so the retrained
heads are identical on every rank and a resumed run retrains exactly as an uninterrupted one; the
technique keeps no state of its own (the head is the module's).

Method card (what it does, when it helps, what it costs): ``rcal.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import RCAL
    >>> rcal = RCAL(lam=0.5)   # add to Trainer(callbacks=[rcal]) with a ClassificationModule
"""

from __future__ import annotations

from copy import deepcopy

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.callbacks.noisy_labels._contrastive import second_view_features, training_set_features
from reglab.mixins import StepOutput
from reglab.nn.contrastive import nt_xent
from reglab.technique import Technique


def lof_inliers(features: Tensor, neighbors: int) -> Tensor:
    """``(n,)`` bool: the samples scikit-learn's Local Outlier Factor keeps (all of a class of <= 3)."""
    from sklearn.neighbors import LocalOutlierFactor

    if len(features) <= 3:
        return torch.ones(len(features), dtype=torch.bool)
    lof = LocalOutlierFactor(n_neighbors=min(neighbors, len(features) - 1))
    return torch.from_numpy(lof.fit_predict(features.double().cpu().numpy()) == 1)


def recover_gaussians(
    features: Tensor, labels: Tensor, num_classes: int, lof_neighbors: int, k_nearest: int, alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class: ``(means (C, D), covariances (C, D, D), inlier counts (C,))`` after outlier removal,
    tail covariances calibrated from the nearest head classes and a ridge (module docstring), and
    the ``(N,)`` bool mask of the inliers."""
    features = features.double().cpu()
    labels = labels.cpu()
    dim = features.shape[1]
    means = torch.zeros(num_classes, dim, dtype=torch.float64)
    covariances = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.long)
    inliers = torch.zeros(len(labels), dtype=torch.bool)
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if len(members) == 0:
            continue
        kept = members[lof_inliers(features[members], lof_neighbors)]
        inliers[kept] = True
        counts[cls] = len(kept)
        means[cls] = features[kept].mean(0)
        if len(kept) > 1:
            covariances[cls] = torch.cov(features[kept].T)
    present = counts > 0
    head = present & (counts >= counts[present].double().mean())
    calibrated = covariances.clone()
    heads = torch.nonzero(head).flatten()
    for cls in torch.nonzero(present & ~head).flatten().tolist():
        nearest = heads[(means[heads] - means[cls]).norm(dim=1).argsort()[:k_nearest]]
        calibrated[cls] = (covariances[cls] + covariances[nearest].sum(0)) / (len(nearest) + 1)
    ridge = alpha * calibrated.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-6)
    calibrated = calibrated + ridge[:, None, None] * torch.eye(dim, dtype=torch.float64)
    return means, calibrated, counts, inliers


def sample_calibrated(
    means: Tensor, covariances: Tensor, counts: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(features, labels)``: each present class topped up to the largest count with draws from
    its Gaussian (fp32)."""
    target = int(counts.max())
    features, labels = [], []
    for cls in torch.nonzero(counts > 0).flatten().tolist():
        extra = target - int(counts[cls])
        if extra == 0:
            continue
        factor = torch.linalg.cholesky(covariances[cls])
        noise = torch.randn(extra, means.shape[1], generator=generator, dtype=torch.float64)
        features.append(means[cls] + noise @ factor.T)
        labels.append(torch.full((extra,), cls, dtype=torch.long))
    if not features:
        return torch.zeros(0, means.shape[1]), torch.zeros(0, dtype=torch.long)
    return torch.cat(features).float(), torch.cat(labels)


def retrain_head(head: nn.Module, features: Tensor, labels: Tensor, steps: int, lr: float, weight_decay: float) -> None:
    """Fit ``head`` to ``(features, labels)`` from its current weights: full-batch CE, Adam.

    A copy is trained and its weights copied back, so no hook on the module's parameters (DDP's
    gradient reducer) sees this backward pass."""
    copy = deepcopy(head)
    trained = [p for p in copy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(copy(features).float(), labels).backward()
            optimizer.step()
    with torch.no_grad():
        for target, source in zip(head.parameters(), copy.parameters()):
            target.copy_(source)


class RCAL(Technique):
    """Contrastive term during training, then calibrated-feature retraining of the head (module docstring).

    Args:
        lam: weight of the contrastive term.
        temperature: NT-Xent temperature.
        calibrate_from_epoch: first epoch at whose end the head is retrained (then every epoch
            end); ``None``: the last epoch (``trainer.max_epochs - 1``).
        lof_neighbors: neighbours of the Local Outlier Factor.
        k_nearest: head classes a tail covariance borrows from.
        alpha: ridge added to every covariance, relative to its mean variance.
        head_steps, head_lr, head_weight_decay: the head retraining's Adam steps, rate and weight decay.
        seed: seed of the views and of the sampled features.
    """

    name = "rcal"

    needs = frozenset({"features"})

    def __init__(
        self,
        lam: float = 1.0,
        temperature: float = 0.2,
        calibrate_from_epoch: int | None = None,
        lof_neighbors: int = 20,
        k_nearest: int = 2,
        alpha: float = 0.1,
        head_steps: int = 200,
        head_lr: float = 0.01,
        head_weight_decay: float = 5e-4,
        seed: int = 0,
    ) -> None:
        for arg, value in (("lam", lam), ("alpha", alpha), ("head_weight_decay", head_weight_decay), ("head_steps", head_steps)):
            if value < 0:
                raise ValueError(f"RCAL: {arg} must be >= 0, got {value}")
        for arg, value in (("temperature", temperature), ("lof_neighbors", lof_neighbors), ("k_nearest", k_nearest),
                           ("head_lr", head_lr)):
            if value <= 0:
                raise ValueError(f"RCAL: {arg} must be > 0, got {value}")
        if calibrate_from_epoch is not None and calibrate_from_epoch < 0:
            raise ValueError(f"RCAL: calibrate_from_epoch must be >= 0 or None, got {calibrate_from_epoch}")
        self.lam, self.temperature = lam, temperature
        self.calibrate_from_epoch = calibrate_from_epoch
        self.lof_neighbors, self.k_nearest, self.alpha = lof_neighbors, k_nearest, alpha
        self.head_steps, self.head_lr, self.head_weight_decay = head_steps, head_lr, head_weight_decay
        self.seed = seed
        self.first_calibration = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, "head", None), nn.Module):
            raise self.fail(
                f"it retrains the classifier head, and {type(pl_module).__name__} has no `head` module",
                "use a module whose `head` maps forward_step's features to the logits (ClassificationModule "
                "with a linear or cosine head)",
            )
        if self.calibrate_from_epoch is not None:
            self.first_calibration = self.calibrate_from_epoch
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            self.first_calibration = trainer.max_epochs - 1
        else:
            raise self.fail(
                "it retrains the head at the end of the last epoch, and the trainer has no max_epochs",
                "set trainer.max_epochs, or pass calibrate_from_epoch (the first epoch whose end retrains the head)",
            )

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        view2 = second_view_features(self, out, module, self.seed)
        return {"contrastive": self.lam * nt_xent(out.features, view2, self.temperature)}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.first_calibration:
            self.calibrate(trainer, pl_module)

    def calibrate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Recover the class Gaussians from the training set and retrain the head on them."""
        features, labels = training_set_features(trainer, module)
        with torch.no_grad():
            num_classes = module.head(features[:1]).shape[-1]
        means, covariances, counts, inliers = recover_gaussians(
            features, labels, num_classes, self.lof_neighbors, self.k_nearest, self.alpha
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.current_epoch)
        sampled, sampled_labels = sample_calibrated(means, covariances, counts, generator)
        inliers = inliers.to(features.device)
        train_features = torch.cat([features[inliers], sampled.to(features.device)])
        train_labels = torch.cat([labels[inliers], sampled_labels.to(labels.device)])
        retrain_head(module.head, train_features, train_labels, self.head_steps, self.head_lr, self.head_weight_decay)
