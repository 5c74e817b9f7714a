"""Category discovery: a classifier over known and novel classes trained from labelled known-class
samples and an unlabelled pool, the SimGCD-style parametric baseline (Wen et al., ICCV 2023)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

from reglab.metrics import ClusteringAccuracy, align_clusters
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone
from reglab.nn.contrastive import mean_positive_log_prob, nt_xent, two_view_masks

Assign = Literal["head", "kmeans"]


def teacher_temperature_at(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """SimGCD's teacher temperature: ``linspace(warmup, final, warmup_epochs)`` for the first
    epochs, then ``final`` (``DistillLoss.teacher_temp_schedule`` of the official code).

    Example:
        >>> [round(teacher_temperature_at(e, 0.07, 0.04, 4), 3) for e in range(5)]
        [0.07, 0.06, 0.05, 0.04, 0.04]
    """
    if epoch >= warmup_epochs:
        return final
    return warmup if warmup_epochs == 1 else warmup + (final - warmup) * epoch / (warmup_epochs - 1)


def self_distillation(student_logits: Tensor, teacher_logits: Tensor, teacher_temperature: float) -> Tensor:
    """Cross-entropy from each view's sharpened, detached teacher prediction to the *other* view's
    student prediction, averaged over both directions (SimGCD's ``DistillLoss``). ``student_logits``
    are already divided by the student temperature; ``teacher_logits`` are the raw cosine scores."""
    student = F.log_softmax(student_logits.float(), dim=-1).chunk(2)
    teacher = F.softmax(teacher_logits.detach().float() / teacher_temperature, dim=-1).chunk(2)
    return sum(-(teacher[1 - v] * student[v]).sum(-1).mean() for v in (0, 1)) / 2


def mean_entropy_gap(student_logits: Tensor) -> Tensor:
    """``log K - H(mean prediction)``: SimGCD's mean-entropy maximization term (``me_max_loss``),
    zero when the batch's predictions use all ``K`` classes equally."""
    mean = F.softmax(student_logits.float(), dim=-1).mean(0)
    return (mean * mean.clamp_min(1e-12).log()).sum() + math.log(mean.numel())


def supervised_contrastive(projections: Tensor, target: Tensor, labelled: Tensor, temperature: float) -> Tensor:
    """SupCon (Khosla et al.) over the labelled rows of two views' projections ``(2N, P)``: positives
    share the class, the denominator is every other labelled row; rows of unlabelled samples take no
    part (masks, not indexing: no data-dependent shapes). Zero when nothing is labelled."""
    not_self, _ = two_view_masks(len(projections) // 2, projections.device)
    both = labelled[:, None] & labelled[None, :]
    positives = both & not_self & (target[:, None] == target[None, :])
    denominator = both & not_self
    # an unlabelled anchor's denominator is empty (-inf log-normalizer): its row is masked out below
    log_prob = mean_positive_log_prob(projections, positives, denominator | ~labelled[:, None], temperature)
    return -(log_prob * labelled).sum() / labelled.sum().clamp_min(1)


class DiscoveryModule(RegularizedMixin, L.LightningModule):
    """The SimGCD-style parametric baseline of generalized (and novel) category discovery.

    ``backbone`` features feed two heads: a cosine classifier over all ``num_classes`` (known
    first, then novel: :class:`~reglab.datamodules.DiscoveryDataModule`'s numbering), whose
    logits are ``cos(f, w_c) / student_temperature`` (SimGCD's weight-normalized last layer with
    its norm fixed to 1), and an MLP projection head for the contrastive terms. A training batch
    carries two views; with ``w = sup_weight`` the loss is, as in the official code (CVMI-Lab/SimGCD
    ``train.py``)::

        (1 - w) * (distill + memax_weight * memax) + w * ce + (1 - w) * infonce + w * supcon

    * ``ce``: cross-entropy of the labelled samples' both views;
    * ``distill``: self-distillation between the views on every sample, the teacher the other
      view's detached prediction at a sharper temperature (``warmup_teacher_temperature`` to
      ``teacher_temperature`` over ``teacher_warmup_epochs``, then constant);
    * ``memax``: ``log K - H(mean prediction)`` over the batch (mean-entropy regularization);
    * ``infonce``: NT-Xent on the projections of all samples (the official temperature 1.0);
    * ``supcon``: supervised contrast on the labelled samples' projections (temperature 0.07).

    Each is logged as ``train/simgcd/<name>``. ``sup_weight=1`` leaves the supervised terms only:
    a backbone trained on the known classes' labels, which ``assign="kmeans"`` turns into the
    k-means baseline (:mod:`sklearn.cluster.KMeans` on the L2-normalized backbone features,
    ``num_classes`` clusters, fitted on the unlabelled pool and assigning the held-out split to the
    nearest centroid), scored by the same metric.

    Scaled to small backbones trained from scratch on two CPU cores (the official code fine-tunes
    the last block of DINO ViT-B/16 for 200 epochs with SGD 0.1 and a cosine schedule): Adam 1e-3
    by default; a projection head of 256 hidden units and 64 outputs instead of 2048 and 256; the
    teacher warm-up over 3 epochs (30 of 200 in the code, a similar share of a short run). The
    loss weights (0.35, and ``memax_weight`` 2, the code's default; its CIFAR scripts use 1) and
    the temperatures are the code's.

    Evaluation: on every validation / test batch (``pool`` marks the unlabelled pool, the rest is
    the held-out split), the predicted cluster is the classifier's argmax (``assign="head"``) or
    the k-means cluster; :class:`~reglab.metrics.ClusteringAccuracy` logs
    ``{val,test}/pool_acc_{all,old,new}`` (the transductive score SimGCD reports) and
    ``{val,test}/acc_{all,old,new}`` (the held-out split).

    Args:
        backbone: a name for :func:`reglab.models.create_backbone` (``"cnn"``, ``"mlp"``, ...).
        input_shape, num_classes, num_known_classes: filled from the DataModule by the ``reglab`` CLI.
        sup_weight, memax_weight: the loss weights above.
        student_temperature, teacher_temperature, warmup_teacher_temperature, teacher_warmup_epochs:
            the self-distillation temperatures and the teacher's warm-up.
        contrastive_temperature, supcon_temperature: of the unsupervised and supervised contrast.
        projection_dim, projection_hidden_dim: the projection head (three linear layers, GELU).
        assign: ``"head"`` or ``"kmeans"`` (above); ``kmeans_init``: k-means restarts.
        backbone_kwargs: passed to the backbone factory.
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.

    Example:
        >>> module = DiscoveryModule("mlp", input_shape=(8,), num_classes=4, num_known_classes=2)
        >>> batch = {"input": torch.randn(6, 8), "view1": torch.randn(6, 8), "view2": torch.randn(6, 8),
        ...          "target": torch.tensor([0, 1, -1, -1, -1, -1]), "labelled": torch.tensor([1, 1, 0, 0, 0, 0]).bool()}
        >>> out = module.forward_step(batch)
        >>> out.logits.shape, module.task_loss(out).shape
        (torch.Size([12, 4]), torch.Size([12]))
    """

    provides = frozenset({"features", "index"})
    #: the label of an unlabelled sample (the step contract's label check skips it, as segmentation's)
    ignore_index = -1

    def __init__(
        self,
        backbone: str = "cnn",
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        num_known_classes: Optional[int] = None,
        sup_weight: float = 0.35,
        memax_weight: float = 2.0,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.07,
        teacher_warmup_epochs: int = 3,
        contrastive_temperature: float = 1.0,
        supcon_temperature: float = 0.07,
        projection_dim: int = 64,
        projection_hidden_dim: int = 256,
        assign: Assign = "head",
        kmeans_init: int = 10,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if input_shape is None or num_classes is None or num_known_classes is None:
            raise ValueError(f"{name} needs input_shape, num_classes and num_known_classes. Fix: pass them (a "
                             "DiscoveryDataModule has all three), or run through `reglab`, which fills them.")
        if not 0 < num_known_classes < num_classes:
            raise ValueError(f"{name}: num_known_classes {num_known_classes} must lie in [1, num_classes "
                             f"{num_classes}): there are known and novel classes. Fix: pass the DataModule's counts.")
        if not 0.0 <= sup_weight <= 1.0:
            raise ValueError(f"{name}: sup_weight {sup_weight} must lie in [0, 1]. Fix: e.g. SimGCD's 0.35.")
        if min(student_temperature, teacher_temperature, warmup_teacher_temperature, contrastive_temperature,
               supcon_temperature) <= 0:
            raise ValueError(f"{name}: every temperature must be positive. Fix: use e.g. SimGCD's defaults.")
        if assign not in ("head", "kmeans"):
            raise ValueError(f"{name}: assign {assign!r} is neither 'head' nor 'kmeans'. Fix: pick one.")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, input_shape, **(backbone_kwargs or {}))
        if getattr(self.backbone, "has_head", False):
            raise ValueError(f"{name}: backbone {backbone!r} brings its own classification head. Fix: use a "
                             "feature backbone (cnn, mlp, timm:<name>).")
        width = self.backbone.feature_dim
        self.projection = nn.Sequential(nn.Linear(width, projection_hidden_dim), nn.GELU(),
                                        nn.Linear(projection_hidden_dim, projection_hidden_dim), nn.GELU(),
                                        nn.Linear(projection_hidden_dim, projection_dim))
        self.classifier = nn.Linear(width, num_classes, bias=False)
        self.metrics = nn.ModuleDict({
            f"{stage}_{part}": ClusteringAccuracy(num_classes, num_known_classes)
            for stage in ("val", "test") for part in ("pool", "heldout")
        })
        self._kmeans_store: dict[str, list[Tensor]] = {}

    def cosine_logits(self, features: Tensor) -> Tensor:
        """``cos(f, w_c)`` for every class: the normalized features against the normalized class weights."""
        return F.normalize(features, dim=-1) @ F.normalize(self.classifier.weight, dim=-1).T

    def forward(self, x: Tensor) -> Tensor:
        return self.cosine_logits(self.backbone(x)) / self.hparams.student_temperature

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        two_views = "view1" in batch
        if self.training and not two_views:
            raise ValueError(f"{type(self).__name__}: training batches carry no `view1` / `view2`, which SimGCD's "
                             "self-distillation needs. Fix: use DiscoveryDataModule with views=True.")
        twice = (lambda t: torch.cat([t, t])) if two_views else (lambda t: t)
        inputs = torch.cat([batch["view1"], batch["view2"]]) if two_views else batch["input"]
        features = self.backbone(inputs)
        cosine = self.cosine_logits(features)
        labelled = batch.get("labelled", torch.zeros_like(batch["target"], dtype=torch.bool))
        index = batch.get("index")
        return StepOutput(
            logits=cosine / self.hparams.student_temperature, target=twice(batch["target"]), features=features,
            index=None if index is None else twice(index), batch=batch,
            extras={"cosine": cosine, "projections": self.projection(features), "labelled": twice(labelled),
                    "views": 2 if two_views else 1},
        )

    def task_loss(self, out: StepOutput) -> Tensor:
        """SimGCD's loss (class docstring) on a two-view batch, the same in every row (it has no
        per-sample form); on an evaluation batch the cross-entropy of its known-class rows."""
        target, known = out.target.clamp_min(0), out.target >= 0
        ce_rows = F.cross_entropy(out.logits.float(), target, reduction="none") * known
        if out.extras["views"] == 1:
            return ce_rows
        h = self.hparams
        w = h.sup_weight
        labelled = out.extras["labelled"] & known
        terms = {"ce": (ce_rows * labelled).sum() / labelled.sum().clamp_min(1),
                 "supcon": supervised_contrastive(out.extras["projections"], out.target, labelled, h.supcon_temperature)}
        total = w * (terms["ce"] + terms["supcon"])
        if w < 1:
            temperature = teacher_temperature_at(self.current_epoch, h.warmup_teacher_temperature,
                                                 h.teacher_temperature, h.teacher_warmup_epochs)
            terms["distill"] = self_distillation(out.logits, out.extras["cosine"], temperature)
            terms["memax"] = mean_entropy_gap(out.logits)
            terms["infonce"] = nt_xent(*out.extras["projections"].chunk(2), h.contrastive_temperature)
            total = total + (1 - w) * (terms["distill"] + h.memax_weight * terms["memax"] + terms["infonce"])
        if self._trainer is not None:
            self.log_dict({f"train/simgcd/{name}": value.detach() for name, value in terms.items()},
                          on_step=False, on_epoch=True, batch_size=len(target))
        return total.expand(len(target))

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        batch = out.batch
        if "pool" not in batch or "true_target" not in batch:
            raise ValueError(f"{type(self).__name__}: evaluation batches need `pool` and `true_target`. Fix: use "
                             "DiscoveryDataModule.")
        pool, true = batch["pool"].bool(), batch["true_target"]
        if self.hparams.assign == "kmeans":
            store = self._kmeans_store.setdefault(stage, [])
            store.append(torch.cat([F.normalize(out.features.float(), dim=-1), pool[:, None].float(),
                                    true[:, None].float(), out.index[:, None].float()], 1).detach())
            return
        preds = out.logits.argmax(-1)
        self.metrics[f"{stage}_pool"].update(preds[pool], true[pool])
        self.metrics[f"{stage}_heldout"].update(preds[~pool], true[~pool])

    def _kmeans_update(self, stage: str) -> None:
        """Fit k-means on the pool's features (all ranks' samples, each once) and score pool and held-out."""
        rows = torch.cat(self._kmeans_store.pop(stage, []) or [torch.empty(0, 0)])
        if rows.numel() == 0:
            return
        if self.trainer.world_size > 1:
            rows = self.all_gather(rows).flatten(0, 1)
        # in dataset order, each sample once (a padded distributed sampler repeats some): k-means++
        # seeding depends on the order, so DDP then clusters exactly as one process does
        index = rows[:, -1].long()
        order = torch.argsort(index, stable=True)
        rows, index = rows[order], index[order]
        rows = rows[torch.cat([index.new_ones(1, dtype=torch.bool), index[1:] != index[:-1]])]
        features, pool, true = rows[:, :-3].cpu().numpy(), rows[:, -3].bool(), rows[:, -2].long()
        kmeans = KMeans(self.hparams.num_classes, n_init=self.hparams.kmeans_init, random_state=0)
        kmeans.fit(features[pool.cpu().numpy()])
        preds = torch.as_tensor(kmeans.predict(features), device=true.device).long()
        # every rank clustered all samples alike; each counts its share, which the metric's sync sums
        share = slice(self.global_rank, None, self.trainer.world_size)
        preds, pool, true = preds[share], pool[share], true[share]
        self.metrics[f"{stage}_pool"].update(preds[pool], true[pool])
        self.metrics[f"{stage}_heldout"].update(preds[~pool], true[~pool])

    def _log_clustering(self, stage: str) -> None:
        if self.hparams.assign == "kmeans":
            self._kmeans_update(stage)
        for part, prefix in (("pool", "pool_acc"), ("heldout", "acc")):
            metric = self.metrics[f"{stage}_{part}"]
            if metric.update_count:
                self.log_dict({f"{stage}/{prefix}_{group}": value for group, value in metric.compute().items()})
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_clustering("val")

    def on_test_epoch_end(self) -> None:
        self._log_clustering("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)



class ContinualDiscoveryModule(DiscoveryModule):
    """:class:`DiscoveryModule` over the stages of continual GCD, for :mod:`reglab.continual`'s
    task-sequence runner with :class:`~reglab.datamodules.ContinualDiscoveryDataModule`.

    The head covers every class from the start; ``active_classes`` (the runner sets it to the
    classes seen so far, which the data numbers known first, then stage by stage) is a prefix
    ``0..seen-1``, and training logits are *cut* to it rather than masked, so the softmaxes of
    self-distillation and the mean-entropy term run over the seen classes only (``log K`` with
    ``K = seen``), as the official Happy code grows its head per stage. The runner scores each
    stage's test classes by the Hungarian map of :meth:`align_predictions`, one map over all the
    tasks scored among the same candidates (GCD's ``v2`` accuracy), since a new class's cluster
    index is not its label.

    Example:
        >>> module = ContinualDiscoveryModule("mlp", input_shape=(8,), num_classes=4, num_known_classes=2)
        >>> module.active_classes[2:] = False
        >>> module(torch.randn(3, 8)).shape
        torch.Size([3, 2])
    """

    #: DiscoveryModule's arguments, for whoever reads the class's signature (the CLI fills the shapes from it);
    #: ``__init__`` keeps its own, which Lightning's ``save_hyperparameters`` reads from the frames
    __signature__ = inspect.signature(DiscoveryModule)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("active_classes", torch.ones(self.hparams.num_classes, dtype=torch.bool))

    @property
    def seen_classes(self) -> int:
        """How many classes are live (the prefix length of ``active_classes``)."""
        seen = int(self.active_classes.sum())
        if not bool(self.active_classes[:seen].all()):
            raise ValueError(f"{type(self).__name__}: active_classes {self.active_classes.nonzero().flatten().tolist()} "
                             "is not a prefix 0..k-1. Fix: use ContinualDiscoveryDataModule, which numbers classes "
                             "known first, then stage by stage, without a shuffle.")
        return seen

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, : self.seen_classes]

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        out = super().forward_step(batch)
        seen = self.seen_classes
        if seen == self.hparams.num_classes:
            return out
        return dataclasses.replace(out, logits=out.logits[:, :seen],
                                   extras={**out.extras, "cosine": out.extras["cosine"][:, :seen]})

    def align_predictions(self, predicted: Tensor, target: Tensor) -> Tensor:
        """The runner's hook: cluster ids mapped to classes (Hungarian, :func:`~reglab.metrics.align_clusters`)."""
        return align_clusters(predicted, target, self.hparams.num_classes, self.hparams.num_classes)
