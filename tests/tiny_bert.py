"""Randomly initialised tiny BERTs, offline, with MiniLM's layer names (``attention.self.query`` ...
``output.dense``), for the tests of techniques that must adapt a transformers model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn


def tiny_bert_config(num_hidden_layers: int = 1):
    """Hidden size 16, 2 heads, a 50-token vocabulary."""
    from transformers import BertConfig

    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                      intermediate_size=32)


def save_tiny_bert(directory: Path, num_hidden_layers: int = 1) -> Path:
    """A tiny 3-class BertForSequenceClassification saved to ``directory`` (for an ``hf:`` backbone)."""
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(tiny_bert_config(num_hidden_layers)).save_pretrained(directory)
    return directory


def token_batch(size: int, generator: torch.Generator | None = None) -> dict:
    """``size`` random 8-token sequences with labels 0, 1, 2, 0, ..."""
    return {"input": {"input_ids": torch.randint(0, 50, (size, 8), generator=generator),
                      "attention_mask": torch.ones(size, 8, dtype=torch.long)},
            "target": torch.arange(size) % 3}


def tiny_bert(directory: Path, num_hidden_layers: int) -> tuple[L.LightningModule, torch.utils.data.DataLoader]:
    """The tiny BERT as an ``hf:`` ClassificationModule, and a loader of 64 random 8-token
    sequences (batches of 16)."""
    from reglab.tasks import ClassificationModule

    module = ClassificationModule(f"hf:{save_tiny_bert(directory, num_hidden_layers)}", num_classes=3,
                                  input_shape=(8,), lr=1e-2)
    batch = token_batch(64, torch.Generator().manual_seed(0))
    samples = [{"input": {key: values[i] for key, values in batch["input"].items()}, "target": batch["target"][i]}
               for i in range(64)]
    return module, torch.utils.data.DataLoader(samples, batch_size=16)


class TinyBertClassifier(nn.Module):
    """A bare BertModel (``backbone``) and a linear ``head`` on its pooled output."""

    def __init__(self, layers: int = 1) -> None:
        from transformers import BertModel

        super().__init__()
        self.backbone = BertModel(tiny_bert_config(layers))
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids=input_ids).pooler_output)
