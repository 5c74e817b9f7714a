"""Few-shot anomaly segmentation on the digit scenes: normal references, synthesized anomalies, pixel masks.

A *class* here is a digit: every scene of class ``c`` holds 1–``max_digits`` digits ``c`` (the
segmentation scenes of :func:`reglab.datamodules.make_digit_scenes` with all class weight on
``c``). A query is a scene of class ``c``, anomalous with probability ``anomaly_rate``: one
anomaly of a uniformly drawn kind is synthesized on it. Its references are ``shots`` *normal*
scenes of the same class (other scenes, other handwriting, other places): the few normal images
a few-shot anomaly segmenter gets as its visual prompt (DictAS's dictionary). Queries and references
are drawn from disjoint halves of the class's digit images, so a reference holds other instances of
the class (other objects, as MVTec's normal images are), never the query's own digits elsewhere.

Anomaly kinds (pure functions, numpy, tested against hand-built cases):

* ``paste`` — :func:`paste_patch`: a square crop of a *foreign* digit (another class, from the
  same split's pool) replaces a square of the scene, anywhere on it (DictAS and DRAEM paste
  foreign texture through a Perlin mask; here the foreign content is another class's strokes).
* ``noise`` — :func:`add_noise`: Gaussian noise of std ``noise_std`` on a square, clipped to [0, 1].
* ``cutout`` — :func:`cut_out`: a square set to background, centred on a digit pixel (a cut-out
  of empty background would change nothing), at most half a digit's side (a whole digit cut away
  would leave a normal-looking scene with one digit fewer).

The pixel mask is :func:`changed_pixels`: the pixels the anomaly changed by more than
``min_change`` — one rule for every kind, so an anomaly that changes nothing (foreign
background pasted on background) is no anomaly, and a query whose mask is empty counts as normal.

Class-generalizable split: training scenes use ``train_classes``, test scenes only
``test_classes`` (unseen in training; DictAS's protocol: train on one dataset's classes, test on
another's). Validation scenes use the training classes, so model selection never sees an unseen
class. Training, validation and test scenes draw their digits from the disjoint pools of
:class:`~reglab.datamodules.DigitsDataModule` (seeded by ``split_seed``). Training queries draw
their ``shots`` references from a bank of ``train_bank`` normal scenes of their class, anew per
query; validation and test queries of a class share one fixed set of ``shots`` references (the
few-shot protocol: the same k normal images of a class for every test image, DictAS's
``fix_few_path`` files).

Batch keys: ``input`` ``(N, 1, H, W)`` the query; ``target`` ``(N, H, W)`` long, 1 on anomalous
pixels; ``reference`` ``(N, shots, 1, H, W)``; ``anomalous`` ``(N,)`` long (the mask is not
empty); ``scene_class`` ``(N,)`` long (the digit); ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .base import DictDataModule, DictDataset
from .digits import DigitsDataModule
from .scenes import DIGIT_SIZE, NUM_DIGITS, _check_layout, make_digit_scenes
from .splits import check_holdout_fractions

ANOMALY_KINDS = ("paste", "noise", "cutout")


def changed_pixels(before: np.ndarray, after: np.ndarray, min_change: float) -> np.ndarray:
    """``(H, W)`` bool: where ``after`` differs from ``before`` by more than ``min_change``."""
    return np.abs(after - before) > min_change


def paste_patch(image: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of ``image`` ``(H, W)`` whose square at ``(top, left)`` is ``patch`` (cut at the border)."""
    out = image.copy()
    region = out[top : top + patch.shape[0], left : left + patch.shape[1]]
    region[...] = patch[: region.shape[0], : region.shape[1]]
    return out


def add_noise(image: np.ndarray, noise: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of ``image`` with ``noise`` added on the square at ``(top, left)``, clipped to [0, 1]."""
    out = image.copy()
    region = out[top : top + noise.shape[0], left : left + noise.shape[1]]
    region[...] = np.clip(region + noise[: region.shape[0], : region.shape[1]], 0.0, 1.0)
    return out


def cut_out(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A copy of ``image`` whose ``size``×``size`` square at ``(top, left)`` is background (0)."""
    out = image.copy()
    out[top : top + size, left : left + size] = 0.0
    return out


def synthesize_anomaly(
    image: np.ndarray, kind: str, foreign: np.ndarray, rng: np.random.Generator, min_size: int, max_size: int,
    noise_std: float, min_change: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of ``kind`` on ``image`` ``(H, W)``: ``(anomalous image, bool mask)``.

    The square's side is uniform in ``[min_size, max_size]``; ``foreign`` is the (upscaled) foreign
    digit a ``paste`` crops from (a random ``side``×``side`` crop of it). A ``cutout`` is at most half
    the digit's side (``foreign``'s): a cut that removed a whole digit would leave a normal-looking scene
    with one digit fewer, its mask on what looks like background.
    """
    height, width = image.shape
    side = int(rng.integers(min_size, max_size + 1))
    if kind == "cutout":
        side = min(side, foreign.shape[0] // 2)
        ys, xs = np.nonzero(image > 0.5)
        pick = int(rng.integers(len(ys))) if len(ys) else None
        y, x = (height // 2, width // 2) if pick is None else (int(ys[pick]), int(xs[pick]))
        top, left = max(0, y - side // 2), max(0, x - side // 2)
        after = cut_out(image, top, left, side)
    else:
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        if kind == "paste":
            side = min(side, *foreign.shape)
            y, x = int(rng.integers(0, foreign.shape[0] - side + 1)), int(rng.integers(0, foreign.shape[1] - side + 1))
            after = paste_patch(image, foreign[y : y + side, x : x + side], top, left)
        elif kind == "noise":
            after = add_noise(image, rng.normal(0.0, noise_std, (side, side)).astype(image.dtype), top, left)
        else:
            raise ValueError(f"synthesize_anomaly: unknown kind {kind!r}. Fix: use one of {ANOMALY_KINDS}.")
    return after, changed_pixels(image, after, min_change)


class AnomalyScenesDataModule(DictDataModule):
    """Few-shot anomaly segmentation scenes, trained on some digit classes and tested on others.

    See the module docstring for the scenes, the anomaly kinds, the masks and the batch keys.

    Args:
        train_classes, test_classes: the digits of the training (and validation) scenes and of the
            test scenes; disjoint for the class-generalizable protocol.
        shots: normal reference scenes per query.
        num_train, num_val, num_test: query scenes per split.
        anomaly_rate: probability that a query gets an anomaly (every split).
        kinds: the anomaly kinds drawn from, uniformly (a subset of ``paste``, ``noise``, ``cutout``).
        min_size, max_size: side of an anomaly's square, in pixels.
        noise_std: std of the ``noise`` kind.
        min_change: how much a pixel must change to count as anomalous.
        train_bank: normal scenes per training class that training references are drawn from.
        canvas, min_digits, max_digits, scale: the scenes' layout (:func:`make_digit_scenes`).
        split_seed, val_fraction, test_fraction: the digits' pools (:class:`DigitsDataModule`).
        batch_size, num_workers, seed, eval_batch_size: as for every reglab DataModule; ``seed``
            also seeds the scenes, the references and the anomalies.

    Example:
        >>> data = AnomalyScenesDataModule(num_train=8, num_val=4, num_test=4, shots=2, batch_size=4)
        >>> data.setup()
        >>> batch = next(iter(data.train_dataloader()))
        >>> tuple(batch["input"].shape), tuple(batch["reference"].shape), tuple(batch["target"].shape)
        ((4, 1, 32, 32), (4, 2, 1, 32, 32), (4, 32, 32))
        >>> set(data.test_dataset.extras["scene_class"].tolist()) <= {5, 6, 7, 8, 9}
        True
    """

    def __init__(
        self,
        train_classes: Sequence[int] = (0, 1, 2, 3, 4),
        test_classes: Sequence[int] = (5, 6, 7, 8, 9),
        shots: int = 4,
        num_train: int = 600,
        num_val: int = 100,
        num_test: int = 300,
        anomaly_rate: float = 0.5,
        kinds: Sequence[str] = ANOMALY_KINDS,
        min_size: int = 6,
        max_size: int = 12,
        noise_std: float = 0.5,
        min_change: float = 0.1,
        train_bank: int = 32,
        canvas: int = 32,
        min_digits: int = 1,
        max_digits: int = 3,
        scale: float = 1.5,
        split_seed: Optional[int] = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        name = type(self).__name__
        _check_layout(name, canvas, scale, min_digits, max_digits)
        train_classes, test_classes = [int(c) for c in train_classes], [int(c) for c in test_classes]
        for arg, classes in (("train_classes", train_classes), ("test_classes", test_classes)):
            if not classes or len(set(classes)) != len(classes) or not all(0 <= c < NUM_DIGITS for c in classes):
                raise ValueError(f"{name}: {arg}={classes} must be distinct digits in 0..9. Fix: list each digit once.")
        unknown = sorted(set(kinds) - set(ANOMALY_KINDS))
        if not kinds or unknown:
            raise ValueError(f"{name}: kinds={list(kinds)} has unknown kinds {unknown}. Fix: use some of {ANOMALY_KINDS}.")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ValueError(f"{name}: anomaly_rate={anomaly_rate} is a probability. Fix: use a value in [0, 1].")
        if not 1 <= min_size <= max_size <= canvas:
            raise ValueError(f"{name}: need 1 <= min_size <= max_size <= canvas, got {min_size}, {max_size}, {canvas}.")
        if shots < 1 or train_bank < shots:
            raise ValueError(f"{name}: need shots >= 1 and train_bank >= shots, got shots={shots}, train_bank={train_bank}.")
        for arg, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"{name}: {arg} must be at least 1 scene, got {value}.")
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        self.classes = {"train": train_classes, "val": train_classes, "test": test_classes}
        self.shots, self.train_bank = shots, train_bank
        self.num_scenes = {"train": num_train, "val": num_val, "test": num_test}
        self.anomaly_rate, self.kinds = anomaly_rate, tuple(kinds)
        self.min_size, self.max_size, self.noise_std, self.min_change = min_size, max_size, noise_std, min_change
        self.layout = {"canvas": canvas, "min_digits": min_digits, "max_digits": max_digits, "scale": scale}
        self.split_seed = seed if split_seed is None else split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.input_shape = (1, canvas, canvas)

    def setup(self, stage: Optional[str] = None) -> None:
        """Generates all three splits once; later calls do nothing."""
        if self.train_dataset is not None:
            return
        pools = DigitsDataModule(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.split_seed)
        pools.setup()
        splits = (("train", pools.train_dataset), ("val", pools.val_dataset), ("test", pools.test_dataset))
        datasets = {split: self._split(split, pool.inputs, pool.targets, offset) for offset, (split, pool) in enumerate(splits)}
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]

    def _scenes(self, digits: Tensor, digit: int, count: int, seed: int) -> np.ndarray:
        """``count`` scenes of ``digits``, all of class ``digit``."""
        weights = torch.zeros(NUM_DIGITS)
        weights[digit] = 1.0
        labels = torch.full((len(digits),), digit)
        return make_digit_scenes(digits, labels, count, class_weights=weights, seed=seed, **self.layout).images[:, 0].numpy()

    def _split(self, split: str, digits: Tensor, labels: Tensor, offset: int) -> DictDataset:
        classes, count = self.classes[split], self.num_scenes[split]
        rng = np.random.default_rng([self.seed, offset])
        scene_class = np.asarray(classes)[rng.integers(len(classes), size=count)]
        bank_size = self.train_bank if split == "train" else self.shots
        size = round(DIGIT_SIZE * self.layout["scale"])
        foreign_digits = torch.nn.functional.interpolate(digits.reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE).float(), size=(size, size),
                                                         mode="bilinear", align_corners=False).clamp(0, 1)[:, 0].numpy()
        side = self.layout["canvas"]
        images = np.zeros((count, side, side), np.float32)
        masks = np.zeros((count, side, side), np.int64)
        references = np.zeros((count, self.shots, side, side), np.float32)
        for digit in classes:
            members = np.flatnonzero(scene_class == digit)
            if len(members) == 0:
                continue
            seed = 10 * (self.seed * 3 + offset) + digit
            # queries and references from disjoint halves of the class's digit images: a reference shows
            # other instances of the class, never the query's own handwriting at another place (the pools are
            # small, ~45 images per class in the test pool, so shared images would be copies of query patches)
            images_of_class = (labels == digit).nonzero().flatten()
            own = digits[images_of_class[torch.randperm(len(images_of_class), generator=torch.Generator().manual_seed(seed))]]
            half = len(own) // 2
            queries = self._scenes(own[:half], digit, len(members), seed)
            bank = self._scenes(own[half:], digit, bank_size, seed + 1000)
            foreign_pool = (labels != digit).nonzero().flatten().numpy()
            for query, position in zip(queries, members):
                chosen = rng.choice(bank_size, self.shots, replace=False) if split == "train" else np.arange(self.shots)
                references[position] = bank[chosen]
                images[position] = query
                if rng.random() < self.anomaly_rate:
                    kind = self.kinds[int(rng.integers(len(self.kinds)))]
                    foreign = foreign_digits[int(rng.choice(foreign_pool))]
                    images[position], mask = synthesize_anomaly(query, kind, foreign, rng, self.min_size, self.max_size,
                                                                self.noise_std, self.min_change)
                    masks[position] = mask
        target = torch.from_numpy(masks)
        extras: dict[str, Any] = {
            "reference": torch.from_numpy(references)[:, :, None],
            "anomalous": target.flatten(1).any(1).long(),
            "scene_class": torch.from_numpy(scene_class).long(),
        }
        return DictDataset(torch.from_numpy(images)[:, None], target, extras)
