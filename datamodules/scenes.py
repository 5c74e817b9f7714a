"""Segmentation scenes composed from the embedded digits: dense masks, instances, noisy masks, long tail.

A scene is a square canvas (32×32 by default) holding 1 to ``max_digits`` digits of scikit-learn's
8×8 digits, each upscaled ``scale``× (bilinear; 12×12 by default: four 16×16 digits do not fit
on 32×32 with the gap below, so use ``canvas=48`` with ``scale=2``) and pasted at a random free
place. Every pixel is labelled: ``0`` is background, a pixel of digit ``d`` is class ``d + 1``
(so there are :data:`NUM_SCENE_CLASSES` = 11 classes). A digit's pixels are those of its upscaled
image above ``threshold``. Digits never overlap: a digit is placed only where its mask, grown by
one pixel, meets no earlier digit, so two digits are always at least one background pixel
apart and every instance is a connected region of its own. A digit for which no such place is
left is left out, so a scene may hold fewer digits than drawn (never none).

Per image the scenes also give ``instances`` (``0`` none, ``1..k`` the k-th placed digit) and
``instance_counts``: a ``(C,)`` vector, at ``d + 1`` the number of digits ``d`` in the image
(column 0, background, is always 0).

**Long tail.** With ``class_weights`` (or the DataModule's ``imbalance_ratio``) each digit's class
is drawn from a skewed profile instead of uniformly: the exponential profile of the CIFAR-LT
protocol (:mod:`reglab.datamodules.long_tail`), ``w_d ∝ (1 / imbalance_ratio) ^ (d / 9)``, so digit
0 is the head and digit 9 appears ``imbalance_ratio`` times less often, in few images, and often
beside head classes in the same image (the mixed rare/common co-occurrence that repeat-factor
sampling is about).

**Noisy masks.** :func:`apply_mask_noise` corrupts each object of a mask the ways segmentation
label noise is simulated in the literature: its boundary dilated or eroded by ``radius`` pixels,
the object shifted, dropped (becomes background) or given the class of another digit as a whole.
What ADELE (Liu et al., CVPR 2022; github.com/Kangningthu/ADELE) trains on: its main setting is
weakly-supervised segmentation (PASCAL VOC), where the noisy masks are pseudo labels obtained from
class activation maps (SEAM, AffinityNet); its SegTHOR experiment corrupts the ground truth
synthetically (``SegThor/brat/loading.py``, noise ``"final"`` on every training image by default):
per image, all organs are eroded or all dilated (chosen at random) by 2–4 iterations of a 3×3 kernel
applied at a resolution where each organ covers about 1000 pixels, growth only into background.
Our synthetic noise simulates the kinds of errors pseudo masks have — boundary errors (dilation,
erosion, shift), missed objects (drop) and wrong classes (whole-object flip) — per object with
given probabilities; ``MaskNoise(dilate=0.5, erode=0.5)`` is ADELE's SegTHOR kind drawn per object
rather than per image.

**Domain shift** (:class:`SceneStyle`, :func:`apply_scene_style`): the same scenes rendered in
another imaging style — digit contrast and background brightness changed, a Gaussian blur, and a
sinusoidal texture grating of random orientation and phase added, then clipped to [0, 1]. The
masks do not change: only the look of the images does, as between the imaging centres and
devices of FPGM's polyp datasets (what a frequency-amplitude augmentation is about: the style
lives in the amplitude spectrum, the structure in the phase).

**Few labels** (the DataModule's ``num_labelled``): only the first ``num_labelled`` training
scenes keep their masks; every pixel of the others is :data:`UNLABELLED` (255, the segmentation
module's ``ignore_index``), so they count in no supervised loss and semi-supervised techniques
read them as unlabelled images.

Example:
    >>> from sklearn.datasets import load_digits
    >>> digits = load_digits()
    >>> images, labels = torch.tensor(digits.images[:200]) / 16, torch.tensor(digits.target[:200])
    >>> scenes = make_digit_scenes(images, labels, num_scenes=4, seed=0)
    >>> scenes.images.shape, scenes.masks.shape, scenes.instance_counts.shape
    (torch.Size([4, 1, 32, 32]), torch.Size([4, 32, 32]), torch.Size([4, 11]))
    >>> noisy = apply_mask_noise(scenes.masks, scenes.instances, MaskNoise(drop=1.0))
    >>> int(noisy.count_nonzero())    # every object dropped: all background
    0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .base import DictDataModule, DictDataset
from .digits import DigitsDataModule
from .splits import check_holdout_fractions

NUM_DIGITS = 10
#: background + the ten digits
NUM_SCENE_CLASSES = NUM_DIGITS + 1
DIGIT_SIZE = 8
#: the mask value of every pixel of an unlabelled training scene: ``SegmentationModule``'s default
#: ``ignore_index`` (the PASCAL VOC convention), so such a scene takes part in no supervised loss
UNLABELLED = 255


def long_tail_class_weights(imbalance_ratio: float, num_classes: int = NUM_DIGITS) -> Tensor:
    """Relative frequencies ``(1 / imbalance_ratio) ^ (c / (C − 1))`` of classes ``0..C-1`` (head first),
    normalized to sum to 1: the CIFAR-LT profile of :mod:`reglab.datamodules.long_tail` as probabilities.

    Example:
        >>> weights = long_tail_class_weights(100.0)
        >>> round(float(weights[0] / weights[-1]), 6)
        100.0
    """
    if imbalance_ratio < 1.0:
        raise ValueError(f"long_tail_class_weights: imbalance_ratio is n_max / n_min and must be ≥ 1, got {imbalance_ratio}.")
    weights = (1.0 / imbalance_ratio) ** (torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1))
    return weights / weights.sum()


@dataclass(frozen=True)
class DigitScenes:
    """Generated scenes (see the module docstring for the conventions).

    Attributes:
        images: ``(N, 1, H, W)`` float in [0, 1].
        masks: ``(N, H, W)`` long: 0 background, ``d + 1`` for digit ``d``.
        instances: ``(N, H, W)`` long: 0 none, ``1..k`` the placed digits in order.
        instance_counts: ``(N, 11)`` long: per image, how many digits of each class (column 0 is 0).
        sources: ``(N, max_digits)`` long: the position in ``digit_images`` of each placed digit, -1 after the last.
    """

    images: Tensor
    masks: Tensor
    instances: Tensor
    instance_counts: Tensor
    sources: Tensor


def make_digit_scenes(
    digit_images: Tensor,
    digit_labels: Tensor,
    num_scenes: int,
    canvas: int = 32,
    min_digits: int = 1,
    max_digits: int = 4,
    scale: float = 1.5,
    class_weights: Optional[Tensor] = None,
    threshold: float = 0.4,
    seed: int = 0,
) -> DigitScenes:
    """Compose ``num_scenes`` scenes from the digits ``digit_images`` (``(M, 8, 8)`` or ``(M, 1, 8, 8)``, in [0, 1]).

    Per scene the number of digits is uniform in ``[min_digits, max_digits]``; each digit's class
    is drawn from ``class_weights`` (``(10,)``, uniform if ``None``), then its image uniformly among
    ``digit_images`` of that class, then its place uniformly among the free ones (see the module
    docstring). The result depends only on the arguments, never on the global RNG.
    """
    if digit_images.dim() == 4:
        digit_images = digit_images.squeeze(1)
    if digit_images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or len(digit_images) != len(digit_labels):
        raise ValueError(
            f"make_digit_scenes: digit_images must be (M, 8, 8) with one label each, got {tuple(digit_images.shape)}"
            f" and {len(digit_labels)} labels."
        )
    _check_layout("make_digit_scenes", canvas, scale, min_digits, max_digits)
    size = round(DIGIT_SIZE * scale)
    weights = torch.full((NUM_DIGITS,), 1.0 / NUM_DIGITS) if class_weights is None else class_weights.double()
    members = [(digit_labels == d).nonzero().flatten() for d in range(NUM_DIGITS)]
    missing = [d for d in range(NUM_DIGITS) if weights[d] > 0 and len(members[d]) == 0]
    if missing:
        raise ValueError(f"make_digit_scenes: no digit image of classes {missing}; give images of every class drawn.")

    patches = F.interpolate(digit_images[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    patches = patches.clamp(0.0, 1.0)[:, 0].numpy()
    patch_masks = patches > threshold
    # a digit's mask grown by one pixel (in a one-pixel frame): the area no other digit may touch
    grown = np.stack([ndimage.binary_dilation(np.pad(m, 1), np.ones((3, 3))) for m in patch_masks]).astype(np.int32)

    # numpy for the per-digit work: these tiny ops run single-threaded, where torch's intra-op
    # threads spin-wait on each other on a busy machine (70x slower with two threads under load)
    generator = torch.Generator().manual_seed(seed)
    images = np.zeros((num_scenes, canvas, canvas), np.float32)
    masks = np.zeros((num_scenes, canvas, canvas), np.int64)
    instances = np.zeros_like(masks)
    counts = torch.zeros(num_scenes, NUM_SCENE_CLASSES, dtype=torch.long)
    sources = torch.full((num_scenes, max_digits), -1, dtype=torch.long)
    for n in range(num_scenes):
        wanted = int(torch.randint(min_digits, max_digits + 1, (1,), generator=generator))
        classes = torch.multinomial(weights, wanted, replacement=True, generator=generator).tolist()
        occupied = np.zeros((canvas + 2, canvas + 2), np.int32)
        placed = 0
        for digit in classes:
            source = int(members[digit][torch.randint(len(members[digit]), (1,), generator=generator)])
            # how many occupied pixels the grown mask would cover at each top-left corner
            windows = np.lib.stride_tricks.sliding_window_view(occupied, grown[source].shape)
            free = np.flatnonzero(np.einsum("ijkl,kl->ij", windows, grown[source]) == 0)
            if len(free) == 0:
                continue
            y, x = divmod(int(free[int(torch.randint(len(free), (1,), generator=generator))]), windows.shape[1])
            window = (n, slice(y, y + size), slice(x, x + size))
            mask = patch_masks[source]
            images[window] = np.maximum(images[window], patches[source])
            masks[window][mask] = digit + 1
            placed += 1
            instances[window][mask] = placed
            occupied[y + 1 : y + 1 + size, x + 1 : x + 1 + size] += mask
            counts[n, digit + 1] += 1
            sources[n, placed - 1] = source
    images, masks, instances = torch.from_numpy(images)[:, None], torch.from_numpy(masks), torch.from_numpy(instances)
    return DigitScenes(images, masks, instances, counts, sources)


def _check_layout(owner: str, canvas: int, scale: float, min_digits: int, max_digits: int) -> None:
    if scale < 1:
        raise ValueError(f"{owner}: scale must be ≥ 1 (the 8×8 digits are upscaled, never shrunk), got {scale}.")
    size = round(DIGIT_SIZE * scale)
    if canvas < size:
        raise ValueError(f"{owner}: canvas={canvas} is smaller than a digit ({size}×{size} pixels); use canvas ≥ {size} or a smaller scale.")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(
            f"{owner}: need 1 ≤ min_digits ≤ max_digits, got min_digits={min_digits}, max_digits={max_digits}."
        )


@dataclass
class MaskNoise:
    """Per-object corruption of segmentation masks (see :func:`apply_mask_noise` and the module docstring).

    Each probability applies to every object independently. ``dilate`` and ``erode`` exclude each
    other (an object's boundary moves one way or not at all), so ``dilate + erode ≤ 1``.

    Args:
        dilate: probability that an object grows by ``radius`` pixels (into background only).
        erode: probability that an object shrinks by ``radius`` pixels (an object thinner than
            ``2 · radius + 1`` pixels everywhere vanishes).
        radius: the boundary change in pixels (a square ``(2r+1)×(2r+1)`` structuring element).
        shift: probability that an object moves by an offset drawn uniformly from
            ``[-max_shift, max_shift]²`` without ``(0, 0)``.
        max_shift: largest shift per axis, in pixels.
        drop: probability that an object is missed (all its pixels background).
        flip: probability that the whole object gets another digit's class, drawn uniformly.
        seed: seed of the noise, independent of the scenes' seeds.

    In YAML (LightningCLI)::

        data:
          mask_noise: {dilate: 0.3, erode: 0.3, flip: 0.2, drop: 0.1}
    """

    dilate: float = 0.0
    erode: float = 0.0
    radius: int = 1
    shift: float = 0.0
    max_shift: int = 2
    drop: float = 0.0
    flip: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dilate", "erode", "shift", "drop", "flip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskNoise: {name} is a probability and must lie in [0, 1], got {value}.")
        if self.dilate + self.erode > 1.0:
            raise ValueError(
                f"MaskNoise: dilate ({self.dilate}) + erode ({self.erode}) exceeds 1; an object is dilated or"
                " eroded, not both, so lower one of them."
            )
        for name in ("radius", "max_shift"):
            if getattr(self, name) < 1:
                raise ValueError(f"MaskNoise: {name} must be at least 1 pixel, got {getattr(self, name)}.")


def _dilate(region: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_dilation(region, np.ones((2 * radius + 1,) * 2))


def _erode(region: np.ndarray, radius: int) -> np.ndarray:
    # Beyond the canvas counts as object, so an object is eroded from its own boundary only, not
    # from the image border that cuts it.
    return ndimage.binary_erosion(region, np.ones((2 * radius + 1,) * 2), border_value=1)


def _shifted(region: np.ndarray, dy: int, dx: int) -> np.ndarray:
    height, width = region.shape
    moved = np.zeros_like(region)
    moved[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = region[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return moved


def apply_mask_noise(
    masks: Tensor, instances: Tensor, noise: MaskNoise, num_classes: int = NUM_SCENE_CLASSES
) -> Tensor:
    """A noisy copy of ``masks`` (``(N, H, W)`` long, 0 background); ``masks`` itself is left unchanged.

    Objects are the instance ids of ``instances`` (``(N, H, W)``, 0 none). Per object, in instance
    order: dropped with probability ``drop``; else dilated or eroded, then shifted, then its class
    flipped, each with its probability. An object's noisy region is painted only onto pixels that
    are background or the object's own in the clean mask and that no earlier object has taken:
    noise moves boundaries into background (as ADELE's over-segmentation does), never over another
    object. Every object draws the same random numbers whichever kinds are enabled, so the result
    depends only on the arguments (``noise.seed`` included), and raising one probability never
    changes what happens through another kind.
    """
    if masks.shape != instances.shape or masks.dim() != 3:
        raise ValueError(
            f"apply_mask_noise: masks and instances must both be (N, H, W), got {tuple(masks.shape)} and {tuple(instances.shape)}."
        )
    generator = torch.Generator().manual_seed(noise.seed)
    side = 2 * noise.max_shift + 1
    clean, objects = masks.numpy(), instances.numpy()
    noisy = np.zeros_like(clean)
    for n in range(len(clean)):
        for k in range(1, int(objects[n].max()) + 1):
            region = objects[n] == k
            if not region.any():
                continue
            # one draw per decision: (drop, boundary, shift, flip), a shift offset, a flip class
            fates = torch.rand(4, generator=generator).tolist()
            offset = int(torch.randint(side * side - 1, (1,), generator=generator))
            other = int(torch.randint(1, num_classes - 1, (1,), generator=generator))
            label = int(clean[n][region][0])
            allowed = (clean[n] == 0) | region
            if fates[0] < noise.drop:
                continue
            if fates[1] < noise.dilate:
                region = _dilate(region, noise.radius)
            elif fates[1] < noise.dilate + noise.erode:
                region = _erode(region, noise.radius)
            if fates[2] < noise.shift:
                offset += offset >= side * side // 2  # skip (0, 0), the centre of the offset grid
                region = _shifted(region, offset // side - noise.max_shift, offset % side - noise.max_shift)
            if fates[3] < noise.flip:
                # a uniform class among the other digits: 1..C-1 without ``label``
                label = other + (other >= label)
            noisy[n][region & allowed & (noisy[n] == 0)] = label
    return torch.from_numpy(noisy)


@dataclass
class SceneStyle:
    """An imaging style for a domain-shifted copy of the scenes (see :func:`apply_scene_style`).

    Args:
        contrast: factor on every pixel's intensity (the digits' contrast to the background).
        brightness: added to every pixel after the contrast (a brighter background).
        blur: standard deviation in pixels of a Gaussian blur applied first (0: none).
        texture: amplitude of a sinusoidal grating added to every image (0: none).
        texture_period: the grating's period in pixels.
        seed: seed of the gratings' orientations and phases (one per image).

    In YAML (LightningCLI)::

        data:
          test_style: {contrast: 0.6, brightness: 0.25, blur: 0.7, texture: 0.15, texture_period: 3}
    """

    contrast: float = 1.0
    brightness: float = 0.0
    blur: float = 0.0
    texture: float = 0.0
    texture_period: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.contrast <= 0:
            raise ValueError(f"SceneStyle: contrast must be > 0 (a factor on the intensities), got {self.contrast}.")
        if self.blur < 0 or self.texture < 0:
            raise ValueError(f"SceneStyle: blur and texture must be ≥ 0, got blur={self.blur}, texture={self.texture}.")
        if self.texture_period < 2:
            raise ValueError(
                f"SceneStyle: texture_period must be at least 2 pixels (shorter periods alias), got {self.texture_period}."
            )


def apply_scene_style(images: Tensor, style: SceneStyle) -> Tensor:
    """``images`` ``(N, C, H, W)`` in [0, 1] rendered in ``style``: blurred, then
    ``brightness + contrast · x + texture · sin(2π (u cos θ + v sin θ) / period + φ)`` with a random
    ``θ`` and ``φ`` per image (seeded by ``style.seed``), clipped to [0, 1]. ``images`` is left unchanged.

    Example:
        >>> flat = apply_scene_style(torch.zeros(1, 1, 4, 4), SceneStyle(contrast=0.5, brightness=0.2))
        >>> flat.unique().tolist()
        [0.20000000298023224]
    """
    if images.dim() != 4:
        raise ValueError(f"apply_scene_style: images must be (N, C, H, W), got {tuple(images.shape)}.")
    styled = images.float()
    if style.blur > 0:
        # per image and channel: no blur across the batch or channel axes
        styled = torch.from_numpy(ndimage.gaussian_filter(styled.numpy(), sigma=(0, 0, style.blur, style.blur)))
    styled = style.brightness + style.contrast * styled
    if style.texture > 0:
        generator = torch.Generator().manual_seed(style.seed)
        angle, phase = (torch.rand(2, len(images), generator=generator) * 2 * torch.pi).view(2, -1, 1, 1, 1)
        v, u = torch.meshgrid(torch.arange(images.shape[2]), torch.arange(images.shape[3]), indexing="ij")
        along = u * angle.cos() + v * angle.sin()
        styled = styled + style.texture * torch.sin(2 * torch.pi * along / style.texture_period + phase)
    return styled.clamp(0.0, 1.0)


class DigitScenesDataModule(DictDataModule):
    """The segmentation scenario: digit scenes, optionally long-tailed and with noisy training masks.

    The digit images of the training, validation and test scenes come from disjoint pools: the
    train / val / test splits of :class:`~reglab.datamodules.DigitsDataModule` (seeded by
    ``split_seed``). Every training batch holds ``input`` ``(N, 1, H, W)`` float, ``target``
    ``(N, H, W)`` long (the noisy mask with ``mask_noise``), ``index``, ``instances`` ``(N, H, W)``
    long, ``instance_counts`` ``(N, 11)`` long and, with ``mask_noise``, ``clean_target`` (the mask
    before noise, for measuring only). Validation and test scenes are clean and their classes
    uniform; ``imbalance_ratio``, ``mask_noise`` and ``num_labelled`` apply to the training scenes
    only, ``test_style`` to the test scenes only (a shifted test domain; validation stays in the
    training domain, so model selection never sees the test style). After ``setup``,
    ``scenes[split]`` is the split's :class:`DigitScenes` (clean masks, the images before any
    style, and ``sources``: the positions of its digits in that split's pool).

    Args:
        canvas: side of the square scenes in pixels (32; 48 gives room for more digits).
        max_digits, min_digits: digits drawn per scene (uniform in between; see the module docstring).
        num_train, num_val, num_test: scenes per split.
        scale: upscaling of the 8×8 digits (1.5: 12×12 pixels; 2: 16×16, with ``canvas=48`` for four digits).
        imbalance_ratio: ``None`` (uniform classes) or the head/tail class frequency ratio of the
            training scenes' digits (:func:`long_tail_class_weights`).
        mask_noise: :class:`MaskNoise` for the training masks, or ``None``.
        num_labelled: ``None`` (every training scene labelled) or how many training scenes keep
            their masks (the first ones; the scenes are drawn at random, so a random subset): the
            masks of the others are all :data:`UNLABELLED`, their ``clean_target`` too. The
            training loader then draws each labelled scene ``(num_train − num_labelled) /
            num_labelled`` times per epoch (at least once; repeat factor sampling), so that on
            average half of every batch is labelled, as in FPGM's (UniMatch's) official code: one
            batch of labelled and one of unlabelled images per step, the labelled set repeated to
            the unlabelled set's size. An epoch is then about ``2 (num_train − num_labelled)``
            scenes. A technique that sets its own repeat factors replaces these.
        test_style: :class:`SceneStyle` of the test scenes (a domain-shifted test split), or ``None``.
        split_seed: seed of the digits' train/val/test pools (default ``seed``).
        val_fraction, test_fraction: share of each digit class in the validation / test pool.
        batch_size, num_workers, seed, eval_batch_size: as for every reglab DataModule
            (:class:`~reglab.datamodules.base.DictDataModule`); ``seed`` also seeds the scenes.

    Example:
        >>> data = DigitScenesDataModule(num_train=64, num_val=16, num_test=16, batch_size=8,
        ...                              mask_noise=MaskNoise(flip=0.3))
        >>> data.num_classes, data.input_shape
        (11, (1, 32, 32))
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch), tuple(batch["target"].shape)
        (['clean_target', 'index', 'input', 'instance_counts', 'instances', 'target'], (8, 32, 32))
    """

    num_classes = NUM_SCENE_CLASSES

    def __init__(
        self,
        canvas: int = 32,
        max_digits: int = 4,
        min_digits: int = 1,
        num_train: int = 1000,
        num_val: int = 200,
        num_test: int = 400,
        scale: float = 1.5,
        imbalance_ratio: Optional[float] = None,
        mask_noise: Optional[MaskNoise] = None,
        num_labelled: Optional[int] = None,
        test_style: Optional[SceneStyle] = None,
        split_seed: Optional[int] = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        name = type(self).__name__
        _check_layout(name, canvas, scale, min_digits, max_digits)
        for arg, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"{name}: {arg} must be at least 1 scene, got {value}.")
        if imbalance_ratio is not None and imbalance_ratio < 1.0:
            raise ValueError(
                f"{name}: imbalance_ratio is the head/tail class frequency ratio and must be ≥ 1, got {imbalance_ratio};"
                " use None for uniform classes."
            )
        if mask_noise is not None and not isinstance(mask_noise, MaskNoise):
            raise TypeError(f"{name}: mask_noise must be a MaskNoise (or None), got {type(mask_noise).__name__}.")
        if test_style is not None and not isinstance(test_style, SceneStyle):
            raise TypeError(f"{name}: test_style must be a SceneStyle (or None), got {type(test_style).__name__}.")
        if num_labelled is not None and not 1 <= num_labelled <= num_train:
            raise ValueError(
                f"{name}: num_labelled={num_labelled} must lie in [1, num_train={num_train}] (the labelled training"
                " scenes). Fix: lower it, or use None to label every training scene."
            )
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        self.canvas, self.scale = canvas, scale
        self.min_digits, self.max_digits = min_digits, max_digits
        self.num_scenes = {"train": num_train, "val": num_val, "test": num_test}
        self.imbalance_ratio = imbalance_ratio
        self.mask_noise = mask_noise
        self.num_labelled, self.test_style = num_labelled, test_style
        self.split_seed = seed if split_seed is None else split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.input_shape = (1, canvas, canvas)
        self.scenes: dict[str, DigitScenes] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        """Generates all three splits once; later calls do nothing."""
        if self.train_dataset is not None:
            return
        pools = DigitsDataModule(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.split_seed)
        pools.setup()
        weights = None if self.imbalance_ratio is None else long_tail_class_weights(self.imbalance_ratio)
        datasets: dict[str, DictDataset] = {}
        for offset, (split, pool) in enumerate(
            (("train", pools.train_dataset), ("val", pools.val_dataset), ("test", pools.test_dataset))
        ):
            scenes = make_digit_scenes(
                pool.inputs, pool.targets, self.num_scenes[split], canvas=self.canvas, min_digits=self.min_digits,
                max_digits=self.max_digits, scale=self.scale, class_weights=weights if split == "train" else None,
                seed=self.seed + offset,
            )
            extras: dict[str, Any] = {"instances": scenes.instances, "instance_counts": scenes.instance_counts}
            target, images = scenes.masks, scenes.images
            if split == "train" and self.mask_noise is not None:
                extras["clean_target"] = target
                target = apply_mask_noise(target, scenes.instances, self.mask_noise, self.num_classes)
            if split == "train" and self.num_labelled is not None:
                if "clean_target" in extras:  # nothing to measure on an unlabelled scene
                    extras["clean_target"] = _unlabel(extras["clean_target"], self.num_labelled)
                target = _unlabel(target, self.num_labelled)
            if split == "test" and self.test_style is not None:
                images = apply_scene_style(images, self.test_style)
            datasets[split] = DictDataset(images, target, extras)
            self.scenes[split] = scenes
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]
        if self.num_labelled is not None:
            unlabelled = self.num_scenes["train"] - self.num_labelled
            factors = torch.ones(self.num_scenes["train"], dtype=torch.float64)
            factors[: self.num_labelled] = max(1.0, unlabelled / self.num_labelled)
            self.set_train_repeat_factors(factors)


def _unlabel(masks: Tensor, num_labelled: int) -> Tensor:
    """A copy of ``masks`` whose scenes after the first ``num_labelled`` are all :data:`UNLABELLED`."""
    masks = masks.clone()
    masks[num_labelled:] = UNLABELLED
    return masks
