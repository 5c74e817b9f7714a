"""MFM — masked frequency modeling (Xie, Li, Zhai, Liu, Wang & Loy, ICLR 2023), and the base of
masked image modeling objectives.

Pretraining without labels: each training image ``x`` is corrupted by removing part of its 2-D
spectrum, the model sees the corrupted image and a decoder on its features predicts ``x``; the loss
is the distance between the prediction's and ``x``'s spectra on the removed frequencies only:

* mask (:func:`frequency_masks`): in the centred (``fftshift``-ed) spectrum, the frequencies within
  ``mask_radius`` of the centre form a disc; per image, a *low-pass* filter (keep the disc) is drawn
  with probability ``sample_ratio``, otherwise a *high-pass* one (keep the rest);
* corruption (:func:`frequency_corrupt`): ``clamp(real(ifft2(ifftshift(mask * fftshift(fft2 x)))))``;
* loss (:func:`frequency_loss`): ``|F(pred) - F(x)|`` per frequency (orthonormal FFT, the complex
  modulus: the official FrequencyLoss at ``loss_gamma = 1`` without the spectrum weight matrix), summed
  over the removed frequencies and channels and divided by the channels times the batch's removed
  frequencies ("masked" recovery target).

Source: the official code (github.com/Jiahao000/MFM: ``data/data_mfm.py`` FreqMaskGenerator,
``models/mfm.py`` frequency_transform and the "masked" recovery target its pretraining configs
set, ``models/frequency_loss.py``), whose defaults are kept: radius 16 at 224 px (``mask_radius``
is that fraction of the image side, 16/224, so it scales with the image), ``sample_ratio = 0.5``
(its ViT configs; its ResNet-50 config uses 0.3), corruption clamped to [0, 1] (its images are
in [0, 1] before normalisation: ``pixel_range``). Where this differs, and why:

* the decoder is one linear layer from the backbone's pooled features to every pixel, the official
  ResNet decoder (a 1x1 convolution to ``stride² x C`` channels and a pixel shuffle on the last
  feature map) for a backbone whose feature map is pooled to 1x1 (the task modules' backbones
  give pooled features); it is dropped after pretraining, as in the code;
* no ImageNet mean/std normalisation: the model sees the data as the DataModule gives it;
* the loss is returned per sample (sample i's masked sum over the batch's mean masked count and
  the channels), whose mean is the official scalar, so it is the module's task loss (labels are
  unused; the head stays as initialised, a probe or fine-tuning trains it).

Random masks come from torch's global generator, which reglab checkpoints (exact resume).
The decoder is a submodule of the module (``masked_modeling_decoder``), added at setup, so it is in
the optimizer, the checkpoint and DDP's gradient sync; a checkpoint names a restore hook that adds
it to a bare module. Two masked modeling techniques together are refused (both replace the task loss).

Method card: ``mfm.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import MFM
    >>> mfm = MFM(image_shape=(1, 8, 8), mask_radius=0.25)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.mixins import StepOutput
from reglab.technique import Technique

DECODER = "masked_modeling_decoder"  # the decoder's attribute on the module: its checkpoint keys start with it
CLEAN, MASK = "masked_modeling_clean", "masked_modeling_mask"  # batch keys of the clean images and the masks


def disc(height: int, width: int, radius: float) -> Tensor:
    """``(H, W)`` 1 where a centred spectrum's frequency lies within ``radius`` pixels of the centre
    ``(H // 2, W // 2)`` (strictly: the official ``>= r²`` is outside), else 0."""
    y = torch.arange(height).sub(height // 2).pow(2)[:, None]
    x = torch.arange(width).sub(width // 2).pow(2)[None, :]
    return ((y + x) < radius**2).float()


def frequency_masks(low_pass: Tensor, height: int, width: int, radius: float) -> Tensor:
    """``(N, 1, H, W)`` masks of kept frequencies (centred spectrum): the disc of ``radius`` pixels
    where ``low_pass`` (N,) is true, its complement elsewhere."""
    inside = disc(height, width, radius).to(low_pass.device)
    return torch.where(low_pass[:, None, None, None], inside, 1 - inside)


def frequency_corrupt(images: Tensor, masks: Tensor, pixel_range: tuple[float, float] | None) -> Tensor:
    """The images with the frequencies where ``masks`` is 0 removed (``masks``: centred spectrum)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    corrupted = torch.fft.ifft2(torch.fft.ifftshift(spectrum * masks, dim=(-2, -1))).real
    return corrupted.clamp(*pixel_range) if pixel_range else corrupted


def removed_mean(distance: Tensor, masks: Tensor) -> Tensor:
    """Per sample (N,): ``distance`` (N, C, H, W) summed over the entries where ``masks`` (N, 1, H, W)
    is 0, over ``C`` times the batch's mean number of such positions: the batch mean is the sum over
    every removed entry divided by their count (the official losses' normalisation)."""
    removed = 1 - masks
    return (distance * removed).sum((1, 2, 3)) / (removed.sum() / len(masks)).clamp_min(1) / distance.shape[1]


def frequency_loss(prediction: Tensor, target: Tensor, masks: Tensor) -> Tensor:
    """Per sample (N,): ``|F(pred) - F(target)|`` (orthonormal, centred spectra) on the removed
    frequencies (:func:`removed_mean`); the batch mean is the official masked FrequencyLoss."""
    def spectrum(images: Tensor) -> Tensor:
        return torch.fft.fftshift(torch.fft.fft2(images.float(), norm="ortho"), dim=(-2, -1))

    difference = spectrum(prediction) - spectrum(target)
    # the official sqrt(re² + im² + 1e-12): the epsilon keeps the gradient finite at a perfect match
    return removed_mean((difference.real.pow(2) + difference.imag.pow(2) + 1e-12).sqrt(), masks)


def add_decoder(module: nn.Module, width: int, pixels: int) -> nn.Module:
    """Register ``module.masked_modeling_decoder`` (Linear(width, pixels)), or return the one it has."""
    if not hasattr(module, DECODER):
        module.add_module(DECODER, nn.Linear(width, pixels))
    return getattr(module, DECODER)


def restore_decoder(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets the decoder,
    shaped as in the checkpoint, before the checkpoint's weights are loaded."""
    pixels, width = checkpoint["state_dict"][f"{DECODER}.weight"].shape
    add_decoder(module, width, pixels)


def without_decoder(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The module's own entries of a pretrained state dict: what a probe or fine-tuning loads."""
    return {key: value for key, value in state_dict.items() if not key.startswith(f"{DECODER}.")}


class MaskedImageModeling(Technique):
    """Corrupt each training image, predict the clean one from the features: a subclass gives the
    corruption (:meth:`corrupt`) and the per-sample loss (:meth:`reconstruction_loss`).

    Args:
        image_shape: ``(C, H, W)`` of one image; ``None``: the inputs are ``(N, C, H, W)`` images.
            Flat inputs (``(N, C*H*W)``, an MLP's) need it.
        export_path: at the end of the fit, the pretrained module's state dict without the decoder
            is saved there (relative: in the run's log folder, ``trainer.log_dir``, when it has one; a
            new file: an existing one is refused at setup), the
            ``pretrained_checkpoint`` a linear probe or full fine-tuning loads; ``None``: not saved
            (the run's own checkpoints hold the decoder too, for exact resume).
    """

    needs = frozenset({"features"})

    def __init__(self, image_shape: tuple[int, int, int] | None = None, export_path: str | None = None) -> None:
        if image_shape is not None and (len(image_shape) != 3 or min(image_shape) < 1):
            raise ValueError(f"{type(self).__name__}: image_shape is (C, H, W) of positive sizes, got {image_shape!r}")
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.export_path = export_path

    def corrupt(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(corrupted images, masks)`` of ``(N, C, H, W)`` images."""
        raise NotImplementedError

    def reconstruction_loss(self, prediction: Tensor, images: Tensor, masks: Tensor) -> Tensor:
        raise NotImplementedError

    def images(self, inputs: Tensor) -> Tensor:
        if self.image_shape is not None:
            if inputs[0].numel() != math.prod(self.image_shape):
                raise self.fail(f"inputs of shape {tuple(inputs.shape[1:])} are not images of shape {self.image_shape}",
                                "set image_shape to the (C, H, W) of one input")
            return inputs.reshape(len(inputs), *self.image_shape)
        if inputs.dim() != 4:
            raise self.fail(f"inputs of shape {tuple(inputs.shape)} are not (N, C, H, W) images",
                            "give image_shape (C, H, W) for flat inputs")
        return inputs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        width = getattr(getattr(pl_module, "backbone", None), "feature_dim", None)
        if width is None:
            raise self.fail("the module has no backbone with a feature_dim", "use a reglab task module (ClassificationModule)")
        shape = self.image_shape or getattr(trainer.datamodule, "input_shape", None) or pl_module.hparams.get("input_shape")
        if shape is None or len(shape) != 3:
            raise self.fail(f"the inputs are not (C, H, W) images (input shape {shape})",
                            "give image_shape (C, H, W) of one input")
        if stage == "fit" and self.export_path and self.exported(trainer).exists():
            raise self.fail(f"export_path {self.exported(trainer)} exists (nothing is overwritten)",
                            "choose a new export_path, or move the file away")
        add_decoder(pl_module, width, math.prod(shape))

    def exported(self, trainer: L.Trainer) -> Path:
        path = Path(self.export_path)
        return path if path.is_absolute() or not trainer.log_dir else Path(trainer.log_dir) / path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_path and trainer.is_global_zero:
            path = self.exported(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": without_decoder(pl_module.state_dict())}, path)

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        inputs = batch["input"]
        images = self.images(inputs)
        corrupted, masks = self.corrupt(images)
        return {**batch, "input": corrupted.to(inputs.dtype).reshape(inputs.shape), CLEAN: images, MASK: masks}

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        images = out.batch[CLEAN]
        prediction = getattr(module, DECODER)(out.features).reshape(images.shape)
        return self.reconstruction_loss(prediction.float(), images.float(), out.batch[MASK])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        add_restore_hook(checkpoint, "reglab.callbacks.self_supervised.mfm:restore_decoder")


class MFM(MaskedImageModeling):
    """Masked frequency modeling (module docstring).

    Args:
        image_shape: see :class:`MaskedImageModeling`.
        mask_radius: radius of the low-frequency disc as a fraction of the image side (official:
            16 px at 224 px).
        sample_ratio: probability of a low-pass mask per image (official ViT configs: 0.5).
        pixel_range: the corrupted images are clamped to it (official: [0, 1]); ``None``: no clamp.
        export_path: see :class:`MaskedImageModeling`.
    """

    name = "mfm"

    def __init__(self, image_shape: tuple[int, int, int] | None = None, mask_radius: float = 16 / 224,
                 sample_ratio: float = 0.5, pixel_range: tuple[float, float] | None = (0.0, 1.0),
                 export_path: str | None = None) -> None:
        super().__init__(image_shape, export_path)
        if mask_radius <= 0:
            raise ValueError(f"MFM: mask_radius (a fraction of the image side) must be > 0, got {mask_radius}")
        if not 0 <= sample_ratio <= 1:
            raise ValueError(f"MFM: sample_ratio (the probability of a low-pass mask) is in [0, 1], got {sample_ratio}")
        self.mask_radius, self.sample_ratio = mask_radius, sample_ratio
        self.pixel_range = tuple(pixel_range) if pixel_range is not None else None

    def corrupt(self, images: Tensor) -> tuple[Tensor, Tensor]:
        height, width = images.shape[-2:]
        low_pass = torch.rand(len(images), device=images.device) < self.sample_ratio
        masks = frequency_masks(low_pass, height, width, self.mask_radius * min(height, width))
        return frequency_corrupt(images, masks, self.pixel_range), masks

    def reconstruction_loss(self, prediction: Tensor, images: Tensor, masks: Tensor) -> Tensor:
        return frequency_loss(prediction, images, masks)
