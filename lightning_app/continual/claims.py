"""Claim protocols of the continual family, registered with ``reglab bench effects``.

* ``task_sequence``: a :class:`TaskSequenceRunner` run per arm and seed on split digits; the
  accuracy matrix gives ``average_accuracy``, ``forgetting`` (max − last),
  ``backward_transfer`` and ``forward_transfer``, also under both evaluation rules
  (``class_il/...``, ``task_il/...``), and the run's costs (``cost/fit_s``,
  ``cost/peak_memory_bytes``, ``cost/stored_bytes``): :meth:`TaskSequenceRunner.scores`. Optionally every arm of a seed starts from one backbone pretrained on a
  disjoint, class-stratified share of the training images (``pretrain_epochs`` > 0), frozen
  (``freeze_backbone``), with only the current task's logits live while it trains
  (``current_task_logits``, as OVOR's official learners).
* ``few_shot_sessions``: the same with a base session and few-shot sessions (``data.shots``);
  adds ``novel_accuracy`` (after the last session, mean over the sessions' tasks) and
  ``base_accuracy``.
* ``online_stream``: one online pass over a stream with :class:`AnytimeAccuracy`
  (``online/A_auc``, ``online/A_last``): ``stream: si_blurry`` (default) or ``drifting``
  (:class:`~reglab.datamodules.DriftingDigitsDataModule`), ``stream_args`` to its constructor.

An arm's spec: ``techniques`` (a list of ``{class_path, init_args}``) and, for a task sequence,
``joint`` (train every task on all seen tasks' data: the upper bound). Data, class order and
initialisation are seeded with the seed. A claim file names ``module: reglab.continual.claims``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from reglab.bench.protocols import ClaimError, Protocol, instantiate, register_protocol
from reglab.continual.online import AnytimeAccuracy
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import DigitsDataModule, DriftingDigitsDataModule, SiBlurryDataModule, TaskSequenceDataModule
from reglab.tasks import ClassificationModule

QUIET = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


class CurrentTaskLogits(L.Callback):
    """While a task trains, only its own classes' logits are live (the official OVOR learners
    mask past tasks' logits); the runner evaluates among all seen classes regardless."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: ClassificationModule) -> None:
        data = trainer.datamodule
        mask = torch.zeros_like(pl_module.active_classes)
        mask[data.tasks[data.task]] = True
        pl_module.active_classes.copy_(mask)


def mlp(model: dict[str, Any]) -> ClassificationModule:
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,),
                                backbone_kwargs={"hidden_sizes": tuple(model["hidden_sizes"])},
                                lr=model["lr"], cosine_head_temperature=model.get("cosine_head_temperature"))


def build_techniques(spec: dict[str, Any]) -> list:
    return [instantiate(technique) for technique in spec.get("techniques", [])]


def check_technique_specs(claim: str, arm: str, spec: dict[str, Any], allowed: set[str]) -> None:
    if set(spec) - allowed:
        raise ClaimError(f"claim {claim}, arm {arm}: unknown field(s) {sorted(set(spec) - allowed)}; "
                         f"this protocol's arms take {sorted(allowed)} (and `label`)")
    for technique in spec.get("techniques", []):
        if not isinstance(technique, dict) or "class_path" not in technique:
            raise ClaimError(f"claim {claim}, arm {arm}: each technique is {{class_path: ..., init_args: {{...}}}}, "
                             f"got {technique!r}")


@functools.cache
def pretrained_backbone(settings_json: str, seed: int) -> dict[str, torch.Tensor]:
    """The MLP fitted on the set-aside share of the training images (all classes); cached per
    (settings, seed), so every arm of a seed starts from the same backbone."""
    settings = json.loads(settings_json)
    L.seed_everything(seed, verbose=False)
    module = mlp(settings["model"])
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=settings["data"]["batch_size"], seed=seed),
                                  num_tasks=settings["data"]["num_tasks"], pretrain_fraction=settings["pretrain_fraction"],
                                  pretraining=True)
    L.Trainer(max_epochs=settings["pretrain_epochs"], logger=False, **{**QUIET, **settings["trainer"]}).fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.backbone.state_dict().items()}


@register_protocol("task_sequence")
class TaskSequenceProtocol(Protocol):
    defaults = {
        "data": {"num_tasks": 5, "scenario": "class", "batch_size": 32, "first_task_classes": None, "shots": None},
        "model": {"hidden_sizes": [128, 128], "lr": 1e-3, "cosine_head_temperature": None},
        "epochs": 3,
        "pretrain_epochs": 0,
        "pretrain_fraction": 0.5,
        "freeze_backbone": False,
        "current_task_logits": False,
        "trainer": {},
    }

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        for key in ("data", "model"):  # a claim file names only the sub-settings it changes
            self.settings[key] = {**self.defaults[key], **settings.get(key, {})}
        if self.settings["freeze_backbone"] and not self.settings["pretrain_epochs"]:
            raise ClaimError(f"claim {claim_name}: freeze_backbone needs a pretrained backbone (pretrain_epochs > 0)")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_specs(self.claim_name, arm, spec, {"techniques", "joint"})

    def sequence(self, seed: int, joint: bool) -> TaskSequenceDataModule:
        data = dict(self.settings["data"])
        base = DigitsDataModule(flatten=True, batch_size=data.pop("batch_size"), seed=seed)
        pretrain_fraction = self.settings["pretrain_fraction"] if self.settings["pretrain_epochs"] else 0.0
        return TaskSequenceDataModule(base, joint=joint, pretrain_fraction=pretrain_fraction, **data)

    def run_sequence(self, spec: dict[str, Any], seed: int, workdir: Path) -> TaskSequenceRunner:
        settings = self.settings
        backbone = pretrained_backbone(json.dumps(settings, sort_keys=True), seed) if settings["pretrain_epochs"] else None
        L.seed_everything(seed, verbose=False)
        module = mlp(settings["model"])
        if backbone is not None:
            module.backbone.load_state_dict(backbone)
            module.backbone.requires_grad_(not settings["freeze_backbone"])
        callbacks = [CurrentTaskLogits()] if settings["current_task_logits"] else []
        runner = TaskSequenceRunner(module, self.sequence(seed, spec.get("joint", False)), build_techniques(spec),
                                    {**QUIET, "max_epochs": settings["epochs"], **settings["trainer"]},
                                    callbacks=callbacks, run_dir=tempfile.mkdtemp(dir=workdir), log=False)
        runner.run()
        return runner

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        return self.run_sequence(spec, seed, workdir).scores()

    def describe(self) -> list[str]:
        return ["Split digits through `reglab.continual.TaskSequenceRunner` (one fit per task, accuracy on every "
                "seen task after each); forgetting = max − last (Chaudhry et al. 2018); seeds set data, class "
                "order and initialisation.", ""]


@register_protocol("few_shot_sessions")
class FewShotSessionsProtocol(TaskSequenceProtocol):
    defaults = {**TaskSequenceProtocol.defaults,
                "data": {**TaskSequenceProtocol.defaults["data"], "num_tasks": 3, "first_task_classes": 6, "shots": 5},
                "epochs": 20}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        if not self.settings["data"]["shots"]:
            raise ClaimError(f"claim {claim_name}: few_shot_sessions needs data.shots (samples per new class)")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        runner = self.run_sequence(spec, seed, workdir)
        matrix = runner.matrix
        return {"novel_accuracy": float(matrix[-1, 1:].mean()), "base_accuracy": float(matrix[-1, 0]),
                **runner.scores()}

    def describe(self) -> list[str]:
        return ["Few-shot sessions through `reglab.continual.TaskSequenceRunner`: a base session, then sessions of "
                "few shots per new class. novel_accuracy: after the last session, mean over the sessions' tasks of "
                "their test accuracy among all classes; base_accuracy: the base session's.", ""]


STREAMS = ("si_blurry", "drifting")


@register_protocol("online_stream")
class OnlineStreamProtocol(Protocol):
    defaults = {"batch_size": 16, "lr": 5e-3, "eval_period": 50, "hidden_sizes": [128, 128], "stream": "si_blurry",
                "stream_args": {}, "trainer": {}}

    def check_settings(self) -> None:
        if self.settings["stream"] not in STREAMS:
            raise ClaimError(f"claim {self.claim_name}: stream {self.settings['stream']!r} is not one of {list(STREAMS)}. "
                             f"Fix: set stream to one of them.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_specs(self.claim_name, arm, spec, {"techniques"})

    def stream(self, seed: int) -> L.LightningDataModule:
        """The stream of a seed: Si-Blurry over the digits, or the drifting digits (stream seed = seed)."""
        settings = self.settings
        if settings["stream"] == "drifting":
            return DriftingDigitsDataModule(batch_size=settings["batch_size"], seed=seed, **settings["stream_args"])
        base = DigitsDataModule(flatten=True, batch_size=settings["batch_size"], seed=seed)
        return SiBlurryDataModule(base, seed=seed, **settings["stream_args"])

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        settings = self.settings
        L.seed_everything(seed, verbose=False)
        data = self.stream(seed)
        module = mlp({"hidden_sizes": settings["hidden_sizes"], "lr": settings["lr"]})
        curve = AnytimeAccuracy(eval_period=settings["eval_period"])
        trainer = L.Trainer(**{**QUIET, "max_epochs": 1, **settings["trainer"]}, logger=False,
                            default_root_dir=workdir, callbacks=[curve, *build_techniques(spec)])
        trainer.fit(module, datamodule=data)
        return curve.summary()

    def describe(self) -> list[str]:
        stream = ("the drifting digits stream (`reglab.datamodules.DriftingDigitsDataModule`: gradual class and "
                  "rotation drift)" if self.settings["stream"] == "drifting"
                  else "the Si-Blurry digits stream (`reglab.datamodules.SiBlurryDataModule`)")
        return [f"One online pass over {stream}, stream seed = seed; `reglab.continual.online.AnytimeAccuracy` "
                "evaluates on the seen classes' test samples every eval_period samples (unseen classes masked in "
                "every arm).", ""]
