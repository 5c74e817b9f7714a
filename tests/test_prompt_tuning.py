"""CoOp's learned context (``PromptTuning``) on the tiny CLIP, and the base-to-novel protocol's data and arms."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
import torch

from reglab import checkpoints, registry
from reglab.bench.protocols import ClaimError
from reglab.callbacks.baselines import PromptTuning
from reglab.callbacks.baselines import prompt_tuning as prompt_tuning_module
from reglab.datamodules import CaptionedDigitsDataModule
from reglab.technique import TechniqueConfigError
from reglab.vision_language_claims import BaseToNovelProtocol, ClassSubsetData, CrossDomainProtocol


@pytest.fixture(scope="module")
def data():
    data = CaptionedDigitsDataModule(domains=["upright"], batch_size=32)
    data.setup("fit")
    return data


def clip(objective="classification"):
    return registry.example_module(data="captions") if objective == "classification" else \
        type(registry.example_module(data="captions"))("tiny", num_classes=10, input_shape=(3, 8, 8),
                                                       model_kwargs={"embed_dim": 16,
                                                                     "text_config": {"num_hidden_layers": 1}})


def test_initial_context_is_the_hand_written_prompt(data):
    # "X X X X X seven." with the context initialised from "a photo of the digit" embeds exactly as the
    # pretraining prompt "a photo of the digit seven." (same length, the same token embeddings everywhere)
    module = clip().eval()  # no dropout
    reference = {key: value[:, :1] for key, value in data.class_prompts.items()}  # template 0: "a photo of the digit"
    module.set_class_prompts(reference)
    caption = {key: value[:4] for key, value in data.train_dataset.extras["caption"].encoded.items()}
    with torch.no_grad():
        expected, caption_features = module.class_embeddings(), module.text_features(caption)
    PromptTuning(ctx_init="a photo of the digit").setup(SimpleNamespace(datamodule=data), module, "test")
    assert module.prompt_context.shape == (5, 384)
    with torch.no_grad():
        assert torch.allclose(module.class_embeddings(), expected, atol=1e-6)
        # (a random move: a constant shift would vanish in the embedding LayerNorm)
        module.prompt_context.add_(torch.randn(5, 384, generator=torch.Generator().manual_seed(0)))  # the context is what the prompts read: moving it moves every class
        assert not torch.allclose(module.class_embeddings(), expected, atol=1e-3)
        # a text without the placeholders (a caption) is untouched by the hook
        assert torch.allclose(module.text_features(caption), caption_features, atol=1e-6)


def test_only_the_context_trains_and_contrastive_is_refused(data):
    module, coop = clip(), PromptTuning(ctx_init="a photo of the digit")
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    statistics = {name: b.clone() for name, b in module.clip.named_buffers()}
    assert any("running_mean" in name for name in statistics)  # the image tower has batch norm
    trainer = registry.example_trainer(max_steps=2, callbacks=[coop], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    # the frozen towers ran as fixed functions: no running statistic moved
    assert all(torch.equal(b, statistics[name]) for name, b in module.clip.named_buffers())
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_context"]
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters() if name in before)
    tokenizer = prompt_tuning_module._tokenizer(data.tokenizer)
    initial = module.clip.text_encoder.get_input_embeddings().weight[
        tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a photo of the digit"))]
    assert not torch.allclose(module.prompt_context, initial)
    with pytest.raises(TechniqueConfigError, match="objective"):
        registry.example_trainer(max_steps=1, callbacks=[PromptTuning()]).fit(clip("contrastive"), datamodule=data)


def test_class_subset_data_relabels_and_keeps_its_classes_prompts(data):
    train = torch.nonzero(data.train_dataset.targets >= 7).flatten()[:6]
    test = torch.nonzero(data.test_dataset.targets >= 7).flatten()
    subset = ClassSubsetData(data, [7, 8, 9], train, test, batch_size=4, seed=0)
    assert subset.num_classes == 3 and subset.class_names == ("seven", "eight", "nine")
    assert torch.equal(subset.test_dataset.targets, data.test_dataset.targets[test] - 7)
    assert torch.equal(subset.class_prompts["input_ids"], data.class_prompts["input_ids"][7:])


def test_base_to_novel_refuses_bad_settings_and_arms():
    with pytest.raises(ClaimError, match="base_classes"):
        BaseToNovelProtocol("c", {"base_classes": list(range(10))})
    with pytest.raises(ClaimError, match="not a file"):
        BaseToNovelProtocol("c", {"pretrain_config": "missing.yaml"})
    protocol = BaseToNovelProtocol("c", {})
    with pytest.raises(ClaimError, match="one probe"):
        protocol.check_arm("probe", {"adapt": "probe"})
    with pytest.raises(ClaimError, match="no technique"):
        protocol.check_arm("zs", {"adapt": "none", "technique": {"class_path": "a.B"}})
    with pytest.raises(ClaimError, match="adapt"):
        protocol.check_arm("x", {"adapt": "sometimes"})


def test_pretraining_domains_reach_the_derived_config(tmp_path, monkeypatch):
    import yaml

    derived = []
    monkeypatch.setattr(checkpoints, "pretrained_checkpoint_for", lambda config, cache: derived.append(config))
    for domains in (["upright", "coloured"], None):
        BaseToNovelProtocol("c", {"pretrain_domains": domains, "cache_dir": str(tmp_path)}).pretrained(3)
    held_out, default = (yaml.safe_load(path.read_text()) for path in derived)
    assert held_out["data"]["init_args"]["domains"] == ["upright", "coloured"]
    assert "domains" not in default["data"]["init_args"]  # null: the pretraining config's own
    assert held_out["data"]["init_args"]["split_seed"] == 3 and derived[0].parent != derived[1].parent
    with pytest.raises(ClaimError, match="pretrain_domains"):
        BaseToNovelProtocol("c", {"pretrain_domains": ["sideways"]})


def test_cross_domain_shots_come_from_the_source_domain_and_tests_keep_domains():
    protocol = CrossDomainProtocol("c", {"domains": ["upright", "noisy"], "source_domain": "noisy", "shots": 3})
    source = CaptionedDigitsDataModule(domains=["upright", "noisy"], batch_size=8)
    source.setup("fit")
    shots = protocol.shots(source, list(range(10)), seed=0, domain=1)
    assert torch.equal(source.train_dataset.extras["domain"][shots], torch.ones(30, dtype=torch.long))
    assert torch.equal(source.train_dataset.targets[shots], torch.arange(10).repeat_interleave(3))
    assert torch.equal(shots, protocol.shots(source, list(range(10)), seed=0, domain=1))  # drawn with the seed
    subset = ClassSubsetData(source, list(range(10)), shots, torch.arange(len(source.test_dataset)), 8, 0)
    assert subset.domain_names == ("upright", "noisy")
    assert torch.equal(subset.test_dataset.extras["domain"], source.test_dataset.extras["domain"])
    for settings in ({"source_domain": "inverted", "domains": ["upright", "noisy"]}, {"domains": ["upright"]}):
        with pytest.raises(ClaimError, match="source_domain"):
            CrossDomainProtocol("c", settings)
    # a probe head that always says "zero" is right on exactly each domain's zeros
    test = torch.nonzero((source.test_dataset.extras["domain"] == 0) | (source.test_dataset.targets < 2)).flatten()
    subset = ClassSubsetData(source, list(range(10)), shots, test, 8, 0)
    always_zero = lambda features: torch.nn.functional.one_hot(torch.zeros(len(features), dtype=torch.long), 10)
    scores = protocol.accuracies(clip().eval(), always_zero, [], subset)
    targets, domains = subset.test_dataset.targets, subset.test_dataset.extras["domain"]
    assert scores["acc"] == pytest.approx((targets == 0).double().mean().item())
    for index, name in enumerate(("upright", "noisy")):
        assert scores[f"acc_{name}"] == pytest.approx((targets[domains == index] == 0).double().mean().item())
    assert scores["acc_noisy"] > 3 * scores["acc_upright"]  # noisy kept zeros and ones only, upright all ten digits


def test_docstring_example_runs():
    result = doctest.testmod(prompt_tuning_module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
