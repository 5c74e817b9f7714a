"""Nearest-neighbour anomaly segmentation (PatchCore-style, no training): the baseline of DictAS.

A query patch's score is its distance to the nearest patch of the normal references: the lookup
retrieves, for each query patch, the reference patch of highest cosine similarity, so the
module's score ``(1 - cos) / 2`` is the cosine nearest-neighbour distance. What is kept from
PatchCore (Roth et al., CVPR 2022): mid-level features of a frozen pretrained network, a local
3×3 neighbourhood mean, the nearest neighbour in the whole memory of the class's few normal
images. What is not: the coreset subsampling (the memory is a few hundred patches here, so all
are kept), the random projection and the Euclidean distance (cosine on normalised features, the
score DictAS reports its own maps in), and the re-weighting of the image score by the neighbour's
neighbourhood. The pooling sizes and layers are the anomaly module's, shared with DictAS.

Example:
    >>> import torch
    >>> lookup = NearestPatchLookup()
    >>> query, dictionary = torch.tensor([[[1.0, 0.1]]]), torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    >>> lookup(query, dictionary)
    tensor([[[3., 0.]]])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.technique import Technique


class NearestPatchLookup(nn.Module):
    """``(query (N, L, C), dictionary (N, M, C)) -> (N, L, C)``: each query row's most cosine-similar
    dictionary row (a hard, one-hot lookup; no parameters)."""

    def forward(self, query: Tensor, dictionary: Tensor) -> Tensor:
        similarity = F.normalize(query.float(), dim=-1) @ F.normalize(dictionary.float(), dim=-1).transpose(1, 2)
        nearest = similarity.argmax(-1)
        return torch.gather(dictionary, 1, nearest[..., None].expand(-1, -1, dictionary.shape[-1]))


def install_nearest_lookup(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook: a bare anomaly module loading a baseline checkpoint gets its lookup back."""
    module.install_lookup(NearestPatchLookup())


class NearestNeighbourAnomaly(Technique):
    """Score every query patch by its nearest normal reference patch (see the module docstring).

    Installs :class:`NearestPatchLookup` into an :class:`~reglab.tasks.AnomalySegmentationModule`;
    nothing trains, so a fit only passes over the data and the test measures the rule.

    Example:
        >>> from reglab.tasks import AnomalySegmentationModule
        >>> module = AnomalySegmentationModule(input_shape=(1, 32, 32))
        >>> NearestNeighbourAnomaly().install(module)
        >>> type(module.lookup).__name__, module.trains_anything()
        ('NearestPatchLookup', False)
    """

    name = "nearest_neighbour_anomaly"
    #: both install the module's one lookup
    conflicts_with = ("DictAS",)

    def install(self, module: L.LightningModule) -> None:
        if not callable(getattr(module, "install_lookup", None)):
            raise self.fail(f"{type(module).__name__} scores no patches against references",
                            "use reglab.tasks.AnomalySegmentationModule (configs/experiment/anomaly_scenes.yaml)")
        if not isinstance(module.lookup, NearestPatchLookup):
            module.install_lookup(NearestPatchLookup())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.install(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        add_restore_hook(checkpoint, f"{__name__}:install_nearest_lookup")
