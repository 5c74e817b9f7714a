"""Backbones by name: built-ins, timm (offline), transformers (a tiny local model)."""

from __future__ import annotations

import pytest
import torch

from reglab.models import create_backbone, list_backbones
from reglab.tasks import ClassificationModule
from tiny_bert import save_tiny_bert


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn", (1, 8, 8)), ("mlp", (3, 4, 4))])
def test_builtin_backbones_give_features(name, shape):
    net = create_backbone(name, shape)
    assert net(torch.zeros(2, *shape)).shape == (2, net.feature_dim)


def test_cnn_refuses_flat_input_with_a_clear_message():
    with pytest.raises(ValueError, match="SmallCNN needs \\(channels, height, width\\)"):
        create_backbone("cnn", (64,))


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError, match=r"accepted: .*cnn, mlp.*timm:<name>, hf:<path>"):
        create_backbone("nope", (64,))
    assert "cnn" in list_backbones()


def test_timm_backbone_offline():
    module = ClassificationModule("timm:resnet10t", num_classes=5, input_shape=(3, 32, 32))
    features, logits = module.features_and_logits(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 5) and features.shape == (2, module.backbone.feature_dim)


def test_unknown_timm_model():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("timm:not_a_model", (3, 8, 8))


def test_transformers_sequence_classifier_from_local_path(tmp_path):
    save_tiny_bert(tmp_path)
    module = ClassificationModule(f"hf:{tmp_path}", num_classes=3, input_shape=(8,))
    batch = {"input": {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
             "target": torch.tensor([0, 2])}
    out = module.forward_step(batch)
    assert out.logits.shape == (2, 3) and out.features.shape == (2, 16)


def test_module_without_shape_explains_the_fix():
    with pytest.raises(ValueError, match="needs num_classes and input_shape"):
        ClassificationModule("mlp")


def test_mlp_batch_norm_is_an_option_off_by_default():
    plain = create_backbone("mlp", input_shape=(64,), hidden_sizes=(32, 16))
    normed = create_backbone("mlp", input_shape=(64,), hidden_sizes=(32, 16), norm="batch")
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    assert [m.num_features for m in normed.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [32, 16]
    with pytest.raises(ValueError, match="norm='layer'.*Fix: pass norm='batch'"):
        create_backbone("mlp", input_shape=(64,), norm="layer")
