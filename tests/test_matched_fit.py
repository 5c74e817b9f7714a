"""The ``matched_fit`` claims protocol (reglab.retrieval_claims): an arm's knob is chosen per seed on a
validation metric, at most another arm's, without training (the fits are faked)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reglab.bench.protocols import ClaimError
from reglab.retrieval_claims import MatchedFitProtocol

REPO = Path(__file__).resolve().parents[1]
KEY = "techniques.inference_free_sparse_retrieval.init_args.weight"
BASE = {"configs": ["configs/technique/flops_regularizer.yaml"]}


def select(values, at_most="base"):
    return {"key": KEY, "values": values, "metric": "val/doc_nonzeros", "at_most": at_most}


def protocol(monkeypatch, nonzeros: dict[str, float], arms: dict) -> tuple[MatchedFitProtocol, list]:
    """A protocol whose fits are faked: a fit's validation non-zeros are ``nonzeros[<its weight override or
    'base'>]``, its test metric a function of it; ``calls`` records every fit's overrides."""
    monkeypatch.chdir(REPO)
    matched = MatchedFitProtocol("sparse", {"configs": ["configs/experiment/text_sparse_retrieval.yaml"]})
    calls = []

    def fit(args):
        overrides = tuple(arg for arg in args if arg.startswith(f"--{KEY}="))
        calls.append(overrides)
        value = nonzeros[overrides[0].split("=")[1] if overrides else "base"]
        trainer = SimpleNamespace(callback_metrics={"val/doc_nonzeros": torch.tensor(value), "train/loss": torch.tensor(1.0)})
        return SimpleNamespace(trainer=trainer, value=value), None

    monkeypatch.setattr(matched, "fit", fit)
    monkeypatch.setattr(matched, "test", lambda cli, history: {"test/doc_nonzeros": cli.value, "test/ndcg@10": cli.value / 100})
    for arm, spec in arms.items():
        matched.check_arm(arm, spec)
    return matched, calls


def test_the_first_weight_within_the_baselines_nonzeros_is_tested_and_later_ones_never_run(monkeypatch, tmp_path):
    arms = {"base": BASE, "idf": {**BASE, "select": select([0.1, 0.2, 0.4])}}
    matched, calls = protocol(monkeypatch, {"base": 45.0, "0.1": 90.0, "0.2": 44.0, "0.4": 20.0}, arms)
    assert matched.run_arm("base", arms["base"], 0, tmp_path) == {
        "test/doc_nonzeros": 45.0, "test/ndcg@10": 0.45, "val/doc_nonzeros": 45.0}
    result = matched.run_arm("idf", arms["idf"], 0, tmp_path)
    assert result == {"test/doc_nonzeros": 44.0, "test/ndcg@10": 0.44, "val/doc_nonzeros": 44.0, "selected": 0.2,
                      "tried": 2.0}
    # the baseline was fitted once for its row and the cap; 0.4 was never fitted
    assert calls == [(), (f"--{KEY}=0.1",), (f"--{KEY}=0.2",)]
    # another seed fits again
    matched.run_arm("idf", arms["idf"], 1, tmp_path)
    assert len(calls) == 6


def test_no_weight_sparse_enough_tests_the_last(monkeypatch, tmp_path):
    arms = {"base": BASE, "idf": {**BASE, "select": select([0.1, 0.2])}}
    matched, calls = protocol(monkeypatch, {"base": 45.0, "0.1": 90.0, "0.2": 60.0}, arms)
    result = matched.run_arm("idf", arms["idf"], 0, tmp_path)
    assert (result["selected"], result["tried"], result["val/doc_nonzeros"]) == (0.2, 2.0, 60.0)


def test_bad_selections_are_refused_at_load(monkeypatch):
    for arms, message in [
        ({"base": BASE, "idf": {**BASE, "select": select([0.2, 0.1])}}, "non-empty ascending list"),
        ({"idf": {**BASE, "select": select([0.1])}, "base": BASE}, "at_most must name an arm listed before"),
        ({"base": BASE, "idf": {**BASE, "select": {"key": KEY, "values": [0.1]}}}, "takes exactly"),
        ({"base": {**BASE, "lr": 1}}, "a fit arm takes `configs`"),
    ]:
        with pytest.raises(ClaimError, match=message):
            protocol(monkeypatch, {}, arms)


def test_a_metric_validation_did_not_log_is_refused(monkeypatch, tmp_path):
    arms = {"base": BASE, "idf": {**BASE, "select": {**select([0.1]), "metric": "val/nonzeros"}}}
    matched, _ = protocol(monkeypatch, {"base": 45.0, "0.1": 40.0}, arms)
    with pytest.raises(ClaimError, match="the last validation logged no 'val/nonzeros'"):
        matched.run_arm("idf", arms["idf"], 0, tmp_path)
