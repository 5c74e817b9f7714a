"""Repeat factor sampling: RFS / IRFS factors, the RepeatFactorSampler contract (seeded epochs,
stochastic rounding, fixed length, mid-epoch resume, sharding, 2-process DDP) and the two techniques."""

from __future__ import annotations

import json
import math
import os
import socket
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from harness import start_ranks
from reglab import registry
from reglab.bench.fit import FitProtocol
from reglab.bench.protocols import ClaimError
from reglab.callbacks import IRFS, RepeatFactorSampling
from reglab.datamodules import (
    DictDataset,
    DigitsDataModule,
    LongTail,
    RepeatFactorSampler,
    ResumableDataLoader,
    repeat_factors_irfs,
    repeat_factors_rfs,
)
from reglab.technique import TechniqueConfigError

# images 0-3; class 0 in three images (5 instances), classes 1 and 2 in one image each, with 1 and 4 instances
COUNTS = torch.tensor([[3, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 4]])


# ----------------------------------------------------------------------------------------------
# the factors


def test_rfs_factors_by_hand():
    # f = (3/4, 1/4, 1/4), t = 1/2: r_c = max(1, sqrt(t / f)) = (1, sqrt 2, sqrt 2); an image takes its rarest class's
    expected = torch.tensor([1.0, math.sqrt(2), 1.0, math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(repeat_factors_rfs(COUNTS, threshold=0.5), expected)


def test_irfs_factors_by_hand():
    # f_img = (3/4, 1/4, 1/4), f_inst = (5/10, 1/10, 4/10) of 10 instances; r_c = max(1, sqrt(t / sqrt(f_img f_inst)))
    # class 0: sqrt(0.5 / sqrt(0.375)) < 1 -> 1; class 1: (0.25 / 0.025) ** (1/4); class 2: (0.25 / 0.1) ** (1/4)
    expected = torch.tensor([1.0, 10 ** 0.25, 1.0, 2.5 ** 0.25], dtype=torch.float64)
    torch.testing.assert_close(repeat_factors_irfs(COUNTS, threshold=0.5), expected)
    # equal image frequency, fewer instances: IRFS repeats class 1's image more than class 2's, RFS does not
    rfs = repeat_factors_rfs(COUNTS, threshold=0.5)
    assert rfs[1] == rfs[3] and repeat_factors_irfs(COUNTS, threshold=0.5)[1] > repeat_factors_irfs(COUNTS, 0.5)[3]


def test_an_image_without_instances_has_factor_one_and_one_object_per_image_makes_irfs_rfs():
    counts = torch.tensor([[0, 0], [1, 0], [0, 1], [0, 1]])  # f = (1/4, 2/4), t = 1: r = (2, sqrt 2)
    expected = torch.tensor([1.0, 2.0, math.sqrt(2), math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(repeat_factors_rfs(counts, threshold=1.0), expected)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    torch.testing.assert_close(repeat_factors_irfs(one_hot, 0.4), repeat_factors_rfs(one_hot, 0.4))


def test_factors_refuse_bad_input():
    with pytest.raises(ValueError, match=r"\(N images, C classes\) matrix"):
        repeat_factors_rfs(torch.ones(4), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        repeat_factors_irfs(torch.tensor([[1, -1]]), 0.1)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        repeat_factors_rfs(COUNTS, 0.0)


# ----------------------------------------------------------------------------------------------
# the sampler


def epoch(sampler: RepeatFactorSampler, number: int) -> list[int]:
    sampler.set_epoch(number)
    return list(sampler)


def test_integer_factors_repeat_each_sample_exactly():
    sampler = RepeatFactorSampler([1.0, 2.0, 3.0], seed=0)
    assert len(sampler) == 6
    for number in range(5):
        assert Counter(epoch(sampler, number)) == {0: 1, 1: 2, 2: 3}




def test_stochastic_rounding_has_the_factors_as_expectation(one_thread):
    factors = torch.tensor([1.0, 1.25, 2.5, 3.25])  # sum 8 = the fixed epoch length, so nothing is cut or wrapped
    sampler = RepeatFactorSampler(factors, seed=3)
    epochs = 4000
    counts = torch.zeros(4)
    lengths = set()
    for number in range(epochs):
        indices = epoch(sampler, number)
        lengths.add(len(indices))
        counts += torch.bincount(torch.tensor(indices), minlength=4)
    assert lengths == {8}
    # per epoch a count has variance <= 1/4 (one Bernoulli), plus the cut or wrap: 0.05 is > 5 standard errors
    torch.testing.assert_close(counts / epochs, factors, atol=0.05, rtol=0)


def test_epochs_are_a_function_of_seed_and_epoch():
    factors = torch.linspace(1.0, 3.0, 40)
    assert epoch(RepeatFactorSampler(factors, seed=1), 2) == epoch(RepeatFactorSampler(factors, seed=1), 2)
    assert epoch(RepeatFactorSampler(factors, seed=1), 2) != epoch(RepeatFactorSampler(factors, seed=1), 3)
    assert epoch(RepeatFactorSampler(factors, seed=1), 2) != epoch(RepeatFactorSampler(factors, seed=2), 2)


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_shards_have_one_fixed_length_and_together_are_the_epoch_list(num_replicas):
    factors = torch.rand(25, generator=torch.Generator().manual_seed(0)) * 2 + 1
    samplers = [RepeatFactorSampler(factors, num_replicas=num_replicas, rank=r, seed=4) for r in range(num_replicas)]
    per_rank = math.ceil(round(float(factors.sum())) / num_replicas)
    for number in range(6):
        shards = [epoch(sampler, number) for sampler in samplers]
        assert [len(shard) for shard in shards] == [per_rank] * num_replicas == [len(s) for s in samplers]
        dealt = [shards[position % num_replicas][position // num_replicas] for position in range(per_rank * num_replicas)]
        assert dealt == samplers[0].epoch_indices().tolist()  # DistributedSampler's indices[rank::num_replicas]


def test_resume_skips_the_trained_batches_of_the_saved_epoch():
    factors = torch.tensor([1.0, 1.5, 2.25, 1.0, 3.0, 1.75, 1.0, 1.5, 2.0, 1.0])  # 16 samples per epoch
    dataset = DictDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))

    def loader():
        return ResumableDataLoader(dataset, 3, sampler=RepeatFactorSampler(factors, seed=0), progress_fn=lambda: (0, 0))

    straight = loader()
    straight.sampler.set_epoch(2)
    full = [batch["index"].tolist() for batch in straight]
    assert len(full) == len(straight) == 6
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "batches_done": 4})
    resumed.sampler.set_epoch(2)
    assert [batch["index"].tolist() for batch in resumed] == full[4:]


def test_sampler_refuses_bad_factors():
    with pytest.raises(ValueError, match="factors ≥ 1"):
        RepeatFactorSampler([1.0, 0.5])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        RepeatFactorSampler([])


# ----------------------------------------------------------------------------------------------
# the techniques in a fit


class SeenIndices(L.Callback):
    """The training indices of every step, in order."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(batch["index"].tolist())


def long_tailed_digits(**kwargs) -> DigitsDataModule:
    """443 training samples, 493 per epoch with RFS or IRFS at threshold 0.1: 8 steps of 64."""
    return DigitsDataModule(flatten=True, batch_size=64, long_tail=LongTail(imbalance_ratio=10.0), **kwargs)


@pytest.mark.parametrize("technique", [RepeatFactorSampling, IRFS])
def test_a_fit_draws_the_training_set_with_the_techniques_factors(technique):
    data, seen = long_tailed_digits(), SeenIndices()
    trainer = registry.example_trainer(max_epochs=1, callbacks=[technique(threshold=0.1), seen])
    trainer.fit(registry.example_module(), datamodule=data)
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, RepeatFactorSampler)  # the technique's setup ran before train_dataloader()
    torch.testing.assert_close(sampler.repeat_factors, repeat_factors_rfs(data.train_instance_counts, 0.1))
    drawn = Counter(index for step in seen.steps for index in step)
    assert sum(drawn.values()) == len(sampler) > data.num_train_samples
    tail = (data.train_dataset.targets == 9).nonzero()[:, 0].tolist()
    head = (data.train_dataset.targets == 0).nonzero()[:, 0].tolist()
    assert sum(drawn[i] for i in tail) / len(tail) > 1.5 > sum(drawn[i] for i in head) / len(head)
    assert data._train_repeat_factors is None  # teardown: the DataModule samples uniformly again


def test_a_resumed_fit_draws_the_same_batches_as_an_uninterrupted_one(tmp_path):
    total_steps, stop_at = 14, 9  # 8 steps per epoch: the stop lies in the second epoch

    def run(max_steps, **fit_kwargs):
        seen, extra = SeenIndices(), fit_kwargs.pop("callbacks", [])
        trainer = registry.example_trainer(max_steps=max_steps, callbacks=[IRFS(threshold=0.1), seen, *extra],
                                           enable_checkpointing=bool(extra))
        module = registry.example_module()
        trainer.fit(module, datamodule=long_tailed_digits(), **fit_kwargs)
        return seen.steps, module

    straight, straight_module = run(total_steps)
    assert len(straight) == total_steps and trainer_epoch_length(straight) == 8
    first, _ = run(stop_at, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1)])
    rest, resumed_module = run(total_steps, ckpt_path=str(tmp_path / f"epoch=1-step={stop_at}.ckpt"))
    assert first + rest == straight
    for key, value in straight_module.state_dict().items():
        torch.testing.assert_close(resumed_module.state_dict()[key], value, rtol=0, atol=0, msg=key)


def trainer_epoch_length(steps: list[list[int]]) -> int:
    """Steps of the first epoch: its last batch is the first smaller than batch size 64."""
    return next(number for number, step in enumerate(steps, 1) if len(step) < 64)


class PlainDataModule(L.LightningDataModule):
    """A DataModule that is not reglab's: no instance counts, no sampler hook."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(DictDataset(torch.randn(8, 64), torch.zeros(8, dtype=torch.long)), 4)


def test_setup_refuses_a_datamodule_without_the_hook_and_stacked_samplers():
    module = registry.example_module()
    with pytest.raises(TechniqueConfigError, match=r"IRFS: .*PlainDataModule has no `train_instance_counts`.* Fix: "):
        registry.example_trainer(max_steps=1, callbacks=[IRFS()]).fit(module, datamodule=PlainDataModule())
    with pytest.raises(TechniqueConfigError, match=r"NoneType has no .* Fix: fit with a reglab DataModule"):
        registry.example_trainer(max_steps=1, callbacks=[IRFS()]).fit(module, PlainDataModule().train_dataloader())
    stacked = [RepeatFactorSampling(threshold=0.1), IRFS(threshold=0.1)]
    with pytest.raises(TechniqueConfigError, match="RepeatFactorSampling: both it and IRFS set the training sampler"):
        registry.example_trainer(max_steps=1, callbacks=stacked).fit(module, datamodule=long_tailed_digits())


def test_datamodule_hook_checks_the_number_of_factors():
    data = long_tailed_digits()
    data.setup("fit")
    assert data.train_instance_counts.shape == (data.num_train_samples, 10)
    with pytest.raises(ValueError, match="one factor per training sample"):
        data.set_train_repeat_factors(torch.ones(3))


# ----------------------------------------------------------------------------------------------
# the claim's rare-class metric: a mean of logged test metrics (fit protocol setting `means`)


def test_fit_protocol_means_average_logged_test_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    smoke = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1"]
    settings = {"configs": ["configs/experiment/clean_digits.yaml"], "overrides": smoke,
                "means": {"test/acc_and_ece": ["test/acc", "test/ece"]}}
    metrics = FitProtocol("means", settings).run_arm("ce", {}, seed=0, workdir=tmp_path)
    assert metrics["test/acc_and_ece"] == pytest.approx((metrics["test/acc"] + metrics["test/ece"]) / 2)
    assert not any("_class_" in key for key in metrics)  # per-class values are logged, never judged
    tail = {"test/acc_tail": [f"test/acc_class_{c}" for c in (7, 8, 9)]}
    assert 0.0 <= FitProtocol("means", {**settings, "means": tail}).run_arm("ce", {}, seed=0, workdir=tmp_path)["test/acc_tail"] <= 1.0
    settings["means"] = {"test/rare": ["test/acc", "test/iou_class_9"]}
    with pytest.raises(ClaimError, match=r"needs \['test/iou_class_9'\], which the test did not log"):
        FitProtocol("means", settings).run_arm("ce", {}, seed=0, workdir=tmp_path)
    with pytest.raises(ClaimError, match="non-empty list of logged test metrics"):
        FitProtocol("means", {"means": {"test/rare": []}})


# ----------------------------------------------------------------------------------------------
# 2-process DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, port: int, report_dir: str) -> None:
    """One rank of a 2-process DDP group: one epoch with IRFS, then a fit whose training split
    differs between the ranks (refused on both)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    seen = SeenIndices()
    trainer = registry.example_trainer(max_epochs=1, devices=2, strategy="ddp", callbacks=[IRFS(threshold=0.1), seen])
    trainer.fit(registry.example_module(), datamodule=long_tailed_digits())
    sampler = trainer.train_dataloader.sampler
    report = {"seen": [i for step in seen.steps for i in step], "factors": sampler.repeat_factors.tolist(),
              "epoch_list": sampler.epoch_indices().tolist(), "length": len(sampler)}
    trainer = registry.example_trainer(max_steps=1, devices=2, strategy="ddp", callbacks=[IRFS(threshold=0.1)])
    try:
        trainer.fit(registry.example_module(), datamodule=long_tailed_digits(seed=rank))
    except TechniqueConfigError as error:
        report["refused"] = str(error)
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_ddp_ranks_share_the_factors_and_deal_disjoint_shards_of_the_epoch(tmp_path):
    start_ranks(ddp_worker, _free_port(), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["factors"] == ranks[1]["factors"] and ranks[0]["epoch_list"] == ranks[1]["epoch_list"]
    epoch_list = ranks[0]["epoch_list"]
    assert ranks[0]["length"] == ranks[1]["length"] == len(epoch_list) // 2
    # by position the shards are disjoint and together the epoch's list (an index may repeat within and across them)
    assert ranks[0]["seen"] == epoch_list[0::2] and ranks[1]["seen"] == epoch_list[1::2]
    assert len(set(epoch_list)) < len(epoch_list)
    for report in ranks:
        assert "training set differs between DDP ranks" in report["refused"]
