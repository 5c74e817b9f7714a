"""Claim protocols of the PEFT family, registered with ``reglab bench effects``.

``finetune``: pretrain on digits 0-4, fine-tune on digits 5-9. Per seed one model (tiny ViT or
small CNN) is pretrained on the source classes and shared by every arm; each arm fine-tunes a
copy with its technique (``{class_path, init_args}``; the pretrained checkpoint is passed as
``pretrained_checkpoint``) and measures

* ``target``: test accuracy on 5-9 (argmax over all 10 logits);
* ``unseen``: the same test images rotated by ``unseen_angle`` degrees (a domain no run trains on;
  the claims of PEGO and SoMA are about it);
* ``retention``: source test accuracy (0-4) with the prediction restricted to the source classes'
  logits (the task known at test time, as in task-incremental evaluation);
* ``trainable`` / ``total`` parameters, ``step_ms`` (median training step, CPU time on CPU),
  ``lr`` (the learning rate used) and the peak memory of the second training step
  (:class:`reglab.bench.memory.PeakTrainingMemory`: ``memory/peak_mb``, and on the CPU what held
  it at the peak, ``memory/optimizer_state_mb``, ``memory/gradient_mb``, ``memory/activation_mb``, ...).

With ``lr_grid`` every arm is fitted at each rate of that shared grid and keeps, per seed, the
rate with the best accuracy on the target *validation* split (the test split is never used to
choose); without it, each arm uses its own ``lr`` (with its ``lr_source``). An arm with no
``technique`` is the pretrained model, measured as it is. ``target_noise`` moves that share of
the fine-tuning labels to the next target class (5→6→…→9→5; clean validation and test labels).

``forget``: pretrain on all ten digits, then run the arm's technique (GS-LoRA) on the same data;
measures ``forget`` (test accuracy on ``forget_classes``), ``retain`` (on the others) and, for a
technique with ``group_norms()``, each adapter group's final norm.

A claim file names ``module: reglab.peft_claims``.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from reglab.bench.memory import PeakTrainingMemory
from reglab.bench.overhead import StepTimer
from reglab.bench.protocols import ClaimError, Protocol, instantiate, register_protocol
from reglab.datamodules import ClassSplitDataModule, DigitsDataModule, LabelNoise
from reglab.datamodules.domains import rotate_images
from reglab.tasks import ClassificationModule

SOURCE, TARGET = 0, 1
#: the settings a pretrained model depends on: claims that agree on these share it
PRETRAIN_KEYS = ("backbone", "backbone_kwargs", "pretrain_epochs", "pretrain_lr", "batch_size", "trainer")


def trainer(epochs: int, callbacks: list, extra: dict[str, Any]) -> L.Trainer:
    return L.Trainer(**{"max_epochs": epochs, "accelerator": "auto", "devices": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "num_sanity_val_steps": 0, **extra}, callbacks=callbacks)


@torch.no_grad()
def accuracy(module: ClassificationModule, loader: Any, classes: list[int] | None = None, angle: float = 0.0,
             only: list[int] | None = None, exclude: bool = False) -> float:
    """Accuracy over ``loader``; ``classes`` restricts the prediction to those logits, ``only``
    keeps the samples of those labels (``exclude``: the samples of every other label)."""
    module.eval()
    correct = total = 0
    for batch in loader:
        logits = module(rotate_images(batch["input"], angle).to(module.device))
        if classes is not None:
            prediction = torch.tensor(classes, device=logits.device)[logits[:, classes].argmax(-1)]
        else:
            prediction = logits.argmax(-1)
        hits, targets = prediction.cpu() == batch["target"], batch["target"]
        if only is not None:
            keep = torch.isin(targets, torch.tensor(only)) != exclude
            hits = hits[keep]
        correct += int(hits.sum())
        total += len(hits)
    return correct / total


class PretrainedStart(Protocol):
    """Shared by ``finetune`` and ``forget``: one pretrained model per seed, then each arm."""

    defaults = {"backbone": "cnn", "backbone_kwargs": {}, "pretrain_epochs": 12, "pretrain_lr": 1e-3,
                "finetune_epochs": 10, "lr_grid": None, "batch_size": 64, "trainer": {}}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        allowed = {"technique", "lr", "lr_source"}
        if set(spec) - allowed:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {sorted(set(spec) - allowed)}; "
                             f"arms take {sorted(allowed)} (and `label`)")
        if "technique" in spec and "lr" not in spec and not self.settings["lr_grid"]:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: give the arm an `lr` (with its `lr_source`) "
                             "or the claim an `lr_grid`")

    def module(self, lr: float) -> ClassificationModule:
        return ClassificationModule(self.settings["backbone"], num_classes=10, input_shape=(1, 8, 8),
                                    backbone_kwargs=self.settings["backbone_kwargs"], lr=lr)

    def source_data(self, seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def target_data(self, seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        raise NotImplementedError

    def pretrained(self, seed: int, workdir: Path) -> tuple[str, ClassificationModule]:
        pretraining = {key: self.settings[key] for key in PRETRAIN_KEYS}
        return _pretrained(type(self), json.dumps(pretraining, sort_keys=True), seed, str(workdir))

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        checkpoint, model = self.pretrained(seed, workdir)
        if "technique" not in spec:
            return self.measure(model, seed)
        target = self.target_data(seed)
        fits = []
        for lr in self.settings["lr_grid"] or [spec["lr"]]:
            L.seed_everything(seed, verbose=False)
            module = self.module(lr)
            technique = instantiate({**spec["technique"], "init_args": {
                **spec["technique"].get("init_args", {}), "pretrained_checkpoint": checkpoint}})
            timer, memory = StepTimer(skip=0), PeakTrainingMemory()
            trainer(self.settings["finetune_epochs"], [technique, timer, memory], self.settings["trainer"]).fit(
                module, datamodule=target)
            fits.append((accuracy(module, target.val_dataloader()), lr, module, technique, timer, memory))
        # with a grid, the rate is chosen on the target validation split, never on the test split
        val, lr, module, technique, timer, memory = max(fits, key=lambda fit: fit[0])
        counts = technique.parameter_counts
        extra = {f"group_norm/{k}": v for k, v in technique.group_norms().items()} if hasattr(technique, "group_norms") else {}
        return {**self.measure(module, seed), "lr": lr, "val": val, "trainable": counts["trainable"],
                "total": counts["total"], "step_ms": 1000 * statistics.median(timer.seconds),
                **{f"memory/{key}": value for key, value in memory.result.items()}, **extra}


@functools.cache
def _pretrained(cls: type[PretrainedStart], settings_json: str, seed: int, workdir: str) -> tuple[str, ClassificationModule]:
    """The pretrained checkpoint of one seed, shared by every arm and claim with these pretraining settings."""
    protocol = cls("pretraining", json.loads(settings_json))
    L.seed_everything(seed, verbose=False)
    model = protocol.module(protocol.settings["pretrain_lr"])
    pretrainer = trainer(protocol.settings["pretrain_epochs"], [], protocol.settings["trainer"])
    pretrainer.fit(model, datamodule=protocol.source_data(seed))
    checkpoint = str(Path(tempfile.mkdtemp(dir=workdir)) / f"{protocol.name}_{seed}.ckpt")
    pretrainer.save_checkpoint(checkpoint)
    return checkpoint, model


@register_protocol("finetune")
class FinetuneProtocol(PretrainedStart):
    defaults = {**PretrainedStart.defaults, "target_noise": 0.0, "unseen_angle": 30.0}

    def split(self, task: int, seed: int, label_noise: LabelNoise | None = None) -> ClassSplitDataModule:
        return ClassSplitDataModule(DigitsDataModule(batch_size=self.settings["batch_size"], seed=seed,
                                                     label_noise=label_noise), task=task)

    def source_data(self, seed: int) -> ClassSplitDataModule:
        return self.split(SOURCE, seed)

    def target_data(self, seed: int) -> ClassSplitDataModule:
        rate = self.settings["target_noise"]
        noise = None if rate == 0 else LabelNoise(kind="asymmetric", rate=rate, seed=seed,
                                                  class_map={c: 5 + (c - 4) % 5 for c in range(5, 10)})
        return self.split(TARGET, seed, noise)

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        source, target = self.source_data(seed), self.split(TARGET, seed)
        for data in (source, target):
            data.setup("test")
        return {"target": accuracy(module, target.test_dataloader()),
                "unseen": accuracy(module, target.test_dataloader(), angle=self.settings["unseen_angle"]),
                "retention": accuracy(module, source.test_dataloader(), classes=source.tasks[SOURCE])}

    def describe(self) -> list[str]:
        noise = self.settings["target_noise"]
        return [f"Pretrain on digits 0-4, fine-tune on 5-9 (`reglab.peft_claims`, protocol `finetune`). target: test "
                f"accuracy on 5-9 among all 10 classes; unseen: the same images rotated {self.settings['unseen_angle']:g}°; "
                "retention: 0-4 test accuracy among 0-4. "
                + ("Learning rate chosen per seed and arm from the grid by target validation accuracy. "
                   if self.settings["lr_grid"] else "Each arm at its own learning rate. ")
                + (f"{noise:.0%} of the fine-tuning labels moved to the next target class (clean test). " if noise else ""),
                ""]


@register_protocol("forget")
class ForgetProtocol(PretrainedStart):
    defaults = {**PretrainedStart.defaults, "backbone": "vit", "backbone_kwargs": {"depth": 2}, "pretrain_epochs": 40,
                "finetune_epochs": 5, "forget_classes": [0, 1]}

    def source_data(self, seed: int) -> DigitsDataModule:
        return DigitsDataModule(batch_size=self.settings["batch_size"], seed=seed)

    target_data = source_data

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        data = self.source_data(seed)
        data.setup("test")
        forget = self.settings["forget_classes"]
        return {"forget": accuracy(module, data.test_dataloader(), only=forget),
                "retain": accuracy(module, data.test_dataloader(), only=forget, exclude=True)}

    def describe(self) -> list[str]:
        return [f"Pretrain on all ten digits, then forget {self.settings['forget_classes']} on the same training data "
                "(`reglab.peft_claims`, protocol `forget`). forget / retain: test accuracy (argmax over all 10 classes) "
                "on the forgotten classes' samples / on every other sample.", ""]
