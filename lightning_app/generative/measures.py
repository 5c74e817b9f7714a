"""Sample-quality measures that run offline, without Inception weights.

Inception-v3 (what FID is defined with) is trained on ImageNet photographs and its weights are a
download; the digits are 8x8 grey images. So the features come from a digits classifier trained
in this repository (the small CNN of ``configs/experiment/clean_digits.yaml``, fitted once and cached
under ``runs/pretrained/`` like the project's pretrained backbones,
:func:`reglab.checkpoints.pretrained_checkpoint_for`). Numbers from these measures are *not* FID
values and compare only with each other (same classifier, same reference set): results say so.

* :func:`frechet_distance` — torchmetrics' ``FrechetInceptionDistance`` with ``feature=`` the
  classifier's penultimate features (:class:`ClassifierFeatures`, 64 dims for the CNN): the Fréchet
  distance between Gaussians fitted to the real and the generated images' features;
* :func:`conditional_accuracy` — the classifier's accuracy on class-conditional samples against the
  classes they were sampled for (torchmetrics' multiclass accuracy);
* :func:`nearest_training_distance` — per sample, the pixel-space L2 distance to its nearest
  training image (memorization: a model that copies its training set scores near 0; held-out real
  images give the reference of an unmemorized sample).

:func:`sample_quality` returns all of them for a set of samples, with the held-out reference.

Example:
    >>> import torch
    >>> from reglab.tasks import ClassificationModule
    >>> classifier = ClassificationModule(backbone="cnn", num_classes=10, input_shape=(1, 8, 8))
    >>> real, fake = torch.rand(32, 1, 8, 8), torch.rand(32, 1, 8, 8)
    >>> frechet_distance(real, fake, ClassifierFeatures(classifier)) > 0
    True
    >>> nearest_training_distance(real[:3], real).tolist()
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: the `reglab fit` config of the in-repo digits classifier (features and conditional accuracy)
CLASSIFIER_CONFIG = "configs/experiment/clean_digits.yaml"
CACHE_DIR = "runs/pretrained"


class ClassifierFeatures(nn.Module):
    """A frozen classifier's penultimate features (its backbone's output) as FID's feature extractor.

    ``num_features`` tells torchmetrics the width, so it never runs a dummy Inception-sized image.
    The classifier is put in eval mode (batch-norm running statistics) and nothing trains.

    Args:
        classifier: a :class:`~reglab.tasks.ClassificationModule` (anything with ``backbone`` and
            ``backbone.feature_dim``) taking images in [0, 1].
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = classifier.backbone.eval().requires_grad_(False)
        self.num_features = classifier.backbone.feature_dim

    def train(self, mode: bool = True) -> ClassifierFeatures:
        # the metric's .train() (Lightning moves every submodule's mode) must not unfreeze batch norm
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images.float())


def digits_classifier(config: str | Path = CLASSIFIER_CONFIG, cache_dir: str | Path = CACHE_DIR) -> nn.Module:
    """The in-repo digits classifier: ``config`` fitted once (cached by its content) and loaded, in eval mode."""
    from reglab.checkpoints import pretrained_checkpoint_for
    from reglab.tasks import ClassificationModule

    checkpoint = pretrained_checkpoint_for(config, cache_dir)
    return ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()


def frechet_distance(real: Tensor, fake: Tensor, features: nn.Module, batch_size: int = 256) -> float:
    """Fréchet distance between ``real`` and ``fake`` images' ``features`` (torchmetrics' FID with a
    custom feature extractor; not an Inception FID). Needs at least two images of each."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features).to(real.device)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


def conditional_accuracy(samples: Tensor, labels: Tensor, classifier: nn.Module) -> float:
    """Share of ``samples`` that ``classifier`` assigns to the class each was sampled for."""
    from torchmetrics.functional.classification import multiclass_accuracy

    with torch.no_grad():
        logits = classifier.eval()(samples.float())
    return float(multiclass_accuracy(logits.argmax(-1), labels.to(logits.device), num_classes=logits.shape[-1],
                                     average="micro"))


def nearest_training_distance(samples: Tensor, training_images: Tensor) -> Tensor:
    """``(N,)`` L2 distance (pixel space) from each sample to its nearest training image."""
    # without the matrix-product shortcut, whose rounding leaves ~1e-3 where a sample copies a training image
    return torch.cdist(samples.flatten(1).float(), training_images.flatten(1).float(),
                       compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def sample_quality(samples: Tensor, labels: Tensor | None, classifier: nn.Module, training_images: Tensor,
                   reference_images: Tensor, reference_labels: Tensor | None = None) -> dict[str, Any]:
    """All measures of ``samples`` (in [0, 1]; ``labels`` the classes they were sampled for, ``None`` for
    unconditional ones) with the in-repo ``classifier``; ``reference_images`` are held-out real images.

    Returns ``fd_classifier_features`` (Fréchet distance to the reference images) beside
    ``reference_fd_classifier_features`` (the training images' distance to them: what a perfect model
    would score, up to the sample counts),
    ``conditional_accuracy`` (when ``labels``; with ``reference_labels`` also the classifier's accuracy
    on the real reference images, ``reference_accuracy``, its ceiling), ``nearest_train_distance`` (mean
    over the samples) and ``reference_nearest_train_distance`` (the same for the reference images).
    """
    features = ClassifierFeatures(classifier)
    measures: dict[str, Any] = {
        "feature_extractor": "in-repo digits classifier (penultimate features), not Inception",
        "fd_classifier_features": frechet_distance(reference_images, samples, features),
        "reference_fd_classifier_features": frechet_distance(reference_images, training_images, features),
        "nearest_train_distance": float(nearest_training_distance(samples, training_images).mean()),
        "reference_nearest_train_distance": float(nearest_training_distance(reference_images, training_images).mean()),
    }
    if labels is not None:
        measures["conditional_accuracy"] = conditional_accuracy(samples, labels, classifier)
        if reference_labels is not None:
            measures["reference_accuracy"] = conditional_accuracy(reference_images, reference_labels, classifier)
    return measures
