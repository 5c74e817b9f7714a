"""LoCA (paper 18): the DCT maths, the finite-difference location gradient, the alternating
schedule, the location update and the parameter count."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from reglab import registry
from reglab.callbacks.peft.loca import (
    InverseDCTWithLocationGradient,
    LoCA,
    LocaLayer,
    dct2,
    dct_matrix,
    sparse_idct2,
)
from tiny_bert import tiny_bert_config


def test_dct_matrix_is_the_orthonormal_dct_ii():
    # by hand: C_2 = [[1, 1], [1, -1]] / sqrt(2)
    torch.testing.assert_close(dct_matrix(2, torch.device("cpu")), torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2))
    c = dct_matrix(5, torch.device("cpu"))
    # row k: sqrt(2/N) * cos(pi * (2j + 1) * k / (2N)), row 0 scaled by 1/sqrt(2)
    j = np.arange(5)
    expected = np.stack([np.sqrt(2 / 5) * np.cos(np.pi * (2 * j + 1) * k / 10) for k in range(5)])
    expected[0] /= np.sqrt(2)
    np.testing.assert_allclose(c.numpy(), expected, atol=1e-6)
    torch.testing.assert_close(c @ c.T, torch.eye(5), atol=1e-6, rtol=0)


def test_sparse_idct2_is_scipys_inverse_dct_of_the_sparse_spectrum():
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.tensor([0, 3, 5, 3]), torch.tensor([2, 1, 6, 1])  # (3, 1) twice: they add up
    coefficients = torch.randn(4, generator=generator)
    spectrum = np.zeros((6, 7))
    np.add.at(spectrum, (rows.numpy(), columns.numpy()), coefficients.numpy())
    expected = scipy.fft.idctn(spectrum, norm="ortho")
    np.testing.assert_allclose(sparse_idct2(coefficients, rows, columns, (6, 7)).numpy(), expected, atol=1e-6)
    # and dct2 inverts it
    np.testing.assert_allclose(dct2(torch.from_numpy(expected).float()).numpy(), spectrum, atol=1e-6)


def _linear_loss(weight_gradient: torch.Tensor, coefficients, locations):
    """<G, dW>: its derivative in dW is G, so every gradient has a closed form."""
    return (InverseDCTWithLocationGradient.apply(coefficients, locations, tuple(weight_gradient.shape)) * weight_gradient).sum()


def test_coefficient_gradient_is_the_dct_of_the_weight_gradient_at_the_locations():
    generator = torch.Generator().manual_seed(1)
    gradient = torch.randn(6, 8, generator=generator)
    coefficients = torch.randn(3, generator=generator, requires_grad=True)
    locations = torch.tensor([[1.2, 4.0, 0.0], [6.6, 2.0, 7.0]], requires_grad=True)
    _linear_loss(gradient, coefficients, locations).backward()
    spectrum_gradient = scipy.fft.dctn(gradient.numpy(), norm="ortho")
    rows, columns = [1, 4, 0], [7, 2, 7]  # rounded
    np.testing.assert_allclose(coefficients.grad.numpy(), spectrum_gradient[rows, columns], atol=1e-5)


def test_location_gradient_is_the_central_difference_of_the_loss_with_one_sided_edges():
    generator = torch.Generator().manual_seed(2)
    gradient = 0.1 * torch.randn(6, 8, generator=generator)  # small: no clamping to [-1, 1]
    coefficients = torch.tensor([0.7, -1.3])
    locations = torch.tensor([[3.0, 0.0], [4.0, 7.0]], requires_grad=True)  # the second sits at a corner
    _linear_loss(gradient, coefficients.requires_grad_(), locations).backward()

    def loss_at(k, row, column):
        moved = locations.detach().clone()
        moved[:, k] = torch.tensor([row, column])
        return float(_linear_loss(gradient, coefficients.detach(), moved))

    expected = torch.tensor([
        [(loss_at(0, 4, 4) - loss_at(0, 2, 4)) / 2, (loss_at(1, 1, 7) - loss_at(1, 0, 7)) / 2],
        [(loss_at(0, 3, 5) - loss_at(0, 3, 3)) / 2, (loss_at(1, 0, 7) - loss_at(1, 0, 6)) / 2],
    ])
    torch.testing.assert_close(locations.grad, expected, atol=1e-5, rtol=0)


def test_location_gradient_is_clamped():
    gradient = torch.zeros(4, 4)
    gradient[2, 1] = 100.0  # a huge weight gradient at one entry
    coefficients = torch.tensor([50.0], requires_grad=True)
    locations = torch.tensor([[1.0], [1.0]], requires_grad=True)
    _linear_loss(gradient, coefficients, locations).backward()
    assert locations.grad.abs().max() == 1.0


def test_location_moves_towards_a_neighbouring_target_frequency():
    """dW should be one DCT basis at (4, 3); the coefficient sits at (2, 3): the locations' Adam
    steps carry it up to row 4 and leave the column."""
    torch.manual_seed(0)
    layer = LocaLayer(nn.Linear(7, 9, bias=False), n_frequency=1, scale=1.0)
    with torch.no_grad():
        layer.coefficients.fill_(1.0)
        layer.locations.copy_(torch.tensor([[2 / 8], [3 / 6]]))
    target = sparse_idct2(torch.tensor([1.0]), torch.tensor([4]), torch.tensor([3]), (9, 7))
    technique = LoCA(n_frequency=1, location_lr=0.01)
    for step in range(40):
        layer.zero_grad()
        (layer.delta_weight() - target).pow(2).sum().backward()
        technique.move_locations([layer], step)
    assert layer.pixel_locations().round().tolist() == [[4.0], [3.0]]


def test_schedule_alternates_phases_and_counts_location_steps():
    technique = LoCA(coefficient_phase=10, location_phase=20, location_until=75)
    technique.on_fit_start(None, None)  # location_until given: the trainer is not asked
    moves = [technique.moves_locations(step) for step in range(100)]
    assert moves == [False] * 10 + [True] * 20 + [False] * 10 + [True] * 20 + [False] * 10 + [True] * 5 + [False] * 25
    assert [technique.location_steps_before(s) for s in range(100)] == [sum(moves[:s]) for s in range(100)]


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.coefficients, self.locations = [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        (layer,) = [m for m in pl_module.modules() if isinstance(m, LocaLayer)]
        self.coefficients.append(layer.coefficients.detach().clone())
        self.locations.append(layer.locations.detach().clone())


def test_a_fit_trains_coefficients_and_locations_in_turn_then_only_coefficients():
    technique, recorder = LoCA(n_frequency=16, location_lr=0.01, coefficient_phase=2, location_phase=2), _Recorder()
    module = registry.example_module()
    registry.example_trainer(max_steps=50, callbacks=[technique, recorder]).fit(module, datamodule=registry.example_data())
    assert technique._location_until == 5  # 10 % of the 50 steps
    coefficients, locations = [torch.zeros(16)] + recorder.coefficients, recorder.locations
    (layer,) = [m for m in module.modules() if isinstance(m, LocaLayer)]
    for step in range(1, 50):
        coefficients_moved = not torch.equal(coefficients[step + 1], coefficients[step])
        locations_moved = not torch.equal(locations[step], locations[step - 1])
        assert coefficients_moved != technique.moves_locations(step), step
        assert locations_moved == technique.moves_locations(step), step
    assert layer.location_exp_avg.abs().sum() > 0


def test_parameter_count_is_three_per_frequency_per_layer_capped_at_the_weight_size():
    from reglab.tasks import ClassificationModule

    module = ClassificationModule("cnn", num_classes=10, input_shape=(1, 8, 8))
    technique = LoCA(n_frequency=300)
    technique.prepare(module)
    # conv 32x1x3x3 has 288 entries (capped), the two others 64x32x3x3 and 64x64x3x3; the head 10x64 + 10
    assert technique.parameter_counts["trainable"] == 3 * (288 + 300 + 300) + 650
    x = torch.randn(2, 1, 8, 8)
    before = module(x)
    with torch.no_grad():
        for adapter in [m for m in module.modules() if isinstance(m, LocaLayer)]:
            adapter.coefficients.normal_()
    changed = module(x)
    assert not torch.allclose(before, changed)
    technique.merge(module)
    assert not any(isinstance(m, LocaLayer) for m in module.modules())
    torch.testing.assert_close(module(x), changed, atol=1e-5, rtol=1e-5)


def test_a_convolution_adds_the_inverse_dct_read_as_out_x_in_kh_kw():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = LocaLayer(conv, n_frequency=5, scale=2.0)
    with torch.no_grad():
        layer.coefficients.normal_()
    rows, columns = layer.pixel_locations().round().long().numpy()
    spectrum = np.zeros((4, 27))
    np.add.at(spectrum, (rows, columns), layer.coefficients.detach().numpy())
    update = torch.from_numpy(2.0 * scipy.fft.idctn(spectrum, norm="ortho")).float().reshape(4, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    expected = nn.functional.conv2d(x, conv.weight + update, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_adapts_a_bert_models_query_key_value_and_dense_layers():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    technique = LoCA(n_frequency=20, target_modules=["query", "key", "value", "dense"])
    technique.prepare(model)
    adapted = sorted(name for name, m in model.named_modules() if isinstance(m, LocaLayer))
    assert adapted == sorted(f"bert.encoder.layer.0.{n}" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")) + ["bert.pooler.dense"]
    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, LocaLayer)]:
            layer.coefficients.normal_()
    logits = model(input_ids=torch.randint(0, 50, (2, 5))).logits
    logits.sum().backward()
    for layer in [m for m in model.modules() if isinstance(m, LocaLayer)]:
        assert layer.coefficients.grad is not None and layer.coefficients.grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None  # frozen


@pytest.mark.parametrize("arguments", [{"n_frequency": 0}, {"coefficient_phase": 0}, {"location_until": -1}])
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError, match="LoCA"):
        LoCA(**arguments)


def test_small_checkpoint_loads_from_checkpoint_with_the_learnt_locations_and_merges(tmp_path):
    from reglab.tasks import ClassificationModule

    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": registry.example_module(seed=3).state_dict()}, pretrained)
    technique = LoCA(n_frequency=32, location_lr=0.05, coefficient_phase=1, location_phase=1, location_until=4,
                     pretrained_checkpoint=str(pretrained))
    module = registry.example_module()
    trainer = registry.example_trainer(max_steps=4, callbacks=[technique])
    trainer.fit(module, datamodule=registry.example_data())
    path = tmp_path / "loca.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not any(key.endswith("base_layer.weight") for key in saved)  # the frozen weights are rebuilt
    x = torch.rand(5, 64)
    expected = module.eval()(x)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()  # new random locations, then the saved ones
    torch.testing.assert_close(reloaded(x), expected)
    assert technique.merge(reloaded) == 1
    torch.testing.assert_close(reloaded(x), expected, atol=1e-5, rtol=1e-5)
