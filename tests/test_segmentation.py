"""Tests of the segmentation task: the tiny U-Net, SegmentationModule's contract, dense loss and metrics."""

from __future__ import annotations

import csv
import doctest
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F

from reglab.cli import main
from reglab.datamodules import DigitScenesDataModule, MaskNoise
from reglab.mixins import StepOutput
from reglab.models import create_backbone
from reglab.models import unet as unet_module
from reglab.registry import example_trainer
from reglab.tasks import SegmentationModule
from reglab.tasks import segmentation as segmentation_module
from reglab.tasks.segmentation import dense_cross_entropy_per_sample, segmentation_metrics
from reglab.technique import TechniqueConfigError, check_labels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def module() -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(num_classes=11, input_shape=(1, 32, 32))


def test_unet_is_a_small_dense_backbone():
    net = create_backbone("unet", (1, 32, 32))
    assert net.dense and 50_000 <= sum(p.numel() for p in net.parameters()) <= 150_000
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, net.feature_dim, 32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        create_backbone("unet", (1, 30, 30))


def test_forward_and_forward_step_follow_the_dense_contract(module):
    batch = {"input": torch.rand(3, 1, 32, 32), "target": torch.randint(0, 11, (3, 32, 32)), "index": torch.arange(3)}
    assert module(batch["input"]).shape == (3, 11, 32, 32)
    out = module.forward_step(batch)
    assert out.logits.shape == (3, 11, 32, 32)
    assert out.target is batch["target"] and out.labels is batch["target"]
    assert out.features.shape == (3, 16, 32, 32) and out.extras["bottleneck"].shape == (3, 64, 8, 8)
    assert torch.equal(out.index, batch["index"])
    assert module.task_loss(out).shape == (3,)
    probabilities = module.predict_step(batch, 0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3, 32, 32))


def test_loss_is_the_mean_pixel_cross_entropy_per_image_for_hard_and_one_hot_targets():
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    hard = dense_cross_entropy_per_sample(logits, target)
    by_hand = torch.stack([F.cross_entropy(logits[n : n + 1], target[n : n + 1]) for n in range(2)])
    torch.testing.assert_close(hard, by_hand)
    one_hot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dense_cross_entropy_per_sample(logits, one_hot), hard)


def test_ignored_pixels_count_in_no_loss():
    logits = torch.randn(2, 3, 2, 2)
    target = torch.tensor([[[0, 1], [255, 255]], [[255, 255], [255, 255]]])
    loss = dense_cross_entropy_per_sample(logits, target, ignore_index=255)
    # image 0: the two labelled pixels' cross-entropies, averaged; image 1: nothing labelled
    counted = -(logits[0, :, 0, 0].log_softmax(0)[0] + logits[0, :, 0, 1].log_softmax(0)[1]) / 2
    torch.testing.assert_close(loss, torch.stack([counted, torch.tensor(0.0)]))
    soft = F.one_hot(target.clamp_max(2), 3).permute(0, 3, 1, 2).float() * (target != 255)[:, None]
    torch.testing.assert_close(dense_cross_entropy_per_sample(logits, soft), loss)


def test_miou_per_class_iou_and_pixel_accuracy_against_a_hand_computed_case():
    # target  0 0 1 1 2 | 255      prediction  0 1 1 1 0 | 2
    target = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = F.one_hot(predicted, 3).T.float().reshape(1, 3, 1, 6)
    metrics = segmentation_metrics(3, prefix="test/")
    metrics.update(logits, target)
    values = metrics.compute()
    # class 0: |{0}| / |{0, 1, 4}| = 1/3; class 1: |{2, 3}| / |{1, 2, 3}| = 2/3; class 2: 0 / |{4}| = 0
    torch.testing.assert_close(values["test/iou_per_class"], torch.tensor([1 / 3, 2 / 3, 0.0]))
    torch.testing.assert_close(values["test/miou"], torch.tensor(1 / 3))
    torch.testing.assert_close(values["test/pixel_acc"], torch.tensor(3 / 5))


def test_check_labels_reads_the_class_dim_of_dense_logits_and_skips_ignored_pixels(module):
    logits = torch.zeros(1, 11, 2, 2)
    fits, too_high = torch.tensor([[[0, 10], [255, 3]]]), torch.tensor([[[0, 11], [255, 3]]])
    check_labels(StepOutput(logits=logits, target=fits, labels=fits), module)
    with pytest.raises(TechniqueConfigError, match="label 11, but SegmentationModule has 11 classes"):
        check_labels(StepOutput(logits=logits, target=too_high, labels=too_high), module)
    classifier_logits = torch.zeros(2, 11)  # (N, C): classes stay in the last dim
    with pytest.raises(TechniqueConfigError, match="has 11 classes"):
        check_labels(StepOutput(logits=classifier_logits, target=torch.tensor([2, 11])), module)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "cnn"}, "one feature vector per image"),
        ({"ignore_index": 3}, "ignore_index=3 is one of the 11 classes"),
        ({"num_classes": None}, "needs num_classes and input_shape"),
    ],
)
def test_bad_module_arguments_fail_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentationModule(**{"num_classes": 11, "input_shape": (1, 32, 32), **kwargs})


def test_module_built_for_other_data_is_refused_at_setup():
    data = DigitScenesDataModule(canvas=48, num_train=8, num_val=4, num_test=4, batch_size=4)
    with pytest.raises(ValueError, match="input_shape=\\(1, 32, 32\\), but DigitScenesDataModule has input_shape=\\(1, 48, 48\\)"):
        example_trainer(max_steps=1).fit(SegmentationModule(num_classes=11, input_shape=(1, 32, 32)), datamodule=data)


def test_a_short_fit_on_noisy_scenes_learns_and_logs_every_metric(one_thread):
    lightning.seed_everything(0, verbose=False)
    data = DigitScenesDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, mask_noise=MaskNoise(flip=0.5))
    model = SegmentationModule(num_classes=data.num_classes, input_shape=data.input_shape, lr=3e-3)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    before = model.task_loss(model.forward_step(batch)).mean().item()
    trainer = example_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    logged = dict(trainer.callback_metrics)
    [results] = trainer.test(model, datamodule=data, verbose=False)
    model.eval()
    after = model.task_loss(model.forward_step(batch)).mean().item()
    assert after < before
    assert {"val/miou", "val/pixel_acc", "train/memorized", "train/corrected"} <= set(logged)
    assert {f"test/iou_class_{c}" for c in range(11)} | {"test/miou", "test/pixel_acc"} <= set(results)
    assert 0.0 <= results["test/miou"] <= 1.0 and 0.0 <= results["test/pixel_acc"] <= 1.0


def test_experiment_yaml_runs_end_to_end_with_reglab_fit(tmp_path: Path, capsys, one_thread):
    main([
        "fit", "--config", str(CONFIGS / "experiment/noisy_scenes.yaml"), f"--runs_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
    ])
    [run] = (tmp_path / "noisy_scenes").glob("version_*")
    with open(run / "metrics.csv") as file:
        columns = set(next(csv.reader(file)))
    assert {"val/miou", "test/miou", "test/iou_class_10", "train/memorized"} <= columns
    assert "test mean IoU (clean masks)" in capsys.readouterr().out


@pytest.mark.parametrize("module_under_test", [segmentation_module, unet_module], ids=lambda m: m.__name__)
def test_docstring_examples_run(module_under_test):
    assert doctest.testmod(module_under_test, verbose=False).failed == 0


def test_prediction_grid_shows_each_scene_its_mask_and_the_prediction(module):
    data = DigitScenesDataModule(num_train=4, num_val=2, num_test=3, batch_size=2)
    data.setup()
    batch = next(iter(data.test_dataloader()))
    figure = segmentation_module.prediction_grid(module, data, num_images=2)
    rows = [[ax.images[0].get_array() for ax in figure.axes[i * 2:(i + 1) * 2]] for i in range(3)]
    with torch.no_grad():
        expected = module.eval()(batch["input"][:2]).argmax(1)
    module.train()
    for shown, truth, predicted, image, mask, prediction in zip(*rows, batch["input"], batch["target"], expected):
        assert (torch.as_tensor(shown) == image[0]).all() and (torch.as_tensor(truth) == mask).all()
        assert (torch.as_tensor(predicted) == prediction).all()


def test_fit_protocol_hooks_are_imported_at_load_and_a_bad_name_says_the_fix():
    from reglab.bench.fit import FitProtocol
    from reglab.bench.protocols import ClaimError

    protocol = FitProtocol("c", {"figures": ["reglab.tasks.segmentation.prediction_grid"],
                                 "measures": ["reglab.nn.fadc.dilation_stats"]})
    assert protocol.figure_fns == {"prediction_grid": segmentation_module.prediction_grid}
    assert [f.__name__ for f in protocol.measures] == ["dilation_stats"]
    with pytest.raises(ClaimError, match="cannot import 'reglab.nn.fadc.no_such'.*Fix"):
        FitProtocol("c", {"measures": ["reglab.nn.fadc.no_such"]})
