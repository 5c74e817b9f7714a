"""Saliency (NormGrad, paper 12): the three maps and their combination by hand, the gradients a layer
sees, the class correlation, the callback's TensorBoard images, the command's grid and the set-up errors."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from reglab.analysis.saliency import block_names, main
from reglab.callbacks.analysis import GradientSaliency, NormGrad
from reglab.callbacks.analysis.saliency import (activations_and_gradients, class_correlation, combine, gradcam_map,
                                                gradient_map, normgrad_map, normalize)
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

# one image, two channels, two locations (1 x 2): x[c, u] and g[c, u]
X = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])
G = torch.tensor([[[[1.0, -2.0]], [[0.0, 2.0]]]])


def test_the_three_maps_by_hand():
    # gradient: max over channels of |g| -> (max(1, 0), max(2, 2))
    torch.testing.assert_close(gradient_map(X, G), torch.tensor([[[1.0, 2.0]]]))
    # Grad-CAM: channel weights = spatial mean of g = (-0.5, 1.0); relu(-0.5 x_0 + 1.0 x_1) = relu(2.5, -0.5)
    torch.testing.assert_close(gradcam_map(X, G), torch.tensor([[[2.5, 0.0]]]))
    # NormGrad: ||g_u|| ||x_u|| = (1 * 5, sqrt(8) * 1)
    torch.testing.assert_close(normgrad_map(X, G), torch.tensor([[[5.0, 8.0 ** 0.5]]]))


def test_normgrad_is_the_norm_of_the_virtual_1x1_convolutions_weight_gradient():
    # the official code's form: at each location the outer product x_u g_u^T, then its Frobenius norm
    x, g = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 3, 4)
    outer = torch.einsum("ncij,ndij->ncdij", x, g)
    torch.testing.assert_close(normgrad_map(x, g), outer.flatten(1, 2).norm(dim=1))


def test_a_flat_activation_is_one_channel_per_feature():
    x, g = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[-3.0, 1.0, 4.0]])
    torch.testing.assert_close(gradient_map(x, g), torch.tensor([[3.0, 1.0, 4.0]]))
    torch.testing.assert_close(normgrad_map(x, g), torch.tensor([[6.0, 1.0, 2.0]]))


def test_the_combination_multiplies_the_maps_scaled_to_0_1():
    a = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])   # scaled: (0, .25, .5, 1)
    b = torch.tensor([[[2.0, 2.0], [4.0, 6.0]]])   # scaled: (0, 0, .5, 1)
    torch.testing.assert_close(combine({"a": a, "b": b}, (2, 2)), torch.tensor([[[0.0, 0.0], [0.25, 1.0]]]))
    # a coarser layer is resized bilinearly first: a 1x1 map is constant, so it scales to 0 everywhere
    assert combine({"a": a, "coarse": torch.ones(1, 1, 1)}, (2, 2)).eq(0).all()
    torch.testing.assert_close(normalize(torch.full((1, 2, 2), 7.0)), torch.zeros(1, 2, 2))


def _linear(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model


def test_each_image_gets_its_own_class_scores_gradient_inside_inference_mode():
    weight = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.5, 0.5, -1.0, 0.0]])
    model, inputs = _linear(weight), torch.rand(2, 1, 2, 2)
    with torch.inference_mode():  # as in a validation loop
        found = activations_and_gradients(model, inputs, torch.tensor([0, 1]), ["input", "1"])
    x, g = found["input"]
    torch.testing.assert_close(g, weight.view(2, 1, 2, 2))  # d logit_c / d x = W[c], image 0 class 0, image 1 class 1
    torch.testing.assert_close(x, inputs)
    torch.testing.assert_close(found["1"][1], torch.eye(2))  # the logits' own gradient: one-hot of the class
    assert model[1].weight.grad is None  # the parameters' gradients are untouched


def test_class_correlation_is_the_pearson_correlation_of_the_top_and_bottom_class_maps():
    weight = torch.tensor([[4.0, 1.0, -2.0, 0.5], [1.0, 2.0, 3.0, -1.0], [-1.0, -3.0, 0.0, 2.0]])
    inputs = torch.ones(1, 1, 2, 2)
    # logits = row sums (3.5, 5, -2): top class 1, bottom class 2; their gradient maps are |W[1]|, |W[2]|
    expected = np.corrcoef(weight[1].abs().numpy(), weight[2].abs().numpy())[0, 1]
    found = class_correlation(_linear(weight), inputs, "gradient", ["input"])
    torch.testing.assert_close(found, torch.tensor([expected], dtype=torch.float32))
    weight[2] = -1.0  # logits (3.5, 5, -4): the bottom class's map is constant, so there is no correlation
    assert class_correlation(_linear(weight), inputs, "gradient", ["input"]).isnan().all()


def _cnn() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule("cnn", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"channels": (4, 8)})


def test_the_callback_logs_a_grid_and_the_class_correlation_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module, normgrad = _cnn(), NormGrad(layers=block_names(_cnn()), every_n_epochs=2, num_images=3)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(max_epochs=2, logger=logger, callbacks=[normgrad], limit_train_batches=2, limit_val_batches=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert "val/normgrad/class_correlation" in trainer.callback_metrics
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    images = events.Images("normgrad/maps")
    assert len(images) == 1  # every second epoch of two: once
    assert (images[0].height, images[0].width) == (2 * 8, 3 * 8)  # the images over their maps


def test_bad_settings_fail_early_with_the_fix():
    with pytest.raises(TechniqueConfigError, match="unknown saliency method 'cam'.*Fix"):
        NormGrad(method="cam")
    with pytest.raises(TechniqueConfigError, match="no layer.*backbone.blocks.99.*Fix: use 'input'.*backbone.blocks.2"):
        activations_and_gradients(_cnn(), torch.rand(1, 1, 8, 8), torch.tensor([0]), ["backbone.blocks.99"])
    flat = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (8,)})
    with pytest.raises(TechniqueConfigError, match="inputs are flat.*Fix: give image_shape"):
        GradientSaliency().setup(L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False), flat, "fit")
    with pytest.raises(TechniqueConfigError, match="flat map of 8 values.*Fix"):
        class_correlation(flat, torch.rand(2, 64), "normgrad", ["backbone.layers.1"], size=(8, 8))


def test_the_command_draws_a_grid_and_keeps_an_existing_one(tmp_path, capsys):
    checkpoint = tmp_path / "digits.ckpt"
    module = _cnn()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, checkpoint)
    main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "out"), "--num-images", "2", "--method", "normgrad",
          "--layer", "backbone.blocks.2", "--layer", "backbone.blocks.5"])
    grid = tmp_path / "out" / "digits_saliency.png"
    assert grid.stat().st_size > 0 and str(grid) in capsys.readouterr().out
    before = grid.read_bytes()
    with pytest.raises(SystemExit):
        main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "out"), "--method", "gradcam"])
    assert "exists and is kept" in capsys.readouterr().err and grid.read_bytes() == before
