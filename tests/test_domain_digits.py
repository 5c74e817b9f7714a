"""DomainDigitsDataModule: five disjoint domains of 3-channel digits, leave-one-domain-out splits,
ColoredMNIST-style colours, domain-balanced training batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from reglab.datamodules import (
    DOMAINS, PALETTE, DomainBalancedSampler, DomainDigitsDataModule, RotatedDigitsDataModule, label_colours,
)
from reglab.datamodules.digits import digit_images


def built(**kwargs) -> DomainDigitsDataModule:
    data = DomainDigitsDataModule(**{"seed": 3, **kwargs})
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def coloured_held_out() -> DomainDigitsDataModule:
    return built(held_out=["coloured"])


@pytest.fixture(scope="module")
def upright_held_out() -> DomainDigitsDataModule:
    return built(held_out=["upright"])


def whole(data: DomainDigitsDataModule, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = data.domain_parts[domain].values()
    return torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts])


def source_rows(data: DomainDigitsDataModule, domain: str) -> list[tuple[float, ...]]:
    """The upright digit each sample was made from, for the domains where it can be recovered: the
    palette's colours all have a channel at 1, so the channel maximum undoes the colouring."""
    inputs, _ = whole(data, domain)
    source = {"upright": inputs[:, 0], "inverted": 1 - inputs[:, 0], "coloured": inputs.amax(1)}[domain]
    return [tuple(row) for row in source.reshape(len(source), -1).tolist()]


def colour_classes(inputs: torch.Tensor) -> torch.Tensor:
    """The palette colour of each coloured image: its colour at its brightest pixel, to the nearest palette entry."""
    flat = inputs.reshape(len(inputs), 3, -1)
    brightest = flat.amax(1).argmax(-1)
    colour = flat[torch.arange(len(inputs)), :, brightest]
    colour = colour / colour.amax(1, keepdim=True)
    return torch.cdist(colour, PALETTE).argmin(1)


def test_every_image_is_in_exactly_one_domain_with_balanced_classes(coloured_held_out):
    data = coloured_held_out
    images, _ = digit_images()
    sizes = {d: sum(len(p) for p in data.domain_parts[d].values()) for d in DOMAINS}
    assert sum(sizes.values()) == len(images)
    originals = Counter(tuple(row) for row in images.reshape(len(images), -1).tolist())
    recovered = Counter(row for d in ("upright", "inverted", "coloured") for row in source_rows(data, d))
    assert not recovered - originals  # no image used twice (nor any image that is not a digit)
    for domain in DOMAINS:
        per_class = torch.bincount(whole(data, domain)[1], minlength=10)
        full = torch.bincount(digit_images()[1], minlength=10)
        assert ((per_class - full / len(DOMAINS)).abs() <= 1).all(), (domain, per_class)


def test_splits_follow_domainbeds_in_and_out_parts(coloured_held_out):
    data = coloured_held_out
    assert data.input_shape == (3, 8, 8) and data.domain_names == ("upright", "rotated", "noisy", "inverted", "coloured")
    assert data.train_domains == ("upright", "rotated", "noisy", "inverted") and data.num_train_domains == 4
    for dataset, part, domains in ((data.train_dataset, "in", [0, 1, 2, 3]), (data.val_dataset, "out", [0, 1, 2, 3]),
                                   (data.test_dataset, "in", [4])):
        assert tuple(dataset.inputs.shape[1:]) == (3, 8, 8)
        assert sorted(dataset.extras["domain"].unique().tolist()) == domains
        expected = sum(len(data.domain_parts[data.domain_names[d]][part]) for d in domains)
        assert len(dataset) == expected
    for domain in DOMAINS:
        parts = data.domain_parts[domain]
        share = len(parts["out"]) / (len(parts["in"]) + len(parts["out"]))
        assert abs(share - data.holdout_fraction) < 0.02
    oracle = data.evaluation_view("coloured", "out")
    assert oracle.test_dataset is data.domain_parts["coloured"]["out"] and oracle.train_dataset is data.train_dataset
    assert data.test_dataset is not oracle.test_dataset  # the view leaves the DataModule's own test split alone


def test_grey_domains_have_equal_channels_and_each_style_is_applied(upright_held_out):
    data = upright_held_out
    upright, _ = whole(data, "upright")
    for domain in ("upright", "rotated", "noisy", "inverted"):
        inputs, _ = whole(data, domain)
        assert torch.equal(inputs[:, 0], inputs[:, 1]) and torch.equal(inputs[:, 0], inputs[:, 2]), domain
        assert inputs.min() >= 0 and inputs.max() <= 1
    # the digits' background (most pixels) is dark upright and bright inverted
    assert upright.median() < 0.5 < whole(data, "inverted")[0].median()
    coloured = whole(data, "coloured")[0]
    assert not torch.equal(coloured[:, 0], coloured[:, 1])


def test_colour_predicts_the_label_in_training_and_the_next_class_when_held_out(coloured_held_out, upright_held_out):
    training = whole(upright_held_out, "coloured")  # coloured is a training domain here
    held_out = whole(coloured_held_out, "coloured")
    for (inputs, targets), shift in ((training, 0), (held_out, 1)):
        colours = colour_classes(inputs)
        assert abs((colours == (targets + shift) % 10).float().mean() - 0.9) < 0.05, shift
        assert (colours == (targets + 1 - shift) % 10).float().mean() < 0.05, shift


def test_label_colours_rule():
    targets = torch.arange(10).repeat(200)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(label_colours(targets, 1.0, 0, generator), targets)
    assert torch.equal(label_colours(targets, 1.0, 1, generator), (targets + 1) % 10)
    mismatched = label_colours(targets, 0.5, 0, generator)
    off = mismatched[mismatched != targets]
    # the other colours are uniform over the nine wrong classes: every one of them appears
    assert len(off) > 0 and set(((off - targets[mismatched != targets]) % 10).tolist()) == set(range(1, 10))


def test_holding_out_another_domain_changes_no_other_domain(coloured_held_out, upright_held_out):
    for domain in ("rotated", "noisy", "inverted"):
        for part in ("in", "out"):
            a, b = coloured_held_out.domain_parts[domain][part], upright_held_out.domain_parts[domain][part]
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(whole(coloured_held_out, "coloured")[0], whole(upright_held_out, "coloured")[0])


def test_every_training_batch_holds_the_same_number_of_every_training_domain(coloured_held_out):
    batches = list(coloured_held_out.train_dataloader())
    smallest = min(len(coloured_held_out.domain_parts[d]["in"]) for d in coloured_held_out.train_domains)
    assert len(batches) == smallest // 15
    seen = torch.cat([b["index"] for b in batches])
    assert len(seen.unique()) == len(seen)  # without replacement within an epoch
    for batch in batches:
        assert batch["input"].shape == (60, 3, 8, 8)
        assert torch.equal(batch["domain"], torch.arange(4).repeat_interleave(15))


def test_balanced_sampler_shards_ranks_and_resumes_by_whole_batches():
    domains = torch.tensor([0] * 13 + [1] * 9 + [2] * 11)
    ranks = [DomainBalancedSampler(domains, batch_size=6, num_domains=3, num_replicas=2, rank=r, seed=4) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    epoch = [list(sampler) for sampler in ranks]
    assert [len(e) for e in epoch] == [12, 12]  # 9 // 2 = 4 batches in all, two per rank
    assert not set(epoch[0]) & set(epoch[1])
    for indices in epoch:
        for start in range(0, len(indices), 6):
            assert domains[indices[start:start + 6]].tolist() == [0, 0, 1, 1, 2, 2]
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != epoch[0]  # a new epoch is a new shuffle
    ranks[0].set_epoch(2)
    ranks[0].resume(epoch=2, samples_done_per_rank=6)
    assert list(ranks[0]) == epoch[0][6:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domains": ["upright", "sideways"]}, "domains must name each of"),
        ({"held_out": ["rotated"], "domains": ["upright", "coloured"]}, "held_out must name"),
        ({"held_out": ["upright", "rotated"], "domains": ["upright", "rotated"]}, "leaves no training domain"),
        ({"batch_size": 50}, "not a multiple of the 4"),
        ({"colour_correlation": 0.0}, "colour_correlation"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DomainDigitsDataModule(**kwargs)


def test_repeat_factor_sampling_is_refused(coloured_held_out):
    with pytest.raises(ValueError, match="domain-balanced"):
        coloured_held_out.set_train_repeat_factors(torch.ones(coloured_held_out.num_train_samples))


def test_both_domain_datamodules_number_their_training_domains_first():
    rotated = RotatedDigitsDataModule(train_angles=[0, 30], test_angles=[60], batch_size=32)
    rotated.setup("fit")
    assert rotated.num_train_domains == 2
    assert sorted(rotated.train_dataset.extras["domain"].unique().tolist()) == [0, 1]
    assert rotated.test_dataset.extras["domain"].unique().tolist() == [2]
