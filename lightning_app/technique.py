"""The technique Protocol: a Lightning ``Callback`` that may take part in the step contract.

A technique overrides any of the stage methods below (all optional) and uses ordinary Lightning
hooks for everything else (EMA updates in ``on_train_batch_end``, gradient masks in
``on_before_optimizer_step``, model surgery in ``setup``). What it needs is declared, and checked
when the trainer sets up, so a missing piece fails before the first step with a message naming
the technique, the need and the fix.

Declarations (class attributes):
    needs: batch keys or step-output fields the technique reads: ``"index"``, ``"features"``,
        ``"clean_target"``, ``"domain"``, ``"task"``.
    conflicts_with: names of technique classes it cannot be stacked with.
    stateful: it keeps state that must be identical on every DDP rank and survive resume; such
        an object belongs to one model (a fit of another model is refused: build a new one).
    fsdp_unsupported: why it cannot run on a model sharded by FSDP (Lightning's ``FSDPStrategy``
        or ``ModelParallelStrategy``), or ``None`` when it can; refused at setup with the reason.
    fp16_unsupported: why it cannot run in 16-bit float precision (``16-mixed``, whose gradient
        scaler sees only the loss Lightning backpropagates, or ``16-true``), or ``None`` when it
        can; refused at setup with the reason (``bf16-mixed`` is not affected).
    predict_in: the evaluation runs (of ``validate``, ``test``, ``predict``) in which an overridden
        :meth:`Technique.transform_predictions` replaces the module's outputs; the validation
        inside a fit is never one (it measures the trained model for checkpoint selection).

A technique that adapts the model while it evaluates (test-time adaptation: TENT, CAFA)
subclasses :class:`EvalTimeAdaptation` instead and implements ``adaptation_loss``.

Example:
    >>> import torch
    >>> class ConfidencePenalty(Technique):
    ...     '''Adds beta * (negative entropy of the prediction).'''
    ...     def __init__(self, beta: float = 0.1):
    ...         self.beta = beta
    ...     def loss_terms(self, out, module):
    ...         p = out.logits.float().softmax(-1)
    ...         return {"neg_entropy": self.beta * (p * p.clamp_min(1e-12).log()).sum(-1).mean()}
    >>> ConfidencePenalty().name
    'confidence_penalty'
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reglab.step import StepOutput, forward_step_with

STAGES = ("transform_batch", "transform_outputs", "transform_targets", "task_loss", "perturb_weights", "loss_terms")
STEP_FIELDS = frozenset({"features", "index"})


class TechniqueConfigError(ValueError):
    """A technique cannot run with the given module, data or other techniques."""


class Technique(L.Callback):
    """Base class of every reglab technique (see the module docstring for the Protocol)."""

    needs: ClassVar[frozenset[str]] = frozenset()
    conflicts_with: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = False
    stages: ClassVar[frozenset[str]] = frozenset()
    fsdp_unsupported: ClassVar[str | None] = None
    fp16_unsupported: ClassVar[str | None] = None
    predict_in: tuple[str, ...] = ("validate", "test", "predict")
    #: whether the class overrides :meth:`transform_predictions` (computed per class)
    changes_predictions: ClassVar[bool] = False

    #: The technique's one id: its module file, config file, log prefix (``train/<name>/...``),
    #: checkpoint state key, card and claim all use it. reglab's techniques set it; a class that
    #: does not gets its snake-cased class name.
    name: ClassVar[str] = "technique"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.stages = frozenset(s for s in STAGES if getattr(cls, s) is not getattr(Technique, s))
        cls.changes_predictions = cls.transform_predictions is not Technique.transform_predictions
        if "name" not in cls.__dict__:
            cls.name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__).lower()
        if isinstance(cls.name, str) and not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
            raise TypeError(f"{cls.__name__}.name must be a snake-case id such as 'elr', got {cls.name!r}")

    @property
    def state_key(self) -> str:
        return self.name

    # -- stages (identity / nothing by default) -------------------------------------------------
    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        return batch

    def transform_outputs(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        return out

    def transform_targets(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return out.target

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        raise NotImplementedError

    def perturb_weights(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        """Offsets ``{parameter name: e}``: the task loss is trained on at ``w + e`` (SAM-style)."""
        raise NotImplementedError

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        return {}

    # -- evaluation only ------------------------------------------------------------------------
    def transform_predictions(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        """A prediction rule: in the runs of ``predict_in``, the validation / test / predict steps
        (``eval_forward``) report these logits instead of the model's (Loki's Fréchet mean, a probe
        head fitted on frozen features). Training never sees it."""
        return out

    # -- task sequences (reglab.continual) -----------------------------------------------
    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """Before task ``task`` is fitted: its trainer is new and not yet attached to the DataModule
        (``trainer.datamodule`` is ``None`` until ``fit``), so work that reads the task's data
        belongs in ``setup`` / ``on_fit_start``, where ``trainer.datamodule`` shows the task."""

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """After task ``task`` was fitted, before its boundary checkpoint (consolidate state here)."""

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_technique(self, trainer, pl_module)
            check_sharding(self, trainer)
            check_precision(self, trainer)
            check_rank_copies(self, trainer, pl_module)

    def fail(self, problem: str, fix: str) -> TechniqueConfigError:
        """An error naming this technique, the problem and the fix (raise it)."""
        return TechniqueConfigError(f"{type(self).__name__}: {problem}. Fix: {fix}.")


def check_technique(technique: Technique, trainer: L.Trainer, module: L.LightningModule) -> None:
    """Validate a technique against the module, the data and the other techniques."""
    # RegularizedMixin, or any module that implements the contract's entry point itself
    if technique.stages and not callable(getattr(module, "regularized_step", None)):
        raise technique.fail(
            f"it changes the training loss (stages: {', '.join(sorted(technique.stages))}) but "
            f"{type(module).__name__} does not use the step contract",
            "mix reglab.mixins.RegularizedMixin into the module and implement "
            "forward_step(batch) -> StepOutput (docs/architecture.md shows how)",
        )
    others = [cb for cb in trainer.callbacks if isinstance(cb, Technique) and cb is not technique]
    for other in others:
        if type(other).__name__ in technique.conflicts_with:
            raise technique.fail(
                f"it cannot be stacked with {type(other).__name__}", "remove one of the two techniques"
            )
    if "task_loss" in technique.stages:
        owners = [t for t in others if "task_loss" in t.stages]
        if owners:
            raise technique.fail(
                f"both it and {type(owners[0]).__name__} replace the task loss", "keep only one of them"
            )
    if "perturb_weights" in technique.stages:
        movers = [t for t in others if "perturb_weights" in t.stages]
        if movers:
            raise technique.fail(
                f"both it and {type(movers[0]).__name__} move the weights the task loss is evaluated at",
                "keep only one of them",
            )
    batch_keys = getattr(trainer.datamodule, "batch_keys", None)
    provides = getattr(module, "provides", None)
    for need in sorted(technique.needs):
        if need in STEP_FIELDS and provides is not None and need not in provides:
            raise technique.fail(
                f"it needs `{need}` from {type(module).__name__}.forward_step, which provides "
                f"{sorted(provides)}",
                f"use a module whose forward_step returns {need} (ClassificationModule does)",
            )
        if need not in STEP_FIELDS - {"index"} and batch_keys is not None and need not in batch_keys:
            raise technique.fail(
                f"it needs `{need}` in every training batch, but {type(trainer.datamodule).__name__} "
                f"yields only {sorted(batch_keys)}",
                f"use a DataModule whose batches carry `{need}` (every reglab DataModule has `index`; "
                "`clean_target` comes with label_noise)",
            )
    check_not_reused(technique, module)


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the trainer's strategy shards the module's parameters across ranks (FSDP)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), (FSDPStrategy, ModelParallelStrategy))


#: What the ``perturb_weights`` stage cannot run under, whatever the technique declares.
PERTURBED_FSDP = ("the task loss at the moved weights runs the module's layers with whole-weight stand-ins "
                  "(torch.func.functional_call), which FSDP's sharded parameters cannot be")
PERTURBED_FP16 = ("its weight offsets come from a gradient of the unscaled loss taken inside the training step, "
                  "outside 16-mixed's gradient scaler, where fp16 gradients under- or overflow unchecked")


def check_sharding(technique: Technique, trainer: L.Trainer) -> None:
    """Refuse a technique that cannot run on a sharded model (``fsdp_unsupported``, or the
    ``perturb_weights`` stage)."""
    reason = technique.fsdp_unsupported or ("perturb_weights" in technique.stages and PERTURBED_FSDP)
    if reason and is_sharded(trainer):
        raise technique.fail(
            f"it cannot run under {type(trainer.strategy).__name__}: {reason}",
            "train with strategy='ddp' (every rank holds the whole model), or leave this technique out",
        )


def check_precision(technique: Technique, trainer: L.Trainer) -> None:
    """Refuse a technique that cannot run in 16-bit float precision (``fp16_unsupported``, or the
    ``perturb_weights`` stage)."""
    reason = technique.fp16_unsupported or ("perturb_weights" in technique.stages and PERTURBED_FP16)
    precision = str(getattr(trainer, "precision", ""))
    if reason and precision.startswith("16"):
        raise technique.fail(
            f"it cannot run with precision='{precision}': {reason}",
            "train with precision='bf16-mixed' (no gradient scaler) or '32-true'",
        )


def check_rank_copies(technique: Technique, trainer: L.Trainer, module: L.LightningModule) -> None:
    """Refuse DDP ranks whose CPU weights are one copy in shared memory. Lightning hands a module to ranks it
    starts with ``start_method="forkserver"`` pickled that way and copies it out for ``spawn`` only
    (Lightning-AI/pytorch-lightning#18238), so every rank's optimizer step writes into the same weights: the
    ranks race, and a technique's per-rank state no longer matches its rank's weights."""
    ranks = getattr(trainer, "world_size", 1)
    if ranks > 1 and any(p.is_shared() for p in module.parameters() if p.device.type == "cpu"):
        raise technique.fail(
            f"the {ranks} DDP ranks' weights are one copy in shared memory (Lightning passes the "
            "module to forkserver-started CPU ranks that way), so every rank's optimizer step writes into the "
            "same weights",
            "start the ranks with start_method='spawn' (strategy='ddp_spawn'), or launch them with torchrun",
        )


def check_not_reused(technique: Technique, module: L.LightningModule) -> None:
    """Refuse a stateful technique that already trained another model: its state (a per-sample
    table, an average, a buffer) belongs to that fit, and a second fit would silently start from
    it. A later fit of the *same* model continues it (the task sequences of ``reglab fit-tasks``)."""
    if not technique.stateful:
        return
    # an id string, not a reference: techniques are pickled (ddp_spawn) and deep-copied
    model = module.__dict__.setdefault("_reglab_model_id", uuid.uuid4().hex)
    fitted = technique.__dict__.get("_reglab_fitted_model_id")
    if fitted is not None and fitted != model:
        name = type(technique).__name__
        raise technique.fail(
            f"this {name} object already trained another model in an earlier fit and carries that "
            f"fit's state, which this fit would start from",
            f"build a new {name}(...) for every fit; to continue a run, resume it with "
            "fit(..., ckpt_path=<its checkpoint>)",
        )
    technique._reglab_fitted_model_id = model


def check_step_output(technique: Technique, out: StepOutput, module: L.LightningModule) -> None:
    """First-step check for modules and data that could not be checked at setup."""
    for need in technique.needs:
        present = getattr(out, need, None) if need in STEP_FIELDS else out.batch.get(need)
        if present is None:
            raise technique.fail(
                f"it needs `{need}` but the first training step has none",
                f"return `{need}` from forward_step / put it in every batch",
            )
    for table in (value for value in vars(technique).values() if isinstance(value, PerSampleTable)):
        check_table_fits(technique, table, out, module)


def check_table_fits(technique: Technique, table: PerSampleTable, out: StepOutput, module: L.LightningModule) -> None:
    """A per-sample table has a row for every training sample and a column for every class.

    ``index`` holds positions in the training set (see :class:`StepOutput`), so the table needs
    the DataModule's ``num_train_samples`` rows (checked at setup) or else as many as the loader's
    dataset has, and more than the first batch's largest index. A short table would fail later
    with a bare indexing error, or a device assert on GPU."""
    trainer = getattr(module, "_trainer", None)
    if table.table is None or out.index is None or trainer is None:
        return
    rows, columns = table.table.shape
    samples = int(out.index.max()) + 1
    if getattr(trainer.datamodule, "num_train_samples", None) is None:
        try:
            samples = max(samples, len(trainer.train_dataloader.dataset))
        except (AttributeError, TypeError):  # no single loader, or an iterable dataset without a length
            pass
    if rows < samples:
        raise technique.fail(
            f"its per-sample table has {rows} rows (num_samples), but the training set has at least "
            f"{samples} samples",
            f"pass num_samples >= {samples} (the training-set size), or leave num_samples unset to take "
            "it from a reglab DataModule",
        )
    if columns != out.logits.shape[-1]:
        raise technique.fail(
            f"its per-sample table has {columns} columns (num_classes), but the model has "
            f"{out.logits.shape[-1]} classes",
            "pass the model's num_classes, or leave num_classes unset to take it from a reglab DataModule",
        )


def check_labels(out: StepOutput, module: L.LightningModule) -> None:
    """Class labels of the first training batch lie in ``[0, C)`` for the model's ``C`` classes.

    reglab DataModules check every split at setup; other DataModules are checked here, before the
    loss fails with a bare indexing error (or a device assert on GPU). Dense logits
    (``(N, C, H, W)``, more than two dims) have their classes in dim 1; labels equal to the
    module's ``ignore_index`` (segmentation's unlabelled pixels) are not class labels."""
    if out.labels is None or out.labels.is_floating_point() or out.labels.numel() == 0:
        return
    classes = out.logits.shape[1] if out.logits.dim() > 2 else out.logits.shape[-1]
    labels = out.labels
    ignore_index = getattr(module, "ignore_index", None)
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
        if labels.numel() == 0:
            return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
        data = "the training data" if datamodule is None else type(datamodule).__name__
        raise TechniqueConfigError(
            f"{data}: the first training batch has label {high if high >= classes else low}, but "
            f"{type(module).__name__} has {classes} classes (labels must lie in [0, {classes})). Fix: "
            f"map the labels to 0..{classes - 1}, or build the model with num_classes > {high}."
        )


def check_contract_ran(module: L.LightningModule) -> bool:
    """After a training step of a module that overrides ``training_step``: refuse when a technique
    changes the loss and the step did not run the contract (the technique would do nothing: ELR's
    table stays zero). Returns whether the check had anything to check."""
    changing = [technique for technique in module.techniques if technique.stages]
    if not changing:
        return False
    if not getattr(module, "_reglab_contract_ran", False):
        name = type(module).__name__
        raise changing[0].fail(
            f"it changes the training loss (stages: {', '.join(sorted(changing[0].stages))}) but "
            f"{name}.training_step does not run the step contract, so the technique does nothing",
            f"delete {name}.training_step (RegularizedMixin's runs every technique), or compute the loss in "
            "it with `loss, out, terms = self.regularized_step(batch)`",
        )
    return True


def run_stages(
    module: L.LightningModule, techniques: list[Technique], batch: dict[str, Any]
) -> tuple[Tensor, StepOutput, dict[str, Tensor]]:
    """One training step of the contract; returns (total loss, step output, named terms)."""
    for technique in techniques:
        if "transform_batch" in technique.stages:
            batch = technique.transform_batch(batch, module)
    out = module.forward_step(batch)
    if not out.batch:
        out.batch = batch
    if out.index is None:
        out.index = batch.get("index")
    module._reglab_contract_ran = True
    if not getattr(module, "_reglab_step_checked", False):
        check_labels(out, module)
        for technique in techniques:
            check_step_output(technique, out, module)
        module._reglab_step_checked = True
    for technique in techniques:
        if "transform_outputs" in technique.stages:
            out = technique.transform_outputs(out, module)
    for technique in techniques:
        if "transform_targets" in technique.stages:
            out.target = technique.transform_targets(out, module)
    loss_owner = next((t for t in techniques if "task_loss" in t.stages), None)
    out.task_loss = loss_owner.task_loss(out, module) if loss_owner else module.task_loss(out)
    total = out.task_loss.mean()
    mover = next((t for t in techniques if "perturb_weights" in t.stages), None)
    if mover is not None:
        moved = perturbed_output(module, techniques, out, mover.perturb_weights(out, module))
        total = (loss_owner.task_loss(moved, module) if loss_owner else module.task_loss(moved)).mean()
    terms = {"task_loss": total}
    for technique in techniques:
        if "loss_terms" in technique.stages:
            for key, value in technique.loss_terms(out, module).items():
                terms[f"{technique.name}/{key}"] = value
                total = total + value
    return total, out, terms


def perturbed_output(
    module: L.LightningModule, techniques: list[Technique], out: StepOutput, offsets: dict[str, Tensor]
) -> StepOutput:
    """The step's forward pass again, at the weights ``w + offsets`` (``perturb_weights``), with the
    step's (transformed) targets and the output transforms re-applied. The moved weights are
    ``p + offset.detach()``, so the loss's gradient reaches each unmoved parameter ``p`` as the
    gradient at ``w + offset``: nothing is changed in place or restored, and accumulation and DDP's
    gradient hooks see one ordinary backward."""
    parameters = dict(module.named_parameters())
    moved = forward_step_with(module, out.batch, {name: parameters[name] + e.detach().to(parameters[name].dtype) for name, e in offsets.items()})
    moved.target, moved.labels, moved.index, moved.batch = out.target, out.labels, out.index, out.batch
    for technique in techniques:
        if "transform_outputs" in technique.stages:
            moved = technique.transform_outputs(moved, module)
    return moved


def trainable_parameters(module: torch.nn.Module) -> dict[str, Tensor]:
    """Name -> parameter, for every parameter that trains (``requires_grad``)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def ascent_offsets(
    loss: Tensor, parameters: dict[str, Tensor], radius: float, adaptive: bool = False
) -> dict[str, Tensor]:
    """The first-order worst-case weight offsets within a ball of ``radius`` around ``w``:
    ``e = radius * g / ||g||`` for the gradient ``g`` of ``loss`` over all ``parameters`` (one
    norm over all of them), or, ``adaptive``, ASAM's ``e = radius * w^2 g / ||w g||`` (element-wise
    scaling by ``|w|``). The gradient is this process's own (``torch.autograd.grad`` fires no DDP
    hook), and the loss's graph is kept for the step's own backward. Parameters the loss does not
    reach get no offset."""
    names = list(parameters)
    grads = torch.autograd.grad(loss, [parameters[n] for n in names], retain_graph=True, allow_unused=True)
    pairs = [(name, g.float()) for name, g in zip(names, grads) if g is not None]
    if not pairs:
        return {}
    scaled = [parameters[name].detach().abs() * g if adaptive else g for name, g in pairs]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = radius / (norm + 1e-12)
    return {name: (parameters[name].detach().square() * g if adaptive else g) * scale for name, g in pairs}


def training_set_shape(
    technique: Technique, trainer: L.Trainer, num_samples: int | None, num_classes: int | None
) -> tuple[int, int]:
    """(number of training samples, number of classes) for per-sample state, from the
    technique's own arguments or else the DataModule."""
    datamodule = trainer.datamodule
    data_samples = getattr(datamodule, "num_train_samples", None)
    data_classes = getattr(datamodule, "num_classes", None)
    if num_samples and data_samples and num_samples < data_samples:
        raise technique.fail(
            f"num_samples={num_samples} is smaller than the {data_samples} training samples of "
            f"{type(datamodule).__name__}, so its per-sample table has no row for some of them",
            f"leave num_samples unset (it is taken from the DataModule) or pass num_samples >= {data_samples}",
        )
    if num_classes and data_classes and num_classes != data_classes:
        raise technique.fail(
            f"num_classes={num_classes} differs from the {data_classes} classes of {type(datamodule).__name__}",
            "leave num_classes unset (it is taken from the DataModule) or pass the DataModule's num_classes",
        )
    num_samples = num_samples or data_samples
    num_classes = num_classes or data_classes
    if not num_samples or not num_classes:
        raise technique.fail(
            "it keeps per-sample state but cannot tell the training-set size and class count",
            "use a reglab DataModule, or pass num_samples and num_classes to the technique",
        )
    return int(num_samples), int(num_classes)


def training_class_counts(
    technique: Technique, trainer: L.Trainer, class_counts: list[int] | None = None
) -> Tensor:
    """``(C,)`` long: how many training samples carry each label (the labels as trained on, so
    noisy ones under label noise), from the technique's own ``class_counts`` or else the
    DataModule's training split (``train_dataset.targets`` and ``num_classes`` of a reglab
    DataModule, after its long tail). Every DDP rank holds the whole training split, so every
    rank gets the same counts."""
    datamodule = trainer.datamodule
    num_classes = getattr(datamodule, "num_classes", None)
    if class_counts is not None:
        counts = torch.as_tensor(class_counts, dtype=torch.long)
        if counts.dim() != 1 or (counts < 0).any() or counts.sum() == 0:
            raise technique.fail(
                f"class_counts must be a list of non-negative sample counts, one per class, got {class_counts}",
                "pass the training split's count of every class",
            )
        if num_classes is not None and len(counts) != num_classes:
            raise technique.fail(
                f"class_counts has {len(counts)} entries but {type(datamodule).__name__} has {num_classes} classes",
                "pass one count per class, or leave class_counts unset to count the DataModule's training split",
            )
        return counts
    targets = getattr(getattr(datamodule, "train_dataset", None), "targets", None)
    if targets is None or num_classes is None:
        raise technique.fail(
            "it needs the number of training samples of every class, and the DataModule does not show them "
            "(no train_dataset.targets and num_classes)",
            "use a reglab DataModule, or pass class_counts=[n_0, n_1, ...] to the technique",
        )
    return torch.bincount(torch.as_tensor(targets).long(), minlength=int(num_classes))


def schedule_epochs(technique: Technique, trainer: L.Trainer, total_epochs: int | None) -> int:
    """The number of epochs a technique's schedule spans: ``total_epochs`` if given, else the
    trainer's ``max_epochs``. Not estimated from ``max_steps``: a run resumed with another step
    budget would then follow another schedule."""
    if total_epochs is not None:
        return total_epochs
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return trainer.max_epochs
    raise technique.fail(
        "its schedule needs the number of training epochs, and the trainer has no max_epochs",
        f"set trainer.max_epochs, or pass total_epochs to {type(technique).__name__}",
    )


class PerSampleTable:
    """An ``(N, C)`` fp32 table indexed by training-sample position, identical on every rank.

    Each rank writes the rows of the samples it saw; :meth:`write` gathers the rows of all ranks
    first, so every rank applies every update. The table follows the module's device lazily and
    round-trips through ``state_dict`` (loading before or after allocation both work).
    """

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self._pending: Tensor | None = None

    def allocate(self, num_samples: int, num_classes: int, fill: float = 0.0) -> None:
        self.table = torch.full((num_samples, num_classes), fill, dtype=torch.float32)
        if self._pending is not None:
            self.load(self._pending)

    def rows(self, index: Tensor) -> Tensor:
        return self._on(index.device)[index]

    def write(self, index: Tensor, values: Tensor, module: L.LightningModule) -> None:
        """Set rows ``index`` to ``values`` on every rank (collective under DDP)."""
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            index = module.all_gather(index).reshape(-1)
            values = module.all_gather(values).reshape(-1, values.shape[-1])
        self._on(index.device).index_copy_(0, index, values.float())

    def _on(self, device: torch.device) -> Tensor:
        if self.table is None:
            raise RuntimeError("PerSampleTable used before allocate()")
        if self.table.device != device:
            self.table = self.table.to(device)
        return self.table

    def state(self) -> Tensor | None:
        return None if self.table is None else self.table.detach().cpu().clone()

    def load(self, table: Tensor) -> None:
        if self.table is None:
            self._pending = table
            return
        if table.shape != self.table.shape:
            raise ValueError(
                f"checkpoint holds a per-sample table of shape {tuple(table.shape)} but this run "
                f"needs {tuple(self.table.shape)}: resume with the same dataset and classes"
            )
        self.table.copy_(table.to(self.table.device))
        self._pending = None


def dataset_features(module: L.LightningModule, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every sample of ``dataset`` from ``module.forward_step``, in eval
    mode and without gradients, fp32 on the module's device. The loader has its own generator, so
    the global RNG (and with it an exactly resumed run) is not touched."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    modes = [(m, m.training) for m in module.modules()]  # each one's: a frozen part may be in eval mode in training
    module.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                features.append(module.forward_step(batch).features.float())
                labels.append(batch["target"])
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(features), torch.cat(labels)


#: ``trainer.state.fn`` of the runs an eval-time technique may adapt in, by Lightning's stage name.
EVAL_RUNS = ("validate", "test", "predict")
_OPTIMIZERS = ("adam", "sgd")


def batch_norm_layers(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer of ``module`` (1-d, 2-d, 3-d, synchronised)."""
    return (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


class EvalTimeAdaptation(Technique):
    """A technique that adapts the model while it evaluates: test-time adaptation (TENT, CAFA).

    A subclass implements :meth:`adaptation_loss` (an unsupervised scalar on a batch's
    :class:`StepOutput`) and may override :meth:`adapted_parameters` (default: the affine scale
    and shift of every batch-norm layer, TENT's choice) and :meth:`on_adaptation_start`. In each
    ``trainer.validate`` / ``test`` / ``predict`` run named in ``adapt_in`` (not in the validation
    of a fit: that measures the source model for checkpoint selection), every batch is evaluated
    as: forward under ``torch.enable_grad``, the loss, backward, one optimizer step on the adapted
    parameters only, ``steps`` times; the metrics and predictions come from the last forward
    (the official TENT's "adapt while predicting": no second forward after the update).

    * **Gradients in the evaluation loop.** Lightning runs evaluation under
      ``torch.inference_mode``, in which no graph can be built (``enable_grad`` does not undo it).
      :meth:`setup` of an adapting stage switches that loop to ``torch.no_grad`` (its
      ``inference_mode`` flag, Lightning's own ``Trainer(inference_mode=False)`` per loop) and
      ``teardown`` switches it back, so other runs of the trainer keep inference mode.
    * **The model is not changed by a run unless asked.** The adapted parameters are copied at
      the start of the run and written back at its end (also when the run fails), with every
      module's train/eval mode, ``requires_grad`` flags and batch-norm settings; running
      statistics are never updated (``track_running_stats`` is off while adapting). So a test
      run leaves the weights, and any checkpoint written later, as they were.
      ``keep_adapted=True`` keeps the adapted parameters on the module after the run (save them
      with ``trainer.save_checkpoint``). Test runs write no checkpoint themselves.
    * **Episodes.** Adaptation state (the adapted parameters and the optimizer's moments) starts
      from the source model at every run, and carries over from batch to batch within it (the
      official TENT's online default, reset between corruptions as its evaluation script does):
      one held-out domain per test run is one episode. ``episodic=True`` resets before every
      batch (the official ``MODEL.EPISODIC``). Per-sample episodes are not offered: batch
      statistics need a batch.
    * **DDP.** Each rank adapts on its share of the batches; the adapted parameters' gradients
      are averaged over the ranks before each step (the strategy's ``reduce``), so every rank
      keeps the same parameters, as one adaptation on the global batch would.
    * At most one eval-time technique per trainer (two would step the same parameters on
      different losses); refused at setup. The module routes its evaluation steps through
      ``eval_forward`` (``RegularizedMixin`` does); a run in which batches ran but none was
      adapted fails at its end, naming the fix.

    Args:
        lr: learning rate of the adaptation optimizer (official TENT: 1e-3).
        optimizer: ``"adam"`` (betas 0.9, 0.999) or ``"sgd"`` (momentum, Nesterov), as TENT's.
        momentum: SGD's momentum.
        weight_decay: the optimizer's weight decay (TENT: 0).
        steps: optimizer steps per batch (TENT: 1).
        episodic: reset to the source model before every batch instead of every run.
        keep_adapted: leave the adapted parameters on the module after the run.
        batch_statistics: normalise batch-norm layers with the test batch's statistics while
            adapting (TENT's "test-time normalization"); ``False`` keeps the running statistics.
        adapt_in: the runs that adapt, of ``validate``, ``test``, ``predict``.

    Example:
        >>> class MinEntropy(EvalTimeAdaptation):
        ...     def adaptation_loss(self, out, module):
        ...         p = out.logits.float().softmax(-1)
        ...         return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        >>> MinEntropy(lr=1e-3).adapt_in
        ('validate', 'test', 'predict')
    """

    def __init__(
        self,
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
        if optimizer not in _OPTIMIZERS:
            raise self.fail(f"optimizer {optimizer!r} is not one of {_OPTIMIZERS}", "pass optimizer='adam' or 'sgd'")
        if steps < 1:
            raise self.fail(f"steps={steps} takes no adaptation step", "pass steps >= 1 (optimizer steps per batch)")
        unknown = sorted(set(adapt_in) - set(EVAL_RUNS))
        if unknown:
            raise self.fail(f"adapt_in names {unknown}, which are not evaluation runs",
                            f"name runs of {list(EVAL_RUNS)} (the validation inside a fit never adapts)")
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.steps, self.episodic, self.keep_adapted = steps, episodic, keep_adapted
        self.batch_statistics, self.adapt_in = batch_statistics, tuple(adapt_in)
        self._run: dict[str, Any] | None = None
        self._loop_modes: list[tuple[Any, bool]] = []

    # -- what a subclass provides ----------------------------------------------------------------
    def adaptation_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        """The unsupervised scalar minimised on every evaluated batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement adaptation_loss(out, module)")

    def adapted_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of what adapts: every batch-norm layer's affine scale and shift."""
        norms = {id(m) for m in batch_norm_layers(module) if m.affine}
        return [(f"{name}.{kind}" if name else kind, p) for name, m in module.named_modules() if id(m) in norms
                for kind, p in m.named_parameters(recurse=False)]

    def on_adaptation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """At the start of an adapting run, before the model is set up for adaptation (so the model
        is still the source model, in Lightning's eval mode)."""

    # -- the mechanism ---------------------------------------------------------------------------
    @property
    def adapting(self) -> bool:
        """Whether an adapting run is in progress."""
        return self._run is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        others = [cb for cb in trainer.callbacks if isinstance(cb, EvalTimeAdaptation) and cb is not self]
        if others:
            raise self.fail(f"both it and {type(others[0]).__name__} adapt the model at test time",
                            "keep only one eval-time adaptation technique")
        if not callable(getattr(pl_module, "eval_forward", None)):
            raise self.fail(f"{type(pl_module).__name__} does not route its evaluation steps through the step "
                            "contract, so nothing would adapt",
                            "mix reglab.mixins.RegularizedMixin into the module (its validation/test/predict steps "
                            "call eval_forward)")
        if not self.adapted_parameters(pl_module):
            raise self.fail(f"{type(pl_module).__name__} has no batch-norm layer with affine parameters, which it "
                            "adapts at test time",
                            "use a backbone with BatchNorm (backbone: cnn, or mlp with backbone_kwargs: {norm: batch})")
        if stage in self.adapt_in:
            loop = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}[stage]
            self._loop_modes.append((loop, loop.inference_mode))
            loop.inference_mode = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        while self._loop_modes:
            loop, mode = self._loop_modes.pop()
            loop.inference_mode = mode

    def _starts(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn is None or trainer.state.fn.value not in self.adapt_in:
            return
        if torch.is_inference_mode_enabled():
            raise self.fail("the evaluation loop runs in inference mode, where no gradient can be taken",
                            "attach the technique to the trainer that runs the evaluation (its setup turns "
                            "inference mode off for that loop), or build the Trainer with inference_mode=False")
        self.on_adaptation_start(trainer, module)
        params = self.adapted_parameters(module)
        norms = list(batch_norm_layers(module))
        self._run = {
            "stage": trainer.state.fn.value,
            "source": [p.detach().clone() for _, p in params],
            "requires_grad": [(p, p.requires_grad) for p in module.parameters()],
            "modes": [(m, m.training) for m in module.modules()],
            "tracking": [(m, m.track_running_stats) for m in norms],
            "batches": 0,
            "adapted": 0,
        }
        module.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
        if self.batch_statistics:
            for norm in norms:  # batch statistics, running statistics left as they are
                norm.train()
                norm.track_running_stats = False
        self._run["optimizer"] = self._make_optimizer([p for _, p in params])

    def _ends(self, trainer: L.Trainer, module: L.LightningModule, check: bool = True) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        params = [p for _, p in self.adapted_parameters(module)]
        with torch.no_grad():
            for p, source in zip(params, run["source"]):
                if not self.keep_adapted:
                    p.copy_(source)
                p.grad = None
        for norm, tracking in run["tracking"]:
            norm.track_running_stats = tracking
        for m, training in run["modes"]:
            m.training = training
        for p, flag in run["requires_grad"]:
            p.requires_grad_(flag)
        if check and run["batches"] and not run["adapted"]:
            raise self.fail(f"the {run['stage']} run evaluated {run['batches']} batches but none was adapted: "
                            f"{type(module).__name__} evaluates without eval_forward",
                            "call self.eval_forward(batch) instead of self.forward_step(batch) in the module's "
                            "validation/test/predict step (RegularizedMixin's do)")

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.momentum > 0)

    def adapt(self, batch: dict[str, Any], module: L.LightningModule) -> StepOutput:
        """Adapt on ``batch`` (``steps`` optimizer steps) and return the last forward's output, detached."""
        run = self._run
        params = [p for _, p in self.adapted_parameters(module)]
        if self.episodic and run["adapted"]:
            with torch.no_grad():
                for p, source in zip(params, run["source"]):
                    p.copy_(source)
            run["optimizer"] = self._make_optimizer(params)
        trainer = module.trainer
        for _ in range(self.steps):
            with torch.enable_grad():
                out = module.forward_step(batch)
                loss = self.adaptation_loss(out, module)
                run["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
            if trainer.world_size > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")
            run["optimizer"].step()
        run["adapted"] += 1
        if run["stage"] != "predict":  # Lightning allows no logging in predict
            prefix = "val" if run["stage"] == "validate" else run["stage"]
            module.log(f"{prefix}/{self.name}/adaptation_loss", loss.detach(), on_epoch=True,
                       batch_size=out.logits.shape[0])
        return out.detached()

    def _counts_batch(self) -> None:
        if self._run is not None:
            self._run["batches"] += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._starts(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._starts(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._starts(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._counts_batch()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._counts_batch()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._counts_batch()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ends(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ends(trainer, pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ends(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._ends(trainer, pl_module, check=False)


def eval_forward(module: L.LightningModule, techniques: list[Technique], batch: dict[str, Any]) -> StepOutput:
    """The forward pass of a validation / test / predict step: adapted by the attached
    :class:`EvalTimeAdaptation` when it is adapting in this run, else ``module.forward_step``; then
    every technique's prediction rule (``transform_predictions``) that applies in this run, in
    config order."""
    adapter = next((t for t in techniques if isinstance(t, EvalTimeAdaptation) and t.adapting), None)
    out = adapter.adapt(batch, module) if adapter is not None else module.forward_step(batch)
    rules = [t for t in techniques if t.changes_predictions]
    if rules:
        fn = module.trainer.state.fn
        run = None if fn is None else fn.value
        for technique in rules:
            if run in technique.predict_in:
                out = technique.transform_predictions(out, module)
    return out
