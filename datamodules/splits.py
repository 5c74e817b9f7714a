"""Seeded, stratified train/holdout splits for datasets that come as a single pool of samples."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def check_holdout_fractions(owner: str, **fractions: float) -> None:
    """Raises ``ValueError`` unless every fraction lies in (0, 1) and together they leave training samples.

    ``owner`` names the DataModule in the message; keywords are the argument names (``val_fraction=0.1``).
    """
    for name, fraction in fractions.items():
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{owner}: {name} must lie in (0, 1), got {fraction}.")
    if sum(fractions.values()) >= 1.0:
        listed = " + ".join(f"{name} ({fraction})" for name, fraction in fractions.items())
        raise ValueError(f"{owner}: {listed} must stay below 1 so that training samples remain.")


def stratified_split(targets: Tensor, holdout_fractions: Mapping[str, float], seed: int) -> dict[str, Tensor]:
    """Splits positions ``0..N-1`` per class: each holdout split takes ``round(fraction · n_c)`` of class ``c``.

    Returns a dict with a sorted long tensor of positions for ``"train"`` (the rest of every class)
    and for each key of ``holdout_fractions``, in that order of carving. Splits are disjoint and
    cover every position; the result depends only on ``targets`` and ``seed``.

    Example:
        >>> import torch
        >>> parts = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), {"val": 0.25}, seed=0)
        >>> len(parts["train"]), len(parts["val"])
        (6, 2)
    """
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {name: [] for name in ("train", *holdout_fractions)}
    for cls in targets.unique(sorted=True):
        members = (targets == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for name, fraction in holdout_fractions.items():
            count = round(fraction * len(members))
            parts[name].append(members[start : start + count])
            start += count
        parts["train"].append(members[start:])
    return {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}


def keep_at_most(positions: Tensor, count: int, seed: int) -> Tensor:
    """A seeded random subset of at most ``count`` of ``positions``, sorted (a loader's shuffle, not
    the subset's draw, decides the order).

    Example:
        >>> import torch
        >>> keep_at_most(torch.arange(10), 3, seed=0)
        tensor([1, 4, 7])
    """
    generator = torch.Generator().manual_seed(seed)
    return positions[torch.randperm(len(positions), generator=generator)[:count]].sort().values
