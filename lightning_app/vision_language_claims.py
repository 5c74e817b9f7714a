"""Claim protocols of the vision-language family's prediction rules and heads, registered with ``reglab bench effects``.

``unseen_classes`` (Loki, paper 24): per seed a digits CNN (:class:`~reglab.tasks.ClassificationModule`,
ten outputs) is fitted on the ``seen_classes`` of :class:`~reglab.datamodules.OpenWorldDigitsDataModule`
(uniform batches); the same weights are then evaluated by each arm's prediction rule with Lightning's
``trainer.test`` on every image of the other classes (``unseen_acc``) and ``trainer.validate`` on the
held-out images of the seen ones (``seen_acc``); ``trainer.predict`` on the unseen images gives the
paper's own error, the mean squared label distance ``|y_hat - y|^2`` (``unseen_sq_distance``). An arm
without technique is argmax; an arm's ``technique`` is a prediction rule such as
:class:`~reglab.callbacks.vision_language.Loki`. The model is fitted once per seed and shared by the
arms, so the arms differ only in the rule.

``linear_probe`` (naive Bayes vs logistic regression, paper 37): per seed a digits CNN is pretrained
on the ``pretrain_classes`` of the digits' training split (:class:`~reglab.datamodules.ClassSplitDataModule`),
frozen, and its features of the whole training split (all ten classes) train the arm's probe — a
:class:`~reglab.callbacks.vision_language.probes.FrozenFeatureProbe` — on ``shots`` samples per class
for each entry of ``shots`` (``null``: all), drawn with the seed; metrics ``acc_<k>shot`` (``acc_all``)
are test-split accuracies. The figure draws both arms' curves and reports where logistic regression
catches up (the crossing point). The paper's sweep is over ImageNet-pretrained models and CIFAR;
here the pretrained model knows half of the classes it is probed on, the "transfer" situation.

``clip_linear_probe`` (paper 37 on the image-text model): the same sweep (:class:`ShotsSweep`) on the
frozen image embeddings of the seed's pretrained tiny CLIP; see :class:`CLIPLinearProbeProtocol`.

``clip_unseen_classes`` (Loki, paper 24, on the image-text model): the seed's pretrained tiny CLIP is
given the prompts of the ``seen_classes`` only and each arm's prediction rule labels every test image
of the other classes; see :class:`CLIPUnseenClassesProtocol`.

``base_to_novel`` (CoOp's protocol, issue 13): per seed the tiny CLIP (:class:`~reglab.tasks.CLIPModule`)
is pretrained once from ``pretrain_config`` on that seed's split; each arm adapts it few-shot on the base
classes (zero-shot, a linear probe, or a fine-tune with the arm's techniques: CoOp's
:class:`~reglab.callbacks.baselines.PromptTuning`, LoRA, none = full fine-tuning) and is scored by
prompts over the base classes and over the novel ones (``base_acc``, ``novel_acc``, harmonic mean
``hm``); see :class:`BaseToNovelProtocol`. ``pretrain_domains`` holds domains out of the pretraining
(the claims pretrain on upright and coloured digits only and evaluate on domains it never saw).

``cross_domain`` (CoOp's domain-generalization protocol, issue 13): the same pretraining and arms; each
arm adapts on ``shots`` images per class, all ten, of ``source_domain`` only and is scored per test
domain (``acc_<domain>``, ``source_acc``, ``target_acc``); see :class:`CrossDomainProtocol`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.bench.protocols import (ClaimError, Protocol, arm_techniques, check_arm_techniques, instantiate,
                                     register_protocol)
from reglab.datamodules import (CaptionedDigitsDataModule, ClassSplitDataModule, DigitsDataModule,
                                OpenWorldDigitsDataModule)
from reglab.datamodules.base import DictDataModule, DictDataset
from reglab.datamodules.domains import DOMAINS
from reglab.metrics import GroupAccuracy
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule, CLIPModule
from reglab.tasks.clip import seed_pretraining
from reglab.technique import Technique, dataset_features

TRAINER = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
COMMON = {"backbone": "cnn", "backbone_kwargs": {}, "epochs": 15, "batch_size": 64, "lr": 1e-3, "trainer": {}}
#: fitted models by (protocol, the settings they depend on, seed): the arms of a seed share one
_MODELS: dict[tuple[str, str, int], ClassificationModule] = {}


def check_technique_arm(protocol: Protocol, arm: str, spec: dict[str, Any]) -> None:
    """An arm of the protocols whose arms are prediction rules or heads: ``technique`` (and ``label``) only."""
    unknown = sorted(set(spec) - {"technique"})
    if unknown:
        raise ClaimError(f"claim {protocol.claim_name}, arm {arm}: unknown field(s) {unknown}. Fix: an arm of "
                         f"protocol {protocol.name!r} takes `technique` (and `label`).")
    check_arm_techniques(protocol.claim_name, arm, spec)


def unseen_sq_distance(predictions: list[Tensor], data: DictDataModule) -> float:
    """The paper's error in the label metric on ``data``'s test images, whatever the arm's own metric: the mean
    of ``|y_hat - y|^2`` over the predicted batches (a smoke run predicts a few only)."""
    predicted = torch.cat(predictions).argmax(-1)
    labels = data.test_dataset.targets[: len(predicted)]
    return (predicted - labels).double().square().mean().item()


class SharedModelProtocol(Protocol):
    """Arms are prediction rules or heads over one model per seed, fitted once (:meth:`model`).
    A subclass gives the data the model is fitted on (:meth:`training_data`) and the settings
    that data depends on (``data_settings``)."""

    data_settings: tuple[str, ...] = ()

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_arm(self, arm, spec)

    def training_data(self, seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def model(self, seed: int) -> ClassificationModule:
        s = self.settings
        key = (self.name, json.dumps({k: s[k] for k in (*COMMON, *self.data_settings)}, sort_keys=True), seed)
        if key not in _MODELS:
            data = self.training_data(seed)
            L.seed_everything(seed, verbose=False)
            module = ClassificationModule(s["backbone"], num_classes=10, input_shape=data.input_shape, lr=s["lr"],
                                          backbone_kwargs=s["backbone_kwargs"])
            trainer = L.Trainer(**{**TRAINER, "max_epochs": s["epochs"], "limit_val_batches": 0, **s["trainer"]})
            trainer.fit(module, datamodule=data)
            _MODELS[key] = module
        return _MODELS[key]


@register_protocol("unseen_classes")
class UnseenClassesProtocol(SharedModelProtocol):
    """Fit on the seen classes, predict every class with the arm's rule (module docstring)."""

    defaults = {**COMMON, "seen_classes": [0, 3, 6, 9]}
    data_settings = ("seen_classes", "batch_size")

    def check_settings(self) -> None:
        self.training_data(0)  # the DataModule's own checks of seen_classes

    def training_data(self, seed: int) -> OpenWorldDigitsDataModule:
        try:
            return OpenWorldDigitsDataModule(seen_classes=self.settings["seen_classes"], m_per_class=None,
                                             batch_size=self.settings["batch_size"], seed=seed)
        except ValueError as error:
            raise ClaimError(f"claim {self.claim_name}: {error}") from error

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        module, data = self.model(seed), self.training_data(seed)

        def trainer() -> L.Trainer:
            return L.Trainer(**{**TRAINER, **self.settings["trainer"]},
                             callbacks=[instantiate(t) for t in arm_techniques(spec)])
        (tested,) = trainer().test(module, datamodule=data, verbose=False)
        (validated,) = trainer().validate(module, datamodule=data, verbose=False)
        distance = unseen_sq_distance(trainer().predict(module, datamodule=data), data)
        return {"unseen_acc": tested["test/acc"], "seen_acc": validated["val/acc"], "unseen_sq_distance": distance}

    def describe(self) -> list[str]:
        s = self.settings
        unseen = sorted(set(range(10)) - set(s["seen_classes"]))
        return [f"Prediction of classes never trained on (`reglab.vision_language_claims`, protocol `unseen_classes`): "
                f"a ten-output {s['backbone']} `ClassificationModule` is fitted on digits {s['seen_classes']} for "
                f"{s['epochs']} epochs (batches of {s['batch_size']}); the same weights are then evaluated by each "
                f"arm's prediction rule on every image of digits {unseen} (`unseen_acc`; argmax, trained on none of "
                "them, sits at about 0) and on held-out images of the seen digits (`seen_acc`); "
                "`unseen_sq_distance` is the mean of |prediction - digit|^2 on the unseen images (the paper's error "
                "in the label metric).", ""]


def _shots_key(shots: int | None) -> str:
    return "acc_all" if shots is None else f"acc_{shots}shot"


class ShotsSweep:
    """A probe fitted on ``shots`` frozen features per class for each entry of the ``shots`` setting
    (``null``: all), scored on the test features (``acc_<k>shot``, ``acc_all``), and the figure of both
    arms' curves with the crossing point. Shared by the probe protocols of the digits CNN and of the
    tiny CLIP; a protocol gives the features."""

    def check_shots(self) -> None:
        shots = self.settings["shots"]
        if not shots or any(k is not None and (not isinstance(k, int) or k < 1) for k in shots):
            raise ClaimError(f"claim {self.claim_name}: shots {shots} must be sample counts per class >= 1 (or null "
                             "for the whole training split). Fix: e.g. shots: [1, 5, 20, null].")

    def check_probe_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if len(arm_techniques(spec)) != 1:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a {self.name} arm names one probe as `technique`, "
                             f"got {len(arm_techniques(spec))}. Fix: e.g. technique: {{class_path: "
                             "reglab.callbacks.vision_language.GaussianNaiveBayesProbe}.")

    def sweep(self, spec: dict[str, Any], seed: int, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
              num_classes: int) -> dict[str, float]:
        """The arm's probe fitted on ``train`` (features, labels) at every shot count, scored on ``test``."""
        (technique,) = arm_techniques(spec)
        (train_features, train_labels), (test_features, test_labels) = train, test
        metrics = {}
        for shots in self.settings["shots"]:
            args = {**technique.get("init_args", {}), "shots_per_class": shots, "seed": seed}
            head = instantiate({"class_path": technique["class_path"], "init_args": args}).fit(
                train_features, train_labels, num_classes)
            metrics[_shots_key(shots)] = (head(test_features).argmax(-1) == test_labels).double().mean().item()
        return metrics

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        shots = self.settings["shots"]
        keys = [_shots_key(k) for k in shots]
        means = {arm: [float(np.mean([run[key] for run in arm_runs])) for key in keys]
                 for arm, arm_runs in runs.items()}
        path = out_dir / f"{claim_name}_shots.png"
        if path.exists():
            raise FileExistsError(f"{path} exists. Fix: write the results to a new --out folder.")
        ticks = [str(k) if k is not None else "all" for k in shots]
        figure, axes = plt.subplots(figsize=(5, 3.2))
        for arm, values in means.items():
            axes.plot(range(len(keys)), values, marker="o", label=arm)
        axes.set_xticks(range(len(keys)), ticks)
        axes.set_xlabel("training images per class")
        axes.set_ylabel("test accuracy")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        lines = [f"![test accuracy vs shots per class]({path.name})", ""]
        arms = sorted(means)
        if len(arms) == 2:
            first, second = arms
            ahead = [a > b for a, b in zip(means[first], means[second])]
            changes = [ticks[i] for i in range(1, len(ahead)) if ahead[i] != ahead[i - 1]]
            where = f"the lead changes at {', '.join(changes)} shots per class" if changes else "the lead never changes"
            lines += [f"Crossing point (means over seeds): {first} ahead of {second} at "
                      f"{[t for t, a in zip(ticks, ahead) if a]} shots per class; {where}.", ""]
        return lines


@register_protocol("linear_probe")
class LinearProbeProtocol(ShotsSweep, SharedModelProtocol):
    """Pretrain on some classes, probe the frozen features of all with k shots per class (module docstring)."""

    defaults = {**COMMON, "pretrain_classes": [0, 1, 2, 3, 4], "shots": [1, 2, 5, 10, 20, None]}
    data_settings = ("pretrain_classes", "batch_size")

    def check_settings(self) -> None:
        self.check_shots()

    def training_data(self, seed: int) -> ClassSplitDataModule:
        classes = sorted(self.settings["pretrain_classes"])
        if not classes or classes != list(range(len(classes))) or len(classes) >= 10:
            raise ClaimError(f"claim {self.claim_name}: pretrain_classes {classes} must be the digits 0..m-1 for some "
                             "m < 10 (the first of two class groups). Fix: e.g. pretrain_classes: [0, 1, 2, 3, 4].")
        base = DigitsDataModule(batch_size=self.settings["batch_size"], seed=seed)
        return ClassSplitDataModule(base, task=0, num_tasks=2, first_task_classes=len(classes))

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        super().check_arm(arm, spec)
        self.check_probe_arm(arm, spec)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        module = self.model(seed)
        probe_data = DigitsDataModule(seed=seed)
        probe_data.setup("fit")
        return self.sweep(spec, seed, dataset_features(module, probe_data.train_dataset),
                          dataset_features(module, probe_data.test_dataset), 10)

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Linear evaluation in the few-shot regime (`reglab.vision_language_claims`, protocol `linear_probe`): "
                f"a {s['backbone']} `ClassificationModule` is pretrained on digits {s['pretrain_classes']} of the "
                f"training split for {s['epochs']} epochs and frozen; each arm's head is fitted on its min-max scaled "
                f"features of {s['shots']} training images per class (null: all) of all ten digits, drawn with the "
                "seed, and scored on the test split (`acc_<k>shot`, `acc_all`).", ""]


# -- base-to-novel and cross-domain on the tiny CLIP (CoOp's protocols) -------------------------

class ClassSubsetData(DictDataModule):
    """Fixed image splits of some classes, relabelled ``0..k-1``, with those classes' prompts and names
    (what :class:`~reglab.tasks.CLIPModule` and prompt-learning techniques read from a DataModule) and
    each image's ``domain`` among the source's ``domain_names`` (the module's per-domain test accuracy)."""

    input_shape = CaptionedDigitsDataModule.input_shape

    def __init__(self, source: CaptionedDigitsDataModule, classes: list[int], train: Tensor, test: Tensor,
                 batch_size: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.num_classes = len(classes)
        self.class_names = tuple(source.class_names[c] for c in classes)
        #: the names of the classes this subset leaves out (OGEN synthesises their features from them)
        self.unseen_class_names = tuple(name for c, name in enumerate(source.class_names) if c not in classes)
        self.domain_names = source.domain_names
        self.tokenizer, self.max_length = source.tokenizer, source.max_length
        self.class_prompts = {key: value[classes] for key, value in source.class_prompts.items()}
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[classes] = torch.arange(len(classes))
        for split, dataset, positions in (("train", source.train_dataset, train), ("test", source.test_dataset, test)):
            setattr(self, f"{split}_dataset", DictDataset(dataset.inputs[positions], relabel[dataset.targets[positions]],
                                                          {"domain": dataset.extras["domain"][positions]}))

    def setup(self, stage: str) -> None:
        """The splits are given at construction."""


ADAPTATIONS = ("none", "fine_tune", "probe")


class CLIPAdaptationProtocol(Protocol):
    """Adapt the tiny CLIP few-shot with each arm's method and score it by prompts; a subclass gives the
    data (:meth:`data`) and the scores (:meth:`run_arm`).

    Per seed the CLIP of ``pretrain_config`` is pretrained once (its ``seed``, ``split_seed`` and
    the trainer's ``max_epochs`` set to the seed and ``pretrain_epochs``, its data's ``domains`` to
    ``pretrain_domains`` unless null; cached by content with
    :func:`reglab.checkpoints.pretrained_checkpoint_for`), so its test images are never seen in
    pretraining. An arm's ``adapt``:

    * ``none`` — zero-shot (no tuning);
    * ``fine_tune`` (default) — ``epochs`` of ``objective: classification`` on the training classes'
      prompts (cross-entropy, as CoOp trains) with the arm's techniques (e.g.
      :class:`~reglab.callbacks.baselines.PromptTuning`, :class:`~reglab.callbacks.peft.LoRA`;
      none: every parameter trains — full fine-tuning);
    * ``probe`` — the arm's technique is a linear-evaluation head
      (:class:`~reglab.callbacks.vision_language.LogisticRegressionProbe`) fitted on the frozen
      image features of the shots; it scores the classes it was fitted on, and classes it has no
      weights for are scored by the frozen model's text classifier.
    """

    defaults = {"pretrain_config": "configs/experiment/tiny_clip_pretrain.yaml", "pretrain_epochs": 4,
                "pretrain_trainer": {}, "pretrain_domains": None, "cache_dir": "runs/pretrained",
                "domains": list(DOMAINS), "shots": 16, "epochs": 10, "batch_size": 32, "lr": 2e-3, "trainer": {}}

    def check_settings(self) -> None:
        self.check_pretraining()
        if self.settings["shots"] < 1:
            raise ClaimError(f"claim {self.claim_name}: shots={self.settings['shots']} leaves nothing to train on. "
                             "Fix: shots >= 1.")

    def check_pretraining(self) -> None:
        s = self.settings
        if not Path(s["pretrain_config"]).is_file():
            raise ClaimError(f"claim {self.claim_name}: pretrain_config {s['pretrain_config']} is not a file. "
                             "Fix: give a `reglab fit` config of a CLIPModule (configs/experiment/tiny_clip_pretrain.yaml).")
        for key in ("domains", "pretrain_domains"):
            domains = s[key]
            if domains is not None and (not domains or not set(domains) <= set(DOMAINS)):
                raise ClaimError(f"claim {self.claim_name}: {key} {domains} must name some of {list(DOMAINS)}. "
                                 f"Fix: e.g. {key}: [upright, coloured]" + (" (or null: the pretraining config's)."
                                                                           if key == "pretrain_domains" else "."))

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - {"technique", "adapt"})
        adapt = spec.get("adapt", "fine_tune")
        if unknown or adapt not in ADAPTATIONS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: fields {unknown} / adapt {adapt!r}. Fix: an arm of "
                             f"protocol {self.name} takes `technique` and `adapt` (one of {list(ADAPTATIONS)}).")
        check_arm_techniques(self.claim_name, arm, spec)
        count = len(arm_techniques(spec))
        if (adapt == "probe" and count != 1) or (adapt == "none" and count):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: adapt {adapt!r} takes "
                             f"{'one probe' if adapt == 'probe' else 'no'} technique, got {count}. Fix: e.g. "
                             "technique: {class_path: reglab.callbacks.vision_language.LogisticRegressionProbe} with "
                             "adapt: probe.")

    def pretrained(self, seed: int) -> Path:
        s = self.settings
        return seed_pretraining(s["pretrain_config"], seed, s["pretrain_epochs"], s["pretrain_domains"],
                                s["pretrain_trainer"], s["cache_dir"])

    def source(self, seed: int) -> CaptionedDigitsDataModule:
        """The captioned digits of ``domains`` on the seed's split (the pretraining's split)."""
        source = CaptionedDigitsDataModule(domains=self.settings["domains"], split_seed=seed, seed=seed)
        source.setup("fit")
        return source

    def shots(self, source: CaptionedDigitsDataModule, classes: list[int], seed: int, domain: int | None = None) -> Tensor:
        """Positions of ``shots`` training images per class of ``classes`` (of ``domain`` only, if given), drawn
        with the seed."""
        generator = torch.Generator().manual_seed(seed)
        targets, domains = source.train_dataset.targets, source.train_dataset.extras["domain"]
        pool = torch.ones_like(targets, dtype=torch.bool) if domain is None else domains == domain
        return torch.cat([torch.nonzero(pool & (targets == c)).flatten()[
            torch.randperm(int((pool & (targets == c)).sum()), generator=generator)[: self.settings["shots"]]]
            for c in classes])

    def adapted(self, spec: dict[str, Any], seed: int, train: ClassSubsetData) -> tuple[CLIPModule, Any, list]:
        """The seed's pretrained CLIP adapted on ``train`` by the arm (eval mode), its probe head (``None``
        unless ``adapt: probe``) and the arm's techniques (callbacks of the scoring runs)."""
        s = self.settings
        adapt = spec.get("adapt", "fine_tune")
        pretrained = CLIPModule.load_from_checkpoint(self.pretrained(seed), map_location="cpu")
        L.seed_everything(seed, verbose=False)
        module = CLIPModule(**{**pretrained.hparams, "num_classes": train.num_classes, "objective": "classification",
                               "lr": s["lr"], "text_lr": s["lr"]})
        module.clip.load_state_dict(pretrained.clip.state_dict())
        techniques = [] if adapt == "probe" else [instantiate(t) for t in arm_techniques(spec)]
        if adapt == "fine_tune":
            self.trainer(techniques, max_epochs=s["epochs"]).fit(module, datamodule=train)
        module.eval()
        head = None
        if adapt == "probe":
            (technique,) = arm_techniques(spec)
            dataset = train.train_dataset
            head = instantiate(technique).fit(image_features(module, dataset), dataset.targets, train.num_classes)
        return module, head, techniques

    def trainer(self, techniques: list, **extra: Any) -> L.Trainer:
        return L.Trainer(**{**TRAINER, "limit_val_batches": 0, **extra, **self.settings["trainer"]},
                         callbacks=techniques)

    def accuracies(self, module: CLIPModule, head: Any, techniques: list, data: ClassSubsetData) -> dict[str, float]:
        """Test accuracy of ``data`` (``acc``) and of each of its domains (``acc_<domain>``): the module's
        zero-shot test run, or the probe ``head`` on the module's image features."""
        if head is None:
            (tested,) = self.trainer(techniques).test(module, datamodule=data, verbose=False)
            return {key.removeprefix("test/"): value for key, value in tested.items() if key.startswith("test/acc")}
        dataset = data.test_dataset
        predicted, labels = head(image_features(module, dataset)).argmax(-1), dataset.targets
        groups = GroupAccuracy(len(data.domain_names))
        groups.update(predicted, labels, dataset.extras["domain"])
        return {"acc": (predicted == labels).double().mean().item(),
                **{f"acc_{name}": value for name, value in zip(data.domain_names, groups.compute().reshape(-1).tolist())
                   if not math.isnan(value)}}  # a domain without test images, as the module's own test run


@register_protocol("base_to_novel")
class BaseToNovelProtocol(CLIPAdaptationProtocol):
    """Fine-tune the tiny CLIP few-shot on base classes, classify base and novel classes by prompts.

    Each arm adapts the seed's pretrained CLIP (:class:`CLIPAdaptationProtocol`) on ``shots`` training
    images per base class (drawn with the seed, every domain of ``domains``) and is scored on the test
    split (CoOp's base-to-novel protocol): ``base_acc`` is accuracy over the base classes only,
    ``novel_acc`` over the novel classes only (each a ``len(classes)``-way zero-shot classification by
    their prompts), ``hm`` their harmonic mean. A probe has no weights for unseen classes, so its
    novel accuracy is the frozen model's text classifier over the novel classes (CoOp's papers
    report no linear probe in base-to-novel; this is the choice made here).
    """

    defaults = {**CLIPAdaptationProtocol.defaults, "base_classes": [0, 1, 2, 3, 4]}

    def check_settings(self) -> None:
        base = self.settings["base_classes"]
        if not base or len(set(base)) != len(base) or not set(base) < set(range(10)):
            raise ClaimError(f"claim {self.claim_name}: base_classes {base} must be some digits, not all. "
                             "Fix: e.g. base_classes: [0, 1, 2, 3, 4].")
        super().check_settings()

    def data(self, seed: int) -> tuple[ClassSubsetData, ClassSubsetData]:
        s = self.settings
        source = self.source(seed)
        base = sorted(s["base_classes"])
        novel = sorted(set(range(10)) - set(base))
        shots = self.shots(source, base, seed)
        test_targets = source.test_dataset.targets

        def test_of(classes: list[int]) -> Tensor:
            return torch.nonzero(torch.isin(test_targets, torch.tensor(classes))).flatten()

        return (ClassSubsetData(source, base, shots, test_of(base), s["batch_size"], seed),
                ClassSubsetData(source, novel, shots[:0], test_of(novel), s["batch_size"], seed))

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        base, novel = self.data(seed)
        module, head, techniques = self.adapted(spec, seed, base)
        novel_acc = self.accuracies(module, None, techniques, novel)["acc"]
        base_acc = self.accuracies(module, head, techniques, base)["acc"]
        hm = 2 * base_acc * novel_acc / (base_acc + novel_acc) if base_acc + novel_acc > 0 else 0.0
        return {"base_acc": base_acc, "novel_acc": novel_acc, "hm": hm}

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Base-to-novel generalization (`reglab.vision_language_claims`, protocol `base_to_novel`, CoOp's "
                f"protocol): the tiny CLIP of `{s['pretrain_config']}` pretrained per seed for {s['pretrain_epochs']} "
                f"epochs on that seed's split ({_pretraining_domains(s)}); each arm adapts it on {s['shots']} "
                f"training images per base class {s['base_classes']} (domains {s['domains']}) for {s['epochs']} "
                "epochs; `base_acc` / `novel_acc` are test accuracies of zero-shot classification by prompts over the "
                "base / the novel classes only, `hm` their harmonic mean. The linear probe's novel accuracy is the "
                "frozen text classifier's.", ""]


def image_features(module: CLIPModule, dataset: DictDataset) -> Tensor:
    """The normalised image embeddings of every image of ``dataset`` (a probe's inputs), in one batch: the
    splits here are a few thousand 8x8 images. Not ``dataset_features``: its ``forward_step`` would score
    the images against class prompts, which a probe neither needs nor, before any evaluation run, has."""
    with torch.no_grad():
        return module.image_features(dataset.inputs.to(module.device)).float()


def _pretraining_domains(settings: dict[str, Any]) -> str:
    domains = settings["pretrain_domains"]
    return "the pretraining config's domains" if domains is None else f"pretraining domains {domains}"


@register_protocol("cross_domain")
class CrossDomainProtocol(CLIPAdaptationProtocol):
    """Fine-tune the tiny CLIP few-shot on one domain, classify every domain's test images by prompts.

    CoOp's domain-generalization protocol: each arm adapts the seed's pretrained CLIP
    (:class:`CLIPAdaptationProtocol`) on ``shots`` training images per class, all ten classes, of
    ``source_domain`` only, and is scored on the test images of every domain of ``domains``
    (:class:`reglab.metrics.GroupAccuracy` through the module's per-domain test accuracy):
    ``acc_<domain>`` each, ``source_acc`` the source domain's, ``target_acc`` the mean over the other
    domains (each domain weighs the same). The linear probe scores every domain (it was fitted on all
    ten classes).
    """

    defaults = {**CLIPAdaptationProtocol.defaults, "source_domain": "upright"}

    def check_settings(self) -> None:
        super().check_settings()
        s = self.settings
        if s["source_domain"] not in s["domains"] or len(s["domains"]) < 2:
            raise ClaimError(f"claim {self.claim_name}: source_domain {s['source_domain']!r} must be one of domains "
                             f"{s['domains']}, beside at least one other to test on. Fix: e.g. source_domain: upright "
                             "with domains: [upright, rotated, noisy].")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        source = self.source(seed)
        classes = list(range(source.num_classes))
        shots = self.shots(source, classes, seed, domain=source.domain_names.index(s["source_domain"]))
        data = ClassSubsetData(source, classes, shots, torch.arange(len(source.test_dataset)), s["batch_size"], seed)
        module, head, techniques = self.adapted(spec, seed, data)
        scores = self.accuracies(module, head, techniques, data)
        per_domain = {name: scores[f"acc_{name}"] for name in s["domains"] if f"acc_{name}" in scores}
        targets = [value for name, value in per_domain.items() if name != s["source_domain"]]
        return {"source_acc": per_domain[s["source_domain"]], "target_acc": sum(targets) / len(targets),
                **{f"acc_{name}": value for name, value in per_domain.items()}}

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Cross-domain generalization (`reglab.vision_language_claims`, protocol `cross_domain`, CoOp's "
                f"domain-generalization protocol): the tiny CLIP of `{s['pretrain_config']}` pretrained per seed for "
                f"{s['pretrain_epochs']} epochs on that seed's split ({_pretraining_domains(s)}); each arm adapts it on "
                f"{s['shots']} training images per class, all ten digits, of the {s['source_domain']} domain only, "
                f"for {s['epochs']} epochs; `acc_<domain>` are zero-shot test accuracies by prompts on each domain of "
                f"{s['domains']}, `source_acc` the {s['source_domain']} domain's, `target_acc` the mean over the "
                "others.", ""]


@register_protocol("clip_linear_probe")
class CLIPLinearProbeProtocol(ShotsSweep, CLIPAdaptationProtocol):
    """Naive Bayes vs logistic regression (paper 37) on the frozen image features of the tiny CLIP.

    Per seed the CLIP of ``pretrain_config`` is pretrained once (:meth:`CLIPAdaptationProtocol.pretrained`)
    and frozen; each arm's probe is fitted on its normalised image embeddings of ``shots`` training
    images per class, all ten, of ``domains`` (the seed's split, never seen in pretraining as test
    images), and scored on the test images of the same domains (:class:`ShotsSweep`). The paper's
    setting in miniature: the linear evaluation of a contrastively pretrained image-text model.
    """

    defaults = {key: CLIPAdaptationProtocol.defaults[key]
                for key in ("pretrain_config", "pretrain_epochs", "pretrain_trainer", "pretrain_domains", "cache_dir")}
    defaults.update(domains=["upright"], shots=[1, 2, 5, 10, 20, None])

    def check_settings(self) -> None:
        self.check_pretraining()
        self.check_shots()

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_arm(self, arm, spec)
        self.check_probe_arm(arm, spec)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        module = CLIPModule.load_from_checkpoint(self.pretrained(seed), map_location="cpu").eval()
        source = self.source(seed)
        train, test = source.train_dataset, source.test_dataset
        return self.sweep(spec, seed, (image_features(module, train), train.targets),
                          (image_features(module, test), test.targets), source.num_classes)

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Linear evaluation of the tiny CLIP in the few-shot regime (`reglab.vision_language_claims`, protocol "
                f"`clip_linear_probe`): the CLIP of `{s['pretrain_config']}` pretrained per seed for "
                f"{s['pretrain_epochs']} epochs on that seed's split ({_pretraining_domains(s)}) and frozen; each "
                f"arm's head is fitted on its min-max scaled image embeddings of {s['shots']} training images per "
                f"class (null: all) of all ten digits in domains {s['domains']}, drawn with the seed, and scored on "
                "the test images of those domains (`acc_<k>shot`, `acc_all`).", ""]


class PromptsOfObservedClasses(Technique):
    """The CLIP as if given the prompts of ``observed`` classes only: the other classes' logits are
    ``-inf`` in evaluation runs, so argmax picks an observed class and a rule after it (Loki) sees
    probabilities over the observed classes. Protocol-internal: it stands for the data a user would
    have, not for a technique."""

    name = "prompts_of_observed_classes"

    def __init__(self, observed: list[int]) -> None:
        self.observed = sorted(observed)

    def transform_predictions(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        mask = torch.ones(out.logits.shape[-1], dtype=torch.bool, device=out.logits.device)
        mask[self.observed] = False
        return dataclasses.replace(out, logits=out.logits.masked_fill(mask, float("-inf")))


@register_protocol("clip_unseen_classes")
class CLIPUnseenClassesProtocol(CLIPAdaptationProtocol):
    """Loki's partially observed label space on the tiny CLIP (the official ``clip_exp``'s setting).

    Per seed the CLIP of ``pretrain_config`` is pretrained once (:meth:`CLIPAdaptationProtocol.pretrained`)
    and used zero-shot, with the prompts of ``seen_classes`` only (:class:`PromptsOfObservedClasses`);
    each arm's prediction rule (none: argmax) labels the test images of ``domains``: ``unseen_acc`` on
    the other digits' images (argmax, which can only name a seen digit, scores 0 there), ``seen_acc``
    on the seen digits' images, ``unseen_sq_distance`` the mean of ``|prediction - digit|^2`` on the
    unseen ones (the paper's error in the label metric). Nothing is tuned, so the arms differ only in
    the rule. The arm's rule reads the seen classes from the data's ``seen_classes``, as it does from
    :class:`~reglab.datamodules.OpenWorldDigitsDataModule` in protocol ``unseen_classes``.
    """

    defaults = {key: CLIPAdaptationProtocol.defaults[key]
                for key in ("pretrain_config", "pretrain_epochs", "pretrain_trainer", "pretrain_domains", "cache_dir",
                            "batch_size", "trainer")}
    defaults.update(domains=["upright"], seen_classes=[0, 3, 6, 9])

    def check_settings(self) -> None:
        self.check_pretraining()
        seen = self.settings["seen_classes"]
        if not seen or len(set(seen)) != len(seen) or not set(seen) < set(range(10)):
            raise ClaimError(f"claim {self.claim_name}: seen_classes {seen} must be some digits, not all. "
                             "Fix: e.g. seen_classes: [0, 3, 6, 9].")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_arm(self, arm, spec)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        module = CLIPModule.load_from_checkpoint(self.pretrained(seed), map_location="cpu").eval()
        source = self.source(seed)
        seen = sorted(s["seen_classes"])
        scores = {}
        for group, classes in (("seen", seen), ("unseen", sorted(set(range(10)) - set(seen)))):
            positions = torch.nonzero(torch.isin(source.test_dataset.targets, torch.tensor(classes))).flatten()
            data = ClassSubsetData(source, list(range(10)), positions[:0], positions, s["batch_size"], seed)
            data.seen_classes = seen
            techniques = [PromptsOfObservedClasses(seen), *(instantiate(t) for t in arm_techniques(spec))]
            (tested,) = self.trainer(techniques).test(module, datamodule=data, verbose=False)
            scores[f"{group}_acc"] = tested["test/acc"]
            if group == "unseen":
                scores["unseen_sq_distance"] = unseen_sq_distance(self.trainer(techniques).predict(module, datamodule=data),
                                                                  data)
        return scores

    def describe(self) -> list[str]:
        s = self.settings
        unseen = sorted(set(range(10)) - set(s["seen_classes"]))
        return [f"Prediction of classes without prompts (`reglab.vision_language_claims`, protocol "
                f"`clip_unseen_classes`, Loki's partially observed label space): the tiny CLIP of "
                f"`{s['pretrain_config']}` pretrained per seed for {s['pretrain_epochs']} epochs on that seed's split "
                f"({_pretraining_domains(s)}) classifies zero-shot with the prompts of digits {s['seen_classes']} only; "
                f"each arm's rule labels the test images of domains {s['domains']}: `unseen_acc` on digits {unseen} "
                "(argmax can only name a seen digit: 0), `seen_acc` on the seen digits, `unseen_sq_distance` the mean "
                "of |prediction - digit|^2 on the unseen images.", ""]
