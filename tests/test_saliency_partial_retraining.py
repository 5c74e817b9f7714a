"""Saliency-aware partial retraining (paper 26): the quantizer, the penalty and the saliency
against hand-computed cases; the surgery on the MLP, the CNN and a tiny BERT."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reglab.callbacks.peft import SaliencyAwarePartialRetraining
from reglab.callbacks.peft.saliency_partial_retraining import fake_quantize, fisher_diagonal, round_ste, saliency_penalty
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError
from tiny_bert import save_tiny_bert, token_batch

NO_CLIP = torch.tensor([[30.0]])  # sigmoid(30) = 1: each channel's full range


def test_two_bit_quantization_of_one_channel_by_hand():
    # range [-1, 2] in 3 steps: scale 1, zero point 1; 0.5 rounds to 0 (half to even)
    weight = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    assert torch.allclose(fake_quantize(weight, 2, NO_CLIP, NO_CLIP), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))
    # clipping to half the range: [-0.5, 1], scale 0.5, zero point 1; -1 and 2 clamp to the ends
    half = torch.tensor([[0.0]])
    assert torch.allclose(fake_quantize(weight, 2, half, half), torch.tensor([[-0.5, 0.0, 0.5, 1.0]]))


def test_quantization_is_per_output_channel_of_a_convolution():
    weight = torch.stack([torch.full((2, 3, 3), 1.0), torch.linspace(-3, 3, 18).view(2, 3, 3)])
    weight[0, 0, 0, 0] = 0.0
    q = fake_quantize(weight, 3, NO_CLIP.view(1, 1, 1, 1).expand(2, 1, 1, 1), NO_CLIP.view(1, 1, 1, 1).expand(2, 1, 1, 1))
    assert q[0].unique().tolist() == [0.0, 1.0]  # channel 0's own range [0, 1], not channel 1's [-3, 3]
    # channel 1: range [-3, 3] in 7 steps of 6/7, zero point round(3.5) = 4 (half to even): grid (k - 4) * 6/7
    grid = (torch.arange(8) - 4) * 6 / 7
    assert torch.allclose(q[1].unique(), grid[(grid - q[1].unique()[:, None]).abs().argmin(1)])
    assert q[1].min().item() == pytest.approx(-24 / 7)


def test_rounding_passes_the_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, -2.0] and x.grad.tolist() == [1.0, 1.0, 1.0]


def test_penalty_by_hand():
    weight, quantized = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, -1.0]])
    saliency = torch.tensor([[4.0, 1.0]])
    assert saliency_penalty(weight, quantized, saliency).item() == pytest.approx(4 * 0.25 + 1 * 1.0)


def head_module(seed: int = 0) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (5,)})


def test_saliency_is_the_sum_of_per_sample_squared_gradients():
    module = head_module()
    x, y = torch.randn(3, 4), torch.tensor([0, 2, 1])
    fisher = fisher_diagonal(module, ["head"], [{"input": x, "target": y}], num_samples=3)["head"]
    # by hand for the head: dCE_n/dW = (softmax(z_n) - onehot(y_n)) f_n^T
    with torch.no_grad():
        features, logits = module.features_and_logits(x)
        error = logits.softmax(-1) - torch.nn.functional.one_hot(y, 3).float()
    expected = sum(torch.outer(error[n], features[n]) ** 2 for n in range(3))
    assert torch.allclose(fisher, expected, atol=1e-6)
    # only the first num_samples samples count
    two = fisher_diagonal(module, ["head"], [{"input": x, "target": y}], num_samples=2)["head"]
    assert torch.allclose(two, expected - torch.outer(error[2], features[2]) ** 2, atol=1e-6)


def with_data(batch: dict) -> SimpleNamespace:
    """A stand-in trainer whose DataModule yields ``batch`` (what the surgery reads at setup)."""
    return SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: [batch]))


def digits_batch(n: int = 6, shape: tuple[int, ...] = (4,)) -> dict:
    return {"input": torch.randn(n, *shape), "target": torch.arange(n) % 3}


def test_surgery_quantizes_trains_adapters_and_clipping_and_normalises_saliency():
    module, batch = head_module(), digits_batch()
    technique = SaliencyAwarePartialRetraining(bits=2, lam=0.1, r=2, calibration_samples=6)
    technique.prepare(module, with_data(batch))
    trainable = sorted(name for name, p in module.named_parameters() if p.requires_grad)
    assert not any(name.endswith("original") for name in trainable)  # the full-precision weights stay frozen
    assert {"up", "low", "lora_A", "lora_B"} <= {part for name in trainable for part in name.split(".")}
    layer, quantizer = technique.quantizers[0]
    assert all(len(row.unique()) <= 4 for row in layer.weight)  # 2 bits: at most 4 values per output channel
    assert quantizer.saliency.mean().item() == pytest.approx(1.0, rel=1e-5)  # one layer: its own mean
    out = module.forward_step(batch)
    terms = technique.loss_terms(out, module)
    expected = 0.1 * saliency_penalty(layer.parametrizations.weight.original, layer.weight, quantizer.saliency)
    assert terms["saliency_reg"].item() == pytest.approx(expected.item()) and expected > 0


def test_plain_partial_retraining_adds_no_term_and_reads_no_data():
    module = head_module()
    technique = SaliencyAwarePartialRetraining(lam=0.0, r=2)
    technique.prepare(module, SimpleNamespace(datamodule=None))  # no data needed without the regularizer
    assert technique.loss_terms(module.forward_step(digits_batch()), module) == {}
    assert torch.equal(technique.quantizers[0][1].saliency, torch.ones_like(technique.quantizers[0][1].saliency))


def test_merge_keeps_the_low_bit_model_output():
    module, batch = head_module(), digits_batch()
    technique = SaliencyAwarePartialRetraining(bits=3, lam=0.1, r=2, calibration_samples=6)
    technique.prepare(module, with_data(batch))
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    module.eval()
    before = module(batch["input"])
    assert technique.merge(module) == 1
    assert torch.allclose(module(batch["input"]), before, atol=1e-5)


def test_cnn_convolutions_and_tiny_bert_linear_layers(tmp_path):
    cnn = ClassificationModule("cnn", num_classes=3, input_shape=(1, 8, 8))
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in cnn.modules())
    technique = SaliencyAwarePartialRetraining(bits=2, lam=0.1, r=2, calibration_samples=4)
    technique.prepare(cnn, with_data(digits_batch(4, (1, 8, 8))))
    assert len(technique.quantizers) == convolutions == 3
    saliency = torch.cat([q.saliency.flatten() for _, q in technique.quantizers])
    assert saliency.mean().item() == pytest.approx(1.0, rel=1e-4)  # normalised over all layers together

    save_tiny_bert(tmp_path)
    bert = ClassificationModule(f"hf:{tmp_path}", num_classes=3, input_shape=(8,))
    batch = token_batch(4)
    technique = SaliencyAwarePartialRetraining(bits=2, lam=0.1, r=2, calibration_samples=4)
    technique.prepare(bert, with_data(batch))
    names = {name for name, m in bert.named_modules() if hasattr(m, "parametrizations")}
    assert {"query", "key", "value", "dense"} <= {name.split(".")[-2] for name in names}
    loss = bert.task_loss(bert.forward_step(batch)).mean() + technique.loss_terms(bert.forward_step(batch), bert)["saliency_reg"]
    loss.backward()
    assert all(q.up.grad is not None for _, q in technique.quantizers)
    assert math.isfinite(loss.item())


def test_bad_arguments_and_missing_data_fail_early():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        SaliencyAwarePartialRetraining(bits=0)
    with pytest.raises(TechniqueConfigError, match="has no DataModule"):
        SaliencyAwarePartialRetraining(r=2).prepare(head_module(), SimpleNamespace(datamodule=None))


def test_small_checkpoint_keeps_the_saliency_and_reloads_the_low_bit_model(tmp_path):
    from reglab.registry import example_data, example_module, example_trainer

    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": example_module(seed=3).state_dict()}, pretrained)
    technique = SaliencyAwarePartialRetraining(bits=2, lam=0.1, r=2, calibration_samples=16,
                                               pretrained_checkpoint=str(pretrained))
    module = example_module()
    trainer = example_trainer(max_steps=3, callbacks=[technique])
    trainer.fit(module, datamodule=example_data())
    path = tmp_path / "sapr.ckpt"
    trainer.save_checkpoint(path)
    saliency = technique.quantizers[0][1].saliency
    assert not torch.equal(saliency, torch.ones_like(saliency))  # measured, not the reload's placeholder
    x = torch.rand(5, 64)
    expected = module.eval()(x)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    reloaded_saliency = [m for m in reloaded.modules() if hasattr(m, "saliency")][0].saliency
    torch.testing.assert_close(reloaded_saliency, saliency)
