"""Dataset condensation: the gradient distance, DC's and DCC's losses, the batch-norm freeze and
NRR-DD's parts (Grad-CAM, critical mask, BN matching, DBR term) against hand-computed cases; the
methods' outputs, the saved set and grid, the command and the protocol's set-up errors."""

from __future__ import annotations

import doctest
import importlib
import json
import math

import pytest
import torch
from torch import nn

from reglab import cli
from reglab.bench.protocols import ClaimError
from reglab.callbacks.condensation.dataset_condensation import DatasetCondensation
from reglab.callbacks.condensation.random_subset import RandomSubset
from reglab.callbacks.condensation.dcc import DCC, mean_gradients
from reglab.callbacks.condensation.nrr_dd import NRRDD, batch_norm_matching, critical_mask, grad_cam
from reglab.condensation import pipeline
from reglab.condensation.distance_transfer import DistanceTransfer, label_distance
from reglab.condensation.matching import freeze_batch_norm, layerwise_distance
from reglab.condensation.pipeline import CondensationError, CondensationProtocol, CondensedSet
from reglab.step import StepOutput
from reglab.technique import TechniqueConfigError

RANDOM = {"class_path": "reglab.callbacks.condensation.random_subset.RandomSubset"}


def _toy_data(n_per_class: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    labels = torch.arange(classes).repeat(n_per_class)
    return torch.rand(len(labels), 1, 8, 8) + labels.view(-1, 1, 1, 1), labels


def test_layerwise_distance_is_one_minus_cosine_per_output_row_and_skips_1d_tensors():
    real, syn = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    bias = torch.tensor([1.0, -1.0])
    # row 1: cos 45 degrees; row 2: parallel; the bias gradients (opposite) add nothing
    expected = 1 - 1 / math.sqrt(2)
    assert float(layerwise_distance([syn, -bias], [real, bias])) == pytest.approx(expected, abs=1e-4)
    conv_real, conv_syn = torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    conv_syn[1] = -1  # second output channel points the other way: 1 - (-1) = 2
    assert float(layerwise_distance([conv_syn], [conv_real])) == pytest.approx(2.0, abs=1e-4)


def _zero_linear() -> nn.Linear:
    net = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(net.weight)
    return net


def test_dc_and_dcc_losses_by_hand_on_a_zero_linear_classifier():
    """With W = 0 the softmax is uniform, so the gradient of class c's mean cross-entropy on one image x is
    G_c[k] = (1/2 - [k == c]) x: both rows are +-x/2. DC sums over classes 2 (1 - cos(real_c, syn_c));
    DCC compares the class-mean gradient, whose rows are +-(x_1 - x_0)/4: 2 (1 - cos(r_1 - r_0, s_1 - s_0))."""
    real = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    syn = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]])]
    net = _zero_linear()
    params = list(net.parameters())
    dc = DatasetCondensation(iterations=1).matching_loss(net, params, real, syn, iteration=0)
    assert float(dc.detach()) == pytest.approx(2 * (1 - 0.0) + 2 * (1 - 1.0), abs=1e-4)
    dcc = DCC(iterations=10, warmup_iterations=3)
    contrastive = 2 * (1 - 1 / math.sqrt(2))  # cos((-1, 1), (0, 1))
    assert float(dcc.matching_loss(net, params, real, syn, iteration=3).detach()) == pytest.approx(contrastive, abs=1e-4)
    assert float(dcc.matching_loss(net, params, real, syn, iteration=2).detach()) == pytest.approx(float(dc.detach()), abs=1e-4)


def test_mean_gradients_average_each_parameter_over_classes():
    a = (torch.tensor([1.0, 3.0]), torch.tensor([[2.0]]))
    b = (torch.tensor([3.0, 5.0]), torch.tensor([[4.0]]))
    mean = mean_gradients([a, b])
    assert torch.equal(mean[0], torch.tensor([2.0, 4.0])) and torch.equal(mean[1], torch.tensor([[3.0]]))


def test_freeze_batch_norm_sets_the_batch_statistics_exactly_and_freezes_them():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    x = torch.randn(16, 3)
    freeze_batch_norm(net, x)
    hidden = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, hidden.mean(0), atol=1e-6)
    assert torch.allclose(net[1].running_var, hidden.var(0), atol=1e-5)  # unbiased, as BatchNorm keeps it
    assert not net[1].training and net[0].training
    net(torch.randn(4, 3))
    assert torch.allclose(net[1].running_mean, hidden.mean(0), atol=1e-6)


def test_random_subset_draws_real_images_of_each_class_reproducibly():
    images, labels = _toy_data()
    first = RandomSubset().condense(images, labels, ipc=2, seed=3)
    assert first.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(first.images, first.labels):
        assert any(torch.equal(image, real) for real in images[labels == label])
    assert torch.equal(first.images, RandomSubset().condense(images, labels, ipc=2, seed=3).images)
    with pytest.raises(CondensationError, match="ipc=7"):
        RandomSubset().condense(images, labels, ipc=7, seed=0)


def test_gradient_matching_moves_the_synthetic_images_and_refuses_unknown_loops():
    images, labels = _toy_data()
    method = DatasetCondensation(iterations=2, init="real", channels=(4,))
    start = method.initial_images(pipeline.per_class(images, labels), 1, torch.Generator().manual_seed(0))
    condensed = method.condense(images, labels, ipc=1, seed=0)
    assert condensed.method == "dataset_condensation" and condensed.labels.tolist() == [0, 1, 2]
    assert not torch.equal(condensed.images, start) and torch.isfinite(condensed.images).all()
    with pytest.raises(CondensationError, match="ipc in"):
        method.condense(images, labels, ipc=3, seed=0)
    with pytest.raises(CondensationError, match="warmup_iterations"):
        DCC(iterations=2, warmup_iterations=5)


def test_condensed_set_round_trips_and_never_overwrites(tmp_path):
    images, labels = _toy_data()
    condensed = CondensedSet(images[:3], labels[:3], "random_subset", 1, {"distance": torch.ones(3)})
    path = condensed.save(tmp_path / "set.pt")
    loaded = CondensedSet.load(path)
    assert torch.equal(loaded.images, condensed.images) and loaded.method == "random_subset"
    assert torch.equal(loaded.extras["distance"], torch.ones(3))
    with pytest.raises(CondensationError, match="exists"):
        condensed.save(path)
    grid = condensed.save_grid(tmp_path / "grid.png")
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CondensationError, match="exists"):
        condensed.save_grid(grid)


def test_condense_command_writes_the_set_grid_and_accuracy_into_a_new_folder(tmp_path, capsys):
    config = tmp_path / "random.yaml"
    config.write_text(json.dumps({"method": RANDOM, "ipc": 1}))
    out = tmp_path / "out"
    cli.main(["condense", "--config", str(config), "--out", str(out), "--eval_models", "1", "--eval_epochs", "2",
              "--seed", "1"])
    summary = json.loads((out / "random_subset_ipc1.json").read_text())
    assert len(summary["test/acc"]) == 1 and 0 <= summary["test/acc"][0] <= 1
    assert CondensedSet.load(out / "random_subset_ipc1.pt").images.shape == (10, 1, 8, 8)
    assert (out / "random_subset_ipc1.png").is_file()
    with pytest.raises(SystemExit, match="exists"):
        pipeline.main(["--config", str(config), "--out", str(out)])


def test_protocol_refuses_arms_that_are_not_methods_and_filters_overrides():
    protocol = CondensationProtocol("c", {"method_overrides": {"iterations": 1, "warmup_iterations": 0}})
    with pytest.raises(ClaimError, match="not a CondensationMethod"):
        protocol.check_arm("bad", {"method": {"class_path": "reglab.tasks.ClassificationModule"}})
    with pytest.raises(ClaimError, match="a condensation arm"):
        protocol.check_arm("bad", {"technique": RANDOM})
    dc = protocol.method({"method": {"class_path": "reglab.callbacks.condensation.dataset_condensation.DatasetCondensation"}})
    assert dc.iterations == 1  # warmup_iterations is DCC's only: not passed to DC
    assert isinstance(protocol.method({"method": RANDOM}), RandomSubset)
    with pytest.raises(ClaimError, match="ipc"):
        CondensationProtocol("c", {"ipc": 0})


def test_label_distance_and_the_dbr_term_by_hand():
    probabilities = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    distances = label_distance(probabilities, torch.tensor([0, 1]))
    assert torch.allclose(distances, torch.tensor([math.sqrt(0.32), math.sqrt(0.02)]), atol=1e-6)
    logits = torch.log(probabilities)  # softmax(log p) = p
    batch = {"label_distance": torch.tensor([0.0, 0.0])}
    out = StepOutput(logits=logits, target=torch.tensor([0, 1]), batch=batch)
    term = DistanceTransfer(weight=2.0).loss_terms(out, None)["dbr"]
    assert float(term) == pytest.approx(2.0 * (0.32 + 0.02) / 2, abs=1e-6)
    with pytest.raises(TechniqueConfigError, match="label_distance"):
        DistanceTransfer().loss_terms(StepOutput(logits=logits, target=torch.tensor([0, 1]), batch={}), None)


def test_critical_mask_keeps_the_top_share_of_each_map():
    cam = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]], [[[1.0, 0.0], [0.2, 0.4]]]])
    assert critical_mask(cam, 0.5).flatten(1).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert critical_mask(cam, 0.0).sum() == 2  # at least one pixel per image


def test_grad_cam_of_a_linear_map_is_the_relu_of_the_weighted_activation():
    """One 1x1 conv channel, global average pool, linear head w: dlogit/dA = w / (H W) everywhere, so the
    map is relu(w * A) scaled to a peak of 1."""
    conv, relu = nn.Conv2d(1, 1, 1, bias=False), nn.ReLU()
    nn.init.ones_(conv.weight)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0], [-1.0]]))
    net = nn.Sequential(conv, relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    images = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    assert torch.allclose(grad_cam(net, relu, images, torch.tensor([0])), images / 4)
    assert torch.equal(grad_cam(net, relu, images, torch.tensor([1])), torch.zeros_like(images))


def test_batch_norm_matching_is_the_distance_to_the_running_statistics():
    norm = nn.BatchNorm1d(2).eval()
    norm.running_mean.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # mean (1, 1), biased var (1, 1); running var (1, 1)
    _, loss = batch_norm_matching(norm, x)
    assert float(loss) == pytest.approx(1.0)


def test_nrr_dd_keeps_the_critical_pixels_of_selected_real_images_and_stores_distances():
    images, labels = _toy_data()
    method = NRRDD(teacher_epochs=1, refine_steps=3, refine_lr=0.5, critical_fraction=0.25, channels=(4,))
    condensed = method.condense(images, labels, ipc=1, seed=0)
    assert condensed.labels.tolist() == [0, 1, 2] and condensed.extras["label_distance"].shape == (3,)
    for image, label in zip(condensed.images, condensed.labels):
        same = [(image == real).float().mean() for real in images[labels == label]]
        assert 0.25 <= max(same) < 1  # a quarter of one real image's pixels kept, the rest refined
    assert isinstance(method.student_techniques(condensed)[0], DistanceTransfer)
    with pytest.raises(CondensationError, match="critical_fraction"):
        NRRDD(critical_fraction=1.5)


def test_protocol_runs_an_arm_and_draws_its_grid_without_overwriting(tmp_path):
    protocol = CondensationProtocol("c", {"eval_models": 1, "eval_epochs": 1})
    protocol.check_arm("random", {"method": RANDOM})
    result = protocol.run_arm("random", {"method": RANDOM}, seed=0, workdir=tmp_path)
    assert set(result) == {"test/acc"} and 0 <= result["test/acc"] <= 1
    runs = {"random": [result]}
    first, second = protocol.figures(runs, tmp_path, "c"), protocol.figures(runs, tmp_path, "c")
    assert "![random](c_random_grid.png)" in first and "![random](c_random_grid_2.png)" in second
    assert (tmp_path / "c_random_grid.png").is_file() and (tmp_path / "c_random_grid_2.png").is_file()


@pytest.mark.parametrize("name", ["reglab.condensation.pipeline", "reglab.condensation.matching",
                                  "reglab.condensation.distance_transfer", "reglab.callbacks.condensation.random_subset",
                                  "reglab.callbacks.condensation.dataset_condensation",
                                  "reglab.callbacks.condensation.dcc", "reglab.callbacks.condensation.nrr_dd"])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    assert doctest.testmod(module, verbose=False).failed == 0
