"""FPGM — Frequency Prior Guided Matching for semi-supervised segmentation under domain shift (paper 38).

FPGM's observation: the amplitude spectrum of the edge regions of labelled objects (polyps) has
a radial profile that varies little across datasets, while the style of an imaging centre
(colour, contrast, texture) lives in the amplitude and the structure in the phase. It learns that
profile from the labelled images and pulls the amplitude of unlabelled images towards it, phase
kept, and trains the model to segment the perturbed image as it segments the original:

1. **Frequency prior** (every step, from the batch's labelled images): the edge region of each
   mask — the Sobel gradient magnitude of the label map, dilated by a ``dilation``×``dilation``
   max-pool, above 0.5 — cuts the grey image (ITU-R 601 weights for 3 channels, the channel mean
   otherwise); its centred orthonormal FFT amplitude ``|F|`` is averaged over each integer radius
   ``r = ⌊√(dy² + dx²)⌋ < R = min(H, W) // 2`` from the centre ``(H // 2, W // 2)``: the radial
   profile :func:`radial_profile`. The batch's mean profile updates an EMA, the prior ``P``
   (``momentum`` 0.999; the first batch sets it).
2. **Perturbation** (:func:`frequency_prior_perturbation`, per image and channel): with the
   image's own radial profile ``p`` and its energy ``E = Σ_r p(r)``,

       p' = E · ((1 − γ) · p / E + γ · P / Σ_r P(r))

   and the perturbed amplitude is ``p'`` read at every frequency's radius (radii ``≥ R``, the
   corners, take ``p'(R − 1)``); with the image's phase ``φ``, the image becomes
   ``Re IFFT(p'(r) · e^{iφ})``. ``γ = 0`` (or no prior yet) leaves the image unchanged.
3. **Consistency** (the unlabelled images): the prediction on the perturbed image is trained
   towards the pseudo label ``argmax`` of the step's own prediction on the original (detached),
   on the pixels whose confidence is at least ``threshold``, with the Dice loss of the official
   code (per class over the kept pixels of the batch, ``1 − (2 Σ s·y + ε) / (Σ s² + Σ y² + ε)``,
   ``ε = 1e-5``, averaged over the classes, background included), weighted by ``weight``.

Source followed: the official code (github.com/ant1dote/FPGM, ``FPGM_code/poly_freq_prior.py``,
class ``FreqPerturbation`` and its training loop; the same file in gge12/FPGM) with its defaults:
``gamma = 0.05``, ``momentum = 0.999``, dilation 3, confidence threshold 0.95
(``conf_thresh_high`` of ``configs/kvasir.yaml``), loss weight 0.5. Where code and text differ:
the paper speaks of aligning the unlabelled images' amplitude spectra with the prior; the code
replaces the whole amplitude by a radially symmetric one (the image's own radial profile blended
with the prior's), so even at ``P`` equal to the image's own profile the perturbation also
discards the amplitude's orientation detail — the code is followed (the identity holds at
``γ = 0`` and for images whose amplitude is already radially symmetric). There is no
low-frequency band of a size ``β`` as in FDA: every radius below ``R`` is blended. The code
trains FPGM inside UniMatch (CutMix strong views and feature perturbation beside it, labelled
loss ``(CE + Dice) / 2``); here FPGM is the one technique, added to the task's own loss (the mean
pixel cross-entropy over the labelled images), and stacks with any other (e.g. ``MeanTeacher``).
The official code's prior comes from binary polyp masks; on multi-class label maps the same Sobel
rule marks every class boundary (pixels equal to the module's ``ignore_index`` count as
background there). Classification batches (labels ``(N,)``) have no masks: the whole image is the
edge region, and every sample is labelled (``unlabelled_only=False`` then applies the consistency
to every sample). Written by hand on ``torch.fft`` (no library has the method).

Under DDP the batch's profile sum and image count are all-reduced before the EMA update, so every
rank holds the same prior; the prior is the technique's state (``state_dict``), so a resumed run
continues it.

Method card (what it does, when it helps, what it costs): ``fpgm.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import FPGM
    >>> fpgm = FPGM(gamma=0.05, momentum=0.999, threshold=0.95, weight=0.5)
    >>> images = torch.rand(2, 1, 8, 8)
    >>> torch.allclose(frequency_prior_perturbation(images, torch.ones(4), gamma=0.0), images)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique

_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _radius_grid(height: int, width: int, device: torch.device) -> Tensor:
    """``(H, W)`` long: ``⌊√(dy² + dx²)⌋`` from the centre ``(H // 2, W // 2)`` of a centred spectrum."""
    y, x = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return ((y - height // 2).float().pow(2) + (x - width // 2).float().pow(2)).sqrt().long()


def radial_profile(amplitude: Tensor) -> Tensor:
    """``(..., R)``: the mean of a centred (``fftshift``-ed) ``(..., H, W)`` amplitude over each
    integer radius ``r < R = min(H, W) // 2`` (see the module docstring).

    Example:
        >>> amplitude = torch.zeros(4, 4)
        >>> amplitude[2, 2], amplitude[1, 2] = 3.0, 2.0   # the centre; one of the 8 at radius 1 (1 or √2 away)
        >>> radial_profile(amplitude)
        tensor([3.0000, 0.2500])
    """
    height, width = amplitude.shape[-2:]
    num_radii = min(height, width) // 2
    radius = _radius_grid(height, width, amplitude.device).flatten()
    inside = radius < num_radii
    values = amplitude.flatten(-2)[..., inside]
    sums = values.new_zeros(*values.shape[:-1], num_radii).index_add_(-1, radius[inside], values)
    return sums / torch.bincount(radius[inside], minlength=num_radii).to(values.dtype)


def centred_amplitude(images: Tensor) -> tuple[Tensor, Tensor]:
    """``(|F|, angle F)`` of the orthonormal 2-D FFT ``F`` of ``(..., H, W)`` images, in fp32;
    the amplitude centred (``fftshift``), the phase not."""
    spectrum = torch.fft.fft2(images.float(), norm="ortho")
    return torch.fft.fftshift(spectrum.abs(), dim=(-2, -1)), spectrum.angle()


def frequency_prior_perturbation(images: Tensor, prior: Tensor, gamma: float, eps: float = 1e-6) -> Tensor:
    """``(N, C, H, W)`` images with each channel's amplitude replaced by its radial profile blended
    with the ``prior`` profile by ``gamma``, energy and phase kept (the formula in the module
    docstring); fp32. A prior of another length is cut to the shorter of the two, as the official
    code does."""
    if gamma == 0:
        return images
    height, width = images.shape[-2:]
    amplitude, phase = centred_amplitude(images)
    own = radial_profile(amplitude)
    radii = min(len(prior), own.shape[-1])
    energy = own.sum(-1, keepdim=True)
    prior = prior[:radii].to(own.device, own.dtype)
    blended = energy * ((1 - gamma) * own[..., :radii] / (energy + eps) + gamma * prior / (prior.sum() + eps))
    radius = _radius_grid(height, width, images.device).clamp(max=radii - 1)
    perturbed = torch.fft.ifftshift(blended[..., radius], dim=(-2, -1))
    return torch.fft.ifft2(torch.polar(perturbed, phase), norm="ortho").real


def edge_regions(labels: Tensor, dilation: int = 3) -> Tensor:
    """``(N, H, W)`` bool: the Sobel gradient magnitude of the ``(N, H, W)`` label map (zero
    padding), dilated by a ``dilation``×``dilation`` max-pool, above 0.5.

    Example:
        >>> labels = torch.zeros(1, 6, 6, dtype=torch.long)
        >>> labels[0, :, 3:] = 1
        >>> edge_regions(labels, dilation=1)[0, 2].int().tolist()    # the step between columns 2 and 3
        [0, 0, 1, 1, 0, 1]
    """
    sobel_x = torch.tensor(_SOBEL_X, device=labels.device).view(1, 1, 3, 3)
    label_map = labels.float().unsqueeze(1)
    gradient = torch.cat([F.conv2d(label_map, sobel_x, padding=1), F.conv2d(label_map, sobel_x.mT, padding=1)], 1)
    magnitude = gradient.pow(2).sum(1, keepdim=True).sqrt()
    return F.max_pool2d(magnitude, dilation, stride=1, padding=dilation // 2)[:, 0] > 0.5


def dice_loss(probs: Tensor, pseudo_labels: Tensor, keep: Tensor, smooth: float = 1e-5) -> Tensor:
    """The official code's Dice loss: per class ``1 − (2 Σ s·y + ε) / (Σ s² + Σ y² + ε)`` over the
    kept positions of the batch, averaged over the classes. ``probs`` ``(N, C, ...)``,
    ``pseudo_labels`` and ``keep`` ``(N, ...)``.

    Example:
        >>> probs = torch.tensor([[[1.0, 0.5]], [[0.0, 0.5]]]).movedim(0, 1)    # (N=1, C=2, 2)
        >>> round(dice_loss(probs, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)).item(), 4)
        0.1556
    """
    one_hot = F.one_hot(pseudo_labels, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    kept = keep.unsqueeze(1).to(probs.dtype)
    dims = [0] + list(range(2, probs.dim()))
    intersection = (probs * one_hot * kept).sum(dims)
    score = (2 * intersection + smooth) / ((probs.pow(2) * kept).sum(dims) + (one_hot * kept).sum(dims) + smooth)
    return (1 - score).mean()


class FPGM(Technique):
    """Frequency-prior amplitude perturbation of unlabelled images and a Dice consistency to the
    model's confident predictions on the originals (see the module docstring).

    Args:
        gamma: weight of the prior in the blended amplitude profile (the official 0.05).
        momentum: of the prior's EMA (the official 0.999).
        dilation: side of the max-pool that widens the mask edges (the official 3; odd).
        threshold: pixels whose predicted confidence on the original is below it are left out of
            the consistency (the official ``conf_thresh_high`` 0.95).
        weight: of the consistency term (the official 0.5).
        unlabelled_only: the consistency runs on the images without a labelled pixel (all
            ``ignore_index``), as in the paper; ``False``: on every image (a fully labelled set).
        image_shape: ``[C, H, W]`` that flat ``(N, D)`` inputs unflatten to (e.g. ``[1, 8, 8]`` for
            flat digits); ``None`` for image batches ``(N, C, H, W)``.
    """

    name = "fpgm"
    stateful = True

    def __init__(
        self,
        gamma: float = 0.05,
        momentum: float = 0.999,
        dilation: int = 3,
        threshold: float = 0.95,
        weight: float = 0.5,
        unlabelled_only: bool = True,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"FPGM: gamma is the prior's weight in a blend and must lie in [0, 1], got {gamma}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"FPGM: momentum must lie in [0, 1), got {momentum}")
        if dilation < 1 or dilation % 2 == 0:
            raise ValueError(f"FPGM: dilation must be an odd number of pixels ≥ 1 (a centred max-pool), got {dilation}")
        if not 0.0 <= threshold <= 1.0 or weight < 0:
            raise ValueError(f"FPGM: threshold must lie in [0, 1] and weight be ≥ 0, got {threshold} and {weight}")
        if image_shape is not None and len(image_shape) != 3:
            raise ValueError(f"FPGM: image_shape must be [C, H, W], got {list(image_shape)}")
        self.gamma, self.momentum, self.dilation = gamma, momentum, dilation
        self.threshold, self.weight, self.unlabelled_only = threshold, weight, unlabelled_only
        self.image_shape = None if image_shape is None else tuple(int(size) for size in image_shape)
        self.prior: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        targets = getattr(getattr(trainer.datamodule, "train_dataset", None), "targets", None)
        if stage != "fit" or not self.unlabelled_only or not isinstance(targets, Tensor):
            return
        ignore_index = getattr(pl_module, "ignore_index", None)
        if targets.dim() < 3 or ignore_index is None or not (targets == ignore_index).flatten(1).all(1).any():
            raise self.fail(
                f"it trains on the unlabelled images (unlabelled_only=True), but every training image of"
                f" {type(trainer.datamodule).__name__} has labels, so it would do nothing",
                "use semi-supervised data (e.g. DigitScenesDataModule(num_labelled=100)), or set unlabelled_only:"
                " false to apply the consistency to every image",
            )

    def images(self, inputs: Tensor) -> Tensor:
        """The batch's inputs as ``(N, C, H, W)`` images."""
        if inputs.dim() == 4:
            return inputs
        if inputs.dim() == 2 and self.image_shape is not None:
            if inputs.shape[1] != self.image_shape[0] * self.image_shape[1] * self.image_shape[2]:
                raise self.fail(
                    f"the flat inputs have {inputs.shape[1]} features, which image_shape={list(self.image_shape)} does not hold",
                    "pass the image_shape [C, H, W] the inputs were flattened from",
                )
            return inputs.view(len(inputs), *self.image_shape)
        raise self.fail(
            f"it perturbs images, but the batch's inputs have shape {tuple(inputs.shape)}",
            "use (N, C, H, W) image batches, or pass image_shape=[C, H, W] for flat (N, D) inputs",
        )

    def update_prior(self, images: Tensor, labels: Tensor, labelled: Tensor, module: L.LightningModule) -> None:
        """One EMA step of the prior towards the mean edge-region profile of the labelled images,
        the same on every rank (their profile sums and counts are all-reduced)."""
        totals = images.new_zeros(min(images.shape[-2:]) // 2 + 1, dtype=torch.float32)
        if labelled.any():  # every rank reduces, with or without labelled images of its own
            chosen = images[labelled].float()
            grey = (chosen * chosen.new_tensor(_GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1) if chosen.shape[1] == 3 else chosen.mean(1)
            if labels.dim() == 3:
                label_map = labels[labelled]
                ignore_index = getattr(module, "ignore_index", None)
                if ignore_index is not None:
                    label_map = label_map.masked_fill(label_map == ignore_index, 0)
                grey = grey * edge_regions(label_map, self.dilation)
            profiles = radial_profile(centred_amplitude(grey)[0])
            totals = torch.cat([profiles.sum(0), profiles.new_tensor([len(profiles)])])
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[-1] == 0:
            return
        profile = totals[:-1] / totals[-1]
        if self.prior is None:
            self.prior = profile
            return
        radii = min(len(self.prior), len(profile))
        self.prior = self.momentum * self.prior[:radii].to(profile.device) + (1 - self.momentum) * profile[:radii]

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        inputs = out.batch["input"]
        images, labels = self.images(inputs), out.labels
        if labels.dim() == 3 and getattr(module, "ignore_index", None) is not None:
            labelled = (labels != module.ignore_index).flatten(1).any(1)
        else:
            labelled = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        with torch.no_grad():
            self.update_prior(images, labels, labelled, module)
        chosen = ~labelled if self.unlabelled_only else torch.ones_like(labelled)
        consistency = out.logits.new_zeros((), dtype=torch.float32)
        if self.prior is not None and chosen.any():
            with torch.no_grad():
                perturbed = frequency_prior_perturbation(images[chosen].detach(), self.prior, self.gamma)
                confidence, pseudo_labels = out.logits[chosen].detach().float().softmax(1).max(1)
            logits = module(perturbed.to(inputs.dtype).reshape(-1, *inputs.shape[1:]))
            consistency = dice_loss(logits.float().softmax(1), pseudo_labels, confidence >= self.threshold)
        return {"consistency": self.weight * consistency}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.prior is None else {"prior": self.prior.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prior = state_dict.get("prior")
