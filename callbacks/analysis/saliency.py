"""Backpropagation saliency at any named layer (Rebuffi, Fong, Ji and Vedaldi, CVPR 2020, "There and
Back Again: Revisiting Backpropagation Saliency Methods"): gradient, Grad-CAM and NormGrad, their
combination over layers, the class-sensitivity metric, and :class:`SaliencyMaps`, the callback that
logs the maps while a model trains (its techniques: ``gradient_saliency`` and ``normgrad``).

Every method reads, at a layer, its output activation ``x`` of shape ``(N, C, *spatial)`` and the
gradient ``g`` of the explained class score with respect to it, and reduces the channels to one
map of shape ``(N, *spatial)`` (the paper's phase 1 "virtual identity layer" then phase 2
"aggregation"):

* ``gradient``: ``max_c |g|`` (Simonyan et al.; TorchRay's ``gradient_to_saliency``); at the layer
  named ``"input"`` this is the plain image gradient;
* ``gradcam``: ``relu(sum_c mean_spatial(g_c) x_c)`` (Selvaraju et al.; TorchRay's
  ``gradient_to_grad_cam_saliency``);
* ``normgrad``: ``||g_u|| * ||x_u||`` at every location ``u``: the Frobenius norm of the gradient of
  a virtual 1x1 convolution inserted after the layer, ``x_u g_u^T``, whose norm is the product of
  the two vector norms (the official code's ``phase1='conv1x1', phase2='norm'``, written there as
  the norm of the outer product; TorchRay's ``gradient_to_norm_grad_saliency``, as here).

A combination over layers follows the official code (``resnet50_grid_saliency.py``): each map is
resized bilinearly to the input's size, scaled to [0, 1] per image (minus its minimum, over its
maximum) and the maps are multiplied. Class sensitivity is the paper's (Section 6): the Pearson
correlation between the maps of the highest- and the lowest-scoring class of the same image,
averaged over images; lower means more sensitive to the class explained. Written by hand: neither
torch nor torchmetrics has backprop saliency at a named layer (Captum has the gradient and
Grad-CAM but no NormGrad and is not a dependency); the correlation is torchmetrics'.

A flat activation ``(N, D)`` (an MLP's input or hidden layer) counts as one channel at ``D``
locations, so the gradient and NormGrad of a flat input are ``|g|`` and ``|g| |x|`` per feature;
such maps are images only through ``image_shape`` (e.g. ``(8, 8)`` for flat 8x8 digits).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    >>> images = torch.rand(2, 1, 8, 8)
    >>> maps = saliency_maps(model, images, torch.tensor([0, 2]), "normgrad", ["0", "input"])
    >>> [tuple(m.shape) for m in maps.values()]
    [(2, 8, 8), (2, 8, 8)]
    >>> combine(maps, (8, 8)).shape
    torch.Size([2, 8, 8])
    >>> class_correlation(model, images, "gradient", ["input"]).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.functional import pearson_corrcoef

from reglab.technique import Technique, TechniqueConfigError

#: the layer name that means the model's input (the virtual identity before the first layer)
INPUT = "input"


def _channels_first(tensor: Tensor) -> Tensor:
    """``(N, C, *spatial)`` as it is; a flat ``(N, D)`` as one channel at ``D`` locations."""
    return tensor.unsqueeze(1) if tensor.dim() == 2 else tensor


def gradient_map(activation: Tensor, gradient: Tensor) -> Tensor:
    """``max_c |g|``: the largest absolute gradient over the channels, ``(N, *spatial)``."""
    return _channels_first(gradient).abs().amax(dim=1)


def gradcam_map(activation: Tensor, gradient: Tensor) -> Tensor:
    """``relu(sum_c w_c x_c)`` with ``w_c`` the gradient's spatial mean of channel ``c``."""
    x, g = _channels_first(activation), _channels_first(gradient)
    weights = g.flatten(2).mean(-1).view(*g.shape[:2], *([1] * (g.dim() - 2)))
    return (weights * x).sum(dim=1).clamp_min(0)


def normgrad_map(activation: Tensor, gradient: Tensor) -> Tensor:
    """``||g_u|| ||x_u||``: the norm of the virtual 1x1 convolution's weight gradient at each location."""
    return _channels_first(gradient).norm(dim=1) * _channels_first(activation).norm(dim=1)


METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradient": gradient_map, "gradcam": gradcam_map, "normgrad": normgrad_map,
}


def check_method(owner: str, method: str) -> None:
    if method not in METHODS:
        raise TechniqueConfigError(f"{owner}: unknown saliency method {method!r}. Fix: use one of {sorted(METHODS)}.")


def block_names(model: nn.Module) -> list[str]:
    """The activated output of every convolution: the first ReLU after each ``Conv2d`` in module order
    (the small CNN's ``backbone.blocks.2``, ``.5``, ``.8``, at 8x8, 4x4 and 2x2 on the digits), the
    block outputs that the official code reads."""
    names, after_convolution = [], False
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            after_convolution = True
        elif after_convolution and isinstance(module, nn.ReLU):
            names.append(name)
            after_convolution = False
    return names


def check_layers(owner: str, model: nn.Module, layers: Sequence[str]) -> None:
    """Raise unless every name is ``"input"`` or a submodule of ``model`` (named as ``named_modules`` names it)."""
    if not layers:
        raise TechniqueConfigError(f"{owner}: no layer to read. Fix: name at least one layer, e.g. [{INPUT!r}].")
    known = dict(model.named_modules())
    missing = [name for name in layers if name != INPUT and name not in known]
    if missing:
        raise TechniqueConfigError(
            f"{owner}: the model has no layer(s) {missing}. Fix: use {INPUT!r} or names from the model's "
            f"named_modules(), e.g. its convolutions' activated outputs {block_names(model)[:6]}.")


def activations_and_gradients(
    model: nn.Module, inputs: Tensor, classes: Tensor, layers: Sequence[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """For each named layer, its output and the gradient of ``sum_i logits[i, classes[i]]`` with respect
    to it (each image's gradient is its own class score's: images do not mix in a forward pass
    unless the model mixes them, as batch norm in training mode does). ``model(inputs)`` must
    return the logits. Runs with gradients on even inside ``no_grad`` / ``inference_mode`` (the
    evaluation loops) and leaves the parameters' ``.grad`` untouched."""
    check_layers(type(model).__name__, model, layers)
    with torch.inference_mode(False), torch.enable_grad():
        # a clone made outside inference mode is an ordinary tensor that autograd can track
        inputs = inputs.detach().clone().requires_grad_(True)
        outputs: dict[str, Tensor] = {INPUT: inputs}
        modules = dict(model.named_modules())

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Tensor) -> None:
                outputs[name] = output
            return hook

        handles = [modules[name].register_forward_hook(keep(name)) for name in layers if name != INPUT]
        try:
            logits = model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        score = logits.gather(1, classes.detach().clone().view(-1, 1).to(logits.device)).sum()
        gradients = torch.autograd.grad(score, [outputs[name] for name in layers])
    return {name: (outputs[name].detach(), gradient.detach()) for name, gradient in zip(layers, gradients)}


def saliency_maps(model: nn.Module, inputs: Tensor, classes: Tensor, method: str,
                  layers: Sequence[str]) -> dict[str, Tensor]:
    """``{layer: (N, *spatial) map}`` of ``method`` explaining ``classes`` (one class index per image)."""
    check_method("saliency_maps", method)
    reduce = METHODS[method]
    return {name: reduce(x, g).float() for name, (x, g) in activations_and_gradients(model, inputs, classes, layers).items()}


def as_image(saliency: Tensor, size: Sequence[int]) -> Tensor:
    """One layer's map ``(N, *spatial)`` at the input's ``size`` ``(H, W)``: bilinear resize of a 2-D
    map; a flat map of ``H * W`` values is reshaped."""
    if saliency.dim() == 2:
        if saliency.shape[1] != size[0] * size[1]:
            raise TechniqueConfigError(
                f"saliency: a flat map of {saliency.shape[1]} values is not an image of {tuple(size)}. Fix: read "
                f"a convolutional layer or {INPUT!r}, or give the image_shape that the flat input unflattens to.")
        return saliency.view(-1, *size)
    return F.interpolate(saliency.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def normalize(saliency: Tensor) -> Tensor:
    """Each image's map minus its minimum, over its (new) maximum: values in [0, 1] (a constant map is 0)."""
    flat = saliency.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / flat.amax(1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)).view_as(saliency)


def combine(maps: dict[str, Tensor], size: Sequence[int]) -> Tensor:
    """The multi-layer map: every layer's map at ``size``, scaled to [0, 1] per image, multiplied."""
    combined = None
    for saliency in maps.values():
        scaled = normalize(as_image(saliency, size))
        combined = scaled if combined is None else combined * scaled
    if combined is None:
        raise TechniqueConfigError("saliency: no map to combine. Fix: name at least one layer.")
    return combined


def explain(model: nn.Module, inputs: Tensor, classes: Tensor, method: str, layers: Sequence[str],
            size: Sequence[int]) -> Tensor:
    """``(N, H, W)`` maps in [0, 1] of ``method`` at ``layers`` (combined when several) for ``classes``."""
    return combine(saliency_maps(model, inputs, classes, method, layers), size)


def class_correlation(model: nn.Module, inputs: Tensor, method: str, layers: Sequence[str],
                      size: Sequence[int] | None = None) -> Tensor:
    """The paper's class-sensitivity measure per image, ``(N,)``: the Pearson correlation between the
    maps explaining the highest- and the lowest-scoring class (lower: more class sensitive).
    ``size`` defaults to the input's last two dimensions. An image whose map is constant for either
    class has no correlation (NaN)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
        size = tuple(size or inputs.shape[-2:])
        top = explain(model, inputs, logits.argmax(1), method, layers, size).flatten(1)
        bottom = explain(model, inputs, logits.argmin(1), method, layers, size).flatten(1)
    finally:
        model.train(was_training)
    defined = (top.std(1) > 0) & (bottom.std(1) > 0)
    correlation = torch.full((len(inputs),), float("nan"))
    if defined.any():
        # torchmetrics correlates columns: one column per image
        found = pearson_corrcoef(top[defined].T.double(), bottom[defined].T.double())
        correlation[defined.cpu()] = found.reshape(-1).float().cpu()
    return correlation


class SaliencyMaps(Technique):
    """Logs saliency maps of a few validation images (and their class correlation) every N epochs.

    A subclass fixes what it explains (:class:`~reglab.callbacks.analysis.NormGrad`,
    :class:`~reglab.callbacks.analysis.GradientSaliency`). The first ``num_images`` images of the
    first validation batch are explained for their labels; at the end of every ``every_n_epochs``-th
    validation epoch (never in the sanity check) the maps go to every TensorBoard logger as an
    image grid ``<name>/maps`` (the images in the top row, their maps below) and
    ``val/<name>/class_correlation`` (mean over those images) is logged. It does not change
    training. ``image_shape`` (``(C, H, W)``) says how a flat input unflattens.
    """

    method: ClassVar[str]

    def __init__(self, layers: Sequence[str] = (INPUT,), every_n_epochs: int = 1, num_images: int = 8,
                 image_shape: Sequence[int] | None = None) -> None:
        check_method(type(self).__name__, self.method)
        if every_n_epochs < 1 or num_images < 1:
            raise TechniqueConfigError(f"{type(self).__name__}: every_n_epochs={every_n_epochs} and "
                                       f"num_images={num_images}. Fix: give positive integers.")
        if image_shape is not None and len(image_shape) != 3:
            raise TechniqueConfigError(f"{type(self).__name__}: image_shape={list(image_shape)}. Fix: give (C, H, W), "
                                       "e.g. [1, 8, 8] for flat 8x8 digits.")
        self.layers = list(layers)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self._batch: tuple[Tensor, Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_layers(type(self).__name__, pl_module, self.layers)
        input_shape = tuple(getattr(pl_module, "hparams", {}).get("input_shape") or ())
        if len(input_shape) == 1:
            self.image_size(torch.empty(1, *input_shape))  # flat inputs need image_shape: say so before training
        if stage == "fit" and not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            rank_zero_warn(f"{type(self).__name__}: the trainer has no TensorBoard logger, so the maps are not drawn "
                           f"(only val/{self.name}/class_correlation is logged). Fix: use `trainer.logger: "
                           "lightning.pytorch.loggers.TensorBoardLogger` (reglab fit's default).")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._batch = (batch["input"][: self.num_images], batch["target"][: self.num_images])

    def image_size(self, inputs: Tensor) -> tuple[int, int]:
        if inputs.dim() == 2:
            if self.image_shape is None:
                raise self.fail(f"the inputs are flat ({inputs.shape[1]} values), so the maps have no image shape",
                                "give image_shape, e.g. [1, 8, 8] for flat 8x8 digits")
            return self.image_shape[1], self.image_shape[2]
        return tuple(inputs.shape[-2:])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        inputs, targets = self._batch
        self._batch = None
        size = self.image_size(inputs)
        correlation = class_correlation(pl_module, inputs, self.method, self.layers, size)
        pl_module.log(f"val/{self.name}/class_correlation", correlation.nanmean().item(), sync_dist=True)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if loggers and trainer.is_global_zero:
            maps = explain(pl_module, inputs, targets, self.method, self.layers, size)
            images = normalize(inputs.float().view(len(inputs), -1, *size).mean(1))
            # one picture: the images side by side, each one's map under it
            grid = torch.cat([torch.cat(list(images), dim=-1), torch.cat(list(maps), dim=-1)], dim=-2)
            for logger in loggers:
                logger.experiment.add_image(f"{self.name}/maps", grid.unsqueeze(0).cpu(), global_step=trainer.global_step)
