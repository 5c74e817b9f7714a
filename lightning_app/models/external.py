"""Backbones from timm and transformers, built offline by default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn


def timm_backbone(name: str, input_shape: Sequence[int], pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``); ``feature_dim`` = its width."""
    import timm

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=input_shape[0], **kwargs)
    model.feature_dim = model.num_features
    return model


class TransformersClassifier(nn.Module):
    """A transformers sequence-classification model returning ``(features, logits)``.

    ``features`` is the first token's last hidden state (the [CLS] position). The batch input is
    a dict of the tokenizer's tensors (``input_ids``, ``attention_mask``, ...).
    """

    has_head = True

    def __init__(self, path: str, num_labels: int | None = None, **kwargs: Any):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        # a head of another size (the usual fine-tuning case) is re-initialised, not an error
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(path, **extra, **kwargs)
        self.feature_dim = self.model.config.hidden_size

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        output = self.model(**inputs, output_hidden_states=True)
        return output.hidden_states[-1][:, 0], output.logits
