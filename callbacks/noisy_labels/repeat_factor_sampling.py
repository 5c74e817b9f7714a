"""RFS — repeat factor sampling (Gupta, Dollár, Girshick, LVIS, CVPR 2019; the long-tail baseline of paper 49).

Images that contain a rare class are repeated within an epoch. With ``f_c`` the fraction of
training images containing class ``c`` and a threshold ``t``:

    r_c = max(1, sqrt(t / f_c)),    r_i = max_{c in image i} r_c

and every epoch image ``i`` is drawn ``floor(r_i) + Bernoulli(frac(r_i))`` times (the stochastic
rounding of detectron2's ``RepeatFactorTrainingSampler``, whose ``repeat_factors_from_category_frequency``
this follows; LVIS v1 uses ``t = 0.001`` with 1203 classes). Only classes rarer than ``t`` are
repeated, so ``t`` is chosen for the data: the class default is LVIS's, and
``configs/technique/repeat_factor_sampling.yaml`` sets the value for reglab's ten-class digit data.

The technique changes no loss: in ``setup`` it computes the factors from the DataModule's
``train_instance_counts`` (per-image instance counts; the one-hot labels for classification data)
and hands them to ``set_train_repeat_factors``, so the training loader that Lightning requests
next uses :class:`reglab.datamodules.RepeatFactorSampler` (seeded epochs, exact mid-epoch resume,
DDP sharding). After the fit the DataModule is set back to uniform sampling.

Method card (what it does, when it helps, what it costs): ``repeat_factor_sampling.card.yaml``.

Example:
    >>> from reglab.callbacks import RepeatFactorSampling
    >>> rfs = RepeatFactorSampling(threshold=0.05)   # Trainer(callbacks=[rfs]) with a reglab DataModule
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.datamodules import repeat_factors_rfs
from reglab.technique import Technique


class RepeatFactorSampling(Technique):
    """Repeat factor sampling of the training set (see the module docstring for the formula).

    Args:
        threshold: the frequency ``t`` below which a class's images are repeated.
    """

    name = "repeat_factor_sampling"

    def __init__(self, threshold: float = 0.001) -> None:
        if not threshold > 0:
            raise ValueError(f"{type(self).__name__}: threshold must be > 0, got {threshold}")
        self.threshold = threshold

    def repeat_factors(self, image_class_counts: Tensor) -> Tensor:
        """The ``(N,)`` per-image factors from the ``(N, C)`` instance counts."""
        return repeat_factors_rfs(image_class_counts, self.threshold)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        other = next((cb for cb in trainer.callbacks if isinstance(cb, RepeatFactorSampling) and cb is not self), None)
        if other is not None:
            raise self.fail(
                f"both it and {type(other).__name__} set the training sampler's repeat factors, and only one"
                " sampler draws the training set",
                "keep one of the two sampling techniques",
            )
        datamodule = trainer.datamodule
        if not (callable(getattr(datamodule, "set_train_repeat_factors", None))
                and hasattr(type(datamodule), "train_instance_counts")):
            raise self.fail(
                f"it resamples the training set through the DataModule, but {type(datamodule).__name__} has no"
                " `train_instance_counts` and `set_train_repeat_factors`",
                "fit with a reglab DataModule (any subclass of reglab.datamodules.DictDataModule), passed"
                " as trainer.fit(model, datamodule=...)",
            )
        factors = self.repeat_factors(datamodule.train_instance_counts)
        if trainer.world_size > 1:
            # every rank must deal its share of one and the same epoch list; all ranks decide together
            same = torch.equal(trainer.strategy.broadcast(factors, src=0), factors)
            if not trainer.strategy.reduce_boolean_decision(same, all=True):
                raise self.fail(
                    "the DataModule's training set differs between DDP ranks (its repeat factors do), so the ranks'"
                    " shards would overlap and miss samples",
                    "build the training split deterministically (seeded) on every rank",
                )
        datamodule.set_train_repeat_factors(factors)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and callable(getattr(trainer.datamodule, "set_train_repeat_factors", None)):
            trainer.datamodule.set_train_repeat_factors(None)
