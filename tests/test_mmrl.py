"""MMRL (paper 20) on the tiny CLIP: its maths on hand-computed cases (the mask widening, the CNN read-out, the
loss, the decoupled inference), where the tokens enter and leave each tower, and what trains."""

from __future__ import annotations

import doctest
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reglab import registry
from reglab.callbacks.vision_language import MMRL
from reglab.callbacks.vision_language import mmrl as mmrl_module
from reglab.callbacks.vision_language.mmrl import attention_readout, upper_layer_count, with_token_positions
from reglab.datamodules import CaptionedDigitsDataModule
from reglab.mixins import StepOutput
from reglab.tasks import CLIPModule
from reglab.technique import TechniqueConfigError


@pytest.fixture(scope="module")
def data():
    data = CaptionedDigitsDataModule(domains=["upright"], batch_size=16)
    data.setup("fit")
    return data


def set_up(module, data, technique, stage="test", class_names=None):
    """The technique's set-up outside a fit (no trainer checks run for stages other than fit)."""
    names = data.class_names if class_names is None else class_names
    module.set_class_prompts(data.class_prompts)
    technique.setup(SimpleNamespace(datamodule=SimpleNamespace(class_names=names)), module, stage)
    return technique


def test_upper_layers_scale_the_official_seven_of_twelve():
    assert [upper_layer_count(depth, 7 / 12) for depth in (12, 4, 2, 1)] == [7, 2, 1, 1]


def test_mask_widening_copies_the_first_position():
    square = torch.tensor([[True, True, False], [True, True, False], [True, True, False]]).view(1, 1, 3, 3)
    widened = with_token_positions(square, 2, 3)
    row = [True, True, True, True, False]  # the two tokens' columns copy position 0's, their rows its row
    assert widened.shape == (1, 1, 5, 5) and widened[0, 0].tolist() == [row] * 5
    additive = torch.tensor([[0.0, -1e9], [0.0, 0.0]])  # (batch, keys): a padding mask, as many rows as keys
    assert with_token_positions(additive, 1, 2).tolist() == [[0.0, 0.0, -1e9], [0.0, 0.0, 0.0]]
    assert with_token_positions(None, 2, 3) is None
    assert with_token_positions(square, 2, 4) is square  # a mask of another length is not the tower's


def test_cnn_readout_is_residual_attention_over_the_feature_map():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    feature_map = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # positions (1, 0) and (0, 1)
    # query (1, 0): scores (1, 0) / sqrt 2; query (0, 2): scores (0, 2) / sqrt 2
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    v = math.exp(2 / math.sqrt(2)) / (math.exp(2 / math.sqrt(2)) + 1)
    first, second = torch.tensor([1 + w, 1 - w]), torch.tensor([1 - v, 2 + v])
    assert torch.allclose(attention_readout(queries, feature_map), ((first + second) / 2).view(1, 2), atol=1e-6)


def test_loss_is_the_alpha_mix_and_the_regularisation_is_the_cosine_distance():
    technique = MMRL(alpha=0.7, reg_weight=2.0)
    out = StepOutput(logits=torch.tensor([[0.0, math.log(3.0)]]), target=torch.tensor([1]),
                     extras={"mmrl_logits": torch.tensor([[0.0, 0.0]]),
                             "class_embeddings": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    expected = 0.7 * math.log(4 / 3) + 0.3 * math.log(2)  # softmax (1/4, 3/4) and (1/2, 1/2) at the target
    assert technique.task_loss(out, None).item() == pytest.approx(expected)
    module = SimpleNamespace(mmrl=SimpleNamespace(zero_shot_text=torch.tensor([[1.0, 0.0], [1.0, 0.0]])))
    terms = technique.loss_terms(out, module)  # cosines 1 and 0: 2 * (1 - 1/2)
    assert set(terms) == {"text_regularization"} and terms["text_regularization"].item() == pytest.approx(1.0)


def test_decoupled_inference_fuses_on_the_tuned_classes_only(data):
    module = registry.example_module(data="captions").eval()
    technique = MMRL(alpha=0.7)
    technique.base_classes = tuple(data.class_names)
    batch = {"input": data.train_dataset.inputs[:4], "target": data.train_dataset.targets[:4]}
    for names, fused in ((data.class_names, True), (tuple(f"{n}!" for n in data.class_names), False)):
        set_up(module, data, technique, class_names=names)
        with torch.no_grad():
            out = module.forward_step(batch)
            classes_only = out.logits.clone()
            rep = module.clip.logit_scale() * F.normalize(technique._image_rep, dim=-1) @ \
                out.extras["class_embeddings"].T
            predicted = technique.transform_predictions(out, module).logits
        assert technique.fused is fused
        assert torch.allclose(predicted, 0.7 * classes_only + 0.3 * rep if fused else classes_only, atol=1e-5)
    technique.teardown(None, module, "test")


def test_tokens_enter_the_upper_vit_blocks_and_leave_before_the_read_out(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), objective="classification",
                        model_kwargs={"embed_dim": 16, "image_backbone": "vit", "text_config": {"num_hidden_layers": 1}})
    module.eval()
    images = data.train_dataset.inputs[:3]
    module.set_class_prompts(data.class_prompts)
    with torch.no_grad():
        plain_image, plain_text = module.image_features(images), module.class_embeddings()
    technique = set_up(module, data, MMRL(n_tokens=2))
    seen = []
    for block in module.clip.image_encoder.blocks:  # after MMRL's hooks: sees what the block runs on
        block.register_forward_pre_hook(lambda layer, args: seen.append(args[0]))
    learner = module.mmrl
    with torch.no_grad():
        features = module.image_features(images)
        assert [x.shape[1] for x in seen] == [17, 17, 19, 19]  # the class token, 16 patches, 2 tokens in blocks 3-4
        for x, j in ((seen[2], 0), (seen[3], 1)):
            assert torch.allclose(x[:, 1:3], learner.mapped("image", j).expand(3, -1, -1))
        assert not torch.allclose(features, plain_image)  # the class token attended to the tokens
        assert technique._image_rep.shape == (3, 16)
        with technique.zero_shot():  # the frozen model inside: no tokens anywhere
            assert torch.allclose(module.image_features(images), plain_image, atol=1e-6)
            module._class_embeddings = None
            assert torch.allclose(module.class_embeddings(), plain_text, atol=1e-6)
        text_seen = []
        (layer,) = module.clip.text_encoder.encoder.layer  # one layer: the top one takes the tokens
        layer.register_forward_pre_hook(lambda layer, args: text_seen.append(args), prepend=False)
        assert not torch.allclose(module.class_embeddings(), plain_text, atol=1e-4)
        hidden, mask = text_seen[0][:2]
        length = data.class_prompts["input_ids"].shape[-1]
        assert hidden.shape[1] == length + 2 and mask.shape[-1] == length + 2  # the mask widened with them
        assert torch.allclose(hidden[:, 1:3], learner.mapped("text", 0).expand(len(hidden), -1, -1))
    technique.teardown(None, module, "test")


def test_only_the_representation_space_trains_and_starts_from_the_zero_shot_text(data):
    module = registry.example_module(data="captions")
    technique = MMRL(n_tokens=3)
    trainer = registry.example_trainer(max_steps=2, max_epochs=1, callbacks=[technique], limit_val_batches=0)
    module.set_class_prompts(data.class_prompts)
    with torch.no_grad():
        plain_text = module.eval().class_embeddings()
    trainer.fit(module.train(), datamodule=data)  # a module in train mode, as a fit gets one: no dropout in them
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"mmrl.{n}" for n, _ in module.mmrl.named_parameters()}
    assert module.mmrl.tokens.shape == (3, 16) and len(module.mmrl.to_text) == 1 and len(module.mmrl.to_image) == 1
    assert torch.allclose(module.mmrl.zero_shot_text, plain_text, atol=1e-6)
    assert technique.base_classes == tuple(data.class_names) and technique.state_dict()["base_classes"]


def test_refused_on_contrastive_training_and_on_bad_arguments(data):
    with pytest.raises(TechniqueConfigError, match="alpha"):
        MMRL(alpha=1.5)
    contrastive = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8),
                             model_kwargs={"embed_dim": 16, "text_config": {"num_hidden_layers": 1}})
    trainer = registry.example_trainer(max_steps=1, callbacks=[MMRL()])
    with pytest.raises(TechniqueConfigError, match="objective"):
        trainer.fit(contrastive, datamodule=data)
    from test_clip import TINY_HF_CLIP  # rootdir-relative, as test_harness imports harness

    real_clip_path = CLIPModule("hf", num_classes=10, input_shape=(3, 8, 8), objective="classification",
                                model_kwargs=TINY_HF_CLIP)
    with pytest.raises(TechniqueConfigError, match="tiny CLIP"):
        MMRL().setup(SimpleNamespace(datamodule=data), real_clip_path, "test")


def test_docstring_example_runs():
    assert doctest.testmod(mmrl_module).failed == 0
