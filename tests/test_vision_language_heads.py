"""Loki's Fréchet-mean rule and the naive Bayes / logistic-regression probes: the maths against
hand-computed cases, and the evaluation-only hook (``transform_predictions``) through Lightning."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from reglab import registry
from reglab.callbacks.vision_language import GaussianNaiveBayesProbe, LogisticRegressionProbe, Loki
from reglab.callbacks.vision_language.logistic_regression_probe import logistic_regression
from reglab.callbacks.vision_language.loki import absolute_distances, embedding_distances, frechet_scores
from reglab.callbacks.vision_language.naive_bayes_probe import gaussian_naive_bayes
from reglab.callbacks.vision_language.probes import few_shot_positions, minmax_scaler
from reglab.datamodules import DigitsDataModule
from reglab.technique import TechniqueConfigError, dataset_features


def test_frechet_scores_by_hand():
    # 0.8 on class 0, 0.2 on class 4 of five ordered classes: -(0.8 y^2 + 0.2 (y - 4)^2)
    scores = frechet_scores(torch.tensor([[0.8, 0.2]]), absolute_distances(5)[[0, 4]])
    assert torch.allclose(scores, torch.tensor([[-3.2, -2.6, -4.0, -7.4, -12.8]]))
    assert scores.argmax(-1).item() == 1  # the continuous Fréchet mean 0.8 rounds to a class never observed
    # the metric of class embeddings: Euclidean distances (3-4-5 triangle)
    d = embedding_distances(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(d, torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]]))


def test_loki_refuses_a_bad_metric_and_classes():
    with pytest.raises(TechniqueConfigError, match="not a metric"):
        Loki(distances=[[0.0, 1.0], [2.0, 0.0]])
    with pytest.raises(TechniqueConfigError, match="square"):
        Loki(distances=[[0.0, 1.0, 2.0]])
    with pytest.raises(TechniqueConfigError, match="metric 'tree'"):
        Loki(metric="tree")
    with pytest.raises(TechniqueConfigError, match="needs the names"):
        Loki(metric="class_names")
    module, data = registry.example_module(), registry.example_data()
    for loki, problem in ((Loki(distances=absolute_distances(3).tolist()), "cover 3 classes"),
                          (Loki(observed_classes=[0, 12]), "observed_classes")):
        with pytest.raises(TechniqueConfigError, match=problem):
            registry.example_trainer(callbacks=[loki]).test(module, datamodule=data, verbose=False)


def _trained(max_steps: int = 5):
    module, data = registry.example_module(), DigitsDataModule(flatten=True, batch_size=128)
    registry.example_trainer(max_steps=max_steps, limit_val_batches=0).fit(module, datamodule=data)
    return module, data


def test_loki_replaces_predictions_in_evaluation_runs_only():
    module, data = _trained()
    observed = [0, 3, 6, 9]
    labels = data.test_dataset.targets
    with torch.no_grad():
        probs = module.eval()(data.test_dataset.inputs)[:, observed].softmax(-1)
    module.train()
    expected = frechet_scores(probs, absolute_distances(10)[observed]).argmax(-1)
    assert set(expected.tolist()) - set(observed), "the hand-computed rule predicts no unseen class: a weak check"

    loki = Loki(observed_classes=observed)
    predicted = torch.cat(registry.example_trainer(callbacks=[loki]).predict(module, datamodule=data)).argmax(-1)
    assert torch.equal(predicted, expected)
    (tested,) = registry.example_trainer(callbacks=[loki]).test(module, datamodule=data, verbose=False)
    assert math.isclose(tested["test/acc"], (expected == labels).float().mean().item(), abs_tol=1e-6)
    # the validation inside a fit keeps argmax (it selects checkpoints on the model itself); a validate run does not
    fit = registry.example_trainer(max_epochs=1, limit_train_batches=1, callbacks=[Loki(observed_classes=observed)])
    fit.fit(module, datamodule=data)
    (plain,) = registry.example_trainer().validate(module, datamodule=data, verbose=False)
    (validated,) = registry.example_trainer(callbacks=[Loki(observed_classes=observed)]).validate(
        module, datamodule=data, verbose=False)
    assert fit.callback_metrics["val/acc"].item() == pytest.approx(plain["val/acc"])
    assert validated["val/acc"] != plain["val/acc"]


def test_naive_bayes_by_hand():
    # class 0 at 0 and 2 (mean 1, variance 1), class 1 at 4 (mean 4, variance 0); priors 2/3, 1/3;
    # shared variance 2/3 * 1 + 1/3 * 0 = 2/3
    head = gaussian_naive_bayes(torch.tensor([[0.0], [2.0], [4.0]]), torch.tensor([0, 0, 1]), num_classes=3)
    logits = head(torch.tensor([[2.4]]))[0]
    assert math.isclose(logits[0].item(), math.log(2 / 3) - 0.5 * 1.4**2 / (2 / 3), rel_tol=1e-6)
    assert math.isclose(logits[1].item(), math.log(1 / 3) - 0.5 * 1.6**2 / (2 / 3), rel_tol=1e-6)
    assert logits[2].item() == -math.inf  # no sample: prior 0
    # one shot per class: the variance is epsilon alone and the rule is the nearest mean
    one_shot = gaussian_naive_bayes(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1]), num_classes=2)
    assert one_shot(torch.tensor([[0.4, 0.4], [0.6, 0.55]])).argmax(-1).tolist() == [0, 1]


def test_logistic_regression_head_is_scikit_learns():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 3] * 20)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(features.numpy(), labels.numpy())
    probs = logistic_regression(features, labels, num_classes=4)(features).softmax(-1)
    assert torch.allclose(probs[:, [0, 2, 3]], torch.from_numpy(model.predict_proba(features.numpy())), atol=1e-10)
    assert (probs[:, 1] == 0).all()  # a class without samples is never predicted
    binary = labels.clamp_max(2) // 2  # two classes: scikit-learn's one-row case
    model = LogisticRegression().fit(features.numpy(), binary.numpy())
    probs = logistic_regression(features, binary, num_classes=2)(features).softmax(-1)
    assert np.allclose(probs.numpy(), model.predict_proba(features.numpy()), atol=1e-10)


def test_few_shot_positions_and_scaler():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 4)
    picked = few_shot_positions(labels, shots=3, seed=1)
    assert torch.bincount(labels[picked]).tolist() == [3, 2, 3]
    assert torch.equal(picked, few_shot_positions(labels, shots=3, seed=1))
    assert len({tuple(few_shot_positions(labels, 1, seed).tolist()) for seed in range(6)}) > 1
    assert torch.equal(few_shot_positions(labels, None, 0), torch.arange(11))
    scale = minmax_scaler(torch.tensor([[0.0, 5.0], [2.0, 5.0]]))
    assert scale(torch.tensor([[1.0, 6.0]])).tolist() == [[0.5, 1.0]]  # a constant dimension keeps scale 1
    with pytest.raises(TechniqueConfigError, match="shots_per_class=0"):
        GaussianNaiveBayesProbe(shots_per_class=0)


@pytest.mark.parametrize("probe", [GaussianNaiveBayesProbe, LogisticRegressionProbe])
def test_probe_reports_the_head_fitted_on_frozen_training_features(probe):
    module, data = _trained()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    technique = probe(shots_per_class=3, seed=2)
    (tested,) = registry.example_trainer(callbacks=[technique]).test(module, datamodule=data, verbose=False)
    train_features, train_labels = dataset_features(module, data.train_dataset)
    test_features, test_labels = dataset_features(module, data.test_dataset)
    head = probe(shots_per_class=3, seed=2).fit(train_features, train_labels, 10)
    accuracy = (head(test_features).argmax(-1) == test_labels).double().mean().item()
    assert math.isclose(tested["test/acc"], accuracy, abs_tol=1e-6)
    (plain,) = registry.example_trainer().test(module, datamodule=data, verbose=False)
    assert tested["test/acc"] != plain["test/acc"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("protocol_class", ["LinearProbeProtocol", "CLIPLinearProbeProtocol"])
def test_linear_probe_protocols_report_the_crossing_point(protocol_class, tmp_path, monkeypatch):
    from reglab import vision_language_claims
    from reglab.bench.protocols import ClaimError

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the CLIP's pretraining config is named from the root
    protocol_type = getattr(vision_language_claims, protocol_class)
    protocol = protocol_type("c", {"shots": [1, 5, None]})
    runs = {"lr": [dict(acc_1shot=0.5, acc_5shot=0.8, acc_all=0.9), dict(acc_1shot=0.6, acc_5shot=0.8, acc_all=0.9)],
            "nb": [dict(acc_1shot=0.7, acc_5shot=0.7, acc_all=0.8), dict(acc_1shot=0.7, acc_5shot=0.75, acc_all=0.8)]}
    lines = protocol.figures(runs, tmp_path, "c")
    assert (tmp_path / "c_shots.png").is_file()
    assert any("lr ahead of nb at ['5', 'all']" in line and "changes at 5 shots" in line for line in lines), lines
    with pytest.raises(FileExistsError):  # never overwrites a figure
        protocol.figures(runs, tmp_path, "c")
    with pytest.raises(ClaimError, match="shots"):
        protocol_type("c", {"shots": [0]})
    with pytest.raises(ClaimError, match="one probe"):
        protocol.check_arm("two", {"technique": [{"class_path": "a.B"}, {"class_path": "a.C"}]})


@pytest.mark.parametrize("name", ["loki", "probes", "naive_bayes_probe", "logistic_regression_probe"])
def test_docstring_examples_run(name):
    module = importlib.import_module(f"reglab.callbacks.vision_language.{name}")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_clip_unseen_classes_masks_the_unprompted_classes_before_the_rule(monkeypatch):
    from reglab.bench.protocols import ClaimError
    from reglab.mixins import StepOutput
    from reglab.vision_language_claims import CLIPUnseenClassesProtocol, PromptsOfObservedClasses

    out = StepOutput(logits=torch.tensor([[0.0, 5.0, 1.0, 2.0]]), target=torch.tensor([1]))
    masked = PromptsOfObservedClasses([0, 2]).transform_predictions(out, None).logits
    assert masked.argmax(-1).item() == 2 and torch.isinf(masked[0, [1, 3]]).all()
    # Loki after the mask: P(0), P(2) = 0.269, 0.731 (e^0 : e^1) whatever class 1 scored, and the Fréchet variances
    # of 0..3 are 2.92, 1.00, 1.08, 3.15: the unprompted 1 between them
    loki = Loki(observed_classes=[0, 2])
    loki._observed, loki._rows = torch.tensor([0, 2]), absolute_distances(4)[[0, 2]]
    scores = loki.transform_predictions(dataclasses.replace(out, logits=masked), None).logits
    torch.testing.assert_close(scores, -torch.tensor([[2.9242, 1.0, 1.0758, 3.1515]]), atol=1e-4, rtol=0)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(ClaimError, match="seen_classes"):
        CLIPUnseenClassesProtocol("c", {"seen_classes": list(range(10))})
