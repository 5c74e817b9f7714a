"""Run a sequence of tasks: one ``Trainer.fit`` per task, technique task hooks, boundary
checkpoints, exact resume at a boundary or in the middle of a task, and the accuracy matrix.

Per task t the runner

1. shows task t (``datamodule.set_task``) and sets the module's ``active_classes``: the classes
   seen so far (class-incremental) or task t's own (task-incremental);
2. builds a fresh ``Trainer`` — loops, early stopping, checkpointing, LR schedules and the
   optimizer start anew (the optimizer is rebuilt by ``configure_optimizers``);
3. calls every technique's ``on_task_start``, fits, calls ``on_task_end``;
4. tests on every task seen so far (one row of the accuracy matrix) and saves
   ``checkpoints/task_<t>_end.ckpt``.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.datamodules.tasks import TaskSequenceDataModule
from reglab.resume import RunCheckpoint
from reglab.continual.metrics import accuracy_matrix, markdown_table, plot_heatmap, summary
from reglab.nonfinite import NonFiniteGuard
from reglab.run_folder import run_loggers
from reglab.technique import Technique


class TaskProgress(L.Callback):
    """The runner's own state, saved in every checkpoint: finished tasks and accuracy rows."""

    def __init__(self) -> None:
        self.tasks_done = 0
        self.rows: list[list[float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"tasks_done": self.tasks_done, "rows": [list(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tasks_done = int(state_dict["tasks_done"])
        self.rows = [list(row) for row in state_dict["rows"]]


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
        for task in range(start, self.datamodule.num_tasks):
            self._show_task(task)
            trainer = self._trainer_for(task)
            for technique in self.techniques:
                technique.on_task_start(trainer, self.module, task)
            try:
                trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=resume_fit_from if task == start else None)
            finally:
                self.trained_any = self.trained_any or trainer.global_step > 0
            for technique in self.techniques:
                technique.on_task_end(trainer, self.module, task)
            self.progress.rows.append(self.evaluate(task))
            self.progress.tasks_done = task + 1
            trainer.save_checkpoint(self.run_dir / "checkpoints" / f"task_{task}_end.ckpt")
        matrix = accuracy_matrix(self.progress.rows)
        self._write_results(matrix)
        return matrix

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
    @torch.no_grad()
    def evaluate(self, after_task: int) -> list[float]:
        """Test accuracy on every task 0..``after_task``: among all seen classes (class-incremental)
        or among the task's own classes (task-incremental)."""
        module, data = self.module, self.datamodule
        training_mask, was_training = module.active_classes.clone(), module.training
        module.eval()
        row = []
        try:
            for task in range(after_task + 1):
                classes = data.classes_seen(after_task) if data.scenario == "class" else data.tasks[task]
                module.active_classes.copy_(self._mask(classes))
                correct = total = 0
                for batch in data.task_dataloader("test", task):
                    batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    predicted = module.forward_step(batch).logits.argmax(-1)
                    correct += int((predicted == batch["target"]).sum())
                    total += len(predicted)
                row.append(correct / total)
        finally:
            module.active_classes.copy_(training_mask)
            module.train(was_training)
        return row

    def _write_results(self, matrix: Tensor) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "accuracy_matrix.md").write_text(markdown_table(matrix) + "\n")
        (self.run_dir / "accuracy_matrix.json").write_text(
            json.dumps({"matrix": self.progress.rows, **summary(matrix)}, indent=1)
        )
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
