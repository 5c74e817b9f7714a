"""Few-shot anomaly segmentation: a query's patches looked up in a dictionary of normal reference patches.

The score of a patch is how badly the dictionary reconstructs it: ``(1 - cos(q, r)) / 2`` between
the query patch ``q`` and what the lookup retrieves for it, ``r`` (DictAS's anomaly map). The
module's own lookup, :class:`NearestPatchLookup`, retrieves the nearest reference patch, so its
score is PatchCore's nearest-neighbour distance in cosine form: the plain module is the
training-free baseline. A technique replaces the lookup (:meth:`AnomalySegmentationModule.install_lookup`:
DictAS's learned sparse lookup); the module owns what every lookup shares: the frozen patch
features, the multi-scale maps, the loss on normal patches and the metrics.

What the baseline keeps of PatchCore (Roth et al., CVPR 2022): mid-level features of a frozen
pretrained network, a local 3×3 neighbourhood mean, the nearest neighbour in the whole memory of
the class's few normal images. What not: the coreset subsampling (the memory is a few hundred
patches here, all kept), the random projection and the Euclidean distance (cosine on normalised
features, the score DictAS reports its maps in), the re-weighting of the image score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone


def patch_scores(query: Tensor, retrieved: Tensor) -> Tensor:
    """``(1 - cos) / 2`` in [0, 1] along the last dim: 0 where the lookup gave the query back.

    Example:
        >>> patch_scores(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, 0.0]]))
        tensor([0., 1.])
    """
    return (1.0 - F.cosine_similarity(query.float(), retrieved.float(), dim=-1)) / 2


def normal_patch_loss(scores: Tensor, anomalous: Tensor) -> Tensor:
    """Per image ``(N,)``: the mean score of its normal patches (DictAS's query loss: a normal patch
    must be found in the dictionary). ``scores`` ``(N, h, w)``, ``anomalous`` ``(N, h, w)`` bool.

    Example:
        >>> normal_patch_loss(torch.tensor([[[0.2, 0.9]]]), torch.tensor([[[False, True]]]))
        tensor([0.2000])
    """
    normal = (~anomalous).float()
    return (scores * normal).flatten(1).sum(1) / (normal.flatten(1).sum(1) + 1e-6)


def patch_mask(target: Tensor, size: Sequence[int]) -> Tensor:
    """``(N, h, w)`` bool: the pixel mask ``(N, H, W)`` on the patch grid (bilinear, then > 0.5: the
    official code's rule)."""
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="bilinear", align_corners=True)[:, 0] > 0.5


def _resized(features: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear up to a finer grid, mean-pooled down to a coarser one."""
    if features.shape[-1] > size[-1]:
        return F.adaptive_avg_pool2d(features, size)
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class NearestPatchLookup(nn.Module):
    """``(query (N, L, C), dictionary (N, M, C)) -> (N, L, C)``: each query row's most cosine-similar
    dictionary row (a hard, one-hot lookup; no parameters).

    Example:
        >>> NearestPatchLookup()(torch.tensor([[[1.0, 0.1]]]), torch.tensor([[[0.0, 1.0], [3.0, 0.0]]]))
        tensor([[[3., 0.]]])
    """

    def forward(self, query: Tensor, dictionary: Tensor) -> Tensor:
        similarity = F.normalize(query.float(), dim=-1) @ F.normalize(dictionary.float(), dim=-1).transpose(1, 2)
        nearest = similarity.argmax(-1)
        return torch.gather(dictionary, 1, nearest[..., None].expand(-1, -1, dictionary.shape[-1]))


class AnomalySegmentationModule(RegularizedMixin, L.LightningModule):
    """Few-shot anomaly segmentation over frozen patch features (see the module docstring).

    A batch holds ``input`` ``(N, 1, H, W)`` queries, ``reference`` ``(N, K, 1, H, W)`` normal
    images of each query's class and ``target`` ``(N, H, W)`` (1 on anomalous pixels), as
    :class:`~reglab.datamodules.AnomalyScenesDataModule` gives them. Patch features are the
    backbone's encoder levels ``layers`` (a dense backbone with ``down`` blocks and ``pool``, the
    tiny U-Net), each L2-normalised over channels, the coarser ones upsampled to the finest
    chosen level's grid (or ``grid``) and concatenated (PatchCore's layer 2 + 3 features, without its
    random projection). For each ``pooling`` kernel (DictAS's ``scale_list`` [1, 3]: a ``k``×``k`` mean of
    the neighbourhood, zero-padded), the query's patches are looked up in its references' patches
    of that scale; the anomaly map is the mean of the scales' patch scores, upsampled bilinearly to
    the image. The backbone stays frozen and in eval mode: only the lookup trains. The module's own
    lookup is :class:`NearestPatchLookup` (no parameters, the nearest-neighbour baseline);
    DictAS installs a learned one.

    :meth:`forward_step` gives ``logits`` = the anomaly map ``(N, 1, H, W)``, ``target`` the mask,
    ``extras["patch_scores"]`` (a list over scales of ``(N, h, w)``) and
    ``extras["patch_anomalous"]`` ``(N, h, w)`` bool (the mask on the patch grid); :meth:`task_loss`
    is :func:`normal_patch_loss` summed over the scales (the official query loss). With a lookup
    without parameters (the nearest neighbour) nothing trains: the fit then skips its steps (no
    optimizer, ``training_step`` gives ``None``), so ``reglab fit`` runs the baseline too.

    Logs ``val/pixel_auroc``, ``test/pixel_auroc`` (torchmetrics' ``BinaryAUROC`` over every pixel of
    the split) and ``test/image_auroc`` (of each image's maximum score, against ``anomalous``).

    Args:
        input_shape: ``(1, H, W)``, filled from the DataModule by the ``reglab`` CLI.
        backbone, backbone_kwargs: the dense backbone (:func:`reglab.models.create_backbone`);
            a ``PretrainedWeights`` callback with ``prefixes: [backbone]`` loads a pretrained one
            (e.g. the segmentation U-Net of ``configs/experiment/clean_scenes.yaml``).
        layers: encoder levels whose features are the patches (0 is the first, full resolution).
        grid: side of the patch grid (``None``: the finest chosen level's); a finer level is mean-pooled
            to it, a coarser one upsampled. The lookup's cost grows with the square of the patch count.
        pooling: neighbourhood sizes (odd), one lookup per size.
        lr, betas: the Adam optimizer of the lookup (DictAS's code: 1e-4, betas (0.5, 0.999)).

    Example:
        >>> module = AnomalySegmentationModule(input_shape=(1, 32, 32))
        >>> batch = {"input": torch.rand(2, 1, 32, 32), "reference": torch.rand(2, 3, 1, 32, 32),
        ...          "target": torch.zeros(2, 32, 32, dtype=torch.long)}
        >>> tuple(module.forward_step(batch).logits.shape), module.feature_dim
        ((2, 1, 32, 32), 96)
    """

    provides = frozenset({"logits", "index"})

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        backbone: str = "unet",
        backbone_kwargs: dict[str, Any] | None = None,
        layers: Sequence[int] = (1, 2),
        grid: int | None = None,
        pooling: Sequence[int] = (1, 3),
        lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
    ) -> None:
        super().__init__()
        if input_shape is None:
            raise ValueError("AnomalySegmentationModule needs input_shape: pass it (datamodule.input_shape) or run "
                             "through `reglab`, which fills it from a reglab DataModule")
        if any(k < 1 or k % 2 == 0 for k in pooling) or not pooling:
            raise ValueError(f"AnomalySegmentationModule: pooling={list(pooling)}. Fix: list odd sizes such as [1, 3].")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, input_shape, **dict(backbone_kwargs or {}))
        blocks = getattr(self.backbone, "down", None)
        if blocks is None or not all(0 <= i < len(blocks) for i in layers) or not layers:
            raise ValueError(f"AnomalySegmentationModule: backbone {backbone!r} has no encoder levels {list(layers)}."
                             " Fix: use the 'unet' backbone and levels below its number of channel widths.")
        self.backbone.requires_grad_(False)
        self.layers, self.grid, self.pooling = sorted(layers), grid, tuple(pooling)
        with torch.no_grad():
            self.feature_dim = self.patch_features(torch.zeros(1, *input_shape)).shape[1]
        self.lookup: nn.Module = NearestPatchLookup()
        self.pixel_auroc = nn.ModuleDict({"val": BinaryAUROC(), "test": BinaryAUROC()})
        self.image_auroc = BinaryAUROC()

    def install_lookup(self, lookup: nn.Module) -> None:
        """Make ``lookup(query (N, L, C), dictionary (N, M, C)) -> (N, L, C)`` this module's dictionary
        lookup in place of the nearest patch (a technique calls it in ``setup``, before the optimizer is built)."""
        self.lookup = lookup.to(self.device)

    def train(self, mode: bool = True) -> AnomalySegmentationModule:
        super().train(mode)
        self.backbone.eval()  # frozen, BatchNorm statistics included
        return self

    def patch_features(self, x: Tensor) -> Tensor:
        """``(N, C, h, w)``: the chosen encoder levels, normalised, on one grid (``grid``, or the finest level's)."""
        levels, features = [], x
        for i, block in enumerate(self.backbone.down[: self.layers[-1] + 1]):
            features = block(features if i == 0 else self.backbone.pool(features))
            if i in self.layers:
                levels.append(F.normalize(features.float(), dim=1))
        size = levels[0].shape[-2:] if self.grid is None else (self.grid, self.grid)
        return torch.cat([_resized(f, size) for f in levels], dim=1)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        query, reference = batch["input"], batch["reference"]
        n, k = reference.shape[:2]
        with torch.no_grad():
            features = self.patch_features(torch.cat([query, reference.flatten(0, 1)]))
        grid = features.shape[-2:]
        scores = []
        for size in self.pooling:
            pooled = features if size == 1 else F.avg_pool2d(features, size, stride=1, padding=size // 2)
            tokens = pooled.flatten(2).transpose(1, 2)  # (N + N K, h w, C)
            queries, dictionary = tokens[:n], tokens[n:].reshape(n, k * tokens.shape[1], -1)
            scores.append(patch_scores(queries, self.lookup(queries, dictionary)).reshape(n, *grid))
        anomaly_map = torch.stack(scores).mean(0)[:, None]
        logits = F.interpolate(anomaly_map, size=query.shape[-2:], mode="bilinear", align_corners=False)
        extras = {"patch_scores": scores, "patch_anomalous": patch_mask(batch["target"], grid)}
        return StepOutput(logits=logits, target=batch["target"], index=batch.get("index"), batch=batch, extras=extras)

    def task_loss(self, out: StepOutput) -> Tensor:
        anomalous = out.extras["patch_anomalous"]
        return torch.stack([normal_patch_loss(scores, anomalous) for scores in out.extras["patch_scores"]]).sum(0)

    def trains_anything(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        if not self.trains_anything():
            return None  # a lookup without parameters: nothing to fit, Lightning skips the step
        return super().training_step(batch, batch_idx)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        scores, target = out.logits[:, 0].float(), out.target
        self.pixel_auroc[stage].update(scores.flatten(), target.flatten())
        self.log(f"{stage}/pixel_auroc", self.pixel_auroc[stage], on_epoch=True, batch_size=len(scores))
        if stage == "test":
            self.image_auroc.update(scores.flatten(1).amax(1), target.flatten(1).amax(1))
            self.log("test/image_auroc", self.image_auroc, on_epoch=True, batch_size=len(scores))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The anomaly maps ``(N, H, W)``."""
        return self.eval_forward(batch).logits[:, 0]

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            return None
        return torch.optim.Adam(trainable, lr=self.hparams.lr, betas=tuple(self.hparams.betas))


def anomaly_grid(model: AnomalySegmentationModule, datamodule: L.LightningDataModule, num_images: int = 6) -> Any:
    """A matplotlib figure of the first ``num_images`` anomalous test queries: per column the query, its
    first reference, the true mask and ``model``'s anomaly map (one colour scale, [0, max over the shown
    maps]). The ``fit`` claims protocol draws it per arm when a claim names it in ``figures``.

    Example:
        >>> from reglab.datamodules import AnomalyScenesDataModule
        >>> data = AnomalyScenesDataModule(num_train=4, num_val=2, num_test=8, shots=2, train_bank=2)
        >>> data.setup()
        >>> figure = anomaly_grid(AnomalySegmentationModule(input_shape=(1, 32, 32)), data, 2)
        >>> len(figure.axes)
        8
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = datamodule.test_dataset
    chosen = test.extras["anomalous"].nonzero().flatten()[:num_images]
    batch = {"input": test.inputs[chosen], "reference": test.extras["reference"][chosen], "target": test.targets[chosen]}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = model.forward_step({k: v.to(model.device) for k, v in batch.items()}).logits[:, 0].float().cpu()
    model.train(was_training)
    shown = {"query": batch["input"][:, 0], "reference": batch["reference"][:, 0, 0], "mask": batch["target"].float(),
             "anomaly map": maps}
    figure, axes = plt.subplots(len(shown), len(chosen), figsize=(1.4 * len(chosen), 6.0), squeeze=False)
    for row, (name, images) in zip(axes, shown.items()):
        row[0].set_ylabel(name)
        top = float(maps.max()) if name == "anomaly map" else 1.0
        for ax, image in zip(row, images):
            ax.imshow(image.numpy(), cmap="magma" if name == "anomaly map" else "gray", vmin=0.0, vmax=max(top, 1e-6))
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    return figure
