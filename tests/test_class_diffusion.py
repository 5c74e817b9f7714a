"""ClassDiffusion's semantic preservation loss against hand-computed cases, and its tuning on a tiny U-Net."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from reglab.callbacks.generative import ClassDiffusion, PlainPersonalization
from reglab.callbacks.generative.class_diffusion import MODIFIER, semantic_preservation_loss, sentence_embedding
from reglab.datamodules.base import DictDataset
from reglab.technique import TechniqueConfigError


def test_sentence_embedding_is_the_masked_mean():
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(sentence_embedding(states, mask), torch.tensor([[2.0, 1.0]]))


def test_spl_is_one_minus_cosine_of_the_pooled_phrases():
    # personalized phrase pools to (1, 1) (its padded token ignored), the class phrase to (1, 0): cos = 1/sqrt(2)
    personalized = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [9.0, -9.0]], [[0.0, 2.0], [0.0, 4.0], [0.0, 0.0]]])
    personalized_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    phrase = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    phrase_mask = torch.tensor([[1, 0], [1, 1]])
    loss = semantic_preservation_loss(personalized, personalized_mask, phrase, phrase_mask)
    # second pair: (0, 2) against (0, 1): same direction, loss 0
    assert torch.allclose(loss, torch.tensor([1 - 1 / math.sqrt(2), 0.0]), atol=1e-6)


def test_negative_weight_is_refused():
    with pytest.raises(TechniqueConfigError, match="spl_weight"):
        ClassDiffusion(spl_weight=-1.0)


def tuned(technique: ClassDiffusion):
    from reglab.tasks import DiffusionModule

    L.seed_everything(0, verbose=False)
    module = DiffusionModule(input_shape=(1, 8, 8), num_classes=10, conditioning="text", block_out_channels=(8, 16),
                             norm_num_groups=4, attention_head_dim=4, cond_dropout=0.0, lr=1e-2)
    unet_before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    images = torch.rand(4, 1, 8, 8)
    data = L.LightningDataModule.from_datasets(DictDataset(images, torch.full((4,), 3)), batch_size=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[technique])
    trainer.fit(module, datamodule=data)
    return module, technique, unet_before


def test_tuning_trains_the_modifier_and_cross_attention_kv_only():
    module, technique, before = tuned(ClassDiffusion(spl_weight=1.0))
    moved = {n for n, p in module.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in moved)
    # the table holds the class prompts, the null prompt and the ten personalized prompts, without a graph
    assert module.prompt_states.shape[0] == 21 and not module.prompt_states.requires_grad
    assert int(technique.personalized(3)) == 14
    samples = module.sample(technique.personalized(torch.tensor([3, 7])), steps=2, seed=0)
    assert samples.shape == (2, 1, 8, 8)
    # the SPL pulls the modifier: with weight 0 it ends elsewhere
    plain, _, _ = tuned(PlainPersonalization())
    assert not torch.allclose(getattr(module, MODIFIER), getattr(plain, MODIFIER))
