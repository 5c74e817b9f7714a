"""NormGrad (Rebuffi, Fong, Ji and Vedaldi, CVPR 2020): saliency from the weight gradient of a virtual
1x1 convolution after each named layer, its maps combined over layers, logged while the model trains.

Official code: https://github.com/srebuffi/revisiting_saliency (``resnet50_grid_saliency.py``:
``phase1='conv1x1', phase2='norm'``, the layer combination by product of maps scaled to [0, 1]);
the maths and the other methods (Grad-CAM, gradient) are in :mod:`reglab.callbacks.analysis.saliency`.
The official code explains one image by backpropagating ``-score`` (its sign does not change a norm);
here a batch is explained in one pass, each image for its own class. The paper's meta-saliency
(one fine-tuning step before explaining) is not built.

Example:
    >>> from reglab.callbacks.analysis import NormGrad
    >>> normgrad = NormGrad(layers=["backbone.blocks.2", "backbone.blocks.5"], every_n_epochs=5)
    >>> normgrad.name, normgrad.method
    ('normgrad', 'normgrad')
    >>> NormGrad(method="gradcam").method   # Grad-CAM through the same callback
    'gradcam'
"""

from __future__ import annotations

from collections.abc import Sequence

from reglab.callbacks.analysis.saliency import INPUT, SaliencyMaps


class NormGrad(SaliencyMaps):
    """Logs NormGrad maps (or ``method="gradcam"`` / ``"gradient"`` at the same layers), combined over
    ``layers``, of a few validation images every ``every_n_epochs`` epochs (see :class:`SaliencyMaps`)."""

    name = "normgrad"

    def __init__(self, layers: Sequence[str] = (INPUT,), method: str = "normgrad", every_n_epochs: int = 1,
                 num_images: int = 8, image_shape: Sequence[int] | None = None) -> None:
        self.method = method
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, num_images=num_images, image_shape=image_shape)
