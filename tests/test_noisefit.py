"""NoiseFiT (paper 62): the adaptive noise, the SNR choice and the hybrid loss against hand-computed
cases; loading the pretrained weights; MiniLM-style (tiny BERT) linear layers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reglab.callbacks.fine_tuning import NoiseFiT
from reglab.callbacks.fine_tuning.noisefit import adaptive_noise
from reglab.registry import example_data, example_trainer
from reglab.step import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError
from tiny_bert import save_tiny_bert, token_batch


def test_adaptive_noise_of_one_token_by_hand():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.manual_seed(0)
    noisy = adaptive_noise(h, base_std=0.5, beta=0.1)
    torch.manual_seed(0)
    eps = torch.randn(1, 4)
    # median 2 (torch takes the lower one), deviations [1, 0, 1, 2], MAD 1; one token: var / mean var = 1
    weight = torch.exp(-0.1 * torch.tensor([1.0, 0.0, 1.0, 2.0]))
    assert torch.allclose(noisy, h + eps * 0.5 * 1.0 * weight * math.e, atol=1e-5)


def test_adaptive_noise_of_a_convolution_output_is_over_channels():
    # every position holds the same value on all channels: MAD 0 across channels, so the noise
    # (bounded by 1e-6 of the channel vector's norm) all but vanishes; over the width it would not
    h = torch.arange(8.0).view(1, 1, 1, 8).expand(2, 3, 4, 8).contiguous()
    assert (adaptive_noise(h, base_std=1.0) - h).abs().max() < 1e-4
    width = h[:, 0]  # (N, L, 8): a Linear layer's output, the noise is over the last dimension
    assert (adaptive_noise(width, base_std=1.0) - width).abs().max() > 1e-2


def two_layer_mlp() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (6, 6)})


def linear_names(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and "head" not in name]


@pytest.mark.parametrize("snr, chosen", [("largest", 0), ("lowest", 1)])
def test_snr_ranks_a_flat_output_above_a_spread_one(snr, chosen):
    module = two_layer_mlp()
    first, second = linear_names(module)
    with torch.no_grad():  # the first layer outputs 1 on every unit: no spread, (almost) no noise, huge SNR
        module.get_submodule(first).weight.zero_()
        module.get_submodule(first).bias.fill_(1.0)
    technique = NoiseFiT(num_layers=1, snr=snr)
    technique.candidates = technique.candidate_layers(module)
    assert technique.candidates == [first, second]
    batch = {"input": torch.randn(8, 4), "target": torch.zeros(8, dtype=torch.long)}
    values = technique.layer_snr(module, batch)
    assert values[0] > 100 * values[1]
    technique.select_layers(SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda x, src: x)), module, batch)
    assert technique.selected_layers == [[first, second][chosen]]


def test_hybrid_loss_by_hand():
    technique, module = NoiseFiT(alpha=0.5, lam=0.1), two_layer_mlp()
    out = StepOutput(logits=torch.zeros(1, 2), target=torch.tensor([0]), batch={})
    noisy = iter([torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)])
    technique.noisy_logits = lambda module, batch: next(noisy)
    terms = technique.loss_terms(out, module)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL([.5, .5] || [.75, .25])
    assert terms["soft_ce"].item() == pytest.approx(0.5 * (kl + 0.0) / 2, rel=1e-5)
    assert terms["consistency"].item() == pytest.approx(0.1 * kl, rel=1e-5)
    module.task_loss = lambda out: torch.tensor([2.0])
    assert technique.task_loss(out, module).item() == pytest.approx(1.0)  # alpha * CE


def test_noise_only_in_the_noisy_passes_and_on_the_chosen_layers():
    module = two_layer_mlp()
    technique = NoiseFiT(noise_std=1.0, num_layers=1)
    technique.candidates = technique.candidate_layers(module)
    technique.selected = torch.tensor([0, 1])
    technique.on_train_batch_start(None, module, None, 0)
    batch = {"input": torch.randn(5, 4), "target": torch.zeros(5, dtype=torch.long)}
    clean = module.forward_step(batch).logits
    assert torch.equal(module.forward_step(batch).logits, clean)  # hooks idle outside the noisy passes
    assert not torch.allclose(technique.noisy_logits(module, batch), clean)
    technique.teardown(None, module, "fit")
    assert torch.equal(technique.noisy_logits(module, batch), clean)  # hooks removed


def test_fit_starts_from_the_pretrained_checkpoint_and_records_its_choice(tmp_path):
    pretrained = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)})
    path = tmp_path / "pretrained.pt"
    torch.save(pretrained.state_dict(), path)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)}, lr=0.0)
    technique = NoiseFiT(pretrained_checkpoint=str(path))
    example_trainer(max_steps=1, callbacks=[technique]).fit(module, datamodule=example_data())
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), pretrained.state_dict().values()))
    # the harness MLP has one hidden layer: it is the only candidate, and chosen
    assert technique.state_dict()["selected"].tolist() == [1] and technique.selected_layers == technique.candidates


def test_tiny_bert_linear_layers_are_candidates(tmp_path):
    save_tiny_bert(tmp_path)
    bert = ClassificationModule(f"hf:{tmp_path}", num_classes=3, input_shape=(8,))
    technique = NoiseFiT(num_layers=3)
    technique.candidates = technique.candidate_layers(bert)
    assert {"query", "key", "value", "dense"} <= {name.split(".")[-1] for name in technique.candidates}
    assert not any("classifier" in name for name in technique.candidates)
    batch = token_batch(4)
    technique.select_layers(SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda x, src: x)), bert, batch)
    assert len(technique.selected_layers) == 3
    technique.on_train_batch_start(None, bert, batch, 0)
    out = bert.forward_step(batch)
    terms = technique.loss_terms(out, bert)
    assert terms["soft_ce"] > 0 and terms["consistency"] > 0


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="snr must be"):
        NoiseFiT(snr="high")
    with pytest.raises(TechniqueConfigError, match="no nn.Linear / nn.Conv2d layer"):
        NoiseFiT(target_modules=["nothing_like_this"]).candidate_layers(two_layer_mlp())
