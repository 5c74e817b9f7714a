"""Training samplers: the resumable, rank-sharded shuffle and repeat factor sampling.

* :class:`ResumableSampler` — a shuffled, rank-sharded sampler that resumes in the middle of an
  epoch (the sampler of every reglab training loader, :class:`~reglab.datamodules.base.ResumableDataLoader`).
* :class:`RepeatFactorSampler` — the same contract, but sample ``i`` appears ``r_i`` times per
  epoch on average (repeat factor sampling, Gupta et al., LVIS, CVPR 2019).
* :func:`repeat_factors_rfs` / :func:`repeat_factors_irfs` — the repeat factors of RFS and of
  instance-aware RFS (Yaman et al. 2023, paper 49) from the ``(N, C)`` matrix of per-image
  instance counts.
* :class:`MPerClassSampler` — batches of ``m`` samples from each of ``batch_size / m`` classes, for
  metric-learning losses and miners.

The repeat factors, with ``t`` the threshold and ``n_ic`` the instances of class ``c`` in image ``i``:

    RFS   f_c = #{i : n_ic > 0} / N                         (fraction of images that contain c)
    IRFS  f_c = sqrt(f_img_c * f_inst_c),  f_img_c as RFS's f_c,  f_inst_c = sum_i n_ic / sum_ic n_ic
    both  r_c = max(1, sqrt(t / f_c)),     r_i = max_{c in i} r_c   (1 for an image with no instance)

RFS follows detectron2's ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``
(LVIS paper, appendix B.2). IRFS has no official code that we could find; its formula is the
paper's (the geometric mean of the image and the instance frequency in RFS's square root), and
the instance frequency is the class's share of all instances, as in the third-party mmdetection
``InstanceBalancedDataset``. With one instance per image (plain classification) both frequencies
are equal and IRFS is RFS.

Example:
    >>> import torch
    >>> counts = torch.tensor([[1, 0], [1, 0], [1, 0], [3, 1]])   # class 1 in one image of four
    >>> repeat_factors_rfs(counts, threshold=0.5)                  # f = (1, 1/4): r_1 = sqrt(2)
    tensor([1.0000, 1.0000, 1.0000, 1.4142], dtype=torch.float64)
    >>> sampler = RepeatFactorSampler(repeat_factors_rfs(counts, threshold=0.5), seed=0)
    >>> len(sampler)                                               # round(3 + sqrt(2)) samples per epoch
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """A shuffled, rank-sharded sampler that can resume in the middle of an epoch.

    It subclasses :class:`~torch.utils.data.DistributedSampler` on purpose: Lightning inserts its own
    distributed sampler under DDP only when the loader's sampler is not already one, so this one
    (and its resume state) survives. Epoch ``e`` is the permutation of a generator seeded with
    ``seed + e`` — exactly :class:`DistributedSampler`'s, padding included (``drop_last=False``).
    Lightning calls :meth:`set_epoch` at every epoch start. A subclass changes what an epoch holds
    by overriding :meth:`rank_indices` (and ``num_samples`` / ``total_size`` if its length differs).

    Args:
        data_source: the dataset, or its size.
        num_replicas: number of ranks; always explicit so no process group is needed.
        rank: this process's rank.
        shuffle: permute every epoch (else the order 0..N-1).
        seed: base seed of the permutations.

    Example:
        >>> sampler = ResumableSampler(10, num_replicas=2, rank=0, seed=0)
        >>> sampler.set_epoch(3)
        >>> full = list(sampler)
        >>> sampler.resume(epoch=3, samples_done_per_rank=2)
        >>> list(sampler) == full[2:], len(sampler)
        (True, 5)
    """

    def __init__(
        self,
        data_source: Union[Sized, int],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        dataset = range(data_source) if isinstance(data_source, int) else data_source
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume_epoch: Optional[int] = None
        self._samples_to_skip = 0

    def resume(self, epoch: int, samples_done_per_rank: int) -> None:
        """Makes the next iteration of ``epoch`` skip the first ``samples_done_per_rank`` indices of this rank.

        It applies once, and only if the epoch set by :meth:`set_epoch` is ``epoch`` when iteration
        starts; ``len()`` keeps the full per-rank length, so the resumed epoch just ends early.
        """
        if not 0 <= samples_done_per_rank <= self.num_samples:
            raise ValueError(
                f"{type(self).__name__}: samples_done_per_rank must lie in [0, {self.num_samples}] (samples per"
                f" rank), got {samples_done_per_rank}; the resume state does not belong to this dataset size or"
                " world size."
            )
        self._resume_epoch = epoch
        self._samples_to_skip = samples_done_per_rank

    def rank_indices(self) -> list[int]:
        """This rank's ``num_samples`` indices of the current epoch, in order."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()
        if self._resume_epoch == self.epoch:
            indices = indices[self._samples_to_skip :]
        self._resume_epoch = None
        return iter(indices)


def repeat_factors_rfs(image_class_counts: Tensor, threshold: float) -> Tensor:
    """RFS's per-image repeat factors ``(N,)`` from per-image instance counts ``(N, C)``.

    ``r_c = max(1, sqrt(threshold / f_c))`` with ``f_c`` the fraction of images containing class
    ``c``; an image gets the factor of its rarest class (1 if it contains none).
    """
    present = _checked_counts(image_class_counts, threshold, "repeat_factors_rfs") > 0
    return _image_factors(present, present.double().mean(0), threshold)


def repeat_factors_irfs(image_class_counts: Tensor, threshold: float) -> Tensor:
    """IRFS's per-image repeat factors ``(N,)`` from per-image instance counts ``(N, C)``.

    As :func:`repeat_factors_rfs`, with ``f_c = sqrt(f_img_c * f_inst_c)``: the geometric mean of
    the fraction of images containing ``c`` and the fraction of all instances that are of class ``c``.
    """
    counts = _checked_counts(image_class_counts, threshold, "repeat_factors_irfs").double()
    present = counts > 0
    instance_frequency = counts.sum(0) / counts.sum().clamp_min(1.0)
    return _image_factors(present, (present.double().mean(0) * instance_frequency).sqrt(), threshold)


def _checked_counts(counts: Tensor, threshold: float, where: str) -> Tensor:
    counts = torch.as_tensor(counts)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(
            f"{where}: image_class_counts must be an (N images, C classes) matrix with N ≥ 1, got shape"
            f" {tuple(counts.shape)}; pass one row of per-class instance counts per training image."
        )
    if counts.is_floating_point() and not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{where}: image_class_counts must be finite and non-negative (instance counts).")
    if not threshold > 0:
        raise ValueError(f"{where}: threshold must be > 0, got {threshold} (LVIS uses 0.001).")
    return counts


def _image_factors(present: Tensor, class_frequency: Tensor, threshold: float) -> Tensor:
    # a class in no image has frequency 0 and no image to repeat; its factor is never used
    class_factors = (threshold / class_frequency.clamp_min(1e-300)).sqrt().clamp_min(1.0)
    return torch.where(present, class_factors, torch.ones_like(class_factors)).amax(1)


class RepeatFactorSampler(ResumableSampler):
    """Repeat factor sampling with :class:`ResumableSampler`'s contract (seeded epochs, exact
    mid-epoch resume, DDP sharding).

    Every epoch, from a generator seeded with ``seed + epoch``: sample ``i`` gets
    ``floor(r_i) + Bernoulli(frac(r_i))`` copies (stochastic rounding, as detectron2's
    ``RepeatFactorTrainingSampler``), the copies are shuffled, and the list is brought to the
    fixed length ``total_size`` and dealt to the ranks as :class:`DistributedSampler` does
    (``indices[rank::num_replicas]``).

    Why a fixed length: Lightning reads ``len()`` of the training loader once, before the first
    ``set_epoch``, and caps every epoch at that many batches (``num_training_batches``), so an epoch
    whose rounding came out longer would be cut and the resume arithmetic
    (``samples_done = batches_done * batch_size``) would refer to an epoch of another length.
    detectron2 has no epochs (one infinite stream), so it never meets this. The length is the
    expected size ``round(sum_i r_i)``, padded up to a multiple of the ranks; an epoch whose
    rounding is longer drops the tail of its shuffled list, a shorter one repeats its head (as
    :class:`DistributedSampler` pads). A uniformly shuffled list cut or wrapped keeps every
    sample's expected share of the epoch, ``r_i / sum_j r_j``; the per-rank length is the same
    every epoch and on every rank.

    Args:
        repeat_factors: ``(N,)`` factors ``≥ 1``, one per training sample (e.g. :func:`repeat_factors_rfs`).
        num_replicas, rank, seed: as :class:`ResumableSampler` (the order is always shuffled).

    Example:
        >>> sampler = RepeatFactorSampler([1.0, 1.0, 2.5, 1.5], num_replicas=2, rank=0, seed=0)
        >>> sampler.epoch_size, len(sampler)
        (6, 3)
        >>> sampler.set_epoch(1)
        >>> indices = list(sampler)
        >>> sampler.resume(epoch=1, samples_done_per_rank=1)
        >>> list(sampler) == indices[1:]
        True
    """

    def __init__(self, repeat_factors: Union[Tensor, list[float]], *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.ndim != 1 or len(factors) == 0 or not torch.isfinite(factors).all() or (factors < 1).any():
            raise ValueError(
                f"RepeatFactorSampler: repeat_factors must be a non-empty 1-D sequence of finite factors ≥ 1 (one"
                f" per training sample), got shape {tuple(factors.shape)} with minimum"
                f" {float(factors.min()) if factors.numel() else None}; compute them with repeat_factors_rfs or"
                " repeat_factors_irfs."
            )
        super().__init__(len(factors), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeat_factors = factors
        self.epoch_size = round(float(factors.sum()))
        self.num_samples = math.ceil(self.epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def epoch_indices(self) -> Tensor:
        """Every rank's indices of the current epoch, ``total_size`` of them, before sharding."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        whole = self.repeat_factors.floor()
        extra = torch.rand(len(whole), generator=generator, dtype=torch.float64) < self.repeat_factors - whole
        copies = torch.repeat_interleave(torch.arange(len(whole)), (whole + extra).long())
        shuffled = copies[torch.randperm(len(copies), generator=generator)]
        return shuffled.repeat(math.ceil(self.total_size / len(shuffled)))[: self.total_size]

    def rank_indices(self) -> list[int]:
        return self.epoch_indices()[self.rank : self.total_size : self.num_replicas].tolist()


def check_m_per_class(owner: str, batch_size: int, m: int, num_classes: int) -> None:
    """Raises ``ValueError`` unless batches of ``batch_size`` can hold ``m`` samples of each of
    ``batch_size / m`` different classes out of ``num_classes`` (``owner`` names the caller)."""
    if m < 1 or batch_size % m:
        raise ValueError(f"{owner}: batch_size {batch_size} is not a multiple of m = {m}. Fix: use a "
                         f"batch_size divisible by m, e.g. {max(m, 1) * max(1, batch_size // max(m, 1))}.")
    if batch_size // m > num_classes:
        raise ValueError(f"{owner}: a batch of {batch_size} with {m} per class needs {batch_size // m} classes, "
                         f"but the training set has {num_classes}. Fix: raise m or lower batch_size to at most "
                         f"{m * num_classes}.")


class MPerClassSampler(ResumableSampler):
    """Training indices in batches of ``batch_size`` that hold ``m`` samples of each of
    ``batch_size / m`` different classes: the class-balanced batches metric-learning miners need
    (every sample has positives in its batch). PyTorch Metric Learning's ``MPerClassSampler`` does
    the same; this one is a :class:`ResumableSampler`, so it shards over ranks and resumes mid-epoch.

    Epoch ``e`` (generator seeded ``seed + e``) shuffles each class's samples into a stream that
    wraps around, and builds ``N // batch_size`` batches (``N`` the training samples): each batch
    draws its classes at random without replacement and takes the next ``m`` samples of each
    class's stream. A class with fewer than ``m`` samples repeats some within a batch. Batches are
    dealt to the ranks in turn, so each rank's batch is balanced on its own.

    Args:
        labels: ``(N,)`` class index of every training sample.
        batch_size: samples per batch (per rank); a multiple of ``m``.
        m: samples per class in a batch.
        num_replicas, rank, seed: as :class:`ResumableSampler`.

    Example:
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
        >>> sampler = MPerClassSampler(labels, batch_size=4, m=2)
        >>> batches = torch.tensor(list(sampler)).view(-1, 2, 2)   # (batch, class, m)
        >>> len(batches), bool((labels[batches] == labels[batches][..., :1]).all())
        (2, True)
    """

    def __init__(self, labels: Tensor, batch_size: int, m: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        labels = torch.as_tensor(labels)
        classes = labels.unique()
        check_m_per_class("MPerClassSampler", batch_size, m, len(classes))
        super().__init__(len(labels), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.m = batch_size, m
        self.members = [(labels == c).nonzero().flatten() for c in classes]
        self.batches_per_rank = len(labels) // batch_size // num_replicas
        if self.batches_per_rank == 0:
            raise ValueError(f"MPerClassSampler: {len(labels)} training samples make no batch of {batch_size} on "
                             f"each of {num_replicas} rank(s). Fix: lower batch_size.")
        self.num_samples = self.batches_per_rank * batch_size
        self.total_size = self.num_samples * num_replicas

    def rank_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        streams = [members[torch.randperm(len(members), generator=generator)] for members in self.members]
        cursors = [0] * len(streams)
        batches = []
        for _ in range(self.batches_per_rank * self.num_replicas):
            batch = []
            for c in torch.randperm(len(streams), generator=generator)[: self.batch_size // self.m].tolist():
                positions = torch.arange(cursors[c], cursors[c] + self.m) % len(streams[c])
                batch.append(streams[c][positions])
                cursors[c] += self.m
            batches.append(torch.cat(batch))
        return torch.stack(batches)[self.rank :: self.num_replicas].flatten().tolist()
