"""The tiny CLIP (reglab.tasks.CLIPModule), its towers and the caption data (reglab.datamodules.captions)."""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reglab.datamodules import PALETTE, DigitsDataModule, DomainDigitsDataModule
from reglab.datamodules.captions import CLASS_WORDS, COLOUR_WORDS, CaptionedDigitsDataModule
from reglab.datamodules.text import Tokens
from reglab.mixins import StepOutput
from reglab.tasks import CLIPModule

#: a small random text transformer of MiniLM's config (its tokenizer's vocabulary), so no weights load
SMALL_TEXT = {"text_pretrained": False, "freeze_token_embeddings": False, "embed_dim": 16,
              "image_kwargs": {"channels": (8, 16)},
              "text_config": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                              "num_hidden_layers": 1}}
#: a randomly initialised transformers CLIPModel over MiniLM's tokenizer ([SEP] = 102 ends a text)
TINY_HF_CLIP = {"config": {
    "text_config": {"vocab_size": 30522, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 102, "pad_token_id": 0,
                    "bos_token_id": 101},
    "vision_config": {"image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2},
    "projection_dim": 8}}


@pytest.fixture(scope="module")
def data():
    captioned = CaptionedDigitsDataModule(domains=["upright", "coloured"], batch_size=32, seed=0)
    captioned.setup("fit")
    return captioned


def _tokens(data, split, positions):
    return {key: value[positions] for key, value in getattr(data, split).extras["caption"].encoded.items()}


def test_symmetric_infonce_by_hand():
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT)
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    out = StepOutput(logits=logits, target=torch.arange(2), extras={"text_features": torch.zeros(2, 4)})
    rows = [-math.log(math.e**2 / (math.e**2 + 1)), math.log(2)]              # image i against captions 0, 1
    columns = [-math.log(math.e**2 / (math.e**2 + math.e)), -math.log(math.e / (1 + math.e))]  # caption i vs images
    expected = torch.tensor([(r + c) / 2 for r, c in zip(rows, columns)])
    torch.testing.assert_close(module.task_loss(out), expected)
    # its mean is CLIP's loss as transformers computes it (on logits per text, the transpose)
    from transformers.models.clip import modeling_clip

    # transformers 5 renamed clip_loss
    reference = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    torch.testing.assert_close(module.task_loss(out).mean(), reference(logits.T))


def test_zero_shot_logits_are_scaled_cosines_to_the_prompt_ensemble(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT).eval()
    module.set_class_prompts(data.class_prompts)
    images = data.test_dataset.inputs[:5]
    with torch.no_grad():
        prompts = data.class_prompts
        per_prompt = torch.stack([F.normalize(module.clip.encode_text({k: prompts[k][c] for k in prompts}), dim=-1)
                                  for c in range(10)])                          # (C, T, D)
        classes = F.normalize(per_prompt.mean(1), dim=-1)
        expected = (1 / 0.07) * F.normalize(module.clip.encode_image(images), dim=-1) @ classes.T
        torch.testing.assert_close(module(images), expected)


def test_captions_say_what_the_image_shows_and_test_images_are_unseen(data):
    from transformers import AutoTokenizer

    from reglab.models.external import transformers_path

    tokenizer = AutoTokenizer.from_pretrained(transformers_path(data.tokenizer))
    train = data.train_dataset
    coloured = (train.extras["domain"] == data.domain_names.index("coloured")).nonzero().flatten()[:40]
    for position in coloured.tolist():
        text = tokenizer.decode(train.extras["caption"][position]["input_ids"], skip_special_tokens=True)
        colour = int((PALETTE - train.inputs[position].amax((1, 2))).abs().sum(1).argmin())
        label, words = int(train.targets[position]), set(re.findall(r"\w+", text))
        assert {str(label), CLASS_WORDS[label]} & words, text
        styled = words & set(COLOUR_WORDS)
        assert not styled or styled == {COLOUR_WORDS[colour]}, (text, COLOUR_WORDS[colour])
    # the split is DigitsDataModule's: no test image of the plain digits is a training image here
    digits = DigitsDataModule(seed=0)
    digits.setup("fit")
    upright = train.inputs[train.extras["domain"] == 0][:, 0].flatten(1)
    test_images = digits.test_dataset.inputs.flatten(1)
    assert torch.cdist(test_images, upright).min(1).values.gt(0).all()
    assert torch.cdist(digits.train_dataset.inputs.flatten(1), upright).min(1).values.eq(0).all()


def test_group_accuracy_by_hand():
    from reglab.metrics import GroupAccuracy

    metric = GroupAccuracy(3)
    # group 0: 2 of 3 right; group 2: 1 of 1; group 1: no sample -> nan (the module then logs nothing for it)
    metric.update(torch.tensor([4, 1, 0]), torch.tensor([4, 1, 2]), torch.tensor([0, 0, 0]))
    metric.update(torch.tensor([3]), torch.tensor([3]), torch.tensor([2]))
    value = metric.compute()
    torch.testing.assert_close(value[[0, 2]], torch.tensor([2 / 3, 1.0]))
    assert value[1].isnan()
    with pytest.raises(ValueError, match="alike"):
        metric.update(torch.zeros(2), torch.zeros(2), torch.zeros(3))


def test_bad_captions_and_domains_are_refused():
    with pytest.raises(ValueError, match="max_length"):
        CaptionedDigitsDataModule(domains=["upright"], max_length=4).setup("fit")
    with pytest.raises(ValueError, match="Fix: drop"):
        CaptionedDigitsDataModule(domains=["upright", "sideways"])
    with pytest.raises(ValueError, match="field other than"):
        CaptionedDigitsDataModule(prompt_templates=["a {style} {word}"])


def test_pretraining_aligns_images_with_their_class_prompts(tmp_path):
    # two caption templates and one prompt, so that a small random text transformer learns in a few steps
    data = CaptionedDigitsDataModule(domains=["upright"],
                                     caption_templates=["a photo of the digit {word}", "a handwritten {numeral}"],
                                     prompt_templates=["a photo of the digit {word}"], batch_size=32, seed=0)
    torch.manual_seed(1)
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT, lr=5e-3)
    trainer = L.Trainer(max_steps=150, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    trainer.fit(module, datamodule=data)
    after = trainer.test(module, datamodule=data, verbose=False)[0]
    # chance is 0.1 and the untrained model sits near it
    assert after["test/acc"] > max(0.4, before + 0.3), (before, after)
    assert after["test/acc_upright"] == after["test/acc"]
    # a later test on other data takes that DataModule's prompts (here: the classes in reverse order)
    reversed_data = CaptionedDigitsDataModule(domains=["upright"], prompt_templates=["a photo of the digit {word}"])
    reversed_data.setup("test")
    reversed_data.class_prompts = Tokens({k: v.flip(0) for k, v in reversed_data.class_prompts.items()})
    flipped = trainer.test(module, datamodule=reversed_data, verbose=False)[0]["test/acc"]
    assert flipped < after["test/acc"] / 2, (flipped, after)
    probabilities = torch.cat(trainer.predict(module, datamodule=data))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(data.test_dataset)))
    assert (probabilities.argmax(1) == data.test_dataset.targets).float().mean() == pytest.approx(after["test/acc"])
    # a checkpoint reloads into the same zero-shot classifier (the prompts come from the data, not the checkpoint)
    trainer.save_checkpoint(tmp_path / "clip.ckpt")
    loaded = CLIPModule.load_from_checkpoint(tmp_path / "clip.ckpt").eval()
    loaded.set_class_prompts(data.class_prompts)
    images = data.test_dataset.inputs[:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module.eval()(images))


def test_frozen_token_embeddings_get_no_gradient_and_no_optimizer_slot(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), text_lr=1e-4,
                        model_kwargs={**SMALL_TEXT, "freeze_token_embeddings": True})
    words = module.clip.text_encoder.get_input_embeddings().weight
    batch = {"input": data.train_dataset.inputs[:8], "target": data.train_dataset.targets[:8],
             "caption": _tokens(data, "train_dataset", slice(0, 8))}
    module.task_loss(module.forward_step(batch)).mean().backward()
    assert words.grad is None
    layer = module.clip.text_encoder.encoder.layer[0].attention.self.query.weight
    assert layer.grad is not None
    groups = module.configure_optimizers().param_groups
    assert not any(p is words for g in groups for p in g["params"])
    assert [g["lr"] for g in groups if any(p is layer for p in g["params"])] == [1e-4]
    assert [g["weight_decay"] for g in groups if any(p is module.clip.log_logit_scale for p in g["params"])] == [0.0]


def test_classification_objective_trains_on_the_class_prompts(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT,
                        objective="classification")
    module.set_class_prompts(data.class_prompts)
    batch = {"input": data.train_dataset.inputs[:6], "target": data.train_dataset.targets[:6]}
    out = module.train().forward_step(batch)
    assert out.logits.shape == (6, 10) and "text_features" not in out.extras
    torch.testing.assert_close(module.task_loss(out), F.cross_entropy(out.logits, batch["target"], reduction="none"))
    module.task_loss(out).mean().backward()
    # the prompts are embedded with gradients while training, so the text tower learns from the labels
    assert module.clip.text_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="objective 'captions'"):
        CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT, objective="captions")


def test_the_transformers_clip_path_matches_clipmodel(data):
    module = CLIPModule("hf", num_classes=10, input_shape=(3, 8, 8), model_kwargs=TINY_HF_CLIP).eval()
    prompts = {key: value[:, 0] for key, value in data.class_prompts.items()}   # one prompt per class
    module.set_class_prompts(prompts)
    images = data.test_dataset.inputs[:4]
    clip = module.clip
    with torch.no_grad():
        reference = clip.model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                               pixel_values=(images - clip.mean) / clip.std).logits_per_image
        torch.testing.assert_close(module(images), reference)
    # a training step on image-caption pairs is CLIPModel's own contrastive loss, and trains both towers
    module.train()
    batch = {"input": images, "target": data.test_dataset.targets[:4],
             "caption": _tokens(data, "test_dataset", slice(0, 4))}
    out = module.forward_step(batch)
    loss = module.task_loss(out).mean()
    reference = clip.model(input_ids=batch["caption"]["input_ids"], attention_mask=batch["caption"]["attention_mask"],
                           pixel_values=(images - clip.mean) / clip.std, return_loss=True).loss
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert clip.model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert clip.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_missing_prompts_or_captions_are_refused(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="no class prompts.*Fix"):
        trainer.test(module, datamodule=DomainDigitsDataModule())
    with pytest.raises(ValueError, match="vocabulary"):
        module.set_class_prompts({"input_ids": torch.full((10, 1, 4), 40000), "attention_mask": torch.ones(10, 1, 4)})
