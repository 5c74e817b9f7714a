"""The generated query–passage retrieval corpus: its generation rules, relevance, hard negatives,
query splits and batches, and that bag-of-words matching does not solve it."""

from __future__ import annotations

import doctest

import pytest
import torch
from transformers import AutoTokenizer

from reglab.datamodules import TextRetrievalDataModule, generate_corpus, retrieval_text, token_overlap
from reglab.datamodules.retrieval_text import ATTRIBUTES, CONNECTIVES
from reglab.models.external import transformers_path


@pytest.fixture(scope="module")
def data():
    data = TextRetrievalDataModule(num_entities=40, batch_size=16, num_hard_negatives=3, seed=1)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def tokenizer(data):
    return AutoTokenizer.from_pretrained(transformers_path(data.tokenizer))


def test_passages_state_their_facts_and_the_partner_is_another_person_and_attribute():
    corpus = generate_corpus(num_entities=12, facts_per_passage=2, repeats=2, sample_seed=3)
    num_attributes = len(ATTRIBUTES)
    assert len(corpus.passages) == 12 * num_attributes * 2
    for text, facts in zip(corpus.passages, corpus.passage_facts.tolist()):
        (e1, a1), (e2, a2) = (divmod(fact, num_attributes) for fact in facts)
        assert e1 != e2 and a1 != a2
        for entity, attribute in ((e1, a1), (e2, a2)):
            value = ATTRIBUTES[attribute].values[int(corpus.values[entity, attribute])]
            assert any(template.format(e=corpus.entities[entity], v=value) in text
                       for template in ATTRIBUTES[attribute].passage_templates)
    # every fact is stated facts_per_passage · repeats times
    assert corpus.passage_facts.flatten().bincount().tolist() == [4] * (12 * num_attributes)
    # a query's words tell its entity and its attribute: one template and one name render it
    for fact, query in enumerate(corpus.queries):
        readings = {(attribute, name) for attribute, spec in enumerate(ATTRIBUTES) for template in spec.query_templates
                    for name in corpus.entities if template.format(e=name) == query}
        assert readings == {(fact % num_attributes, corpus.entities[fact // num_attributes])}
    # first or last names are shared between people (the name-sharing negatives)
    assert len({name.split()[0] for name in corpus.entities}) < len(corpus.entities)
    assert generate_corpus(num_entities=12, sample_seed=3).passages == generate_corpus(num_entities=12, sample_seed=3).passages
    assert generate_corpus(num_entities=12, sample_seed=3).passages != generate_corpus(num_entities=12, sample_seed=4).passages


def test_relevance_grades_and_a_binding_negative_for_every_query():
    corpus = generate_corpus(num_entities=10, sample_seed=0)
    graded, binary = corpus.relevance(graded=True), corpus.relevance(graded=False)
    assert torch.equal(binary, (graded == 2).long())
    num_attributes = len(ATTRIBUTES)
    stated = [[divmod(fact, num_attributes) for fact in facts] for facts in corpus.passage_facts.tolist()]
    for query in range(len(corpus.queries)):
        entity, attribute = divmod(query, num_attributes)
        about = [p for p, facts in enumerate(stated) if any(e == entity for e, _ in facts)]
        answers = [p for p, facts in enumerate(stated) if (entity, attribute) in facts]
        assert graded[query].nonzero().flatten().tolist() == about
        assert (graded[query] == 2).nonzero().flatten().tolist() == answers
        # a passage names the person and states the asked attribute of someone else
        assert any((entity, attribute) not in facts and any(e == entity for e, _ in facts)
                   and any(a == attribute and e != entity for e, a in facts)
                   for facts in stated)


def test_partly_paired_corpus_has_binding_negatives_only_for_the_paired_attributes():
    num_attributes, entities = len(ATTRIBUTES), 10
    corpus = generate_corpus(num_entities=entities, sample_seed=1, paired_attributes=3)
    stated = [sorted(set(divmod(fact, num_attributes) for fact in facts)) for facts in corpus.passage_facts.tolist()]
    two_fact = [facts for facts in stated if len(facts) == 2]
    paired = {a for facts in two_fact for _, a in facts}
    assert len(paired) == 3 and len(two_fact) == entities * 3 and len(stated) == entities * (3 + 2 * 3)
    assert all(len(facts) == 1 for facts in stated if facts[0][1] not in paired)
    # a one-fact passage reads as one statement (no connective)
    assert all(not any(connective in text for connective in CONNECTIVES)
               for text, facts in zip(corpus.passages, stated) if len(facts) == 1)
    # every query keeps two positives; a binding negative (names the person, states the asked
    # attribute of someone else) exists exactly for the queries about paired attributes
    assert (corpus.relevance(graded=False).sum(1) == 2).all()
    for query in range(len(corpus.queries)):
        entity, attribute = divmod(query, num_attributes)
        binding = any((entity, attribute) not in facts and any(e == entity for e, _ in facts)
                      and any(a == attribute and e != entity for e, a in facts) for facts in stated)
        assert binding == (attribute in paired)
    data = TextRetrievalDataModule(num_entities=entities, paired_attributes=3, num_hard_negatives=2, batch_size=4)
    data.setup("fit")
    assert tuple(next(iter(data.train_dataloader()))["positive_ids"].shape) == (4, 2)
    with pytest.raises(ValueError, match="paired_attributes must be None or in 2..6"):
        generate_corpus(num_entities=4, paired_attributes=1)
    with pytest.raises(ValueError, match="with facts_per_passage=2"):
        TextRetrievalDataModule(num_entities=4, facts_per_passage=1, paired_attributes=3)


def test_query_splits_are_disjoint_seeded_and_hold_every_attribute(data):
    ids = {name: getattr(data, f"{name}_dataset").targets for name in ("train", "val", "test")}
    together = torch.cat(list(ids.values()))
    assert len(together) == len(together.unique()) == len(data.corpus.queries)
    for split in ids.values():
        assert set((split % len(ATTRIBUTES)).tolist()) == set(range(len(ATTRIBUTES)))
    again = TextRetrievalDataModule(num_entities=40, num_hard_negatives=3, seed=1, max_train_queries=50)
    other = TextRetrievalDataModule(num_entities=40, num_hard_negatives=3, seed=2)
    again.setup("fit"), other.setup("fit")
    assert torch.equal(again.test_dataset.targets, ids["test"])
    assert set(again.train_dataset.targets.tolist()) < set(ids["train"].tolist()) and len(again.train_dataset) == 50
    assert not torch.equal(other.test_dataset.targets, ids["test"])
    # the corpus follows sample_seed, not the split seed
    assert other.corpus.passages == data.corpus.passages


def test_batches_carry_query_and_passage_tokens_and_the_relevance(data, tokenizer):
    batch = next(iter(data.train_dataloader()))
    passage_ids = data.passages.encoded["input_ids"]
    queries = batch["target"]
    assert torch.equal(batch["relevance"], data.relevance[queries])
    assert torch.equal(batch["positive"]["input_ids"], passage_ids[batch["positive_id"]])
    assert torch.equal(batch["hard_negatives"]["input_ids"], passage_ids[batch["hard_negative_ids"]])
    assert (batch["relevance"].gather(1, batch["positive_ids"]) == 2).all()
    assert (batch["relevance"] == 2).sum(1).tolist() == [batch["positive_ids"].shape[1]] * len(queries)
    assert torch.equal(batch["hard_negative_relevance"], batch["relevance"].gather(1, batch["hard_negative_ids"]))
    assert (batch["hard_negative_relevance"] < 2).all()
    # the query tokens are those of the query's text
    first = data.corpus.queries[int(queries[0])].split()
    assert tokenizer.decode(batch["input"]["input_ids"][0], skip_special_tokens=True).split() == first
    # the hard negatives are the non-answering passages that share the most words with the query
    overlap = token_overlap(batch["input"]["input_ids"], passage_ids, tuple(tokenizer.all_special_ids))
    chosen = overlap.gather(1, batch["hard_negative_ids"])
    others = overlap.masked_fill(batch["relevance"] == 2, -1).scatter(1, batch["hard_negative_ids"], -1)
    assert (chosen.min(1).values >= others.max(1).values).all()
    assert (chosen >= 2).all()  # at least the full name: each person has 10 passages that do not answer
    passages = list(data.passage_dataloader())
    assert torch.equal(torch.cat([b["target"] for b in passages]), torch.arange(len(data.corpus.passages)))
    assert torch.equal(torch.cat([b["input"]["input_ids"] for b in passages]), passage_ids)


def test_bag_of_words_matching_does_not_solve_the_test_queries(data, tokenizer):
    queries = data.test_dataset.targets
    query_ids = torch.stack([data.test_dataset.inputs[i]["input_ids"] for i in range(len(queries))])
    overlap = token_overlap(query_ids, data.passages.encoded["input_ids"], tuple(tokenizer.all_special_ids))
    top = overlap == overlap.max(1, keepdim=True).values
    answers = data.relevance[queries] == 2
    # expected precision@1 of ranking by shared words, ties broken at random
    precision_at_1 = ((top & answers).sum(1) / top.sum(1)).mean()
    assert precision_at_1 < 0.5, f"bag of words finds the answer first for {precision_at_1:.0%} of the test queries"


def test_binary_relevance_and_bad_arguments():
    binary = TextRetrievalDataModule(num_entities=6, relevance="binary", num_hard_negatives=2, max_train_queries=4)
    binary.setup("fit")
    assert set(binary.relevance.unique().tolist()) == {0, 1}
    assert (next(iter(binary.train_dataloader()))["hard_negative_relevance"] == 0).all()
    with pytest.raises(ValueError, match="relevance must be 'graded' or 'binary'"):
        TextRetrievalDataModule(relevance="ndcg")
    with pytest.raises(ValueError, match="num_hard_negatives must be in 0..34"):
        TextRetrievalDataModule(num_entities=6, num_hard_negatives=35)
    with pytest.raises(ValueError, match="facts_per_passage must be 1 or 2"):
        TextRetrievalDataModule(facts_per_passage=3)
    with pytest.raises(ValueError, match="num_entities must be in 2..256"):
        TextRetrievalDataModule(num_entities=1)
    short = TextRetrievalDataModule(num_entities=6, max_passage_length=12)
    with pytest.raises(ValueError, match=r"longest passage has \d+ tokens, more than max_passage_length=12"):
        short.setup("fit")


def test_docstring_examples_run():
    assert doctest.testmod(retrieval_text, verbose=False).failed == 0
