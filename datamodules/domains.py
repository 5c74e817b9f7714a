"""Domain shift on the embedded digits, in miniature of DomainBed's RotatedMNIST and ColoredMNIST.

* :class:`RotatedDigitsDataModule` — one domain per rotation angle (RotatedMNIST). The upright
  images are split into train / val / test pools first (stratified, seeded by ``split_seed``),
  then the images of each split are dealt round-robin, class by class, to the split's angles, so
  an unseen test domain never shows an image the model was trained on, at any angle.
* :class:`DomainDigitsDataModule` — the shared multi-domain scenario of the domain-generalization
  claims: five named domains (upright, rotated, coloured, noisy, inverted) of 3-channel images,
  every image dealt to one domain, leave-one-domain-out with ``held_out``, domain-balanced
  training batches (DomainBed's one minibatch per domain).

Batches carry ``domain``, the sample's domain index (the training domains first, so training
domains are ``0 .. num_train_domains - 1``).
"""

from __future__ import annotations

import colorsys
import copy
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.transforms.functional import InterpolationMode, rotate

from .base import ClassificationDataModule, DictDataset, Split
from .digits import DigitsDataModule, digit_images
from .label_noise import MNIST_ASYMMETRIC_MAP
from .sampling import ResumableSampler
from .splits import check_holdout_fractions, stratified_split

UPRIGHT_SHAPE = (1, 8, 8)


def rotate_images(images: Tensor, angle: float) -> Tensor:
    """``(N, 1, H, W)`` images rotated counter-clockwise by ``angle`` degrees about their centre.

    Bilinear interpolation; corners that come from outside the image are black (0), the digits'
    background.
    """
    if angle == 0:
        return images.clone()
    return rotate(images, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)


def deal_to_domains(targets: Tensor, num_domains: int, generator: torch.Generator) -> Tensor:
    """A domain index in ``[0, num_domains)`` per sample: shuffled, then dealt round-robin within
    each class, so every domain gets ``n_c / num_domains`` (±1) samples of class ``c``."""
    shuffled = torch.randperm(len(targets), generator=generator)
    by_class = shuffled[torch.sort(targets[shuffled], stable=True).indices]
    domains = torch.empty(len(targets), dtype=torch.long)
    domains[by_class] = torch.arange(len(targets)) % num_domains
    return domains


class RotatedDigitsDataModule(ClassificationDataModule):
    """Digits rotated by a few angles, one domain per angle; train on some, test on unseen ones.

    Args:
        train_angles: angles (degrees, counter-clockwise) of the training domains.
        val_angles: angles of the validation split's domains; default ``train_angles`` (held-out
            images of the training domains: DomainBed's training-domain validation).
        test_angles: angles of the test split's domains, typically unseen in training.
        split_seed: seed of the train/val/test split of the upright images (default ``seed``).
            Fix it to keep the image pools while ``seed`` varies the shuffle and the dealing, e.g.
            so that a model pretrained on the upright training pool never saw a test image.
        flatten: inputs of shape ``(64,)`` instead of ``(1, 8, 8)``.
        val_fraction, test_fraction: share of each class in the validation / test pool.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments
            (``batch_size``, ``num_workers``, ``seed``, ``label_noise``, ``long_tail``, ``eval_batch_size``).

    Example:
        >>> data = RotatedDigitsDataModule(train_angles=[0, 15, 30], test_angles=[60], batch_size=16)
        >>> data.domain_angles, data.num_domains
        ((0.0, 15.0, 30.0, 60.0), 4)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, sorted(batch["domain"].unique().tolist())
        (torch.Size([16, 1, 8, 8]), [0, 1, 2])
        >>> data.test_dataset.extras["domain"].unique().tolist()
        [3]
    """

    num_classes = 10
    default_asymmetric_map = MNIST_ASYMMETRIC_MAP

    def __init__(
        self,
        train_angles: Sequence[float] = (0.0, 15.0, 30.0),
        val_angles: Optional[Sequence[float]] = None,
        test_angles: Sequence[float] = (60.0,),
        split_seed: Optional[int] = None,
        flatten: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        val_angles = train_angles if val_angles is None else val_angles
        for arg, angles in (("train_angles", train_angles), ("val_angles", val_angles), ("test_angles", test_angles)):
            if len(angles) == 0:
                raise ValueError(f"{name}: {arg} is empty; give at least one angle per split.")
            if len(set(angles)) != len(angles):
                raise ValueError(f"{name}: {arg} repeats an angle ({list(angles)}); list each domain once.")
        self.train_angles = tuple(float(a) for a in train_angles)
        self.val_angles = tuple(float(a) for a in val_angles)
        self.test_angles = tuple(float(a) for a in test_angles)
        self.domain_angles = tuple(dict.fromkeys(self.train_angles + self.val_angles + self.test_angles))
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.input_shape = (64,) if flatten else UPRIGHT_SHAPE
        super().__init__(**kwargs)
        self.split_seed = self.seed if split_seed is None else split_seed

    @property
    def num_domains(self) -> int:
        return len(self.domain_angles)

    @property
    def num_train_domains(self) -> int:
        """Training batches carry domains ``0 .. num_train_domains - 1`` (as :class:`DomainDigitsDataModule`'s)."""
        return len(self.train_angles)

    def _load_splits(self) -> dict[str, Split]:
        upright = DigitsDataModule(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.split_seed)
        upright.setup()
        pools = {
            "train": (upright.train_dataset, self.train_angles),
            "val": (upright.val_dataset, self.val_angles),
            "test": (upright.test_dataset, self.test_angles),
        }
        # One generator per split, so that changing one split's angles leaves the others' dealing alone.
        return {
            name: self._rotated(pool.inputs, pool.targets, angles, torch.Generator().manual_seed(self.seed + offset))
            for offset, (name, (pool, angles)) in enumerate(pools.items())
        }

    def _rotated(self, images: Tensor, targets: Tensor, angles: tuple[float, ...], generator: torch.Generator) -> Split:
        dealt = deal_to_domains(targets, len(angles), generator)
        rotated = torch.empty_like(images)
        domain = torch.empty(len(targets), dtype=torch.long)
        for local, angle in enumerate(angles):
            members = (dealt == local).nonzero().flatten()
            rotated[members] = rotate_images(images[members], angle)
            domain[members] = self.domain_angles.index(angle)
        return rotated.reshape(-1, *self.input_shape), targets, {"domain": domain}


#: the domains of :class:`DomainDigitsDataModule`, in their default order
DOMAINS = ("upright", "rotated", "coloured", "noisy", "inverted")
#: one colour per class: ten hues evenly spaced round the colour wheel, full saturation and value
PALETTE = torch.tensor([colorsys.hsv_to_rgb(c / 10, 1.0, 1.0) for c in range(10)], dtype=torch.float32)


def label_colours(targets: Tensor, correlation: float, shift: int, generator: torch.Generator) -> Tensor:
    """A colour (a class of :data:`PALETTE`) per sample: the colour of class ``target + shift``
    (mod 10) with probability ``correlation``, else one of the nine others, uniformly."""
    matched = (targets + shift) % 10
    other = (matched + torch.randint(1, 10, targets.shape, generator=generator)) % 10
    keep = torch.rand(targets.shape, generator=generator) < correlation
    return torch.where(keep, matched, other)


def render_domain(domain: str, images: Tensor, targets: Tensor, generator: torch.Generator, *,
                  rotation: float = 45.0, colour_correlation: float = 0.9, colour_shift: int = 0,
                  noise_std: float = 0.3) -> tuple[Tensor, Tensor]:
    """``(N, 1, H, W)`` digits in [0, 1] drawn as one of :data:`DOMAINS`: ``(N, 3, H, W)`` images and
    the :data:`PALETTE` index each image is painted in (``-1`` for the grey domains).

    ``coloured`` paints a sample in the colour of class ``target + colour_shift`` with probability
    ``colour_correlation`` (:func:`label_colours`); ``noisy`` draws its noise from ``generator``.
    :class:`DomainDigitsDataModule` documents each domain; the caption data
    (:mod:`reglab.datamodules.captions`) names the colour in the caption.
    """
    colours = torch.full((len(images),), -1, dtype=torch.long)
    if domain == "coloured":
        colours = label_colours(targets, colour_correlation, colour_shift, generator)
        return images * PALETTE[colours][:, :, None, None], colours
    if domain == "rotated":
        images = rotate_images(images, rotation)
    elif domain == "noisy":
        images = (images + noise_std * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)
    elif domain == "inverted":
        images = 1.0 - images
    elif domain != "upright":
        raise ValueError(f"render_domain: unknown domain {domain!r}. Fix: use one of {list(DOMAINS)}.")
    return images.expand(-1, 3, -1, -1).clone(), colours


class DomainBalancedSampler(ResumableSampler):
    """Training indices in batches of ``batch_size`` that hold ``batch_size / num_domains`` samples
    of every domain, domain by domain (DomainBed's one minibatch per training domain, concatenated).

    Epoch ``e`` shuffles each domain's samples with a generator seeded ``seed + e`` and cuts them
    into per-domain shares; an epoch has as many batches as the smallest domain fills, so the
    larger domains' last few samples (different ones each epoch) sit that epoch out. The batches
    are dealt to the ranks in turn (batch ``b`` to rank ``b mod num_replicas``) and every rank gets
    the same number, so each rank's batch is balanced on its own. :class:`ResumableSampler`'s
    mid-epoch resume works unchanged: a resumed epoch skips whole batches.

    Args:
        domains: ``(N,)`` domain index of every training sample, in ``0 .. num_domains - 1``.
        batch_size: samples per batch (per rank); a multiple of ``num_domains``.
        num_domains: how many domains every batch holds.
        num_replicas, rank, seed: as :class:`ResumableSampler`.

    Example:
        >>> sampler = DomainBalancedSampler(torch.tensor([0, 0, 0, 1, 1, 1, 1]), batch_size=2, num_domains=2)
        >>> len(sampler)                         # three batches: domain 0 fills three shares of one
        6
        >>> indices = list(sampler)
        >>> [indices[i] < 3 <= indices[i + 1] for i in (0, 2, 4)]   # each batch: domain 0's sample, then domain 1's
        [True, True, True]
    """

    def __init__(self, domains: Tensor, batch_size: int, num_domains: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        domains = torch.as_tensor(domains)
        if num_domains < 1 or batch_size % num_domains:
            raise ValueError(
                f"DomainBalancedSampler: batch_size {batch_size} is not a multiple of the {num_domains} training"
                f" domains. Fix: use a batch_size divisible by {num_domains}, e.g. {num_domains * max(1, batch_size // num_domains)}."
            )
        super().__init__(len(domains), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.per_domain = batch_size // num_domains
        self.members = [(domains == d).nonzero().flatten() for d in range(num_domains)]
        sizes = [len(m) for m in self.members]
        self.batches_per_rank = min(sizes) // self.per_domain // num_replicas
        if self.batches_per_rank == 0:
            raise ValueError(
                f"DomainBalancedSampler: the training domains hold {sizes} samples, too few for one batch of"
                f" {self.per_domain} samples per domain on each of {num_replicas} rank(s). Fix: lower batch_size."
            )
        self.num_samples = self.batches_per_rank * batch_size
        self.total_size = self.num_samples * num_replicas

    def rank_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shares = self.batches_per_rank * self.num_replicas * self.per_domain
        # (batches, domains, per_domain): batch b is domain 0's share b, then domain 1's, ...
        batches = torch.stack([m[torch.randperm(len(m), generator=generator)][:shares].reshape(-1, self.per_domain)
                               for m in self.members], dim=1)
        return batches[self.rank :: self.num_replicas].flatten().tolist()


class DomainDigitsDataModule(ClassificationDataModule):
    """Five domains of the digits for leave-one-domain-out domain generalization (DomainBed's protocol).

    Every image belongs to exactly one domain: the 1,797 images are shuffled and dealt round-robin,
    class by class, to the ``domains`` (so each domain has about a fifth of every class), and each
    domain is split, stratified, into an ``in`` part and an ``out`` part of ``holdout_fraction``
    (DomainBed's ``holdout_fraction``, 0.2). The domains, each an image of shape ``(3, 8, 8)``:

    * ``upright``: the digit in grey (the same intensity in the three channels);
    * ``rotated``: the digit rotated by ``rotation`` degrees (45), grey;
    * ``coloured``: the digit painted in one of ten colours (:data:`PALETTE`), ColoredMNIST-style.
      While it is a training domain, a sample is painted in its label's colour with probability
      ``colour_correlation`` (0.9; else in one of the nine others): the colour is a shortcut
      that predicts the label 90% of the time. Held out, the correlation is reversed as in
      ColoredMNIST's -90% test environment: with the same probability a sample wears the colour of
      the *next* class (``label + 1`` mod 10), so a model that learnt the shortcut is pushed
      towards the wrong class;
    * ``noisy``: grey digit plus Gaussian pixel noise of std ``noise_std`` (0.3; the same noise
      in the three channels, clipped to [0, 1]), drawn once with the seed;
    * ``inverted``: ``1 − x``, grey.

    The splits follow DomainBed's ``train.py``: the training split is the ``in`` parts of the
    training domains (every domain not ``held_out``), the validation split their ``out`` parts
    (training-domain validation, DomainBed's default model selection), the test split the ``in``
    parts of the held-out domains; :meth:`evaluation_view` gives any one domain's part as the test
    split (the held-out ``out`` part is the oracle's validation set). ``domain`` in every batch is
    the index in :attr:`domain_names`: the training domains in the order of ``domains``, then the
    held-out ones. The training loader is domain-balanced (:class:`DomainBalancedSampler`): every
    batch holds ``batch_size / num_train_domains`` samples of each training domain.

    Label noise and a long tail apply to the training split only, as everywhere.

    Args:
        domains: the domains to build, among :data:`DOMAINS`.
        held_out: the test domain(s), among ``domains``; the rest are the training domains.
        holdout_fraction: the ``out`` share of every domain (per class).
        rotation: angle of the ``rotated`` domain, degrees counter-clockwise.
        colour_correlation: in (0, 1], how often a ``coloured`` sample wears its label's colour
            (training) or the next class's colour (held out).
        noise_std: standard deviation of the ``noisy`` domain's pixel noise.
        batch_size: training batch size per rank; a multiple of the number of training domains.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments
            (``num_workers``, ``seed``, ``label_noise``, ``long_tail``, ``eval_batch_size``).

    Example:
        >>> data = DomainDigitsDataModule(held_out=["coloured"], batch_size=60)
        >>> data.domain_names
        ('upright', 'rotated', 'noisy', 'inverted', 'coloured')
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, torch.bincount(batch["domain"]).tolist()
        (torch.Size([60, 3, 8, 8]), [15, 15, 15, 15])
        >>> data.test_dataset.extras["domain"].unique().tolist()
        [4]
        >>> len(data.evaluation_view("coloured", "out").test_dataset) < len(data.test_dataset)
        True
    """

    num_classes = 10
    input_shape = (3, 8, 8)
    default_asymmetric_map = MNIST_ASYMMETRIC_MAP

    def __init__(
        self,
        domains: Sequence[str] = DOMAINS,
        held_out: Sequence[str] = ("coloured",),
        holdout_fraction: float = 0.2,
        rotation: float = 45.0,
        colour_correlation: float = 0.9,
        noise_std: float = 0.3,
        batch_size: int = 60,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        domains, held_out = tuple(domains), tuple(held_out)
        unknown = sorted(set(domains) - set(DOMAINS))
        if unknown or len(set(domains)) != len(domains):
            raise ValueError(f"{name}: domains must name each of {list(DOMAINS)} at most once, got {list(domains)}. "
                             f"Fix: drop {unknown or 'the repeats'}.")
        if not held_out or set(held_out) - set(domains) or len(set(held_out)) != len(held_out):
            raise ValueError(f"{name}: held_out must name one or more of the domains {list(domains)} once each, got "
                             f"{list(held_out)}. Fix: set held_out to the test domain(s), e.g. [{domains[0]!r}].")
        self.train_domains = tuple(d for d in domains if d not in held_out)
        if not self.train_domains:
            raise ValueError(f"{name}: held_out {list(held_out)} leaves no training domain. Fix: hold out fewer domains.")
        if batch_size % len(self.train_domains):
            raise ValueError(f"{name}: batch_size {batch_size} is not a multiple of the {len(self.train_domains)} "
                             "training domains, so batches cannot hold the same number of samples of every domain. "
                             f"Fix: use a multiple of {len(self.train_domains)}.")
        if not 0.0 < colour_correlation <= 1.0:
            raise ValueError(f"{name}: colour_correlation must lie in (0, 1], got {colour_correlation}.")
        if noise_std < 0:
            raise ValueError(f"{name}: noise_std must be ≥ 0, got {noise_std}.")
        check_holdout_fractions(name, holdout_fraction=holdout_fraction)
        self.domains, self.held_out = domains, held_out
        self.domain_names = self.train_domains + held_out
        self.holdout_fraction = holdout_fraction
        self.rotation = float(rotation)
        self.colour_correlation = colour_correlation
        self.noise_std = noise_std
        self.domain_parts: dict[str, dict[str, DictDataset]] = {}
        super().__init__(batch_size=batch_size, **kwargs)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def num_train_domains(self) -> int:
        return len(self.train_domains)

    def _load_splits(self) -> dict[str, Split]:
        images, targets = digit_images()
        generator = torch.Generator().manual_seed(self.seed)
        dealt = deal_to_domains(targets, len(self.domains), generator)
        # one seed per domain (drawn in the order of `domains`), so that which domain is held out
        # changes no other domain's colours, noise or split
        domain_seeds = torch.randint(2**62, (len(self.domains),), generator=generator).tolist()
        for position, (domain, seed) in enumerate(zip(self.domains, domain_seeds)):
            members = (dealt == position).nonzero().flatten()
            own = torch.Generator().manual_seed(seed)
            inputs = self._render(domain, images[members], targets[members], own)
            parts = stratified_split(targets[members], {"out": self.holdout_fraction}, seed)
            index = torch.full((len(members),), self.domain_names.index(domain), dtype=torch.long)
            self.domain_parts[domain] = {
                part: DictDataset(inputs[positions], targets[members][positions], {"domain": index[positions]})
                for part, positions in (("in", parts["train"]), ("out", parts["out"]))
            }
        return {"train": self._joined(self.train_domains, "in"), "val": self._joined(self.train_domains, "out"),
                "test": self._joined(self.held_out, "in")}

    def _joined(self, domains: tuple[str, ...], part: str) -> Split:
        datasets = [self.domain_parts[d][part] for d in domains]
        return (torch.cat([d.inputs for d in datasets]), torch.cat([d.targets for d in datasets]),
                {"domain": torch.cat([d.extras["domain"] for d in datasets])})

    def _render(self, domain: str, images: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """``(N, 1, 8, 8)`` digits in [0, 1] as ``domain``'s ``(N, 3, 8, 8)`` images."""
        return render_domain(domain, images, targets, generator, rotation=self.rotation,
                             colour_correlation=self.colour_correlation,
                             colour_shift=1 if domain in self.held_out else 0, noise_std=self.noise_std)[0]

    def evaluation_view(self, domain: str, part: str) -> DomainDigitsDataModule:
        """This DataModule with ``domain``'s ``part`` (``"in"`` or ``"out"``) as its test split, for
        ``trainer.test`` on one domain (the training split, the batch keys and the sizes stay, so
        techniques set up on it as on the training data). Needs :meth:`setup`."""
        self._require_setup()
        if domain not in self.domain_parts or part not in ("in", "out"):
            raise ValueError(f"{type(self).__name__}.evaluation_view: no part {part!r} of domain {domain!r}; domains "
                             f"{list(self.domains)}, parts 'in' and 'out'.")
        view = copy.copy(self)
        view.test_dataset = self.domain_parts[domain][part]
        return view

    def set_train_repeat_factors(self, factors: Optional[Tensor]) -> None:
        if factors is not None:
            raise ValueError(f"{type(self).__name__}: its training batches are domain-balanced (one share per "
                             "training domain), so repeat factor sampling cannot reorder them. Fix: use the technique "
                             "on a DataModule without domains, or drop it.")
        super().set_train_repeat_factors(factors)

    def _train_sampler(self, *, num_replicas: int, rank: int, seed: int) -> DomainBalancedSampler:
        return DomainBalancedSampler(self.train_dataset.extras["domain"], self.batch_size, self.num_train_domains,
                                     num_replicas=num_replicas, rank=rank, seed=seed)
