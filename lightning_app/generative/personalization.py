"""The ``personalization`` claims protocol: tune a text-conditional diffusion model on a few images of a new
concept and measure whether the concept was learned and the class words were kept.

Per seed the text-conditional :class:`~reglab.tasks.DiffusionModule` of ``pretrain_config`` (its
``conditioning`` set to ``text``, ``seed_everything`` and the data seed to the seed, ``max_epochs`` to
``pretrain_epochs``) is pretrained once on the digits and cached by content
(:func:`reglab.checkpoints.pretrained_checkpoint_for`). The concept is ``shots`` training images of digit
``concept_class`` drawn with the seed and turned ``thick`` (strokes dilated by one pixel: a 2x2 max filter)
or ``inverted`` (``1 - x``). An arm is one personalization technique (``technique:``, a
:class:`~reglab.callbacks.generative.ClassDiffusion`, whose ``spl_weight: 0`` is plain personalization)
fitted from the pretrained model for ``steps`` steps of batches of ``batch_size`` concept images (AdamW at
``lr``, no condition dropout), then sampled (DDIM, ``sample_steps`` steps, seeded, ``samples`` per prompt):

* ``concept_gap`` — how close samples of the concept prompt ("a handwritten digit x three") come to the
  concept's images, on the scale from the real concept to the untouched class: the mean distance of each
  sample to its nearest concept example, in the penultimate features of the in-repo digits classifier
  (:mod:`reglab.generative.measures`), minus that of held-out concept images (test images of the class made
  the same way), divided by the plain test images' of the class minus it (0: as close as real unseen concept
  images; 1: no closer than ordinary digits of the class; lower is better);
* ``composition_accuracy`` — the classifier's accuracy on samples of the modifier composed with the *other*
  class names ("a handwritten digit x seven" must still be a seven): whether the new word kept to its role
  beside the class word rather than taking the whole prompt over;
* ``class_accuracy`` — its accuracy on samples of the plain class prompts (what the tuning forgot);
* ``concept_accuracy`` — its accuracy on the concept prompt's samples as the concept's class (reported);
* ``spl`` — the tuned concept phrase's ``1 - cos`` to its class phrase (reported).

The results page shows each arm's first-run samples of every prompt (:func:`prompt_grid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reglab.bench.protocols import ClaimError, Protocol, arm_techniques, instantiate, register_protocol
from reglab.generative.measures import CACHE_DIR, CLASSIFIER_CONFIG, ClassifierFeatures, conditional_accuracy
from reglab.generative.sample import GRID_COLUMNS, grid_figure, row_names

CONCEPTS = ("thick", "inverted")


def make_concept(images: Tensor, concept: str) -> Tensor:
    """``images`` (``(N, 1, H, W)`` in [0, 1]) as the ``concept``: ``thick`` (a 2x2 max filter: every stroke one
    pixel wider to the right and down) or ``inverted``."""
    if concept == "thick":
        return torch.nn.functional.max_pool2d(torch.nn.functional.pad(images, (0, 1, 0, 1)), 2, stride=1)
    if concept == "inverted":
        return 1 - images
    raise ValueError(f"concept {concept!r} is not one of {CONCEPTS}")


def nearest_feature_distance(features: Tensor, examples: Tensor) -> float:
    """Mean over ``features`` of the L2 distance to the nearest row of ``examples``."""
    return float(torch.cdist(features, examples, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.mean())


def prompt_grid(blocks: list[Tensor], prompts: list[list[str]], count: int) -> Any:
    """A grid of the first :data:`~reglab.generative.sample.GRID_COLUMNS` samples of every prompt, a row each:
    ``blocks[i]`` holds ``count`` samples of each of ``prompts[i]``, prompt by prompt."""
    columns = min(GRID_COLUMNS, count)
    rows = [images.view(len(names), count, *images.shape[1:])[:, :columns].flatten(0, 1)
            for images, names in zip(blocks, prompts)]
    return grid_figure(torch.cat(rows), columns, [name for names in prompts for name in names])


def concept_gap(samples: float, held_out_concept: float, plain_class: float) -> float:
    """Where ``samples``' distance lies from the held-out concept's (0) to the plain class's (1)."""
    return (samples - held_out_concept) / (plain_class - held_out_concept)


@register_protocol("personalization")
class PersonalizationProtocol(Protocol):
    defaults = {"pretrain_config": "configs/experiment/digits_diffusion.yaml", "pretrain_epochs": 30,
                "pretrain_trainer": {}, "cache_dir": CACHE_DIR, "classifier_config": CLASSIFIER_CONFIG,
                "concept_class": 3, "concept": "thick", "shots": 5, "steps": 200, "batch_size": 5, "lr": 1e-3,
                "samples": 20, "sample_steps": 25, "trainer": {}}

    def check_settings(self) -> None:
        s = self.settings
        for key in ("pretrain_config", "classifier_config"):
            if not Path(s[key]).is_file():
                raise ClaimError(f"claim {self.claim_name}: {key} {s[key]} is not a file. Fix: run from the repository "
                                 "root, or give a `reglab fit` config.")
        if s["concept"] not in CONCEPTS:
            raise ClaimError(f"claim {self.claim_name}: concept {s['concept']!r}. Fix: use one of {list(CONCEPTS)}.")
        if not 0 <= s["concept_class"] < 10 or s["shots"] < 1:
            raise ClaimError(f"claim {self.claim_name}: concept_class {s['concept_class']}, shots {s['shots']}. Fix: "
                             "a digit 0-9 and at least one shot.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if len(arm_techniques(spec)) != 1:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: one personalization technique per arm. Fix: "
                             "technique: {class_path: reglab.callbacks.generative.ClassDiffusion, init_args: {...}}.")

    def pretrained(self, seed: int) -> Path:
        """The seed's text-conditional model, fitted once (cached by the derived config's content)."""
        import yaml

        from reglab.checkpoints import pretrained_checkpoint_of

        s = self.settings
        source = Path(s["pretrain_config"])
        config = yaml.safe_load(source.read_text())
        config["seed_everything"] = seed
        config["data"]["init_args"]["seed"] = seed
        config["model"]["init_args"]["conditioning"] = "text"
        config["trainer"] = {**config.get("trainer", {}), "max_epochs": s["pretrain_epochs"], **s["pretrain_trainer"]}
        config.pop("run_name", None)
        return pretrained_checkpoint_of(config, f"{source.stem}-text-seed{seed}", s["cache_dir"])

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        import lightning as L

        from reglab.datamodules import DigitsDataModule
        from reglab.datamodules.base import DictDataset
        from reglab.generative.measures import digits_classifier
        from reglab.tasks import DiffusionModule

        s = self.settings
        data = DigitsDataModule(seed=seed)
        data.setup("fit")
        data.setup("test")
        train, test = data.train_dataset, data.test_dataset
        own = (train.targets == s["concept_class"]).nonzero().flatten()
        shots = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(seed))[:s["shots"]]]
        examples = make_concept(train.inputs[shots], s["concept"])
        plain = test.inputs[test.targets == s["concept_class"]]

        module = DiffusionModule.load_from_checkpoint(self.pretrained(seed), map_location="cpu")
        module.hparams.lr, module.hparams.cond_dropout = s["lr"], 0.0
        (technique,) = [instantiate(t) for t in arm_techniques(spec)]
        tuning = L.LightningDataModule.from_datasets(
            DictDataset(examples, torch.full((len(examples),), s["concept_class"])), batch_size=s["batch_size"])
        L.seed_everything(seed, verbose=False)
        trainer = L.Trainer(**{"max_steps": s["steps"], "accelerator": "cpu", "devices": 1, "logger": False,
                               "enable_checkpointing": False, "enable_progress_bar": False,
                               "enable_model_summary": False, "limit_val_batches": 0, **s["trainer"]},
                            callbacks=[technique])
        trainer.fit(module, datamodule=tuning)

        others = [c for c in range(module.num_classes) if c != s["concept_class"]]
        count = s["samples"]

        def draw(classes: list[int], personalized: bool) -> tuple[Tensor, Tensor]:
            labels = torch.tensor(classes).repeat_interleave(count)
            conditions = technique.personalized(labels) if personalized else labels
            return module.sample(conditions, steps=s["sample_steps"], seed=seed), labels

        concept_samples, concept_labels = draw([s["concept_class"]], True)
        composed, composed_labels = draw(others, True)
        classes, class_labels = draw(list(range(module.num_classes)), False)
        names = row_names(module)
        modifier = technique.modifier
        self.keep_figure(arm, "samples", lambda: prompt_grid(
            [concept_samples, composed, classes],
            [[f"{modifier} {names[s['concept_class']]}"], [f"{modifier} {names[c]}" for c in others], names], count))

        classifier = digits_classifier(s["classifier_config"], s["cache_dir"])
        features = ClassifierFeatures(classifier)
        example_features = features(examples)
        distance = {name: nearest_feature_distance(features(images), example_features) for name, images in
                    {"samples": concept_samples, "held_out": make_concept(plain, s["concept"]), "plain": plain}.items()}
        with torch.no_grad():
            spl = technique.refresh(module)[s["concept_class"]]
        return {
            "concept_gap": concept_gap(distance["samples"], distance["held_out"], distance["plain"]),
            "concept_distance": distance["samples"],
            "composition_accuracy": conditional_accuracy(composed, composed_labels, classifier),
            "class_accuracy": conditional_accuracy(classes, class_labels, classifier),
            "concept_accuracy": conditional_accuracy(concept_samples, concept_labels, classifier),
            "spl": float(spl),
        }
