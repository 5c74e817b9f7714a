"""OVOR's virtual outlier regularization (paper 08, "OVOR: OnePrompt with Virtual Outlier
Regularization for Rehearsal-Free Class-Incremental Learning"; official code
github.com/jpmorganchase/ovor, ``learners/ood.py``).

Rehearsal-free class-incremental learners train each task's part of the head on that task's data
only, so at test time the classes of different tasks are confused. OVOR tightens every task's
decision region: it synthesizes *virtual outliers* in feature space just outside the task's
features and trains the head so that their energy is high and the task's own energy low.

Outlier synthesis (k-NN boundary sampling as in NPOS, which OVOR builds on), per task, from the
features ``f_1..f_n`` of the task's training samples, with ``d_k(z)`` the distance of ``z`` to its
k-th nearest neighbour among the L2-normalized ``f_i / ||f_i||`` (a training point counts as its
own first neighbour, as in the official faiss search):

1. boundary ID points: the ``boundary_points`` features with the largest ``d_k``;
2. candidates: ``candidates_per_point`` draws ``f_b + std * eps``, ``eps ~ N(0, I)``, around each
   boundary point ``f_b``;
3. outliers: the ``outliers_per_class * (classes in the task)`` candidates with the largest ``d_k``
   (their normalized versions are compared with the normalized ID features).

Energy-margin regularization of the head, over the logits ``z`` of the *current task's* classes,
with the energy ``E(x) = -logsumexp_c z_c(x)`` and the Huber penalty ``h`` (delta 1, mean over
samples) of the official code:

    loss = CE + lam * ( h(max(0, E(x_id) - tau_id)) + h(max(0, tau_ood - E(x_ood))) )

The ID samples are the training batch; the outliers go through the head only (``module.head``).

Defaults are the official code's: ``lam = 0.1``, ``tau_id = -15``, ``tau_ood = -3``, ``K = 50``,
50 boundary points, 600 candidates per boundary point, 40 outliers per class, ``std = 0.1`` (its
``cov`` in ``configs/common.yaml``); the regularization runs in the last epochs of every task (16
regular + 4 regularized epochs on CIFAR-100, 40 + 10 on ImageNet-R): set ``start_epoch``.
Outliers are synthesized anew at the start of every regularized epoch, from the current model.

Where this departs from the official code (the paper's intent is followed):

* **Boundary points.** The official ``NPOS._generate`` finds the boundary points and builds
  ``boundary_points = in_dist[i].repeat(...)`` but never uses them: its candidates are
  ``cov * offsets``, Gaussian noise around the *origin*. Here the candidates are drawn around the
  boundary ID points, as the paper (and NPOS) describe.
* The official code scores the (unnormalized) candidates against the index of normalized ID
  features; here the candidates are normalized too, so both live in the same space.
* Every training step sees all outliers of the task (the official code gives each ID batch the
  next chunk of them; same expected gradient, less noise, and only the head runs on them), and
  the ID term uses the step's own batch, so the backbone also trains in regularized epochs (the
  official OOD epochs train the head on features stored at the epoch start).

Method card (what it does, when it helps, what it costs): ``ovor.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import OVOR
    >>> ovor = OVOR(start_epoch=8)  # 10 epochs per task: the last 2 regularized, as 16 + 4
    >>> features = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    >>> synthesize_outliers(features, num_classes=2, k=10, boundary_points=5,
    ...                     candidates_per_point=20, outliers_per_class=4).shape
    torch.Size([8, 8])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique, dataset_features

KNN_CHUNK = 4096  # candidates per distance block: bounds memory at KNN_CHUNK x (ID points) floats


@torch.no_grad()
def kth_neighbour_distance(queries: Tensor, keys: Tensor, k: int) -> Tensor:
    """Euclidean distance of every query to its ``k``-th nearest key (a query that is also a key
    counts itself), computed in blocks of queries."""
    return torch.cat([
        torch.cdist(block, keys).topk(k, dim=1, largest=False).values[:, -1]
        for block in queries.split(KNN_CHUNK)
    ])


def synthesize_outliers(
    features: Tensor,
    num_classes: int,
    k: int = 50,
    boundary_points: int = 50,
    candidates_per_point: int = 600,
    outliers_per_class: int = 40,
    std: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Virtual outliers around the boundary of ``features`` (``(n, D)``, one task's ID features),
    by k-NN boundary sampling (see the module docstring); returns ``(m, D)`` outliers in the space
    of ``features``, ``m = min(outliers_per_class * num_classes, candidates)``. ``k`` and the
    number of boundary points are capped at ``n``."""
    features = features.float()
    reference = F.normalize(features, dim=1)
    k = min(k, len(features))
    boundary = kth_neighbour_distance(reference, reference, k).topk(min(boundary_points, len(features))).indices
    centres = features[boundary].repeat_interleave(candidates_per_point, dim=0)
    noise = torch.randn(centres.shape, generator=generator, dtype=centres.dtype, device="cpu").to(centres.device)
    candidates = centres + std * noise
    distance = kth_neighbour_distance(F.normalize(candidates, dim=1), reference, k)
    keep = distance.topk(min(outliers_per_class * num_classes, len(candidates))).indices
    return candidates[keep]


def energy(logits: Tensor) -> Tensor:
    """``E(x) = -logsumexp_c z_c(x)`` per sample, in fp32."""
    return -torch.logsumexp(logits.float(), dim=-1)


def energy_margin_loss(id_logits: Tensor, outlier_logits: Tensor, tau_id: float, tau_ood: float) -> Tensor:
    """``h(max(0, E_id - tau_id)) + h(max(0, tau_ood - E_ood))`` with ``h`` the mean Huber loss
    (delta 1) against 0, as in the official ``NPOS.loss``."""
    id_gap = F.relu(energy(id_logits) - tau_id)
    outlier_gap = F.relu(tau_ood - energy(outlier_logits))
    return F.huber_loss(id_gap, torch.zeros_like(id_gap)) + F.huber_loss(outlier_gap, torch.zeros_like(outlier_gap))


class OVOR(Technique):
    """Virtual outlier regularization of the head (see the module docstring).

    In a task sequence (``reglab fit-tasks``) the current task's classes come from the
    DataModule's ``tasks``; in a plain fit they are the module's active classes (all).

    Args:
        lam: weight of the energy-margin term (lambda).
        tau_id, tau_ood: energy margins of ID samples (pushed below) and outliers (pushed above).
        k: the k of the k-NN distance.
        boundary_points: boundary ID points per task.
        candidates_per_point: Gaussian candidates drawn around each boundary point.
        outliers_per_class: outliers kept per class of the task.
        std: standard deviation of the candidates around their boundary point.
        start_epoch: first regularized epoch of every task (earlier epochs are plain training).
        seed: seed of the candidate draws (combined with the task and epoch).
    """

    name = "ovor"

    needs = frozenset({"features"})
    stateful = True

    def __init__(
        self,
        lam: float = 0.1,
        tau_id: float = -15.0,
        tau_ood: float = -3.0,
        k: int = 50,
        boundary_points: int = 50,
        candidates_per_point: int = 600,
        outliers_per_class: int = 40,
        std: float = 0.1,
        start_epoch: int = 0,
        seed: int = 0,
    ) -> None:
        counts = dict(k=k, boundary_points=boundary_points, candidates_per_point=candidates_per_point,
                      outliers_per_class=outliers_per_class)
        for name, value in counts.items():
            if value < 1:
                raise self.fail(f"{name} must be at least 1, got {value}", f"pass {name} >= 1")
        if lam < 0 or std <= 0 or start_epoch < 0:
            raise self.fail(f"needs lam >= 0, std > 0 and start_epoch >= 0, got {lam}, {std}, {start_epoch}",
                            "pass values in those ranges")
        if tau_id >= tau_ood:
            raise self.fail(f"tau_id ({tau_id}) must lie below tau_ood ({tau_ood}): ID energy is pushed "
                            "below tau_id and outlier energy above tau_ood", "pass tau_id < tau_ood")
        self.lam, self.tau_id, self.tau_ood, self.std = lam, tau_id, tau_ood, std
        self.k, self.boundary_points, self.candidates_per_point = k, boundary_points, candidates_per_point
        self.outliers_per_class, self.start_epoch, self.seed = outliers_per_class, start_epoch, seed
        self.task = 0
        self.current_classes: Tensor | None = None
        self.outliers: Tensor | None = None
        self.outlier_epoch = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, "head", None), torch.nn.Module):
            raise self.fail(f"it runs the head on feature-space outliers, but {type(pl_module).__name__} has no "
                            "`head` module", "use a module with a separate head (ClassificationModule with a "
                            "reglab or timm backbone)")
        data = trainer.datamodule
        if getattr(data, "train_dataset", None) is None:
            raise self.fail("it synthesizes outliers from the training set, but the trainer has no DataModule "
                            "with a train_dataset", "fit with a reglab DataModule (trainer.fit(..., datamodule=...))")
        tasks = getattr(data, "tasks", None)
        if tasks is not None:  # a task sequence: this fit is task data.task
            if data.task != self.task:
                self.outliers, self.outlier_epoch = None, -1
            self.task, self.current_classes = data.task, torch.tensor(tasks[data.task])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or self.outlier_epoch == epoch:
            return  # not regularizing yet, or resumed inside an epoch whose outliers are restored
        features, _ = dataset_features(pl_module, trainer.datamodule.train_dataset)
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.task + epoch)
        self.outliers = synthesize_outliers(
            features, len(self._classes(pl_module)), self.k, self.boundary_points, self.candidates_per_point,
            self.outliers_per_class, self.std, generator,
        )
        self.outlier_epoch = epoch

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if self.outliers is None:
            return {"energy": torch.zeros((), device=out.logits.device)}
        classes = self._classes(module).to(out.logits.device)
        self.outliers = self.outliers.to(out.logits.device)
        outlier_logits = module.head(self.outliers)[:, classes]
        loss = energy_margin_loss(out.logits[:, classes], outlier_logits, self.tau_id, self.tau_ood)
        return {"energy": self.lam * loss}

    def _classes(self, module: L.LightningModule) -> Tensor:
        if self.current_classes is not None:
            return self.current_classes
        active = getattr(module, "active_classes", None)
        return active.nonzero().flatten() if active is not None else torch.arange(module.head.out_features)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "outlier_epoch": self.outlier_epoch}
        if self.outliers is not None:
            state["outliers"] = self.outliers.detach().cpu().clone()
        if self.current_classes is not None:
            state["current_classes"] = self.current_classes.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task, self.outlier_epoch = int(state_dict["task"]), int(state_dict["outlier_epoch"])
        self.outliers = state_dict.get("outliers")
        self.current_classes = state_dict.get("current_classes")
