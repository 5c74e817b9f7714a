"""The pydoc-topics text DataModule and the small causal language model (GPT-2 config, random init)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from reglab.datamodules import PydocTopicsDataModule, pydoc_topics
from reglab.tasks import LanguageModelModule

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             accelerator="cpu", devices=1)


@pytest.fixture(scope="module")
def data():
    data = PydocTopicsDataModule(block_size=32, vocab_size=512, batch_size=4)
    data.setup("fit")
    return data


def tiny(vocab_size=512, **kwargs):
    torch.manual_seed(0)
    return LanguageModelModule(vocab_size=vocab_size, n_layer=1, n_embd=32, n_head=2, n_positions=32,
                               **{"prompt_length": 8, "max_new_tokens": 6, **kwargs})


def test_split_by_document_blocks_and_lossless_tokens(data):
    topics = {split: set(names) for split, names in data.split_topics.items()}
    assert not topics["train"] & topics["val"] and not topics["train"] & topics["test"] and not topics["val"] & topics["test"]
    assert set().union(*topics.values()) == {name for name, _ in pydoc_topics()}
    for dataset in (data.train_dataset, data.val_dataset, data.test_dataset):
        assert dataset.inputs.shape[1] == 32 and int(dataset.inputs.max()) < 512
    # byte-level BPE decodes to the very text: the first training block is the start of the first training document
    first = dict(pydoc_topics())[data.split_topics["train"][0]]
    assert first.startswith(data.decode(data.train_dataset.inputs[0]))


def test_tokenizer_is_deterministic_and_small_sets_are_subsets(data):
    small = PydocTopicsDataModule(block_size=32, vocab_size=512, max_train_blocks=5, seed=3)
    small.setup("fit")
    assert small.tokenizer.to_str() == data.tokenizer.to_str()
    assert len(small.train_dataset) == 5
    rows = {tuple(row) for row in data.train_dataset.inputs.tolist()}
    assert all(tuple(row) in rows for row in small.train_dataset.inputs.tolist())
    assert torch.equal(small.val_dataset.inputs, data.val_dataset.inputs)


def test_bad_data_settings_fail_early_with_the_fix():
    with pytest.raises(ValueError, match="vocab_size must exceed 257"):
        PydocTopicsDataModule(vocab_size=100)
    with pytest.raises(ValueError, match="Fix: a smaller block_size"):
        PydocTopicsDataModule(block_size=10**6, vocab_size=300).setup("fit")


def test_step_shifts_targets_and_the_task_loss_is_gpt2s_loss_per_block():
    module = tiny(vocab_size=64).eval()  # no dropout: the two forward passes below agree
    ids = torch.randint(0, 64, (3, 10))
    out = module.forward_step({"input": ids})
    assert out.logits.shape == (3, 9, 64) and torch.equal(out.target, ids[:, 1:])
    per_block = module.task_loss(out)
    assert per_block.shape == (3,)
    for row, loss in zip(ids, per_block):  # transformers' own shifted loss, one block at a time
        torch.testing.assert_close(loss, module.model(input_ids=row[None], labels=row[None]).loss)


def test_greedy_generation_is_the_argmax_of_the_returned_logits_step_by_step():
    module = tiny(vocab_size=64).eval()
    prompts = torch.randint(0, 64, (2, 5))
    tokens, logits = module.generate(prompts, max_new_tokens=4)
    assert tokens.shape == (2, 4) and logits.shape == (2, 4, 64)
    sequence = prompts
    for step in range(4):  # no cache: the full forward of the sequence so far
        next_logits = module(sequence)[:, -1]
        torch.testing.assert_close(logits[:, step], next_logits, rtol=1e-4, atol=1e-4)
        sequence = torch.cat([sequence, next_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, sequence[:, 5:])
    sampled, _ = module.generate(prompts, max_new_tokens=4, do_sample=True)
    assert sampled.shape == (2, 4)


def test_fit_logs_perplexity_and_predict_generates(data):
    module = tiny()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=3, limit_predict_batches=1, **QUIET)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    # every validation block has the same length, so the perplexity over tokens is exp(mean block loss)
    assert metrics["val/ppl"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-4)
    (predicted,) = trainer.predict(module, datamodule=data)
    assert predicted["tokens"].shape == (4, 6) and predicted["prompt"].shape == (4, 8)
    assert torch.equal(predicted["prompt"], data.test_dataset.inputs[:4, :8])
    assert (predicted["entropy"] >= 0).all() and (predicted["entropy"] <= math.log(512) + 1e-4).all()


def test_module_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="needs vocab_size"):
        LanguageModelModule()
    with pytest.raises(ValueError, match="multiple of n_head"):
        LanguageModelModule(vocab_size=64, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="fit in n_positions"):
        LanguageModelModule(vocab_size=64, n_positions=16, prompt_length=8, max_new_tokens=9)
    small_vocab = tiny(vocab_size=300)
    with pytest.raises(ValueError, match="Fix: leave vocab_size unset"):
        L.Trainer(max_steps=1, **QUIET).fit(small_vocab, datamodule=PydocTopicsDataModule(block_size=32, vocab_size=512))


def test_generate_command_writes_continuations_and_measures_and_never_overwrites(data, tmp_path):
    from reglab.cli import main

    module = tiny()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, **QUIET)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    config = tmp_path / "train.yaml"
    config.write_text("data:\n  class_path: reglab.datamodules.PydocTopicsDataModule\n"
                      "  init_args: {block_size: 32, vocab_size: 512}\n")
    args = ["generate", "--ckpt", str(tmp_path / "lm.ckpt"), "--config", str(config), "--out", str(tmp_path / "out"),
            "--prompts", "3"]
    main(args)
    page = (tmp_path / "out/generations.md").read_text()
    assert page.count("▶") == 3 and data.decode(data.test_dataset.inputs[0, :8]) in page
    measured = json.loads((tmp_path / "out/generations.json").read_text())
    assert 0 <= measured["rep_4"] <= 1 and 0 < measured["distinct_1"] <= 1 and measured["entropy"] > 0
    with pytest.raises(SystemExit, match="already holds generations. Fix: give a new --out folder"):
        main(args)
    assert (tmp_path / "out/generations.md").read_text() == page
