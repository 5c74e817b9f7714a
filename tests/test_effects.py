"""The effect harness's verdict rules and claim files (no training: fake per-seed results)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from reglab.bench.effects import Check, Claim, RunResult, load_claims, verdict, write_report

REPO = Path(__file__).resolve().parents[1]


def test_superiority_rule_against_a_hand_computation():
    # diffs 0.02, 0.04, 0.06: mean 0.04, std 0.02, s.e. 0.02/sqrt(3) = 0.011547; 0.04 - 0.023094 > 0.
    judged = verdict(Check("test/acc", "higher"), [0.70, 0.70, 0.70], [0.72, 0.74, 0.76])
    assert judged.shown
    assert judged.difference == pytest.approx(0.04)
    assert judged.stderr == pytest.approx(0.02 / math.sqrt(3))
    # diffs 0.00, 0.04, 0.08: mean 0.04, s.e. 0.04/sqrt(3) = 0.023094; 0.04 - 0.046188 < 0.
    assert not verdict(Check("test/acc", "higher"), [0.7] * 3, [0.70, 0.74, 0.78]).shown


def test_lower_flips_the_sign():
    baseline, technique = [0.10, 0.10, 0.10], [0.07, 0.08, 0.09]  # ECE falls by 0.02 ± 0.0058
    assert verdict(Check("test/ece", "lower"), baseline, technique).shown
    assert not verdict(Check("test/ece", "higher"), baseline, technique).shown
    assert verdict(Check("test/ece", "lower"), baseline, technique).difference == pytest.approx(-0.02)


def test_non_inferiority_rule_uses_the_margin():
    # diffs -0.01, 0.00, +0.01: mean 0, s.e. 0.01/sqrt(3) = 0.005774, so mean - 2 s.e. = -0.011547.
    baseline, technique = [0.70, 0.70, 0.70], [0.69, 0.70, 0.71]
    assert verdict(Check("test/acc", "at_least", margin=0.012), baseline, technique).shown
    assert not verdict(Check("test/acc", "at_least", margin=0.011), baseline, technique).shown
    assert not verdict(Check("test/acc", "higher"), baseline, technique).shown
    # at_most mirrors at_least for lower-is-better metrics.
    assert verdict(Check("test/ece", "at_most", margin=0.012), baseline, technique).shown
    assert not verdict(Check("test/ece", "at_most", margin=0.011), baseline, technique).shown


def test_one_seed_never_shows_a_claim():
    judged = verdict(Check("test/acc", "at_least", margin=0.5), [0.5], [0.9])
    assert math.isinf(judged.stderr) and not judged.shown


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "test/acc", "direction": "up"}, "direction must be one of"),
        ({"metric": "test/acc", "direction": "higher", "margin": 0.01}, "needs direction at_least/at_most"),
        ({"metric": "test/acc", "direction": "at_least", "margin": -0.01}, "must be >= 0"),
        ({"metric": "", "direction": "higher"}, "metric must be"),
    ],
)
def test_bad_checks_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Check(**kwargs)


def test_unpaired_values_are_rejected():
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        verdict(Check("test/acc", "higher"), [0.1, 0.2], [0.3])


BASE = {"name": "c", "claim": "text", "configs": []}


def test_single_metric_form_is_one_check_and_multi_metric_form_is_several():
    single = Claim.from_dict({**BASE, "metric": "test/acc", "direction": "at_least", "margin": 0.01})
    assert single.checks == [Check("test/acc", "at_least", 0.01)]
    multi = Claim.from_dict({**BASE, "checks": [{"metric": "test/acc", "direction": "higher"},
                                                {"metric": "test/ece", "direction": "lower"}]})
    assert multi.metrics == ["test/acc", "test/ece"]
    with pytest.raises(ValueError, match="not both"):
        Claim.from_dict({**BASE, "metric": "test/acc", "direction": "higher", "checks": [{"metric": "x", "direction": "lower"}]})
    with pytest.raises(ValueError, match="non-empty checks"):
        Claim.from_dict(BASE)


def test_registered_claims_load_and_name_their_files():
    claims = load_claims(REPO / "benchmarks/effects")
    names = {c.name for c in claims}
    assert {"ps_kd", "ps_kd_noisy", "mean_teacher"} <= names
    for path in sorted((REPO / "benchmarks/effects").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["name"] == path.stem


def test_report_gives_one_verdict_per_check(tmp_path):
    claim = Claim.from_dict({**BASE, "checks": [{"metric": "test/acc", "direction": "higher"},
                                                {"metric": "test/ece", "direction": "lower"}]})
    runs = {
        "baseline": [RunResult({"test/acc": 0.70, "test/ece": 0.05, "test/loss": 1.0}, {}) for _ in range(3)],
        "technique": [RunResult({"test/acc": a, "test/ece": e, "test/loss": 0.9}, {})
                      for a, e in ((0.72, 0.08), (0.74, 0.09), (0.76, 0.10))],
    }
    outcome = write_report(claim, runs, tmp_path, "reglab bench effects --only c")
    assert outcome == "test/acc higher: claim shown; test/ece lower: claim not reproduced"
    text = (tmp_path / "c.md").read_text()
    assert text.count("Verdict: **") == 2 and "| test/loss |" in text
