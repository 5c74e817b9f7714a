"""Backbones by name: a registry of small built-in models plus timm and transformers factories.

A backbone maps a batch's ``input`` to ``(N, feature_dim)`` features and exposes
``feature_dim``; the task module puts the head on top. A *dense* backbone (``dense = True``, e.g.
``"unet"``) maps images to ``(N, feature_dim, H, W)`` per-pixel features instead, for
:class:`reglab.tasks.SegmentationModule`. Names:

* a registered name (``"mlp"``, ``"cnn"``, ``"vit"``, ``"unet"``; see :func:`list_backbones`);
* ``"timm:<model name>"`` — any timm model, its classifier removed (``pretrained`` off by default
  so it works offline);
* ``"hf:<path or hub id>"`` — a transformers sequence-classification model, which keeps its own
  head (``has_head = True``) and returns ``(features, logits)``.

Example:
    >>> net = create_backbone("mlp", input_shape=(64,), hidden_sizes=(32,))
    >>> net.feature_dim
    32
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding a factory ``fn(input_shape, **kwargs) -> nn.Module`` under ``name``."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def list_backbones() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<name>", "hf:<path>"]


def create_backbone(
    name: str, input_shape: Sequence[int], pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build the backbone ``name`` for inputs of shape ``input_shape`` (without the batch dim)."""
    input_shape = tuple(int(d) for d in input_shape)
    if name.startswith("timm:"):
        from reglab.models.external import timm_backbone

        return timm_backbone(name[len("timm:") :], input_shape, pretrained=pretrained, **kwargs)
    if name.startswith("hf:"):
        from reglab.models.external import TransformersClassifier

        return TransformersClassifier(name[len("hf:") :], **kwargs)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backbone {name!r}; accepted: {', '.join(list_backbones())}"
        )
    if pretrained:
        raise ValueError(f"backbone {name!r} has no pretrained weights; load a checkpoint instead")
    return _REGISTRY[name](input_shape, **kwargs)
