"""IRFS — instance-aware repeat factor sampling (Yaman, Mahmud, Liu, 2023, paper 49).

RFS (:mod:`reglab.callbacks.noisy_labels.repeat_factor_sampling`) measures a class's rarity by the
fraction of images that contain it only; two classes in equally many images get the same factor
however many instances each has. IRFS uses the geometric mean of the image frequency and the
instance frequency:

    f_img_c  = #{images containing c} / #images
    f_inst_c = #{instances of c} / #instances
    r_c = max(1, sqrt(t / sqrt(f_img_c * f_inst_c))),    r_i = max_{c in image i} r_c

with the same per-epoch stochastic rounding as RFS. No official code was found; the formula is
the paper's (its LVIS runs keep RFS's ``t = 0.001``), and the instance frequency is the share of
all instances, as the third-party mmdetection ``InstanceBalancedDataset`` computes it. On data with
one object per image (plain classification) both frequencies are equal and IRFS is RFS.

Method card (what it does, when it helps, what it costs): ``irfs.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import IRFS
    >>> irfs = IRFS(threshold=0.05)   # Trainer(callbacks=[irfs]) with a reglab DataModule
"""

from __future__ import annotations

from torch import Tensor

from reglab.callbacks.noisy_labels.repeat_factor_sampling import RepeatFactorSampling
from reglab.datamodules import repeat_factors_irfs


class IRFS(RepeatFactorSampling):
    """Instance-aware repeat factor sampling (see the module docstring for the formula); its
    ``threshold`` and its setup are :class:`RepeatFactorSampling`'s, only the class frequency differs."""

    name = "irfs"

    def repeat_factors(self, image_class_counts: Tensor) -> Tensor:
        return repeat_factors_irfs(image_class_counts, self.threshold)
