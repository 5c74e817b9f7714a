"""The tiny CLIP (reglab.tasks.CLIPModule), its towers and the caption data (reglab.datamodules.captions)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reglab.datamodules import PALETTE, DigitsDataModule, DomainDigitsDataModule
from reglab.datamodules.captions import COLOUR_WORDS, CaptionedDigitsDataModule
from reglab.mixins import StepOutput
from reglab.tasks import CLIPModule

#: a small random text transformer of MiniLM's config (its tokenizer's vocabulary), so no weights load
SMALL_TEXT = {"text_pretrained": False, "embed_dim": 16, "image_kwargs": {"channels": (8, 16)},
              "text_config": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 1}}
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
    columns = [-math.log(math.e**2 / (math.e**2 + math.e)), -math.log(math.e / (1 + math.e))]  # caption i against images
    expected = torch.tensor([(r + c) / 2 for r, c in zip(rows, columns)])
    torch.testing.assert_close(module.task_loss(out), expected)
    # its mean is CLIP's loss as transformers computes it (on logits per text, the transpose)
    from transformers.models.clip.modeling_clip import clip_loss

    torch.testing.assert_close(module.task_loss(out).mean(), clip_loss(logits.T))


def test_zero_shot_logits_are_scaled_cosines_to_the_prompt_ensemble(data):
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT).eval()
    module.set_class_prompts(data.class_prompts)
    images = data.test_dataset.inputs[:5]
    with torch.no_grad():
        prompts = data.class_prompts
        per_prompt = torch.stack([F.normalize(module.clip.encode_text({k: prompts[k][c] for k in ("input_ids", "attention_mask")}), dim=-1)
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
        label = int(train.targets[position])
        assert str(label) in text or ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                      "nine"][label] in text.split(), text
        styled = any(word in text.split() for word in COLOUR_WORDS)
        assert not styled or COLOUR_WORDS[colour] in text.split(), (text, COLOUR_WORDS[colour])
    # the split is DigitsDataModule's: no test image of the plain digits is a training image here
    digits = DigitsDataModule(seed=0)
    digits.setup("fit")
    upright = train.inputs[train.extras["domain"] == 0][:, 0].flatten(1)
    test_images = digits.test_dataset.inputs.flatten(1)
    assert torch.cdist(test_images, upright).min(1).values.gt(0).all()
    assert torch.cdist(digits.train_dataset.inputs.flatten(1), upright).min(1).values.eq(0).all()


def test_bad_captions_and_domains_are_refused():
    with pytest.raises(ValueError, match="max_length"):
        CaptionedDigitsDataModule(domains=["upright"], max_length=4).setup("fit")
    with pytest.raises(ValueError, match="Fix: drop"):
        CaptionedDigitsDataModule(domains=["upright", "sideways"])
    with pytest.raises(ValueError, match="field other than"):
        CaptionedDigitsDataModule(prompt_templates=["a {style} {word}"])


def test_pretraining_aligns_images_with_their_class_prompts(data, tmp_path):
    torch.manual_seed(0)
    module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs=SMALL_TEXT, lr=3e-3)
    trainer = L.Trainer(max_steps=60, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    trainer.fit(module, datamodule=data)
    after = trainer.test(module, datamodule=data, verbose=False)[0]
    # chance is 0.1 and the untrained model sits near it; the per-domain accuracies are logged too
    assert after["test/acc"] > max(0.3, before + 0.15), (before, after)
    assert set(after) >= {"test/acc_upright", "test/acc_coloured"}
    probabilities = torch.cat(trainer.predict(module, datamodule=data))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(data.test_dataset)))


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
    batch = {"input": images, "target": data.test_dataset.targets[:4], "caption": _tokens(data, "test_dataset", slice(0, 4))}
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
