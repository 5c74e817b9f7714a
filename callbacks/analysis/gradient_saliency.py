"""Gradient saliency (Simonyan, Vedaldi and Zisserman, 2014): the largest absolute gradient of the class
score over the input's channels, logged while the model trains; NormGrad's baseline row.

The map is TorchRay's ``gradient_to_saliency`` (``max_c |d score / d x|``), see
:mod:`reglab.callbacks.analysis.saliency`.

Example:
    >>> from reglab.callbacks.analysis import GradientSaliency
    >>> GradientSaliency(every_n_epochs=5).layers
    ['input']
"""

from __future__ import annotations

from collections.abc import Sequence

from reglab.callbacks.analysis.saliency import INPUT, SaliencyMaps


class GradientSaliency(SaliencyMaps):
    """Logs the input-gradient maps of a few validation images every ``every_n_epochs`` epochs (see
    :class:`SaliencyMaps`)."""

    name = "gradient_saliency"
    method = "gradient"

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, image_shape: Sequence[int] | None = None) -> None:
        super().__init__(layers=(INPUT,), every_n_epochs=every_n_epochs, num_images=num_images, image_shape=image_shape)
