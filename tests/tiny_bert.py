"""A randomly initialised tiny BERT with a task head, offline: the MiniLM layer names
(``attention.self.query`` ... ``output.dense``) for the PEFT techniques' tests."""

import torch
from torch import nn


class TinyBertClassifier(nn.Module):
    def __init__(self, layers: int = 1) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        self.backbone = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                                             num_attention_heads=2, intermediate_size=32))
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids=input_ids).pooler_output)
