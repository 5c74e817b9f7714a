"""Happy (Ma et al., NeurIPS 2024): a debiased learning framework for continual generalized category
discovery — clustering-guided initialization, soft entropy regularization and hardness-aware
prototype sampling on the SimGCD-style baseline, stage by stage."""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reglab.step import StepOutput
from reglab.tasks import DiscoveryModule
from reglab.technique import Technique


def seen_classes(module: DiscoveryModule) -> int:
    """The live classes of a stage (a plain :class:`DiscoveryModule`: all of them)."""
    return getattr(module, "seen_classes", module.hparams.num_classes)


def entropy_gap(probabilities: Tensor) -> Tensor:
    """``log K - H(p)`` of a distribution over ``K`` entries (zero when it is uniform).

    Example:
        >>> float(entropy_gap(torch.tensor([0.5, 0.5])))
        0.0
        >>> round(float(entropy_gap(torch.tensor([1.0, 0.0]))), 4)  # log 2
        0.6931
    """
    return (probabilities * probabilities.clamp_min(1e-12).log()).sum() + math.log(probabilities.numel())


def soft_entropy(student_logits: Tensor, num_old: int, old_new_weight: float = 2.0, old_weight: float = 1.0,
                 new_weight: float = 1.0) -> Tensor:
    """Happy's group-wise entropy regularization of the batch's mean prediction ``p`` (``me_max_loss``
    of the official ``train_online``): with ``p_o, p_n`` the mass on the ``num_old`` old and the new
    classes, ``old_new_weight * gap([p_o, p_n]) + old_weight * gap(p_old / p_o) + new_weight *
    gap(p_new / p_n)`` (:func:`entropy_gap`; the last term only with two or more new classes).
    Unlike the flat ``log K - H(p)``, which wants the new classes' share to be their share of the
    ``K`` classes (small when few classes are new), it asks half the mass for the new classes.

    Example:
        >>> logits = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
        >>> float(soft_entropy(logits, num_old=2))  # p_o = p_n = 1/2, uniform inside the old: 0
        0.0
    """
    mean = F.softmax(student_logits.float(), dim=-1).mean(0)
    old, new = mean[:num_old], mean[num_old:]
    marginal = torch.stack([old.sum(), new.sum()])
    total = old_new_weight * entropy_gap(marginal) + old_weight * entropy_gap(old / marginal[0])
    if len(new) > 1:
        total = total + new_weight * entropy_gap(new / marginal[1])
    return total


def mean_similarity(prototypes: Tensor) -> Tensor:
    """Each prototype's mean cosine similarity to the *other* prototypes: its hardness (a class
    close to many others is confused more and forgotten first).

    Example:
        >>> mean_similarity(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])).tolist()
        [0.5, 0.5, 0.0]
    """
    unit = F.normalize(prototypes, dim=-1)
    similarity = unit @ unit.T
    return (similarity.sum(-1) - similarity.diagonal()) / (len(unit) - 1)


def hardness_probabilities(similarity: Tensor, temperature: float) -> Tensor:
    """Sampling probabilities of the prototypes: ``softmax(mean_similarity / temperature)``.

    Example:
        >>> hardness_probabilities(torch.tensor([0.0, 0.0]), 0.1).tolist()
        [0.5, 0.5]
    """
    return F.softmax(similarity.float() / temperature, dim=-1)


def class_radius(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The code's radius of the Gaussian around each prototype: ``sqrt(mean_c trace(cov_c) / D)``
    over the classes' (normalized) features, one radius for all classes.

    Example:
        >>> feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> float(class_radius(feats, torch.tensor([0, 0, 1, 1]), 2))  # trace 1 per class, D = 2
        0.7071067690849304
    """
    variances = []
    for cls in range(num_classes):
        members = features[labels == cls]
        centred = members - members.mean(0)
        variances.append((centred**2).sum() / len(members) / features.shape[1])
    return torch.stack(variances).mean().sqrt()


class Happy(Technique):
    """Happy's three parts (and the code's feature distillation) on
    :class:`~reglab.tasks.ContinualDiscoveryModule`, through :mod:`reglab.continual`'s runner over
    :class:`~reglab.datamodules.ContinualDiscoveryDataModule`'s stages (``reglab fit-tasks``).

    Stage 0 (labelled known classes) trains the module as it is (SimGCD's supervised and
    self-distillation terms). At its end, and at the end of every later stage, the prototypes of
    the stage's classes are stored: the mean normalized backbone feature of each class (stage 0: by
    label; later: by the model's prediction on the stage's pool, the class's head row when nothing
    is predicted), with one radius from stage 0 (:func:`class_radius`). At the start of each
    unlabelled stage ``t ≥ 1``:

    * **clustering-guided initialization**: k-means on the pool's normalized features (as many
      clusters as classes seen after the stage); the centroids least like any old class (lowest
      maximum cosine to the old head rows) become the new classes' head rows;
    * the model is copied as the **teacher** of the feature distillation.

    During stage ``t ≥ 1`` it adds, with ``u = 1 - sup_weight`` of the module (the weight of the
    module's own unlabelled terms, so the relative weights are the code's, which adds them at 1):

    * **soft entropy regularization** (:func:`soft_entropy`) *in place of* the module's flat
      mean-entropy term: the term added is ``u * (soft_entropy - memax_weight * memax)``;
    * **hardness-aware prototype sampling**: as many samples as the batch's rows, prototypes drawn
      with :func:`hardness_probabilities` (temperature ``hardness_temperature``), plus Gaussian
      noise of ``radius * radius_scale``, classified by the head (the module's cosine / student
      temperature) into their classes: cross-entropy, weight ``prototype_weight``;
    * **feature distillation**: ``sum ||f - f_teacher||^2 / N`` of the normalized backbone
      features against the stage-start teacher's, weight ``distill_weight``.

    Logged as ``train/happy/{soft_entropy,prototypes,distill}``.

    Follows the official code (github.com/mashijie1028/Happy-CGCD, ``train_happy.py``,
    ``models/utils_proto_aug.py``, ``models/utils_simgcd_pro.py``): weights 2 / 1 / 1 of the
    group-wise entropy, hardness temperature 0.1, radius scale 1, prototype and distillation weights
    1, prototypes and k-means on L2-normalized features, new-head rows from the lowest-max-logit
    centroids. Adapted: one module runs every stage (the code rebuilds a head per stage and copies
    the old rows; here the head covers all classes and the stage's prefix is live); the code keeps
    each stage's best-on-test epoch and computes the next stage's prototypes with it, here the last
    epoch (no model selection on test); sampling draws from a generator seeded by ``(seed, step)``
    so a resumed run samples alike. Under DDP every rank runs the k-means and the prototype update on
    the whole stage (the dataset, not its shard) with the same seeds, so all ranks keep one state.
    On a plain :class:`~reglab.tasks.DiscoveryModule` fit (one stage, as the shared harness runs it
    with ``task`` set to 1) the old classes are the labelled ones, their prototypes taken from
    their labels at the start.

    State: the prototypes, their hardness and radius, the stage, and the teacher's weights.

    Args:
        old_new_weight, old_weight, new_weight: :func:`soft_entropy`'s weights.
        prototype_weight, hardness_temperature, radius_scale: the prototype sampling.
        distill_weight: the feature distillation.
        init_new_heads: clustering-guided initialization on or off.
        kmeans_init: k-means restarts.
        seed: of the prototype sampling.

    Example:
        >>> from reglab.datamodules import ContinualDiscoveryDataModule, DiscoveryDataModule
        >>> from reglab.continual import TaskSequenceRunner
        >>> from reglab.tasks import ContinualDiscoveryModule
        >>> import tempfile
        >>> base = DiscoveryDataModule("blobs", known_classes=[0, 1], labelled_fraction=0.8, batch_size=64,
        ...                            generated_classes=4, generated_samples=240)
        >>> data = ContinualDiscoveryDataModule(base, num_stages=2)
        >>> module = ContinualDiscoveryModule("mlp", input_shape=data.input_shape, num_classes=4, num_known_classes=2)
        >>> happy = Happy()
        >>> runner = TaskSequenceRunner(module, data, [happy], {"max_steps": 2, "enable_progress_bar": False,
        ...     "enable_model_summary": False, "limit_val_batches": 0}, run_dir=tempfile.mkdtemp(), log=False)
        >>> runner.matrix.shape if runner.run() is not None else None
        torch.Size([3, 3])
        >>> happy.prototypes.shape[0]
        4
    """

    name = "happy"
    stateful = True

    def __init__(self, old_new_weight: float = 2.0, old_weight: float = 1.0, new_weight: float = 1.0,
                 prototype_weight: float = 1.0, hardness_temperature: float = 0.1, radius_scale: float = 1.0,
                 distill_weight: float = 1.0, init_new_heads: bool = True, kmeans_init: int = 10, seed: int = 0) -> None:
        if min(old_new_weight, old_weight, new_weight, prototype_weight, distill_weight, radius_scale) < 0:
            raise self.fail("the weights and radius_scale must not be negative", "use values >= 0 (the code's: 2, 1, 1, 1, 1, 1)")
        if hardness_temperature <= 0:
            raise self.fail(f"hardness_temperature {hardness_temperature} must be positive", "use e.g. the code's 0.1")
        if kmeans_init < 1:
            raise self.fail(f"kmeans_init {kmeans_init} must be at least 1", "use e.g. 10")
        self.weights = {"old_new_weight": old_new_weight, "old_weight": old_weight, "new_weight": new_weight}
        self.prototype_weight, self.hardness_temperature = prototype_weight, hardness_temperature
        self.radius_scale, self.distill_weight = radius_scale, distill_weight
        self.init_new_heads, self.kmeans_init, self.seed = init_new_heads, kmeans_init, seed
        self.task, self.started_task = 0, 0
        self.prototypes: Optional[Tensor] = None
        self.hardness: Optional[Tensor] = None
        self.radius: Optional[Tensor] = None
        self.teacher_state: Optional[dict[str, Tensor]] = None
        self.teacher: Optional[torch.nn.Module] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, DiscoveryModule):
            raise self.fail(f"it needs a DiscoveryModule (cosine head, views, labelled mask), got "
                            f"{type(pl_module).__name__}", "train a reglab.tasks.ContinualDiscoveryModule with "
                            "reglab fit-tasks over a ContinualDiscoveryDataModule")
        super().setup(trainer, pl_module, stage)

    # -- stage boundaries -------------------------------------------------------------------------
    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        self.task = task

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.task == 0 or self.started_task == self.task:  # stage 0, or resumed inside a started stage
            return
        data = trainer.datamodule.train_dataset
        if self.prototypes is None:  # a stage without stored ones: the labelled classes' from their labels
            self._store_prototypes(pl_module, data, pl_module.hparams.num_known_classes, labelled_only=True)
            if self.prototypes is None:
                raise self.fail(f"stage {self.task} starts without prototypes of the earlier stages, and its "
                                "data labels none", "run Happy from stage 0 (it stores them at each stage's end)")
        self.teacher_state = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        self.teacher = None
        if self.init_new_heads:
            self._initialize_new_heads(pl_module, data)
        self.started_task = self.task

    @torch.no_grad()
    def _initialize_new_heads(self, module: DiscoveryModule, pool: Dataset) -> None:
        features, _, _ = self._features(module, pool)
        old, seen = len(self.prototypes), seen_classes(module)
        kmeans = KMeans(seen, n_init=self.kmeans_init, random_state=self.seed).fit(features.cpu().numpy())
        centroids = F.normalize(torch.as_tensor(kmeans.cluster_centers_, dtype=features.dtype), dim=-1)
        weight = module.classifier.weight
        closeness = (centroids.to(weight.device) @ F.normalize(weight[:old], dim=-1).T).max(-1).values
        chosen = closeness.topk(seen - old, largest=False).indices
        norm = weight[old:seen].norm(dim=-1).mean()
        weight[old:seen] = centroids.to(weight.device)[chosen] * norm

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        self._store_prototypes(pl_module, trainer.datamodule.train_dataset, seen_classes(pl_module))

    @torch.no_grad()
    def _store_prototypes(self, module: DiscoveryModule, data: Dataset, upto: int, labelled_only: bool = False) -> None:
        """The prototypes of classes ``len(prototypes)..upto-1``: by label where labelled, else by
        prediction (``labelled_only``: labelled samples only; no prototype when none is labelled)."""
        features, predicted, target = self._features(module, data)
        labels = torch.where(target >= 0, target, torch.full_like(predicted, -1) if labelled_only else predicted)
        if labelled_only and not bool((labels >= 0).any()):
            return
        old = 0 if self.prototypes is None else len(self.prototypes)
        rows = [features[labels == c].mean(0) if bool((labels == c).any()) else
                F.normalize(module.classifier.weight[c].detach().float().cpu(), dim=-1) for c in range(old, upto)]
        if self.radius is None:
            self.radius = class_radius(features[labels >= 0], labels[labels >= 0], upto)
        fresh = F.normalize(torch.stack(rows), dim=-1)
        self.prototypes = fresh if self.prototypes is None else torch.cat([self.prototypes, fresh])
        self.hardness = mean_similarity(self.prototypes) if len(self.prototypes) > 1 else torch.zeros(1)

    @staticmethod
    def _features(module: DiscoveryModule, data: Dataset) -> tuple[Tensor, Tensor, Tensor]:
        """Normalized backbone features, predictions (among the live classes) and ``target`` of ``data``, on CPU."""
        was_training = module.training
        module.eval()
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        try:
            for batch in DataLoader(data, batch_size=256):
                features = module.backbone(batch["input"].to(module.device))
                logits = module.cosine_logits(features)[:, : seen_classes(module)]
                parts.append((F.normalize(features.float(), dim=-1).cpu(), logits.argmax(-1).cpu(), batch["target"]))
        finally:
            module.train(was_training)
        return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]

    # -- the loss ---------------------------------------------------------------------------------
    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if self.task == 0 or out.extras.get("views") != 2 or self.prototypes is None:
            return {}
        h, old = module.hparams, len(self.prototypes)
        unlabelled_weight = 1.0 - h.sup_weight
        # the module already added memax_weight * (log K - H(p)); this swaps it for the group-wise form
        flat = entropy_gap(F.softmax(out.logits.float(), dim=-1).mean(0))
        soft = soft_entropy(out.logits, old, **self.weights) - h.memax_weight * flat
        terms = {"soft_entropy": unlabelled_weight * soft}
        if self.prototype_weight:
            terms["prototypes"] = unlabelled_weight * self.prototype_weight * self._prototype_loss(out, module)
        if self.distill_weight:
            terms["distill"] = unlabelled_weight * self.distill_weight * self._distill_loss(out, module)
        return terms

    def _prototype_loss(self, out: StepOutput, module: DiscoveryModule) -> Tensor:
        step = module.trainer.global_step if module._trainer is not None else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        count = len(out.logits)
        labels = torch.multinomial(hardness_probabilities(self.hardness, self.hardness_temperature), count,
                                   replacement=True, generator=generator)
        noise = torch.randn((count, self.prototypes.shape[1]), generator=generator)
        samples = (self.prototypes[labels] + noise * self.radius * self.radius_scale).to(out.logits.device)
        logits = module.cosine_logits(samples.to(module.classifier.weight.dtype))[:, : out.logits.shape[1]]
        return F.cross_entropy(logits.float() / module.hparams.student_temperature, labels.to(out.logits.device))

    def _distill_loss(self, out: StepOutput, module: DiscoveryModule) -> Tensor:
        if self.teacher is None:
            self.teacher = copy.deepcopy(module.backbone).requires_grad_(False).eval()
            self.teacher.load_state_dict(self.teacher_state)
        self.teacher.to(out.features.device)
        inputs = torch.cat([out.batch["view1"], out.batch["view2"]])
        with torch.no_grad():
            teacher = F.normalize(self.teacher(inputs).float(), dim=-1)
        student = F.normalize(out.features.float(), dim=-1)
        return ((student - teacher) ** 2).sum() / len(student)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "started_task": self.started_task}
        for key in ("prototypes", "hardness", "radius"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu().clone()
        if self.teacher_state is not None:
            state["teacher"] = {k: v.detach().cpu().clone() for k, v in self.teacher_state.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task, self.started_task = int(state_dict["task"]), int(state_dict["started_task"])
        for key in ("prototypes", "hardness", "radius"):
            setattr(self, key, state_dict[key].clone() if key in state_dict else None)
        self.teacher_state = {k: v.clone() for k, v in state_dict["teacher"].items()} if "teacher" in state_dict else None
        self.teacher = None
