"""The dataset condensation pipeline: condense, train a fresh model on the synthetic set, test it.

1. **condense**: a :class:`CondensationMethod` turns the real training set into ``ipc`` images per
   class (a :class:`CondensedSet`); the methods live in ``reglab.callbacks.condensation`` (the
   baselines ``random_subset`` and ``dataset_condensation``, then ``dcc`` and ``nrr_dd``);
2. **train**: a freshly initialised :class:`reglab.tasks.ClassificationModule` (the same small CNN
   the methods condense with, as the official DC code's evaluation ``-eval_mode S``) is fitted on
   the synthetic set alone with a Lightning ``Trainer``, plus any technique the method asks for
   (:meth:`CondensationMethod.student_techniques`, e.g. NRR-DD's distance transfer);
3. **test**: its accuracy on the real test split (``test/acc``, torchmetrics in the module).

The real data are scikit-learn's 8x8 digits (:class:`reglab.datamodules.DigitsDataModule`, the
stratified split seeded by the data seed), so every step runs in seconds on a CPU.

The ``condensation`` claim protocol (arms = methods, metric ``test/acc`` at fixed images per class)
and the ``reglab condense`` command (saves the condensed set as ``.pt`` and an image grid as PNG)
are here too.

Example:
    >>> from reglab.condensation.pipeline import evaluate, real_data, training_split
    >>> from reglab.callbacks.condensation.random_subset import RandomSubset
    >>> data = real_data(seed=0)
    >>> images, labels = training_split(data)
    >>> condensed = RandomSubset().condense(images, labels, ipc=1, seed=0)
    >>> condensed.images.shape, condensed.labels.tolist()
    (torch.Size([10, 1, 8, 8]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> 0.0 <= evaluate(condensed, data, seed=0, epochs=5) <= 1.0
    True
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader

from reglab.bench.protocols import ClaimError, Protocol, register_protocol
from reglab.datamodules import DigitsDataModule
from reglab.datamodules.base import DictDataset
from reglab.tasks import ClassificationModule
from reglab.technique import Technique

#: the network every method condenses with and every condensed set is evaluated on (SmallCNN)
CHANNELS = (32, 64)


class CondensationError(ValueError):
    """A condensation that cannot run (bad images per class, a file that exists, a method that is none)."""


@dataclass
class CondensedSet:
    """A synthetic training set: ``images`` (N, C, H, W), their ``labels`` (N,), the ``method``'s id
    and ``ipc``; ``extras`` hold per-image tensors a method's student training reads (NRR-DD's
    distances), in the images' order."""

    images: Tensor
    labels: Tensor
    method: str
    ipc: int
    extras: dict[str, Tensor] = field(default_factory=dict)

    def dataset(self) -> DictDataset:
        """The set as the DictDataset every reglab task reads (``input``, ``target``, ``index``, extras)."""
        return DictDataset(self.images, self.labels, dict(self.extras))

    def save(self, path: Path) -> Path:
        """Write the set to a new ``.pt`` file (an existing file is never overwritten)."""
        path = Path(path)
        if path.exists():
            raise CondensationError(f"{path} exists. Fix: choose a new --out folder or file name; condensed sets "
                                    "are never overwritten.")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": self.images, "labels": self.labels, "method": self.method, "ipc": self.ipc,
                    "extras": self.extras}, path)
        return path

    @classmethod
    def load(cls, path: Path) -> CondensedSet:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["images"], state["labels"], state["method"], state["ipc"], state.get("extras", {}))

    def save_grid(self, path: Path) -> Path:
        """An image grid (one column per class, ``ipc`` rows) as a new PNG file."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        if path.exists():
            raise CondensationError(f"{path} exists. Fix: choose a new --out folder or file name; figures are "
                                    "never overwritten.")
        classes = self.labels.unique().tolist()
        fig, axes = plt.subplots(self.ipc, len(classes), figsize=(0.8 * len(classes), 0.8 * self.ipc + 0.5),
                                 squeeze=False)
        for column, label in enumerate(classes):
            for row, image in enumerate(self.images[self.labels == label][: self.ipc]):
                ax = axes[row][column]
                ax.imshow(image.detach().float().mean(0), cmap="gray")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(str(label), fontsize=8)
        fig.suptitle(f"{self.method}, {self.ipc} image(s) per class", fontsize=9)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


class CondensationMethod:
    """Base class of a condensation method: :meth:`condense` makes ``ipc`` images per class.

    ``name`` is the method's id (its module, card, config and claim arm use it)."""

    name: ClassVar[str] = "condensation_method"

    def condense(self, images: Tensor, labels: Tensor, ipc: int, seed: int) -> CondensedSet:
        raise NotImplementedError

    def student_techniques(self, condensed: CondensedSet) -> list[Technique]:
        """Techniques to train the fresh model on ``condensed`` with (default: none, plain cross-entropy)."""
        return []

    @staticmethod
    def check_ipc(name: str, labels: Tensor, ipc: int) -> None:
        """Raise :class:`CondensationError` unless every class has at least ``ipc`` real images."""
        counts = torch.bincount(labels)
        if not isinstance(ipc, int) or ipc < 1 or int(counts.min()) < ipc:
            raise CondensationError(f"{name}: ipc={ipc!r} images per class, but the smallest class has "
                                    f"{int(counts.min())} real images. Fix: use an integer ipc from 1 to that.")


def network(input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = CHANNELS) -> ClassificationModule:
    """A freshly initialised small CNN classifier (draws from torch's global generator)."""
    return ClassificationModule("cnn", num_classes=num_classes, input_shape=tuple(input_shape),
                                backbone_kwargs={"channels": tuple(channels)})


def per_class(images: Tensor, labels: Tensor) -> list[Tensor]:
    """The images of each class 0..C-1."""
    return [images[labels == label] for label in range(int(labels.max()) + 1)]


def class_labels(num_classes: int, ipc: int) -> Tensor:
    """``[0]*ipc + [1]*ipc + ...``: the label order of every condensed set."""
    return torch.arange(num_classes).repeat_interleave(ipc)


def sample(images: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Up to ``n`` of ``images`` drawn without replacement."""
    return images[torch.randperm(len(images), generator=generator)[:n]]


def real_data(seed: int) -> DigitsDataModule:
    """The real digits, split by ``seed`` (the test split is what every condensed set is tested on)."""
    return DigitsDataModule(seed=seed, batch_size=256)


def training_split(data: DigitsDataModule) -> tuple[Tensor, Tensor]:
    """The real training images and labels, the methods' input."""
    data.setup("fit")
    return data.train_dataset.inputs, data.train_dataset.targets


def fit_classifier(dataset: DictDataset, seed: int, epochs: int, lr: float, channels: tuple[int, ...] = CHANNELS,
                   techniques: list[Technique] | None = None) -> ClassificationModule:
    """A fresh CNN (initialised from ``seed``) trained ``epochs`` epochs (Adam at ``lr``, batches of
    256) on ``dataset``, with ``techniques``."""
    L.seed_everything(seed, verbose=False)
    model = network(tuple(dataset.inputs.shape[1:]), int(dataset.targets.max()) + 1, channels)
    model.hparams.lr = lr
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=list(techniques or []))
    trainer.fit(model, train_dataloaders=DataLoader(dataset, batch_size=256, shuffle=True))
    return model


def fit_student(condensed: CondensedSet, seed: int, epochs: int = 300, lr: float = 1e-3,
                channels: tuple[int, ...] = CHANNELS, techniques: list[Technique] | None = None) -> ClassificationModule:
    """A fresh CNN trained on the condensed set alone (full-batch epochs: a set has <= 256 images here)."""
    return fit_classifier(condensed.dataset(), seed, epochs, lr, channels, techniques)


def evaluate(condensed: CondensedSet, data: DigitsDataModule, seed: int, epochs: int = 300, lr: float = 1e-3,
             channels: tuple[int, ...] = CHANNELS, techniques: list[Technique] | None = None) -> float:
    """Test accuracy on the real test split of a fresh CNN trained on ``condensed`` only."""
    model = fit_student(condensed, seed, epochs, lr, channels, techniques)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]


def method_class(class_path: str) -> type[CondensationMethod]:
    """The method class at ``class_path``, refused unless it is a CondensationMethod."""
    module_name, _, attribute = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, CondensationMethod)):
        raise CondensationError(f"{class_path} is not a CondensationMethod. Fix: name a method of "
                                "reglab.callbacks.condensation (random_subset, dataset_condensation, dcc, nrr_dd).")
    return cls


def instantiate_method(spec: Any) -> CondensationMethod:
    """A method from ``{class_path: ..., init_args: {...}}``."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise CondensationError(f"a method is `{{class_path: ..., init_args: {{...}}}}`, got {spec!r}. Fix: e.g. "
                                "`{class_path: reglab.callbacks.condensation.dcc.DCC}`.")
    return method_class(spec["class_path"])(**spec.get("init_args", {}))


def condense_and_evaluate(method: CondensationMethod, seed: int, ipc: int, eval_models: int = 1,
                          epochs: int = 300, lr: float = 1e-3) -> tuple[CondensedSet, list[float]]:
    """The whole pipeline for one seed (data split, condensation and student initialisations)."""
    data = real_data(seed)
    images, labels = training_split(data)
    condensed = method.condense(images, labels, ipc=ipc, seed=seed)
    students = method.student_techniques(condensed)
    accuracies = [evaluate(condensed, data, 1000 * seed + k, epochs, lr, techniques=students) for k in range(eval_models)]
    return condensed, accuracies


#: each arm's condensed sets by seed, for the figures (the harness memoizes run_arm across claims)
_SETS: dict[str, dict[int, CondensedSet]] = {}


def fresh_path(path: Path) -> Path:
    """``path``, or ``<stem>_2<suffix>``, ``_3``, ... if it exists: results folders are never overwritten."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
    return candidate


@register_protocol("condensation")
class CondensationProtocol(Protocol):
    """Arms are methods (``method: {class_path, init_args}``); per seed s the digits split of s is
    condensed to ``ipc`` images per class with seed s, then ``eval_models`` fresh CNNs are trained
    on the set (``eval_epochs`` full-batch epochs, Adam at ``eval_lr``) and tested on the real test
    split: ``test/acc`` is their mean."""

    defaults = {"ipc": 1, "eval_models": 2, "eval_epochs": 300, "eval_lr": 1e-3, "method_overrides": {}}

    def check_settings(self) -> None:
        if not isinstance(self.settings["ipc"], int) or self.settings["ipc"] < 1:
            raise ClaimError(f"claim {self.claim_name}: ipc must be a positive integer, got {self.settings['ipc']!r}")

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        self.arm_methods: dict[str, str] = {}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) - {"label", "method"} or "method" not in spec:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a condensation arm is `method: {{class_path: ..., "
                             f"init_args: {{...}}}}`, got {spec}")
        try:
            self.method(spec)
        except (CondensationError, ImportError, AttributeError, TypeError) as error:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: {error}") from error
        self.arm_methods[arm] = self.method_key(spec)

    def method_key(self, spec: dict[str, Any]) -> str:
        return json.dumps([spec["method"], self.settings], sort_keys=True, default=str)

    def method(self, spec: dict[str, Any]) -> CondensationMethod:
        """The arm's method; ``method_overrides`` (e.g. the smoke budget) update the init_args of every
        arm whose method takes them."""
        method = dict(spec["method"])
        takes = inspect.signature(method_class(method["class_path"])).parameters
        overrides = {k: v for k, v in self.settings["method_overrides"].items() if k in takes}
        method["init_args"] = {**method.get("init_args", {}), **overrides}
        return instantiate_method(method)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        condensed, accuracies = condense_and_evaluate(self.method(spec), seed, s["ipc"], s["eval_models"],
                                                      s["eval_epochs"], s["eval_lr"])
        _SETS.setdefault(self.method_key(spec), {})[seed] = condensed
        return {"test/acc": sum(accuracies) / len(accuracies)}

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        """Each arm's condensed set of its first seed as an image grid (a new file, never overwritten)."""
        lines = ["## Condensed sets (first seed)", ""]
        for arm in runs:
            sets = _SETS.get(self.arm_methods.get(arm, ""), {})
            if sets:
                path = sets[min(sets)].save_grid(fresh_path(out_dir / f"{claim_name}_{arm}_grid.png"))
                lines.append(f"![{arm}]({path.name})")
        return [*lines, ""] if len(lines) > 2 else []

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Digits 8x8 (scikit-learn), {s['ipc']} image(s) per class condensed from the training split; "
                f"{s['eval_models']} fresh CNN(s) (channels {list(CHANNELS)}) per seed trained on the condensed set "
                f"only ({s['eval_epochs']} full-batch epochs, Adam {s['eval_lr']:g}); test/acc on the real test split.",
                ""]


def main(argv: list[str]) -> None:
    """``reglab condense``: condense the digits, save the set (.pt) and its image grid (.png), and
    report the test accuracy of a fresh CNN trained on it."""
    parser = argparse.ArgumentParser(
        prog="reglab condense",
        description="Condense the digits training set to a few images per class with a method "
        "(random_subset, dataset_condensation, dcc, nrr_dd), save it and its image grid, and test a fresh CNN "
        "trained on it.")
    parser.add_argument("--config", type=Path, required=True,
                        help="a method config, e.g. configs/condensation/dcc.yaml (`method: {class_path, init_args}`)")
    parser.add_argument("--ipc", type=int, default=None, help="images per class (default: the config's, else 1)")
    parser.add_argument("--seed", type=int, default=0, help="data split, condensation and student seed")
    parser.add_argument("--eval_models", type=int, default=1, help="fresh CNNs trained on the set (0: none)")
    parser.add_argument("--eval_epochs", type=int, default=300, help="full-batch epochs of each fresh CNN")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for <method>_ipc<k>.pt/.png/.json")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"reglab condense: {args.out} exists. Fix: name a new folder; nothing is overwritten.")
    config = yaml.safe_load(args.config.read_text())
    try:
        method = instantiate_method(config.get("method") if isinstance(config, dict) else None)
        ipc = args.ipc if args.ipc is not None else int(config.get("ipc", 1))
        condensed, accuracies = condense_and_evaluate(method, args.seed, ipc, args.eval_models, args.eval_epochs)
    except CondensationError as error:
        raise SystemExit(f"reglab condense: {error}") from None
    stem = args.out / f"{condensed.method}_ipc{ipc}"
    condensed.save(stem.with_suffix(".pt"))
    condensed.save_grid(stem.with_suffix(".png"))
    summary = {"method": condensed.method, "ipc": ipc, "seed": args.seed, "test/acc": accuracies}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))

