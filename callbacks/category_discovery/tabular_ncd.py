"""Tabular NCD (Troisemaine et al., DMKD 2024, "A Practical Approach to Novel Class Discovery in
Tabular Data"): the simple deep NCD model (PBN, projection-based NCD), then the novel classes
counted and clustered in its latent space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.discovery.tabular import CLUSTERINGS, Clustering, discovery_scores
from reglab.step import StepOutput
from reglab.tasks import DiscoveryModule
from reglab.technique import Technique

HEADS = "tabular_ncd_pbn"  # PBN's layers' attribute on the module: their checkpoint keys start with it


def projection_loss(known_logits: Tensor, target: Tensor, labelled: Tensor, reconstruction: Tensor, inputs: Tensor,
                    weight: float) -> Tensor:
    """PBN's loss per row, whose mean is ``w * CE + (1 - w) * MSE`` as in the official code: ``CE``
    the cross-entropy of the labelled rows over the known classes (their mean), ``MSE`` the squared
    reconstruction error summed over the features (its mean over every row, labelled or not).

    Example:
        >>> logits = torch.zeros(2, 2)  # CE of the labelled row: log 2
        >>> rows = projection_loss(logits, torch.tensor([0, -1]), torch.tensor([True, False]),
        ...                        torch.tensor([[1.0], [0.0]]), torch.zeros(2, 1), weight=0.5)
        >>> round(float(rows.mean()), 4)  # 0.5 * log 2 + 0.5 * (1 + 0) / 2
        0.5966
    """
    ce = F.cross_entropy(known_logits.float(), target.clamp_min(0), reduction="none") * labelled
    share = len(target) / labelled.sum().clamp_min(1)  # the labelled rows' mean, spread over every row
    mse = (reconstruction.float() - inputs.float()).pow(2).sum(-1)
    return weight * ce * share + (1 - weight) * mse


def mirrored_decoder(encoder: nn.Module, latent_dim: int, out_features: int) -> nn.Sequential:
    """The encoder's Linear widths in reverse, from the ``latent_dim``-d latent back to ``out_features``
    inputs (Linear-ReLU blocks, a plain Linear last), as the code mirrors its encoder."""
    hidden = [m.out_features for m in encoder.modules() if isinstance(m, nn.Linear)][::-1]
    layers: list[nn.Module] = []
    width = latent_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, out_features))


def add_heads(module: DiscoveryModule, latent_dim: int) -> nn.ModuleDict:
    """Register PBN's layers on the module as ``module.tabular_ncd_pbn`` (or return those it has):
    ``latent`` (a Linear from the backbone's features: the code's encoder ends in a linear layer),
    ``classifier`` (a Linear over the known classes) and ``decoder`` (:func:`mirrored_decoder`)."""
    if not hasattr(module, HEADS):
        known, inputs = module.hparams.num_known_classes, math.prod(module.hparams.input_shape)
        module.add_module(HEADS, nn.ModuleDict({
            "latent": nn.Linear(module.backbone.feature_dim, latent_dim), "classifier": nn.Linear(latent_dim, known),
            "decoder": mirrored_decoder(module.backbone, latent_dim, inputs)}))
    return getattr(module, HEADS)


def restore_heads(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets PBN's layers,
    shaped as in the checkpoint, before the checkpoint's weights are loaded."""
    add_heads(module, checkpoint["state_dict"][f"{HEADS}.latent.weight"].shape[0])


class TabularNCD(Technique):
    """PBN on :class:`~reglab.tasks.DiscoveryModule` for novel class discovery in tabular data, and
    the discovery at test time: the novel classes counted and clustered in its latent space.

    PBN's encoder is the module's backbone and a linear ``latent_dim``-d layer on its features, and
    the latent is L2-normalized; a linear classifier over the known classes and a decoder that
    mirrors the encoder read it (:func:`add_heads`: submodules of the module, ``tabular_ncd_pbn``, so
    they are in the optimizer, the checkpoints and DDP's gradient sync). Training replaces the
    module's loss (:func:`projection_loss`, logged as ``train/tabular_ncd/ce`` and ``.../mse``): the
    labelled rows' cross-entropy over the known classes weighted ``w``, and the reconstruction of
    every row, labelled or not, weighted ``1 - w``. PBN trains on the rows themselves, so the
    training batches' two views are replaced by the input; the module's own heads take no part.

    At the end of ``trainer.test`` (not in the fit's validation: the count estimate fits a k-means
    for every candidate ``k``), the L2-normalized latents of the unlabelled pool are clustered into
    ``num_novel`` clusters (``estimate_num_novel``: as many as
    :func:`~reglab.discovery.tabular.estimate_class_count`'s silhouette finds in ``k_min..k_max``;
    otherwise the data's own count) by ``clustering`` (``kmeans``, ``ncd_kmeans`` with the labelled
    rows' class centroids, or ``ncd_spectral``: :func:`~reglab.discovery.tabular.discover`). Logged:
    ``test/tabular_ncd/pool_acc_new`` (Hungarian accuracy of those clusters on the pool's novel
    classes, :class:`~reglab.metrics.ClusteringAccuracy`), ``test/tabular_ncd/num_novel`` (the
    count used) and ``test/tabular_ncd/num_novel_error`` (its distance to the true count). Every
    process computes the same clustering from the whole pool (the latents are recomputed from the
    DataModule's datasets, not gathered). Novel class discovery only: the pool must hold novel
    classes alone (``DiscoveryDataModule(mode="ncd")``).

    Follows the official code (github.com/ColinTr/PracticalNCD, ``models/PBN_model.py``, the
    notebooks): batches of 512 and AdamW there (the DataModule's batches and the module's optimizer
    here), ``w`` tuned per set (0.06 to 0.97 in its ``hyperparameters.json``; 0.5 by default here,
    :func:`~reglab.discovery.tabular.select_on_hidden_classes` tunes it on hidden known classes), the
    clustering k-means on the latent (the code's PBN default), ``k`` estimated in 2..30. The code's
    latent size is tuned per set (11 to 768); 16 by default here. One difference: the code clusters
    the unnormalized latent but estimates ``k`` on the normalized one; here both use the normalized
    latent, on which the model is trained.

    Args:
        w: the weight of the cross-entropy (``1 - w``: the reconstruction).
        latent_dim: the size of PBN's latent.
        clustering: ``"kmeans"``, ``"ncd_kmeans"`` or ``"ncd_spectral"``.
        estimate_num_novel: estimate the number of novel classes (else the data's count is used).
        k_min, k_max: the estimate's range.
        min_dist: the spectral graph's affinity on its longest spanning-tree edge.
        n_init: k-means restarts.
        seed: of the clustering.
        scored_classes: score ``pool_acc_new`` on the pool rows of these classes only (indices among the
            data's novel classes, ``0`` the first), the assignment of clusters to classes made on them
            alone: the hidden-class tuning passes its hidden classes, so no novel label is read.

    Example:
        >>> from reglab.datamodules import DiscoveryDataModule
        >>> data = DiscoveryDataModule("blobs", known_classes=[0, 1, 2], mode="ncd", batch_size=64)
        >>> module = DiscoveryModule("mlp", input_shape=data.input_shape, num_classes=data.num_classes,
        ...                          num_known_classes=data.num_known_classes)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[TabularNCD(k_max=5)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> (logged,) = trainer.test(module, datamodule=data, verbose=False)
        >>> 2 <= logged["test/tabular_ncd/num_novel"] <= 5
        True
    """

    name = "tabular_ncd"

    def __init__(self, w: float = 0.5, latent_dim: int = 16, clustering: Clustering = "kmeans",
                 estimate_num_novel: bool = True, k_min: int = 2, k_max: int = 30, min_dist: float = 0.6,
                 n_init: int = 10, seed: int = 0, scored_classes: Optional[Sequence[int]] = None) -> None:
        if not 0.0 <= w <= 1.0:
            raise self.fail(f"w {w} must lie in [0, 1]", "use e.g. 0.5, or tune it on hidden known classes")
        if latent_dim < 1:
            raise self.fail(f"latent_dim {latent_dim} must be at least 1", "use e.g. 16")
        if clustering not in CLUSTERINGS:
            raise self.fail(f"clustering {clustering!r} is not one of {list(CLUSTERINGS)}", "pick one")
        if not 2 <= k_min <= k_max:
            raise self.fail(f"the estimate's range {k_min}..{k_max} is empty or starts below 2 (the silhouette "
                            "needs two clusters)", "use e.g. the code's 2..30")
        if not 0.0 < min_dist < 1.0:
            raise self.fail(f"min_dist {min_dist} must lie in (0, 1)", "use e.g. the code's 0.6")
        self.w, self.latent_dim, self.clustering, self.estimate_num_novel = w, latent_dim, clustering, estimate_num_novel
        self.k_min, self.k_max, self.min_dist, self.n_init, self.seed = k_min, k_max, min_dist, n_init, seed
        self.scored_classes = None if scored_classes is None else [int(c) for c in scored_classes]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DiscoveryModule):
            raise self.fail(f"it needs a DiscoveryModule (its backbone, classifier and known-class count), got "
                            f"{type(pl_module).__name__}", "train a reglab.tasks.DiscoveryModule")
        mode = getattr(trainer.datamodule, "mode", None)
        if mode != "ncd" or not hasattr(trainer.datamodule, "pool_dataset"):
            raise self.fail(f"it discovers novel classes in a pool of novel classes only, and the DataModule is "
                            f"{type(trainer.datamodule).__name__} with mode {mode!r}",
                            "use DiscoveryDataModule(mode='ncd')")
        super().setup(trainer, pl_module, stage)
        add_heads(pl_module, self.latent_dim)

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        if "view1" not in batch:
            return batch
        return {**batch, "view1": batch["input"], "view2": batch["input"]}

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        views = out.extras["views"]
        if views == 1:  # an evaluation batch: the module's known-class cross-entropy
            return module.task_loss(out)
        heads = getattr(module, HEADS)
        labelled = out.extras["labelled"] & (out.target >= 0)
        inputs = out.batch["input"].flatten(1).repeat(views, 1)
        latent = F.normalize(heads["latent"](out.features), dim=-1)
        known_logits, reconstruction = heads["classifier"](latent), heads["decoder"](latent)
        rows = projection_loss(known_logits, out.target, labelled, reconstruction, inputs, self.w)
        # the module's heads are computed but untrained: a zero term keeps DDP from finding them unused
        rows = rows + 0.0 * (out.logits.sum() + out.extras["projections"].sum())
        if module._trainer is not None:
            ce = (F.cross_entropy(known_logits[labelled].float(), out.target[labelled]) if labelled.any()
                  else rows.new_zeros(()))
            mse = (reconstruction.float() - inputs.float()).pow(2).sum(-1).mean()
            module.log_dict({"train/tabular_ncd/ce": ce.detach(), "train/tabular_ncd/mse": mse.detach()},
                            on_step=False, on_epoch=True, batch_size=len(rows))
        return rows

    @torch.no_grad()
    def latents(self, module: DiscoveryModule, inputs: Tensor) -> np.ndarray:
        """PBN's L2-normalized latents of ``inputs``, in chunks, as float64 rows."""
        layer = getattr(module, HEADS)["latent"]
        features = [F.normalize(layer(module.backbone(chunk.to(module.device))).float(), dim=-1).cpu()
                    for chunk in inputs.split(1024)]
        return torch.cat(features).double().numpy()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data, known = trainer.datamodule, pl_module.hparams.num_known_classes
        pool, train = data.pool_dataset, data.train_dataset
        labelled, true_novel = train.extras["labelled"], (pool.extras["true_target"] - known).numpy()
        scored = None if self.scored_classes is None else np.isin(true_novel, self.scored_classes)
        scores = discovery_scores(
            self.latents(pl_module, pool.inputs), self.latents(pl_module, train.inputs[labelled]),
            train.targets[labelled].numpy(), true_novel, pl_module.hparams.num_classes - known, self.clustering,
            self.estimate_num_novel, scored, k_min=self.k_min, k_max=self.k_max, min_dist=self.min_dist,
            n_init=self.n_init, seed=self.seed)
        pl_module.log_dict({f"test/tabular_ncd/{name}": value for name, value in scores.items()})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        add_restore_hook(checkpoint, "reglab.callbacks.category_discovery.tabular_ncd:restore_heads")
