"""OGEN's feature generator (paper 01) on the tiny CLIP: its maths on hand-computed cases, the warm-up that
trains the generator only, the class statistics, and the refusal without a prompt learner."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from reglab import registry
from reglab.callbacks.baselines import PromptTuning
from reglab.callbacks.vision_language import OGEN
from reglab.callbacks.vision_language.ogen import FeatureGenerator, nearest_classes
from reglab.datamodules import CaptionedDigitsDataModule
from reglab.technique import TechniqueConfigError, dataset_features

UNSEEN = ["ten", "eleven", "twelve"]


@pytest.fixture(scope="module")
def data():
    data = CaptionedDigitsDataModule(domains=["upright"], batch_size=16)
    data.setup("fit")
    return data


def test_nearest_classes_by_cosine_of_means():
    means = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # cosines: (0,1) 0.8, (0,2) 0, (1,2) 0.6
    assert nearest_classes(means, 1).flatten().tolist() == [1, 0, 1]
    assert nearest_classes(means, 2).tolist() == [[1, 2], [0, 2], [1, 0]]


def test_generator_is_the_normalised_ffn_plus_attention():
    generator = FeatureGenerator(dim=2, num_classes=1, heads=1, dropout=0.0)
    with torch.no_grad():
        for layer in (generator.ffn[0], generator.ffn[2]):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        generator.attention.out_proj.weight.zero_()
        generator.attention.out_proj.bias.zero_()
    queries = torch.tensor([[[3.0, -4.0], [3.0, 4.0]]])  # ffn = relu: (3, 0) and (3, 4); attention adds 0
    out = generator(queries, torch.randn(1, 2, 2), torch.randn(1, 2, 2))
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    with torch.no_grad():
        generator.attention.out_proj.bias.copy_(torch.tensor([0.0, 1.0]))  # attention output now (0, 1) per query
    out = generator(queries, torch.randn(1, 2, 2), torch.randn(1, 2, 2))
    assert torch.allclose(out, torch.tensor([[3.0, 1.0], [3.0, 5.0]]) / torch.tensor([[10.0 ** 0.5], [34.0 ** 0.5]]))


def _fit(data, ogen, steps=3, module=None):
    module = module or registry.example_module(data="captions")
    trainer = registry.example_trainer(max_steps=steps, max_epochs=1, callbacks=[ogen, PromptTuning()],
                                       limit_val_batches=0)
    before = {}

    class Snapshot(L.Callback):  # the weights as the first step finds them (the generator exists by then)
        def on_train_start(self, trainer, pl_module):
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=data)
    return module, before


def test_warm_up_trains_the_generator_only_then_the_context_too(data):
    module, before = _fit(data, OGEN(unseen_class_names=UNSEEN, total_epochs=2, warmup_fraction=0.5))  # epoch 0: warm-up
    assert torch.equal(module.prompt_context, before["prompt_context"])
    assert not torch.equal(module.ogen_generator.ffn[0].weight, before["ogen_generator.ffn.0.weight"])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_context"} | {f"ogen_generator.{n}" for n, _ in module.ogen_generator.named_parameters()}
    module, before = _fit(data, OGEN(unseen_class_names=UNSEEN, warmup_fraction=0.0))
    assert not torch.equal(module.prompt_context, before["prompt_context"])


def test_class_statistics_are_the_training_features(data):
    module = registry.example_module(data="captions")
    module.set_class_prompts(data.class_prompts)  # dataset_features scores the images too
    # before the fit: the tower's BatchNorm running statistics move in training, frozen weights or not
    features, labels = dataset_features(module, data.train_dataset)
    _fit(data, OGEN(unseen_class_names=UNSEEN, total_epochs=2, warmup_fraction=0.5), steps=1, module=module)
    assert torch.allclose(module.ogen_generator.mean[3], features[labels == 3].mean(0), atol=1e-5)
    assert torch.allclose(module.ogen_generator.std[3], features[labels == 3].std(0, unbiased=False), atol=1e-5)


def test_refused_without_a_prompt_learner_or_unseen_classes(data):
    trainer = registry.example_trainer(max_steps=1, callbacks=[OGEN(unseen_class_names=UNSEEN)])
    with pytest.raises(TechniqueConfigError, match="PromptTuning"):
        trainer.fit(registry.example_module(data="captions"), datamodule=data)
    trainer = registry.example_trainer(max_steps=1, callbacks=[PromptTuning(), OGEN()])
    with pytest.raises(TechniqueConfigError, match="unseen_class_names"):
        trainer.fit(registry.example_module(data="captions"), datamodule=data)
