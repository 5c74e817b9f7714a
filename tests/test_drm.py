"""DRM's steering and domain-head loss against hand-computed cases, and its heads through a fit,
a checkpoint and a bare reload (callbacks/domain_generalization/drm.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reglab import registry
from reglab.callbacks.domain_generalization.drm import DRM, HEADS, steered_log_probs
from reglab.datamodules import RotatedDigitsDataModule
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def _entropy(p):
    return -sum(x * math.log(x) for x in p)


def test_steering_weighs_each_sample_by_inverse_entropy():
    # sample 0: head A says (0.9, 0.1), head B (0.5, 0.5); sample 1: the other way round
    confident, unsure = [math.log(9.0), 0.0], [0.0, 0.0]
    logits = torch.tensor([[confident, unsure], [unsure, confident]])  # (heads, samples, classes)
    h_a, h_b = _entropy([0.9, 0.1]), _entropy([0.5, 0.5])
    w_confident = (1 / h_a) / (1 / h_a + 1 / h_b)
    expected = w_confident * 0.9 + (1 - w_confident) * 0.5
    steered = steered_log_probs(logits, gamma=1.0).exp()
    torch.testing.assert_close(steered, torch.tensor([[expected, 1 - expected]] * 2))
    # gamma 2 leans further towards the confident head; 0 is the plain average; < 0 takes it outright
    w2 = h_a**-2 / (h_a**-2 + h_b**-2)
    torch.testing.assert_close(steered_log_probs(logits, 2.0).exp()[0, 0], torch.tensor(w2 * 0.9 + (1 - w2) * 0.5))
    torch.testing.assert_close(steered_log_probs(logits, 0.0).exp(), torch.tensor([[0.7, 0.3]] * 2))
    torch.testing.assert_close(steered_log_probs(logits, -1.0).exp(), torch.tensor([[0.9, 0.1]] * 2))


def test_masked_classes_stay_impossible():
    logits = torch.tensor([[[1.0, 0.0, -math.inf]], [[0.0, 2.0, -math.inf]]])
    steered = steered_log_probs(logits, 1.0)
    assert torch.isfinite(steered[0, :2]).all() and steered[0, 2] == -math.inf


def _module(seed=0):
    torch.manual_seed(seed)
    return ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (5,)})


def test_each_sample_trains_the_head_of_its_domain():
    module, drm = _module(), DRM(num_domains=2, weight=0.5)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(), callbacks=[drm])
    drm.setup(trainer, module, "validate")  # adds the heads without the fit's checks
    features = torch.randn(4, 5)
    target, domain = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0])
    out = StepOutput(logits=module.head(features), target=target, features=features, batch={"domain": domain})
    heads = getattr(module, HEADS).heads
    own = torch.stack([heads[d](features[i]) for i, d in enumerate(domain.tolist())])
    expected = 0.5 * F.cross_entropy(own, target)
    torch.testing.assert_close(drm.loss_terms(out, module)["domain_heads"], expected)


def _data(**kwargs):
    return RotatedDigitsDataModule(flatten=True, batch_size=64, **kwargs)


def _fit(module, drm, data, steps=4):
    trainer = registry.example_trainer(max_steps=steps, callbacks=[drm], limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    return trainer


def test_evaluation_steers_and_a_bare_reload_steers_alike(tmp_path):
    data = _data(train_angles=(0.0, 30.0))
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)})
    trainer = _fit(module, DRM(num_domains=2, gamma=2.0), data)
    x = torch.rand(7, 64)
    module.train()
    features = module.backbone(x)
    shared = module.head(features)
    torch.testing.assert_close(module(x), shared)  # training mode: the shared head only
    module.eval()
    heads = getattr(module, HEADS)
    expected = steered_log_probs(torch.stack([*(h(features) for h in heads.heads), shared]), 2.0)
    steered = module(x)
    torch.testing.assert_close(steered, expected)
    assert not torch.allclose(steered, shared.log_softmax(-1))

    path = tmp_path / "drm.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    assert hasattr(reloaded, HEADS) and getattr(reloaded, HEADS).gamma == 2.0
    torch.testing.assert_close(reloaded(x), steered)


def test_without_a_domain_count_it_is_refused_with_the_fix():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(), callbacks=[])
    with pytest.raises(TechniqueConfigError, match="pass num_domains"):
        DRM().setup(trainer, _module(), "validate")


def test_a_domain_beyond_the_heads_is_refused_at_the_first_step():
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)})
    with pytest.raises(TechniqueConfigError, match="a training batch has domain 2, but there are 2 domain heads"):
        _fit(module, DRM(num_domains=2), _data(train_angles=(0.0, 30.0, 45.0)), steps=1)
