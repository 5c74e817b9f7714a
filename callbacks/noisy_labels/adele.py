"""ADELE — adaptive early-learning correction (Liu, Liu, Zhu, Shen, Fernandez-Granda, CVPR 2022, paper 48).

Trained on noisy annotations, a network first fits the correct part of them and memorizes the
wrong part later, and in segmentation each class reaches that point at its own time. ADELE
watches, for every class, how well the model fits the (noisy) training labels, detects from
that curve when the class starts being memorized, and from then on corrects the class's labels
with the model's confident predictions; a multi-scale consistency term keeps the predictions of
rescaled inputs close to each other.

1. **Per-class training fit.** After every training step the counts of ``argmax(logits)`` against
   the data's labels (``out.labels``, the original noisy ones) are added up per class; a point of
   the curve is recorded ``points_per_epoch`` times per epoch, at ``x`` = epochs elapsed, from the
   counts since the previous point. Dense outputs ``(N, C, H, W)``: the IoU
   ``TP / (T + P - TP)`` of every class (the official code's ``update_iou_stat``/``compute_iou``).
   Classification ``(N, C)``: the per-class accuracy against the noisy labels, ``TP / T`` (the
   share of samples labelled c that are predicted c). A point where a class is neither
   predicted nor labelled (IoU) or not labelled (accuracy) is left out of that class's curve.
2. **Onset.** At the end of each epoch, for every class not corrected yet, the curve
   ``f(t) = a (1 - exp(-t^b / c))`` is fitted to the points (``scipy.optimize.curve_fit``, trust
   region reflective, start (1, 1, 1), bounds ``a, b in [0, 1]``, ``c >= 0``, ``sigma`` geometric
   from 1 to 0.1 so the latest points weigh most). With ``f'(t) = a b / c exp(-t^b / c) t^(b-1)``
   the class is memorizing from the first epoch t with ``|f'(t) - f'(1)| / |f'(1)| > r``
   (r = 0.9), and its labels are corrected from the next epoch on, for the rest of training.
3. **Correction** (``transform_targets``), of every class under correction, from the average of
   the softmax predictions over the scales: a label becomes the predicted class where the
   averaged probability of that class exceeds ``tau`` (0.8) and that class is under correction
   (with ``background_class`` set, the background is under correction as soon as one other
   class is). Dense outputs follow the official code's further rules: a sample is corrected only
   if its labels hold a class under correction or nothing but background; a pixel may only
   become a class present in the sample's labels (or the background); a sample whose
   correction would remove more than half of its foreground and leave it over 95% background
   keeps its labels; ``ignore_index`` pixels stay as they are.
4. **Multi-scale consistency** (``loss_terms``): the input is rescaled by each of ``scales``
   (bilinear, ``align_corners=True``), run through the module's ``forward``, and dense logits are
   resized back; with ``p_s`` the softmax of scale s and ``p̄ = clamp(mean_s p_s, 1e-3, 1 - 1e-3)``,
   the term is ``lam * mean_s mean_n [max p̄_n >= rho] KL(p_s,n || p̄_n)`` (a Jensen-Shannon
   divergence; gradients flow through every scale and the mixture). ``[max p̄_n >= rho]`` takes
   the maximum over all classes and pixels of sample n, as the official code does. Inputs that
   are not images (``batch["input"]`` not ``(N, C, H, W)``, e.g. flat digits) cannot be rescaled:
   there the term is skipped (said once in the log) and the correction uses the single-scale
   prediction.

Following the official code (github.com/Kangningthu/ADELE: ``train.py`` for PASCAL VOC — the
curve fit ``curve_func``/``fit``/``derivation``/``label_update_epoch``, ``--r_threshold 0.9``,
``--mask_threshold 0.8``, ``--Reinit_dict yes`` of its README; ``lib/datasets/VOCTrainwsegDataset.py``
``update_allclass`` for the correction rules; ``lib/utils/JSD_loss.py`` ``calc_jsd_multiscale``
with ``threshold 0.8`` and scales 0.7 / 1.5 from ``config.py``; ``SegThor/brat/`` for the second
data set). Where this implementation departs from it, and why:

* The official code counts the epochs 1..T-1 whose derivative drop is at most r and corrects
  from the epoch after; the drop grows with t (b <= 1), so that is the first epoch with a drop
  above r — which is what is computed here, from the ratio ``f'(t) / f'(1)`` in log space (it
  does not depend on a, and does not underflow for a steep curve). Its x-axis starts the first
  point at 0; here a point sits at the epochs elapsed when it was taken (``f(0) = 0`` is the
  untrained model). A fit needs at least 3 points of a class; a flat fit (a = 0 or b = 0, where
  ``f'`` is 0 and the official ratio is NaN, which corrects at once) or a failed fit decides
  nothing that epoch.
* Labels are corrected online, in the step, from the original labels and the current multi-scale
  prediction, instead of once per epoch after an extra multi-scale pass over the training set.
  With ``--Reinit_dict yes`` the VOC code also re-derives every correction from the original
  annotations each epoch, so the only difference is that the prediction used is up to one epoch
  newer; no per-sample label table is kept. (The SegTHOR code instead corrects cumulatively every
  10 epochs from single-scale training predictions, with tau = 0.7 and the rule that the label's
  class must be under correction too; it also cuts a leading flat part of the curve.)
* The task loss is the module's, at scale 1; the official code also adds the cross-entropy of
  the two rescaled views (VOC: with logits scaled by learnable softmax weights, 1/3 each).
* Classification, flat inputs and ``points_per_epoch`` (the VOC code records a point every 100
  iterations, ~10 per epoch) are this implementation's; the paper is about segmentation.

Under DDP the per-class counts are all-reduced after every step, so every rank records the same
curve and decides the same onsets; all state (counts, curve points, onsets) is in ``state_dict``,
so a run resumed mid-epoch continues exactly.

Method card (what it does, when it helps, what it costs): ``adele.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import ADELE
    >>> adele = ADELE(r=0.9, tau=0.8, lam=1.0)   # Trainer(callbacks=[adele]) with a RegularizedMixin module
    >>> adele.scales
    (0.7, 1.0, 1.5)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from scipy.optimize import OptimizeWarning, curve_fit
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique

MIXTURE_CLAMP = 1e-3
IOU_EPSILON = 1e-10
MIN_POINTS = 3  # the curve has three parameters


# -- the onset curve -------------------------------------------------------------------------------
def onset_curve(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """``f(t) = a (1 - exp(-t^b / c))``, the training-fit curve ADELE fits per class."""
    return a * (1.0 - np.exp(-np.power(t, b) / c))


def fit_onset_curve(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """``(a, b, c)`` of :func:`onset_curve` fitted to the points ``(x, y)`` as the official code
    fits them (start (1, 1, 1), trust region reflective, bounds a, b in [0, 1], c >= 0, sigma
    geometric from 1 to 0.1: the latest points weigh most). Raises ``RuntimeError`` when the
    fit does not converge."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # no covariance from a few points: not used
        params, _ = curve_fit(
            onset_curve, x, y, p0=(1.0, 1.0, 1.0), method="trf", sigma=np.geomspace(1.0, 0.1, len(y)),
            absolute_sigma=True, bounds=([0.0, 0.0, 0.0], [1.0, 1.0, np.inf]),
        )
    return float(params[0]), float(params[1]), float(params[2])


def relative_slope_drop(t: float, a: float, b: float, c: float) -> float:
    """``|f'(t) - f'(1)| / |f'(1)|`` for :func:`onset_curve`; NaN where the curve is flat
    (``a = 0`` or ``b = 0``: ``f'`` is 0). Computed from ``f'(t) / f'(1) = exp(-(t^b - 1) / c)
    t^(b-1)``, which does not depend on ``a`` and does not underflow for steep curves."""
    if a <= 0.0 or b <= 0.0 or c <= 0.0:
        return math.nan
    return abs(math.exp(-(t**b - 1.0) / c + (b - 1.0) * math.log(t)) - 1.0)


def memorization_started(x: Sequence[float], y: Sequence[float], t: float, r: float) -> bool:
    """Whether the class whose training-fit curve has the points ``(x, y)`` memorizes at epoch
    ``t``: the relative drop of the fitted curve's slope since epoch 1 exceeds ``r``. Fewer than 3
    points, a fit that fails, or a flat fit decide nothing (False)."""
    if len(y) < MIN_POINTS:
        return False
    try:
        a, b, c = fit_onset_curve(x, y)
    except (RuntimeError, ValueError):
        return False
    return relative_slope_drop(t, a, b, c) > r  # NaN > r is False


# -- the per-class training fit ------------------------------------------------------------------
def fit_counts(predicted: Tensor, labels: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """``(3, C)`` float64 counts per class: true positives, predictions, labels (positions whose
    label is ``ignore_index`` not counted), for predicted and labelled class maps of any shape."""
    if ignore_index is not None:
        keep = labels != ignore_index
        predicted, labels = predicted[keep], labels[keep]
    predicted, labels = predicted.reshape(-1), labels.reshape(-1)
    hits = labels[predicted == labels]
    return torch.stack([
        torch.bincount(hits, minlength=num_classes),
        torch.bincount(predicted, minlength=num_classes),
        torch.bincount(labels, minlength=num_classes),
    ]).double()


def per_class_fit(counts: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
    """The training fit of every class from ``(..., 3, C)`` counts, and where it is defined:
    IoU ``TP / (T + P - TP)`` for dense outputs (defined where a class is labelled or
    predicted), accuracy against the labels ``TP / T`` for classification (defined where it is
    labelled)."""
    hits, predicted, labelled = counts.unbind(-2)
    if dense:
        return hits / (labelled + predicted - hits + IOU_EPSILON), labelled + predicted > 0
    return hits / (labelled + IOU_EPSILON), labelled > 0


# -- correction and consistency ------------------------------------------------------------------
def correct_labels(
    labels: Tensor,
    probs: Tensor,
    correcting: Tensor,
    tau: float,
    background_class: int | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Labels with those of the classes under correction replaced by confident predictions.

    ``labels`` ``(N,)`` or ``(N, H, W)`` class indices, ``probs`` ``(N, C)`` or ``(N, C, H, W)``
    (the multi-scale average), ``correcting`` a ``(C,)`` bool mask. A label becomes
    ``argmax(probs)`` where that probability exceeds ``tau`` and the predicted class is under
    correction. Dense labels also follow the official code's rules (module docstring, step 3):
    the sample gate, the class constraint, the foreground guard, and ``ignore_index``.
    """
    confidence, predicted = probs.max(1)
    change = (confidence > tau) & correcting[predicted] & (predicted != labels)
    if labels.dim() == 1:
        return torch.where(change, predicted, labels)
    num_samples, num_classes = probs.shape[:2]
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    change &= valid
    # which classes each sample's labels hold (ignored pixels land in an extra column)
    present = torch.zeros(num_samples, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, torch.where(valid, labels, num_classes).flatten(1), True)
    present = present[:, :num_classes]
    foreground = present.clone()
    correcting_foreground = correcting.clone()
    if background_class is not None:
        foreground[:, background_class] = False
        correcting_foreground[background_class] = False
    has_foreground = foreground.any(1)
    # class constraint: a pixel may only become a class the sample's labels hold (samples that
    # hold background only are not constrained)
    allowed = present.gather(1, predicted.flatten(1)).view_as(predicted)
    change &= allowed | ~has_foreground.view(-1, 1, 1)
    # sample gate: it holds a class under correction, or background only
    gate = (foreground & correcting_foreground).any(1) | ~has_foreground
    change &= gate.view(-1, 1, 1)
    corrected = torch.where(change, predicted, labels)
    if background_class is not None:
        # foreground guard: a correction that wipes out most of a sample's objects is not taken
        before = (valid & (labels != background_class)).flatten(1).sum(1)
        after = (valid & (corrected != background_class)).flatten(1).sum(1)
        background_share = (corrected == background_class).flatten(1).float().mean(1)
        wiped = (after < 0.5 * before) & (background_share > 0.95)
        corrected = torch.where(wiped.view(-1, 1, 1), labels, corrected)
    return corrected


def scaled_size(size: Sequence[int], scale: float, multiple: int = 1) -> tuple[int, int]:
    """``(H, W)`` times ``scale``, floored as ``F.interpolate(scale_factor=...)`` does, then rounded
    to the nearest positive multiple of ``multiple``."""
    return tuple(max(multiple, round(math.floor(side * scale) / multiple) * multiple) for side in size)


def multiscale_consistency(logits: Sequence[Tensor], rho: float) -> Tensor:
    """``mean_s mean_n [max p̄_n >= rho] KL(p_s,n || p̄_n)`` over the views' logits (``(N, C)`` or
    ``(N, C, H, W)``, all the same shape), with ``p̄`` the clamped mean of their softmaxes; the
    mask takes the maximum of ``p̄`` over all classes and positions of a sample."""
    probs = [view.float().softmax(1) for view in logits]
    mixture = torch.stack(probs).mean(0).clamp(MIXTURE_CLAMP, 1.0 - MIXTURE_CLAMP)
    confident = (mixture.flatten(1).amax(1) >= rho).float()
    confident = confident.view(-1, *([1] * (mixture.dim() - 2)))
    log_mixture = mixture.log()
    divergence = sum(F.kl_div(log_mixture, p, reduction="none").sum(1) for p in probs)
    return (divergence * confident).mean() / len(probs)


# -- the technique -------------------------------------------------------------------------------
class ADELE(Technique):
    """Adaptive early-learning correction (the method and its sources: module docstring).

    Works on classification logits ``(N, C)`` and dense logits ``(N, C, H, W)``.

    Args:
        r: the relative drop of the fitted curve's slope that marks a class's memorization onset.
        tau: a label becomes the prediction where the averaged probability exceeds this.
        lam: weight of the multi-scale consistency term (0 switches it off).
        rho: the consistency term counts samples whose averaged prediction reaches this somewhere.
        scales: input scales whose predictions are averaged and made consistent; must hold 1.0
            (the step's own forward pass). ``(1.0,)`` uses the step's prediction alone.
        points_per_epoch: points of each class's training-fit curve recorded per epoch.
        background_class: the background class of dense labels: always corrected alongside the
            others and never decided on its own; ``None`` for classification or no background.
        ignore_index: a label value (dense) that is neither counted nor corrected; by default the
            module's ``ignore_index`` attribute when it has one (``SegmentationModule``: 255).
        size_multiple: rescaled heights and widths are rounded to a multiple of this, for
            backbones that need divisible sizes (a U-Net with k pooling levels: 2^k).
    """

    name = "adele"

    stateful = True

    def __init__(
        self,
        r: float = 0.9,
        tau: float = 0.8,
        lam: float = 1.0,
        rho: float = 0.8,
        scales: Sequence[float] = (0.7, 1.0, 1.5),
        points_per_epoch: int = 10,
        background_class: int | None = None,
        ignore_index: int | None = None,
        size_multiple: int = 1,
    ) -> None:
        scales = tuple(float(s) for s in scales)
        if not 0.0 < r < 1.0:
            raise ValueError(f"ADELE: r must be in (0, 1), got {r}")
        if not 0.0 <= tau < 1.0 or not 0.0 <= rho <= 1.0:
            raise ValueError(f"ADELE: tau must be in [0, 1) and rho in [0, 1], got tau={tau}, rho={rho}")
        if lam < 0:
            raise ValueError(f"ADELE: lam must be >= 0, got {lam}")
        if 1.0 not in scales or any(s <= 0 for s in scales):
            raise ValueError(f"ADELE: scales must be positive and hold 1.0 (the step's own pass), got {scales}")
        if points_per_epoch < 1 or size_multiple < 1:
            raise ValueError(f"ADELE: points_per_epoch and size_multiple must be >= 1, got {points_per_epoch}, {size_multiple}")
        self.r, self.tau, self.lam, self.rho = r, tau, lam, rho
        self.scales = scales
        self.points_per_epoch = points_per_epoch
        self.background_class = background_class
        self.ignore_index = ignore_index
        self.size_multiple = size_multiple
        self.totals: Tensor | None = None  # (3, C) counts over all training steps so far, all ranks
        self.snapshots: Tensor | None = None  # (P, 3, C) the totals at each curve point
        self.points: Tensor | None = None  # (P,) epochs elapsed at each point
        self.corrected_since: Tensor | None = None  # (C,) epoch after which a class is corrected; -1: not
        self._said_flat = False
        self._dense = False  # set from the logits' shape at every step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.ignore_index is None:
            self.ignore_index = getattr(pl_module, "ignore_index", None)

    # -- state --------------------------------------------------------------------------------
    def _allocate(self, num_classes: int) -> None:
        self.totals = torch.zeros(3, num_classes, dtype=torch.float64)
        self.snapshots = torch.zeros(0, 3, num_classes, dtype=torch.float64)
        self.points = torch.zeros(0, dtype=torch.float64)
        self.corrected_since = torch.full((num_classes,), -1.0, dtype=torch.float64)

    def correcting(self, device: torch.device | None = None) -> Tensor | None:
        """``(C,)`` bool mask of the classes whose labels are corrected now, or None before any."""
        if self.corrected_since is None or not bool((self.corrected_since >= 0).any()):
            return None
        mask = self.corrected_since >= 0
        if self.background_class is not None:
            mask[self.background_class] = True
        return mask.to(device)

    def state_dict(self) -> dict[str, Any]:
        if self.totals is None:
            return {}
        return {"totals": self.totals.cpu().clone(), "snapshots": self.snapshots.clone(),
                "points": self.points.clone(), "corrected_since": self.corrected_since.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "totals" in state_dict:
            self.totals = state_dict["totals"].double()
            self.snapshots = state_dict["snapshots"].double()
            self.points = state_dict["points"].double()
            self.corrected_since = state_dict["corrected_since"].double()

    # -- stages -------------------------------------------------------------------------------
    def _views(self, out: StepOutput, module: L.LightningModule) -> list[Tensor]:
        """Logits of the step's input at every scale, dense ones resized to the step's logits."""
        inputs = out.batch.get("input")
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            if not self._said_flat and len(self.scales) > 1:
                rank_zero_info("ADELE: the training inputs are not images (N, C, H, W), so they cannot be "
                               "rescaled: no multi-scale consistency term, corrections from the "
                               "single-scale prediction.")
                self._said_flat = True
            return [out.logits]
        views = []
        for scale in self.scales:
            if scale == 1.0:
                views.append(out.logits)
                continue
            scaled = F.interpolate(inputs, size=scaled_size(inputs.shape[-2:], scale, self.size_multiple),
                                   mode="bilinear", align_corners=True)
            logits = module(scaled)
            if logits.dim() == 4:
                logits = F.interpolate(logits, size=out.logits.shape[-2:], mode="bilinear", align_corners=True)
            views.append(logits)
        return views

    def transform_targets(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        if out.target.is_floating_point():
            raise self.fail(
                "it corrects class-index targets, but an earlier technique made them soft",
                "list adele before the techniques that soften targets (label smoothing, mixup) in `techniques`",
            )
        correcting = self.correcting(out.logits.device)
        views = self._views(out, module) if correcting is not None or self.lam > 0 else [out.logits]
        out.extras[self.name] = views
        if correcting is None:
            return out.target
        with torch.no_grad():
            probs = torch.stack([view.float().softmax(1) for view in views]).mean(0)
            target = correct_labels(out.target, probs, correcting, self.tau, self.background_class, self.ignore_index)
        changed = (target != out.target).float().mean()
        module.log(f"train/{self.name}/changed", changed, on_step=False, on_epoch=True, batch_size=out.logits.shape[0])
        return target

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        views = out.extras.get(self.name, [])
        if self.lam == 0 or len(views) < 2:
            return {}
        return {"consistency": self.lam * multiscale_consistency(views, self.rho)}

    # -- the training-fit curve and the onsets ------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        out = outputs.get("step_output") if isinstance(outputs, dict) else None
        if out is None:
            raise self.fail(
                "it reads every step's output from what training_step returns, and this one returned "
                f"{type(outputs).__name__} without `step_output`",
                "return RegularizedMixin.training_step's dict (call super().training_step), or add "
                "`step_output=out.detached()` to your training_step's returned dict",
            )
        labels = out.labels if out.labels is not None else out.target
        num_classes, self._dense = out.logits.shape[1], out.logits.dim() > 2
        if self.totals is None:
            self._allocate(num_classes)
        counts = fit_counts(out.logits.argmax(1), labels, num_classes, self.ignore_index)
        # summed over ranks every step: every rank holds the same curve and decides the same onsets
        self.totals = self.totals.to(counts.device) + trainer.strategy.reduce(counts, reduce_op="sum")
        batches = trainer.num_training_batches
        if math.isfinite(batches) and (batch_idx + 1) * self.points_per_epoch // batches > batch_idx * self.points_per_epoch // batches:
            self._record_point(trainer.current_epoch + (batch_idx + 1) / batches)

    def _record_point(self, epochs: float) -> None:
        totals = self.totals.cpu()
        self.snapshots = torch.cat([self.snapshots, totals.unsqueeze(0)])
        self.points = torch.cat([self.points, torch.tensor([epochs], dtype=torch.float64)])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.totals is None:
            return
        last = self.snapshots[-1] if len(self.snapshots) else torch.zeros_like(self.totals.cpu())
        if not torch.equal(last, self.totals.cpu()):  # steps since the last point (an epoch cut short)
            self._record_point(float(trainer.current_epoch + 1))
        self._decide_onsets(float(self.points[-1]), dense=self._dense)
        pl_module.log(f"train/{self.name}/corrected_classes", float((self.corrected_since >= 0).sum()))

    def _decide_onsets(self, epochs: float, dense: bool) -> None:
        step_counts = torch.diff(self.snapshots, dim=0, prepend=torch.zeros_like(self.snapshots[:1]))
        fit, defined = per_class_fit(step_counts, dense)
        for c in range(fit.shape[1]):
            if self.corrected_since[c] >= 0 or c == self.background_class:
                continue
            keep = defined[:, c]
            if memorization_started(self.points[keep].numpy(), fit[keep, c].numpy(), epochs, self.r):
                self.corrected_since[c] = epochs
