"""The Si-Blurry online stream (reglab.datamodules.si_blurry) and the online metrics over it
(reglab.continual.online)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from reglab.datamodules import DigitsDataModule, SiBlurryDataModule, si_blurry_stream
from harness import ddp_strategy, quiet_trainer, small_module
from reglab.continual.online import AnytimeAccuracy, area_under_accuracy, seen_class_accuracy

# 20 classes x 30 samples, grouped by class as many datasets are stored.
TARGETS = torch.arange(20).repeat_interleave(30)


def home_task(stream, cls: int) -> int:
    groups = [d + b for d, b in zip(stream.disjoint_classes, stream.blurry_classes)]
    return next(t for t, classes in enumerate(groups) if cls in classes)


def test_every_sample_once_and_class_proportions():
    stream = si_blurry_stream(TARGETS, 20, num_tasks=5, disjoint_percent=50, blurry_percent=10, seed=3)
    assert sorted(stream.order.tolist()) == list(range(len(TARGETS)))
    assert stream.task.tolist() == sorted(stream.task.tolist()) and sum(stream.task_sizes) == len(TARGETS)
    disjoint, blurry = sum(stream.disjoint_classes, []), sum(stream.blurry_classes, [])
    assert len(disjoint) == 10 and len(blurry) == 10 and sorted(disjoint + blurry) == list(range(20))
    labels = TARGETS[stream.order]
    for cls in disjoint:  # a disjoint class lives in its own task only
        assert set(stream.task[labels == cls].tolist()) == {home_task(stream, cls)}


def test_m_percent_of_blurry_samples_move_and_only_those():
    stream = si_blurry_stream(TARGETS, 20, num_tasks=5, disjoint_percent=50, blurry_percent=10, seed=3)
    blurry_samples = int(torch.isin(TARGETS, torch.tensor(sum(stream.blurry_classes, []))).sum())
    assert len(stream.blurred) == blurry_samples * 10 // 100 == 30
    assert torch.isin(TARGETS[stream.blurred], torch.tensor(sum(stream.blurry_classes, []))).all()
    task_of = torch.empty(len(TARGETS), dtype=torch.long)
    task_of[stream.order] = stream.task
    moved = torch.zeros(len(TARGETS), dtype=torch.bool)
    moved[stream.blurred] = True
    for position in (~moved).nonzero().flatten().tolist():
        assert task_of[position] == home_task(stream, int(TARGETS[position]))
    # the blurred samples are spread over tasks other than their home (a few may land back home)
    away = [task_of[p] != home_task(stream, int(TARGETS[p])) for p in stream.blurred.tolist()]
    assert sum(away) > len(away) // 2


def test_stochastic_boundaries_are_seeded():
    first = si_blurry_stream(TARGETS, 20, seed=0)
    assert torch.equal(first.order, si_blurry_stream(TARGETS, 20, seed=0).order)
    others = [si_blurry_stream(TARGETS, 20, seed=s) for s in range(1, 6)]
    assert any(o.task_sizes != first.task_sizes for o in others)
    assert any([len(c) for c in o.disjoint_classes] != [len(c) for c in first.disjoint_classes] for o in others)


def test_extreme_proportions():
    all_disjoint = si_blurry_stream(TARGETS, 20, disjoint_percent=100, blurry_percent=10, seed=1)
    assert not sum(all_disjoint.blurry_classes, []) and len(all_disjoint.blurred) == 0
    all_blurry = si_blurry_stream(TARGETS, 20, disjoint_percent=0, blurry_percent=100, seed=1)
    # a task owning fewer blurry samples than its drawn count gives up all it has (official code)
    assert 0 < len(all_blurry.blurred) <= len(TARGETS)
    assert sorted(all_blurry.order.tolist()) == list(range(len(TARGETS)))
    with pytest.raises(ValueError, match="disjoint_percent"):
        si_blurry_stream(TARGETS, 20, disjoint_percent=150)


def digits_stream(batch_size: int = 32, seed: int = 0) -> SiBlurryDataModule:
    return SiBlurryDataModule(DigitsDataModule(flatten=True, batch_size=batch_size, seed=seed))


def test_loader_yields_the_stream_in_order_and_resumes_mid_stream():
    data = digits_stream()
    data.setup("fit")
    assert "task" in data.batch_keys and data.num_train_samples == len(data.stream.order)
    loader = data.train_dataloader()
    yielded = torch.cat([batch["index"] for batch in loader])
    assert torch.equal(yielded, data.stream.order)
    resumed = data.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches_done": 5})
    assert torch.equal(torch.cat([batch["index"] for batch in resumed]), data.stream.order[5 * 32 :])


class IndexRecorder(L.Callback):
    def __init__(self):
        self.indices: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].clone())


def test_online_fit_resumes_mid_stream_exactly(tmp_path):
    """One online epoch stopped after 7 batches and resumed: same weights, same curve, and the
    two halves together saw every stream sample once, in order."""

    def run(max_steps, ckpt_path=None, checkpoint=None):
        module, recorder, curve = small_module(), IndexRecorder(), AnytimeAccuracy(eval_period=64)
        callbacks = [curve, recorder] + ([checkpoint] if checkpoint else [])
        trainer = quiet_trainer(max_epochs=1, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(checkpoint))
        trainer.fit(module, datamodule=digits_stream(), ckpt_path=ckpt_path)
        return module, recorder, curve

    straight, straight_seen, straight_curve = run(-1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    _, first_half, _ = run(7, checkpoint=checkpoint)
    resumed, second_half, resumed_curve = run(-1, ckpt_path=str(tmp_path / "epoch=0-step=7.ckpt"))
    data = digits_stream()
    data.setup("fit")
    assert torch.equal(torch.cat(first_half.indices + second_half.indices), data.stream.order)
    assert torch.equal(torch.cat(straight_seen.indices), data.stream.order)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert resumed_curve.samples == straight_curve.samples and resumed_curve.accuracies == straight_curve.accuracies
    assert resumed_curve.summary() == straight_curve.summary()


def test_resume_refuses_another_stream():
    data = digits_stream()
    with pytest.raises(ValueError, match="same seed"):
        data.load_state_dict({**data.state_dict(), "stream_seed": 5})


# -- online metrics ---------------------------------------------------------------------------
def test_area_under_accuracy_is_the_mean_of_equally_spaced_points():
    assert area_under_accuracy([0.5, 0.25, 1.0, 0.25]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="eval_period"):
        area_under_accuracy([])


class FixedLogits(L.LightningModule):
    """Predicts the same logits for every input (for a hand-computed accuracy)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_seen_class_accuracy_counts_seen_test_samples_and_predicts_among_seen_classes():
    class Split:
        targets = torch.tensor([0, 0, 1, 2, 2, 2])

        def __getitem__(self, i):
            return {"input": torch.zeros(1), "target": self.targets[i]}

        def __len__(self):
            return len(self.targets)

    # class 1 scores highest but is unseen: the prediction falls back to class 2, the best seen one
    module = FixedLogits(torch.tensor([[0.0, 5.0, 1.0]]))
    seen = torch.tensor([True, False, True])
    # seen test samples: classes 0, 0, 2, 2, 2; all predicted 2 -> 3 / 5
    assert seen_class_accuracy(module, Split(), seen, batch_size=2) == pytest.approx(3 / 5)


def test_anytime_accuracy_curve_points_and_unseen_class_mask():
    data, curve, module = digits_stream(batch_size=32), AnytimeAccuracy(eval_period=100), small_module()
    quiet_trainer(max_epochs=1, callbacks=[curve]).fit(module, datamodule=data)
    total = len(data.stream.order)
    assert len(curve.samples) == total // 100
    assert all(s >= 100 * (k + 1) for k, s in enumerate(curve.samples))
    assert all(0.0 <= a <= 1.0 for a in curve.accuracies)
    summary = curve.summary()
    assert summary["online/A_auc"] == pytest.approx(sum(curve.accuracies) / len(curve.accuracies))
    assert summary["online/A_last"] == seen_class_accuracy(module, data.test_dataset, curve.seen, 64)
    streamed_classes = torch.zeros(10, dtype=torch.bool)
    streamed_classes[data.train_dataset.targets] = True
    assert torch.equal(curve.seen, streamed_classes) and torch.equal(module.active_classes, streamed_classes)


def test_anytime_accuracy_masks_classes_before_they_appear():
    data, curve, module = digits_stream(batch_size=32), AnytimeAccuracy(eval_period=1000), small_module()
    quiet_trainer(max_steps=1, callbacks=[curve]).fit(module, datamodule=data)
    data.setup("fit")
    first_batch_classes = torch.zeros(10, dtype=torch.bool)
    first_batch_classes[data.train_dataset.targets[:32]] = True
    assert torch.equal(module.active_classes, first_batch_classes) and not first_batch_classes.all()


def test_anytime_accuracy_refuses_bad_settings():
    with pytest.raises(ValueError, match="eval_period"):
        AnytimeAccuracy(eval_period=0)

    class NoMask(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="active_classes"):
        quiet_trainer(max_steps=1, callbacks=[AnytimeAccuracy()]).fit(NoMask(), datamodule=digits_stream())


class CurveOnEachRank(L.Callback):
    """Saves, per rank, the labels that rank trained on and its AnytimeAccuracy state."""

    def __init__(self, report_dir, curve: AnytimeAccuracy):
        self.report_dir, self.curve, self.labels = report_dir, curve, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch["target"].clone())

    def on_train_end(self, trainer, pl_module):
        torch.save({"labels": torch.cat(self.labels), **self.curve.state_dict(), "summary": self.curve.summary()},
                   self.report_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_anytime_accuracy_agrees_on_every_ddp_rank_and_counts_all_ranks_classes(tmp_path):
    curve = AnytimeAccuracy(eval_period=64)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ddp_strategy(), max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[curve, CurveOnEachRank(tmp_path, curve)])
    trainer.fit(small_module(), datamodule=digits_stream(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    union = torch.zeros(10, dtype=torch.bool)
    union[torch.cat([report["labels"] for report in ranks])] = True
    assert not torch.equal(ranks[0]["labels"], ranks[1]["labels"])  # the ranks did see different samples
    for report in ranks:
        assert torch.equal(report["seen"], union)
        assert report["samples_seen"] == 2 * 6 * 16
        assert report["samples"].tolist() == ranks[0]["samples"].tolist() and len(report["samples"]) == 3
        assert report["accuracies"].tolist() == ranks[0]["accuracies"].tolist()
        assert report["summary"] == ranks[0]["summary"]
