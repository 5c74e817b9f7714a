"""Run a sequence of tasks: one ``Trainer.fit`` per task, technique task hooks, boundary
checkpoints, exact resume at a boundary or in the middle of a task, and the accuracy matrix.

Per task t the runner

1. shows task t (``datamodule.set_task``) and sets the module's ``active_classes``: the classes
   seen so far (class-incremental) or task t's own (task-incremental);
2. builds a fresh ``Trainer`` — loops, early stopping, checkpointing, LR schedules and the
   optimizer start anew (the optimizer is rebuilt by ``configure_optimizers``);
3. calls every technique's ``on_task_start``, fits, calls ``on_task_end``;
4. tests on every task seen so far (one row of the accuracy matrix) and on the next task (for
   forward transfer) and saves ``checkpoints/task_<t>_end.ckpt``.

Before the first task it tests the untrained model on every task (the initial accuracies of
forward transfer). Each test is scored under both evaluation rules of
:mod:`reglab.continual.metrics`, class-incremental and task-incremental (the logits masked to the
task's classes), from one forward pass; the scenario's rule gives the accuracy matrix, the other
is reported beside it. Per task it also records the cost of the experience
(:mod:`reglab.continual.costs`: fit and evaluation wall time, peak memory, bytes the techniques
store). Results: ``accuracy_matrix.{md,json,png}`` (deterministic, so a resumed run writes the same
JSON) and ``experiences.json`` (the costs; a resumed task counts only its resumed part).

Every checkpoint is an ordinary Lightning checkpoint; :class:`TaskProgress` (a callback) puts
the number of finished tasks and the accuracy rows into it, the DataModule its task index, the
techniques their state. Resuming from a boundary checkpoint loads these into the live objects and
continues with the next task; from a mid-task one (``checkpoints/task_<t>/``) Lightning resumes
the fit of task t exactly (see docs/architecture.md) and the sequence continues from there.
:func:`latest_checkpoint` finds the newest of a run's checkpoints (``--ckpt_path last``).

Each task logs to ``<run_dir>/tasks/task_<t>/``: ``metrics.csv`` and TensorBoard events side by
side; a resumed task continues its logs. Checkpoints are :class:`~reglab.resume.RunCheckpoint`
(exact resume after any stop) and :class:`~reglab.nonfinite.NonFiniteGuard` stops a task whose
loss diverges. Callbacks that start a run from pretrained weights (:class:`PretrainedWeights`) act on the
first task only; later tasks continue from the previous task's weights.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.datamodules.tasks import TaskSequenceDataModule
from reglab.resume import RunCheckpoint
from reglab.continual.costs import ExperienceMeter, experiences_table, state_bytes
from reglab.continual.metrics import RULES, accuracy_matrix, incremental_scores, markdown_table, plot_heatmap, rules_table, summary
from reglab.nonfinite import NonFiniteGuard
from reglab.run_folder import run_loggers
from reglab.technique import Technique


class TaskProgress(L.Callback):
    """The runner's own state, saved in every checkpoint: finished tasks, and per evaluation rule
    (``class_il``, ``task_il``) the accuracy rows, the next-task accuracies and the initial ones;
    the cost of each finished experience."""

    def __init__(self) -> None:
        self.tasks_done = 0
        self.rows: dict[str, list[list[float]]] = {rule: [] for rule in RULES}
        self.next_task: dict[str, list[float]] = {rule: [] for rule in RULES}
        self.initial: dict[str, list[float]] = {rule: [] for rule in RULES}
        self.experiences: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"tasks_done": self.tasks_done, "rows": copy.deepcopy(self.rows), "next_task": copy.deepcopy(self.next_task),
                "initial": copy.deepcopy(self.initial), "experiences": copy.deepcopy(self.experiences)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict["rows"], dict):
            raise ValueError(
                "TaskProgress: this checkpoint comes from a runner before the class-/task-incremental rows "
                "(its rows are one list); resume it with that reglab version, or start the sequence again."
            )
        self.tasks_done = int(state_dict["tasks_done"])
        self.rows = copy.deepcopy(state_dict["rows"])
        self.next_task = copy.deepcopy(state_dict["next_task"])
        self.initial = copy.deepcopy(state_dict["initial"])
        self.experiences = copy.deepcopy(state_dict["experiences"])


class TaskSequenceRunner:
    """Fits ``module`` on the tasks of ``datamodule`` one after another.

    Args:
        module: a LightningModule with ``active_classes`` (``ClassificationModule``); its head
            covers all classes from the start.
        datamodule: the task sequence.
        techniques: techniques attached to every task's trainer (the same objects throughout).
        trainer_kwargs: ``Trainer`` arguments for every task (no ``callbacks`` / ``logger``).
        callbacks: other callbacks; each task gets a fresh copy (so early stopping resets).
        run_dir: where checkpoints, logs and the accuracy matrix go.
        checkpoint_every_n_steps: also checkpoint inside a task every n steps (for resume).
        log: write CSV and TensorBoard logs per task (``<run_dir>/tasks/task_<t>``).
    """

    def __init__(
        self,
        module: L.LightningModule,
        datamodule: TaskSequenceDataModule,
        techniques: Sequence[Technique] = (),
        trainer_kwargs: dict[str, Any] | None = None,
        callbacks: Sequence[L.Callback] = (),
        run_dir: str | Path = "runs/tasks",
        checkpoint_every_n_steps: int | None = None,
        log: bool = True,
    ) -> None:
        self.module, self.datamodule = module, datamodule
        self.techniques = list(techniques)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.callbacks = [copy.deepcopy(cb) for cb in callbacks]
        self.run_dir = Path(run_dir)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.log = log
        self.progress = TaskProgress()
        self.trained_any = False  # whether any optimizer step ran (a failed start left nothing)

    # -- the sequence ----------------------------------------------------------------------------
    def run(self, ckpt_path: str | Path | None = None) -> Tensor:
        """Fit every remaining task; returns the accuracy matrix (also written to ``run_dir``)."""
        self.datamodule.setup("fit")
        start, resume_fit_from = 0, None
        if ckpt_path is not None:
            start, resume_fit_from = self._restore(Path(ckpt_path))
        else:
            # a module that reads its classes from the DataModule at setup (the tiny CLIP's prompts) needs them
            # before this first test, which runs before any trainer exists
            take_class_prompts = getattr(self.module, "take_class_prompts", None)
            if take_class_prompts is not None:
                take_class_prompts(self.datamodule)
            self.progress.initial = self._accuracies(range(self.datamodule.num_tasks), after_task=None)
        for task in range(start, self.datamodule.num_tasks):
            self._show_task(task)
            trainer = self._trainer_for(task)
            for technique in self.techniques:
                technique.on_task_start(trainer, self.module, task)
            fit = ExperienceMeter(self.module.device)
            try:
                with fit:
                    trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=resume_fit_from if task == start else None)
            finally:
                self.trained_any = self.trained_any or trainer.global_step > 0
            for technique in self.techniques:
                technique.on_task_end(trainer, self.module, task)
            clock = time.perf_counter()
            self._record_evaluation(task)
            self.progress.experiences.append({
                "task": task, "fit_s": fit.seconds, "eval_s": time.perf_counter() - clock,
                "peak_memory_bytes": fit.peak_memory_bytes, "memory_kind": fit.memory_kind,
                "stored_bytes": {technique.state_key: state_bytes(technique) for technique in self.techniques},
            })
            self.progress.tasks_done = task + 1
            trainer.save_checkpoint(self.run_dir / "checkpoints" / f"task_{task}_end.ckpt")
        matrix = self.matrix
        self._write_results(matrix)
        return matrix

    @property
    def rule(self) -> str:
        """The evaluation rule of the scenario: ``class_il`` or ``task_il``."""
        return "class_il" if self.datamodule.scenario == "class" else "task_il"

    @property
    def matrix(self) -> Tensor:
        """The accuracy matrix of the tasks finished so far, under the scenario's rule."""
        return accuracy_matrix(self.progress.rows[self.rule])

    def scores(self) -> dict[str, float]:
        """The finished sequence's scores: ``summary`` of the matrix, ``forward_transfer``, the same
        under each rule (``class_il/...``, ``task_il/...``), and its costs summed over the tasks
        (``cost/fit_s``), at their peak (``cost/peak_memory_bytes``) and at the end
        (``cost/stored_bytes``: all techniques)."""
        progress = self.progress
        rules = incremental_scores(progress.rows, progress.next_task, progress.initial)
        costs = {
            "cost/fit_s": sum(e["fit_s"] for e in progress.experiences),
            "cost/peak_memory_bytes": float(max(e["peak_memory_bytes"] for e in progress.experiences)),
            "cost/stored_bytes": float(sum(progress.experiences[-1]["stored_bytes"].values())),
        }
        own_fwt = rules.get(f"{self.rule}/forward_transfer")
        return {**summary(self.matrix), **({"forward_transfer": own_fwt} if own_fwt is not None else {}), **rules, **costs}

    def _show_task(self, task: int) -> None:
        self.datamodule.set_task(task)
        trained = self.datamodule.classes_seen(task) if self.datamodule.scenario == "class" else self.datamodule.tasks[task]
        self.module.active_classes.copy_(self._mask(trained))

    def _mask(self, classes: list[int]) -> Tensor:
        mask = torch.zeros_like(self.module.active_classes)
        mask[classes] = True
        return mask

    def _trainer_for(self, task: int) -> L.Trainer:
        others = [cb for cb in self.callbacks if task == 0 or not getattr(cb, "starts_a_sequence_only", False)]
        callbacks: list[L.Callback] = [*self.techniques, self.progress, *copy.deepcopy(others), NonFiniteGuard()]
        if self.trainer_kwargs.get("enable_checkpointing") is not False:  # None (from the CLI) means on
            every = self.checkpoint_every_n_steps
            callbacks.append(RunCheckpoint(
                dirpath=self.run_dir / "checkpoints" / f"task_{task}", save_last=True,
                every_n_train_steps=every, save_top_k=-1 if every else 1,
            ))
        logger: Any = False
        if self.log:
            logger = run_loggers(self.run_dir / "tasks" / f"task_{task}")
        return L.Trainer(**{**self.trainer_kwargs, "default_root_dir": self.trainer_kwargs.get("default_root_dir") or str(self.run_dir)},
                         callbacks=callbacks, logger=logger)

    # -- evaluation -------------------------------------------------------------------------------
    def _record_evaluation(self, task: int) -> None:
        """After ``task``: a row of accuracies on tasks 0..task and the accuracy on the next task."""
        last = task + 1 == self.datamodule.num_tasks
        accuracies = self._accuracies(range(task + 1 if last else task + 2), after_task=task)
        for rule, values in accuracies.items():
            self.progress.rows[rule].append(values[: task + 1])
            if not last:
                self.progress.next_task[rule].append(values[task + 1])

    @torch.no_grad()
    def _accuracies(self, tasks: range, after_task: int | None) -> dict[str, list[float]]:
        """Test accuracy on each of ``tasks`` after ``after_task`` (``None``: before any training),
        under both rules: among the classes seen through ``max(after_task, j)`` for task j
        (class-incremental: a task not trained yet is tested among the classes it will be tested
        among once trained) and among task j's own classes (task-incremental). One forward pass with
        every class live; each rule masks the logits itself. A module with ``align_predictions``
        (continual category discovery: cluster ids, not labels) maps each rule's predictions before
        they are scored (:func:`aligned`)."""
        module, data = self.module, self.datamodule
        training_mask, was_training = module.active_classes.clone(), module.training
        module.eval()
        module.active_classes.fill_(True)
        candidates: dict[str, list[Tensor]] = {rule: [] for rule in RULES}
        predicted: dict[str, list[Tensor]] = {rule: [] for rule in RULES}
        targets: list[Tensor] = []
        try:
            for task in tasks:
                candidates["class_il"].append(self._mask(data.classes_seen(task if after_task is None else max(after_task, task))))
                candidates["task_il"].append(self._mask(data.tasks[task]))
                parts: dict[str, list[Tensor]] = {rule: [] for rule in RULES}
                task_targets = []
                for batch in data.task_dataloader("test", task):
                    batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    logits = module.forward_step(batch).logits
                    for rule in RULES:
                        parts[rule].append(logits.masked_fill(~candidates[rule][-1], float("-inf")).argmax(-1).cpu())
                    task_targets.append(batch["target"].cpu())
                targets.append(torch.cat(task_targets))
                for rule in RULES:
                    predicted[rule].append(torch.cat(parts[rule]))
            align = getattr(module, "align_predictions", None)
            if align is not None:
                for rule in RULES:
                    predicted[rule] = aligned(align, predicted[rule], targets, candidates[rule])
            accuracies = {rule: [float((p == t).double().mean()) for p, t in zip(predicted[rule], targets)] for rule in RULES}
        finally:
            module.active_classes.copy_(training_mask)
            module.train(was_training)
        return accuracies

    def _write_results(self, matrix: Tensor) -> None:
        progress = self.progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        scores = {k: v for k, v in self.scores().items() if not k.startswith("cost/")}
        (self.run_dir / "accuracy_matrix.md").write_text(
            markdown_table(matrix) + "\n\n" + rules_table(scores) + "\n\n" + experiences_table(progress.experiences) + "\n"
        )
        (self.run_dir / "accuracy_matrix.json").write_text(json.dumps({
            "matrix": progress.rows[self.rule], "rule": self.rule, **scores,
            "rows": progress.rows, "next_task": progress.next_task, "initial": progress.initial,
        }, indent=1))
        (self.run_dir / "experiences.json").write_text(json.dumps(progress.experiences, indent=1))
        plot_heatmap(matrix, self.run_dir / "accuracy_matrix.png")

    # -- resume -----------------------------------------------------------------------------------
    def _restore(self, path: Path) -> tuple[int, Path | None]:
        """Load the runner's state from a checkpoint; returns (first task to fit, checkpoint to
        resume that task's fit from, or None when the checkpoint is at a task boundary)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.progress.load_state_dict(checkpoint["callbacks"][self.progress.state_key])
        self.datamodule.load_state_dict(checkpoint[type(self.datamodule).__qualname__])
        if self.progress.tasks_done <= self.datamodule.task:
            return self.datamodule.task, path  # inside a task: Lightning restores the rest
        # first: the hooks a checkpoint names add what a technique's setup added (Mamba-FSCIL's projector)
        self.module.on_load_checkpoint(checkpoint)
        self.module.load_state_dict(checkpoint["state_dict"])
        for technique in self.techniques:
            if technique.state_key in checkpoint["callbacks"]:
                technique.load_state_dict(checkpoint["callbacks"][technique.state_key])
        return self.progress.tasks_done, None


def aligned(align: Any, predicted: list[Tensor], targets: list[Tensor], candidates: list[Tensor]) -> list[Tensor]:
    """Each task's predictions through a module's ``align_predictions(predicted, target)`` (a
    discovery model's cluster ids to classes), one alignment over all tasks scored among the same
    candidate classes, so those tasks share one map (GCD's one Hungarian assignment)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for task, mask in enumerate(candidates):
        groups.setdefault(tuple(mask.nonzero().flatten().tolist()), []).append(task)
    result = list(predicted)
    for members in groups.values():
        joined = align(torch.cat([predicted[t] for t in members]), torch.cat([targets[t] for t in members]))
        for t, part in zip(members, joined.split([len(predicted[t]) for t in members])):
            result[t] = part
    return result


def checkpoint_progress(path: Path) -> tuple[int, float]:
    """Where in the sequence a checkpoint of the runner was taken: ``(task, step)``, a boundary
    checkpoint ``task_<t>_end.ckpt`` counting as after every step of task t."""
    if path.name.endswith("_end.ckpt"):
        return int(path.name.split("_")[1]), float("inf")
    step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    return int(path.parent.name.split("_")[1]), float(step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a runner's run folder (boundary or inside a task), or ``None``.

    Newest means furthest in the sequence: the highest task, and within it the highest step;
    a boundary checkpoint is newer than every checkpoint inside its task.
    """
    folder = Path(run_dir) / "checkpoints"
    candidates = [*folder.glob("task_*_end.ckpt"), *folder.glob("task_*/*.ckpt")]
    return max(candidates, key=checkpoint_progress, default=None)
