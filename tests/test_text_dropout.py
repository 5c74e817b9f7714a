"""Text dropout (paper 21) and its scenario: the hinted digits, the multi-input retrieval model's
pieces against hand-computed cases, the dropout's draws, and the refusals."""

from __future__ import annotations

import doctest

import pytest
import torch

import reglab.callbacks.metric_learning.text_dropout as text_dropout_module
import reglab.datamodules.hinted_digits as hinted_digits_module
import reglab.tasks.multi_input as multi_input_module
from reglab.callbacks.metric_learning import TextDropout
from reglab.datamodules import HintedDigitsDataModule
from reglab.datamodules.hinted_digits import VARIANTS, load_tokenizer
from reglab.registry import example_data, example_module, example_trainer
from reglab.tasks.multi_input import BagOfTokens
from reglab.tasks.two_tower import target_ranks
from reglab.technique import TechniqueConfigError


@pytest.fixture(scope="module")
def data() -> HintedDigitsDataModule:
    data = example_data(64, "hinted_digits")
    data.setup("fit")
    return data


@pytest.mark.parametrize("module", [text_dropout_module, hinted_digits_module, multi_input_module])
def test_docstring_examples_run(module):
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


def test_each_query_names_its_variant_and_its_item_is_digit_and_variant(data):
    tokenizer = load_tokenizer(data.tokenizer)
    train = data.train_dataset
    for position in range(0, len(train), 97):
        sample = train[position]
        hint = tokenizer.decode(sample["text"]["input_ids"], skip_special_tokens=True)
        words = set(hint.split())
        assert VARIANTS[int(sample["variant"])] in words and not words & (set(VARIANTS) - {VARIANTS[int(sample["variant"])]})
        assert int(sample["target"]) == int(sample["digit"]) * data.num_variants + int(sample["variant"])
    assert tokenizer.decode(data.empty_text["input_ids"][data.empty_text["attention_mask"].bool()]) == "[CLS] [SEP]"
    # splits: every image once, each digit in every split
    sizes = [len(split) for split in (data.train_dataset, data.val_dataset, data.test_dataset)]
    assert sum(sizes) == 1797
    for split in (data.train_dataset, data.val_dataset, data.test_dataset):
        assert split.extras["digit"].unique().tolist() == list(range(10))


def test_the_datamodule_refuses_bad_settings():
    with pytest.raises(ValueError, match="num_variants must be in 2..8"):
        HintedDigitsDataModule(num_variants=9)
    too_short = HintedDigitsDataModule(max_text_length=4)
    with pytest.raises(ValueError, match="more than max_text_length=4.*raise max_text_length"):
        too_short.setup("fit")


def test_bag_of_tokens_is_the_masked_mean_of_the_token_embeddings():
    bag = BagOfTokens(vocab_size=4, dim=2)
    with torch.no_grad():
        bag.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -2.0], [10.0, 10.0]]))
    ids = torch.tensor([[1, 2, 3], [3, 1, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(bag(ids, mask), torch.tensor([[2.0, 0.0], [10.0, 10.0]]))


def test_target_ranks_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.9], [0.0, 0.1, 0.2]])
    # row 0: one score above the target's; row 1: a tie counts in the target's favour; row 2: last
    assert target_ranks(scores, torch.tensor([2, 0, 0])).tolist() == [1, 0, 2]


def test_without_text_replaces_exactly_the_chosen_rows_by_the_empty_hint(data):
    module = example_module(0, data="hinted_digits")
    with pytest.raises(RuntimeError, match="empty hint is not known yet"):
        module.without_text({"text": {}}, torch.zeros(0, dtype=torch.bool))
    module.empty_text_ids.copy_(data.empty_text["input_ids"])
    module.empty_text_mask.copy_(data.empty_text["attention_mask"])
    batch = next(iter(data.train_dataloader()))
    rows = torch.arange(len(batch["target"])) % 3 == 0
    dropped = module.without_text(batch, rows)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(dropped["text"][key][rows], data.empty_text[key].expand(int(rows.sum()), -1))
        assert torch.equal(dropped["text"][key][~rows], batch["text"][key][~rows])
    assert dropped["input"] is batch["input"] and torch.equal(batch["text"]["input_ids"], next(iter(data.train_dataloader()))["text"]["input_ids"])


def test_text_dropout_drops_each_query_with_probability_p(data):
    module = example_module(0, data="hinted_digits")
    module.empty_text_ids.copy_(data.empty_text["input_ids"])
    module.empty_text_mask.copy_(data.empty_text["attention_mask"])
    batch = next(iter(data.train_dataloader()))
    size = len(batch["target"])
    empty = data.empty_text["attention_mask"].expand(size, -1)

    def dropped_rows(p: float, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = TextDropout(p).transform_batch(batch, module)
        return (out["text"]["attention_mask"] == empty).all(1) & (out["text"]["input_ids"] == module.empty_text_ids).all(1)

    assert not dropped_rows(0.0, 0).any() and dropped_rows(1.0, 0).all()
    # the draw is one uniform per query from the global RNG (which the step contract checkpoints)
    torch.manual_seed(3)
    expected = torch.rand(size) < 0.3
    assert torch.equal(dropped_rows(0.3, 3), expected) and 0 < int(expected.sum()) < size


def test_text_dropout_refuses_bad_p_and_a_model_without_text():
    with pytest.raises(ValueError, match="p is a probability"):
        TextDropout(p=1.5)
    trainer = example_trainer(max_steps=1, callbacks=[TextDropout()])
    with pytest.raises(TechniqueConfigError, match="TextDropout: it needs `text`"):
        trainer.fit(example_module(0), datamodule=example_data(256))


def test_evaluation_logs_recall_with_and_without_the_text(data, tmp_path):
    module = example_module(0, data="hinted_digits")
    trainer = example_trainer(max_steps=3, limit_val_batches=0, limit_test_batches=1, callbacks=[TextDropout(0.5)])
    trainer.fit(module, datamodule=data)
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    assert {f"test/{kind}recall@{k}" for kind in ("", "no_text_") for k in (1, 4)} <= set(logged)
    # recall@k grows with k, with and without the text
    assert logged["test/recall@1"] <= logged["test/recall@4"] and logged["test/no_text_recall@1"] <= logged["test/no_text_recall@4"]
    # the no-text metrics are of the empty-hint queries: recomputed by hand on the first test batch
    batch = next(iter(data.test_dataloader()))
    no_text = module.without_text(batch, torch.ones(len(batch["target"]), dtype=torch.bool))
    with torch.no_grad():
        ranks = target_ranks(module(no_text["input"], no_text["text"]), batch["target"])
    assert logged["test/no_text_recall@4"] == pytest.approx(float((ranks < 4).float().mean()), abs=1e-6)
    # a checkpoint keeps the empty hint: the loaded model queries without text, no DataModule needed
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = type(module).load_from_checkpoint(tmp_path / "model.ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(no_text["input"], loaded.without_text(batch, torch.ones(len(ranks), dtype=torch.bool))["text"]),
                           module(no_text["input"], no_text["text"]))


def test_the_module_refuses_a_datamodule_without_an_empty_hint():
    trainer = example_trainer(max_steps=1)
    with pytest.raises(ValueError, match="has no `empty_text`.*HintedDigitsDataModule"):
        trainer.fit(example_module(0, data="hinted_digits"), datamodule=example_data(256))
