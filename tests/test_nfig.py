"""NFIG and single-scale PixelAR (reglab.models.autoregressive, reglab.tasks.AutoregressiveImageModule): the token
maps by hand, block causality, one network evaluation a group, exact resume and bf16, the set-up errors."""

from __future__ import annotations

import pytest
import torch
from harness import assert_resumes_exactly_and_trains_in_bf16

from reglab.datamodules import DigitsDataModule
from reglab.models.autoregressive import NFIG, PixelAR, accumulate, frequency_token_maps, quantize
from reglab.tasks import AutoregressiveImageModule
from reglab.technique import TechniqueConfigError

TINY = dict(d_model=16, n_layers=1, n_heads=2)


def test_frequency_token_maps_by_hand():
    # mean 0.5 -> level 2 of 0..4; the 2x2 levels [[4, 0], [2, 2]] are that mean plus the residual
    image = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    coarse, fine = frequency_token_maps(image, levels=5, scales=(1, 2))
    assert coarse.tolist() == [[[2]]]
    assert fine.tolist() == [[[2, -2], [0, 0]]]
    assert accumulate([coarse, fine], levels=5).tolist() == [[[4, 0], [2, 2]]]


def test_the_stages_sum_to_the_quantized_image():
    images = torch.rand(6, 1, 8, 8)
    maps = frequency_token_maps(images, levels=5, scales=(1, 2, 4, 8))
    assert [m.shape[-1] for m in maps] == [1, 2, 4, 8]
    assert torch.equal(accumulate(maps, levels=5), quantize(images, 5)[:, 0])
    for model in (NFIG(levels=5, **TINY), PixelAR(levels=5, block_size=16, **TINY)):
        tokens = model.tokens(images)
        assert tokens.shape[1] == sum(model.group_sizes) and 0 <= tokens.min() and tokens.max() < model.vocab_size
        assert torch.equal(model.images(tokens), quantize(images, 5).float() / 4)


def test_nfig_input_is_the_upsampled_previous_stage():
    model = NFIG(levels=5, scales=(1, 2), image_size=2, **TINY)
    image = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    # stage 1 sees nothing; stage 2 sees the 1x1 level 2 (of 4) at each of its four positions
    assert model.inputs(model.tokens(image)).tolist() == [[0.0, 0.5, 0.5, 0.5, 0.5]]


def test_pixel_ar_input_is_the_token_one_group_earlier():
    model = PixelAR(levels=5, block_size=2, image_size=2, **TINY)
    tokens = torch.tensor([[4, 0, 2, 1]])
    assert model.inputs(tokens).tolist() == [[0.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("model", [NFIG(**TINY), PixelAR(block_size=16, **TINY), PixelAR(block_size=1, **TINY)],
                         ids=["nfig", "pixel_ar_16", "pixel_ar_1"])
def test_a_group_sees_only_earlier_groups(model):
    """Changing the tokens of group g and later leaves group g's logits unchanged (block-causal)."""
    model.eval()
    tokens = model.tokens(torch.rand(2, 1, 8, 8))
    labels = torch.tensor([1, 2])
    g = len(model.group_sizes) // 2
    later = model.group >= g
    changed = tokens.clone()
    changed[:, later] = torch.randint(0, model.vocab_size, (2, int(later.sum())))
    with torch.no_grad():
        before, after = model(tokens, labels), model(changed, labels)
    here = model.group == g
    assert torch.allclose(before[:, here], after[:, here], atol=1e-5)
    assert not torch.allclose(before[:, model.group == len(model.group_sizes) - 1],
                              after[:, model.group == len(model.group_sizes) - 1])


@pytest.mark.parametrize("kwargs, evaluations", [(dict(model="nfig"), 4), (dict(model="pixel_ar", block_size=16), 4),
                                                 (dict(model="pixel_ar", block_size=8), 8)])
def test_sampling_costs_one_network_evaluation_a_group(kwargs, evaluations):
    module = AutoregressiveImageModule(input_shape=(1, 8, 8), num_classes=10, **kwargs, **TINY)
    calls = []
    module.net.transformer.register_forward_hook(lambda *_: calls.append(1))
    samples = module.sample(torch.arange(3), seed=0)
    assert len(calls) == evaluations == module.network_evaluations
    assert samples.shape == (3, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    assert torch.equal(samples, module.sample(torch.arange(3), seed=0))


def test_a_training_step_lowers_the_loss():
    torch.manual_seed(0)
    module = AutoregressiveImageModule(input_shape=(1, 8, 8), num_classes=10, model="nfig", **TINY)
    batch = {"input": torch.rand(8, 1, 8, 8).round(), "target": torch.arange(8)}
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(5):
        loss = module.task_loss(module.forward_step(batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_training_resumes_exactly_and_runs_in_bf16(one_thread, tmp_path):
    """Stopped mid-epoch and resumed, the weights equal an uninterrupted run's; bf16-mixed trains."""
    def module():
        torch.manual_seed(0)
        return AutoregressiveImageModule(input_shape=(1, 8, 8), num_classes=10, model="nfig", dropout=0.1, **TINY)

    # batches of 256: 5 steps per epoch, so the stop at step 3 is mid-epoch; dropout draws from the global RNG
    assert_resumes_exactly_and_trains_in_bf16(module, lambda: DigitsDataModule(batch_size=256, seed=0), tmp_path)


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="var"), "model 'var'"),
    (dict(model="nfig", scales=(1, 3, 8)), "scales (1, 3, 8)"),
    (dict(model="pixel_ar", block_size=5), "block_size 5"),
    (dict(model="nfig", levels=1), "levels=1"),
    (dict(input_shape=(3, 8, 8)), "not (1, size, size)"),
])
def test_bad_settings_fail_at_construction(kwargs, words):
    with pytest.raises(TechniqueConfigError, match="AutoregressiveImageModule") as error:
        AutoregressiveImageModule(**{"input_shape": (1, 8, 8), "num_classes": 10, **kwargs})
    assert words in str(error.value) and "Fix:" in str(error.value)
