"""Synthetic label noise for the training split, following the protocols of the noisy-label papers.

Three kinds, each the convention of the official code that introduced it:

* ``symmetric`` — ELR (Liu et al., 2020, github.com/shengliu66/ELR, ``data_loader/cifar10.py``,
  ``symmetric_noise``): a seeded permutation picks ``round(rate · N)`` samples and each gets a label
  drawn uniformly from *all* classes, so some keep their true label and the fraction of labels that
  actually change is ``rate · (C − 1) / C``. With ``include_true_label=False`` the new label is drawn
  from the other ``C − 1`` classes instead and exactly ``round(rate · N)`` labels change. (ELR's
  loop takes every ``i < rate · N``, i.e. ``ceil(rate · N)`` samples; this equals ``round`` whenever
  ``rate · N`` is whole, as in all of its settings, without ``ceil``'s float surprises such as
  ``ceil(0.7 · 10) == 8``.)
* ``asymmetric`` — Patrini et al. (2017) ``multiclass_noisify`` as used by ELR for CIFAR-100: each
  sample whose class ``c`` is a key of ``class_map`` independently becomes ``class_map[c]`` with
  probability ``rate``; other classes never change. (ELR's CIFAR-10 loader instead flips exactly
  ``ceil(rate · n_c)`` samples of each mapped class; the expected noise is the same.)
* ``pairflip`` — Co-teaching (Han et al., 2018, ``noisify_pairflip``): every sample of class ``c``
  becomes ``(c + 1) mod C`` with probability ``rate``.

Example:
    >>> import torch
    >>> clean = torch.arange(10).repeat(100)
    >>> noisy = apply_label_noise(clean, 10, LabelNoise(kind="pairflip", rate=0.3, seed=1))
    >>> bool(((noisy == clean) | (noisy == (clean + 1) % 10)).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

NoiseKind = Literal["symmetric", "asymmetric", "pairflip"]

# Patrini et al. (2017), MNIST: 2→7, 3→8, 5↔6, 7→1 (digits that look alike).
MNIST_ASYMMETRIC_MAP: dict[int, int] = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}

# ELR / Patrini CIFAR-10: truck→automobile, bird→airplane, deer→horse, cat↔dog.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# ELR / Patrini CIFAR-100: within each block of 5 consecutive class ids, c → the next one, cyclically.
# The official code uses blocks of ids rather than the true superclasses; this mirrors it.
CIFAR100_ASYMMETRIC_MAP: dict[int, int] = {c: c - c % 5 + (c + 1) % 5 for c in range(100)}


@dataclass
class LabelNoise:
    """Which label noise to apply to the training split (see the module docstring for each convention).

    Args:
        kind: ``"symmetric"``, ``"asymmetric"`` or ``"pairflip"``.
        rate: noise rate in [0, 1]; its meaning per kind is in the module docstring.
        class_map: for ``"asymmetric"`` only: true class → noisy class. ``None`` lets the DataModule
            use its dataset's standard map (e.g. :data:`MNIST_ASYMMETRIC_MAP` for digits).
        seed: seed of the noise, independent of the split and shuffle seeds.
        include_true_label: for ``"symmetric"`` only: whether the uniformly drawn label may be the
            true one (ELR's convention).

    In YAML (LightningCLI)::

        data:
          label_noise: {kind: asymmetric, rate: 0.3}
    """

    kind: NoiseKind = "symmetric"
    rate: float = 0.4
    class_map: Optional[dict[int, int]] = None
    seed: int = 0
    include_true_label: bool = True

    def __post_init__(self) -> None:
        if self.kind not in get_args(NoiseKind):
            raise ValueError(f"LabelNoise: unknown kind {self.kind!r}; use one of {get_args(NoiseKind)}.")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"LabelNoise: rate must lie in [0, 1], got {self.rate}.")
        if self.class_map is not None and self.kind != "asymmetric":
            raise ValueError(
                f"LabelNoise: class_map only applies to kind='asymmetric', got kind={self.kind!r};"
                " remove class_map or set kind: asymmetric."
            )

    def check_num_classes(self, num_classes: int) -> None:
        """Raises ``ValueError`` when this noise cannot apply to ``num_classes`` classes."""
        if num_classes < 2:
            raise ValueError(f"LabelNoise: label noise needs at least 2 classes, got num_classes={num_classes}.")
        if self.class_map is None:
            return
        out_of_range = sorted(
            {c for pair in self.class_map.items() for c in pair if not 0 <= c < num_classes}
        )
        if out_of_range:
            raise ValueError(
                f"LabelNoise: class_map uses classes {out_of_range} outside [0, {num_classes});"
                f" keys and values must be class ids of this {num_classes}-class dataset."
            )


def apply_label_noise(targets: Tensor, num_classes: int, noise: LabelNoise) -> Tensor:
    """Returns a noisy copy of ``targets`` (1-D long); ``targets`` itself is left unchanged.

    The result depends only on ``targets``, ``num_classes`` and ``noise`` (its ``seed`` included),
    never on the global RNG.

    Raises:
        ValueError: asymmetric noise without a ``class_map``, or a map/class count that do not fit.
    """
    noise.check_num_classes(num_classes)
    generator = torch.Generator().manual_seed(noise.seed)
    if noise.kind == "symmetric":
        return _symmetric_noise(targets, num_classes, noise, generator)
    if noise.kind == "asymmetric":
        if noise.class_map is None:
            raise ValueError(
                "apply_label_noise: kind='asymmetric' needs a class_map (true class → noisy class);"
                " pass LabelNoise(kind='asymmetric', class_map={...})."
            )
        noisy_class_of = torch.arange(num_classes)
        noisy_class_of[list(noise.class_map)] = torch.tensor(list(noise.class_map.values()))
    else:
        noisy_class_of = (torch.arange(num_classes) + 1) % num_classes
    flipped = torch.rand(len(targets), generator=generator) < noise.rate
    return torch.where(flipped, noisy_class_of[targets], targets)


def _symmetric_noise(targets: Tensor, num_classes: int, noise: LabelNoise, generator: torch.Generator) -> Tensor:
    num_noisy = round(noise.rate * len(targets))
    chosen = torch.randperm(len(targets), generator=generator)[:num_noisy]
    if noise.include_true_label:
        new_labels = torch.randint(num_classes, (num_noisy,), generator=generator)
    else:
        # A shift in [1, C) guarantees a different class and is uniform over the other C − 1.
        shift = torch.randint(1, num_classes, (num_noisy,), generator=generator)
        new_labels = (targets[chosen] + shift) % num_classes
    noisy = targets.clone()
    noisy[chosen] = new_labels
    return noisy
