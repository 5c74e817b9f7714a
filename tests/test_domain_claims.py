"""The `domains` claims protocol: leave-one-domain-out, training-domain validation vs the oracle,
evaluation through trainer.test from the fitted weights every time."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from reglab.bench.protocols import ClaimError, get_protocol
from reglab.domain_claims import DomainsProtocol, HeldOutFit, select

TINY = {"domains": ["upright", "rotated", "inverted"], "held_out": ["inverted", "upright"], "epochs": 1,
        "batch_size": 20, "lr_grid": [0.001], "trainer": {"limit_train_batches": 2}}


class StartRecorder(L.Callback):
    """Remembers the weights every test run starts from, and leaves the model changed after each
    (as a test-time adaptation that keeps its updates would)."""

    starts: list[torch.Tensor] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StartRecorder.starts.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            for parameter in pl_module.parameters():
                parameter.add_(1.0)


def test_selection_reads_training_domain_validation_and_the_oracle_reads_the_held_out_validation():
    fits = [HeldOutFit(lr=0.001, training_domain_val=0.9, held_out_val=0.2, held_out_test=0.3),
            HeldOutFit(lr=0.003, training_domain_val=0.8, held_out_val=0.6, held_out_test=0.7),
            HeldOutFit(lr=0.01, training_domain_val=0.1, held_out_val=0.1, held_out_test=0.95)]
    assert select("noisy", fits) == {"noisy": 0.3, "oracle/noisy": 0.7, "lr/noisy": 0.001}


def test_run_arm_selects_per_held_out_domain_and_averages(monkeypatch):
    protocol = DomainsProtocol("c", {"domains": ["upright", "rotated", "noisy"], "lr_grid": [0.001, 0.003]})
    # training-domain validation prefers the larger rate, the oracle the smaller; tests differ by domain
    table = {("upright", 0.001): (0.5, 0.9, 0.60), ("upright", 0.003): (0.7, 0.1, 0.80),
             ("rotated", 0.001): (0.5, 0.9, 0.40), ("rotated", 0.003): (0.7, 0.1, 0.20),
             ("noisy", 0.02): (0.5, 0.9, 0.55)}
    calls = []

    def fit(self, spec, held_out, lr, seed):
        calls.append((held_out, lr, seed))
        return HeldOutFit(lr, *table[held_out, lr])

    monkeypatch.setattr(DomainsProtocol, "fit", fit)
    protocol.settings["held_out"] = ["upright", "rotated"]
    metrics = protocol.run_arm("erm", {}, 4, None)
    assert metrics == {"upright": 0.8, "oracle/upright": 0.6, "lr/upright": 0.003,
                       "rotated": 0.2, "oracle/rotated": 0.4, "lr/rotated": 0.003,
                       "average": pytest.approx(0.5), "oracle/average": pytest.approx(0.5)}
    assert calls == [("upright", 0.001, 4), ("upright", 0.003, 4), ("rotated", 0.001, 4), ("rotated", 0.003, 4)]
    protocol.settings["held_out"] = ["noisy"]
    assert protocol.run_arm("arm", {"lr_grid": [0.02]}, 0, None)["noisy"] == 0.55  # the arm's grid wins
    assert protocol.grid({"lr": 0.5}) == [0.5] and protocol.grid({}) == [0.001, 0.003]


def test_a_tiny_sweep_tests_every_part_from_the_fitted_weights_and_reports_every_metric():
    protocol = get_protocol("domains", "reglab.domain_claims")("tiny", TINY)
    spec = {"technique": [{"class_path": f"{__name__}.StartRecorder"},
                          {"class_path": "reglab.callbacks.LabelSmoothing", "init_args": {"epsilon": 0.1}}]}
    protocol.check_arm("stacked", spec)
    StartRecorder.starts = []
    metrics = protocol.run_arm("stacked", spec, 0, None)
    assert set(metrics) == {"inverted", "oracle/inverted", "lr/inverted", "upright", "oracle/upright", "lr/upright",
                            "average", "oracle/average"}
    assert all(0.0 <= metrics[key] <= 1.0 for key in metrics if not key.startswith("lr/"))
    # per held-out domain: each training domain's out part, the held-out out part, the held-out in part
    assert len(StartRecorder.starts) == 2 * (2 + 2)
    for fit in (StartRecorder.starts[:4], StartRecorder.starts[4:]):
        assert all(torch.equal(start, fit[0]) for start in fit)  # the last test's changes never carry over


def test_the_table_has_a_row_per_arm_and_a_column_per_held_out_domain(tmp_path):
    protocol = DomainsProtocol("c", {"domains": ["upright", "noisy"]})
    runs = {"erm": [{"upright": 0.5, "noisy": 0.7, "average": 0.6, "oracle/upright": 0.6, "oracle/noisy": 0.7,
                     "oracle/average": 0.65},
                    {"upright": 0.7, "noisy": 0.7, "average": 0.7, "oracle/upright": 0.7, "oracle/noisy": 0.7,
                     "oracle/average": 0.7}]}
    lines = protocol.figures(runs, tmp_path, "c")
    assert "| arm | upright | noisy | average |" in lines
    assert "| erm | 0.6000 ± 0.1414 | 0.7000 ± 0.0000 | 0.6500 ± 0.0707 |" in lines
    assert "| erm | 0.6500 ± 0.0707 | 0.7000 ± 0.0000 | 0.6750 ± 0.0354 |" in lines


@pytest.mark.parametrize(
    "settings, arm, message",
    [
        ({"batch_size": 50}, {}, "not a multiple of the 4"),
        ({"held_out": ["sideways"]}, {}, "held_out must name"),
        ({"held_out": ["noisy", "noisy"]}, {}, "repeats a domain"),
        ({"lr_grid": []}, {}, "lr_grid must be a non-empty list"),
        ({"data": {"colour": 1}}, {}, "unexpected keyword"),
        ({}, {"epochs": 3}, "unknown field"),
        ({}, {"technique": [{"init_args": {}}]}, "a technique is"),
        ({}, {"lr_grid": [-1.0]}, "lr_grid must be"),
    ],
)
def test_bad_claims_fail_before_any_run(settings, arm, message):
    with pytest.raises(ClaimError, match=message):
        DomainsProtocol("c", settings).check_arm("a", arm)


def test_the_sections_results_page_is_the_leave_one_domain_out_table_of_every_method():
    from reglab import registry
    from reglab.docs import render_results_table

    cards = registry.load((Path(__file__).resolve().parents[1] / "callbacks").resolve())
    domains = {"upright": [0.9, 0.7], "rotated": [0.5, 0.7], "coloured": [0.3, 0.3], "noisy": [0.8, 0.8],
               "inverted": [0.2, 0.4], "average": [0.54, 0.58], "oracle/average": [0.6, 0.6]}
    results = {"domainbed": {"techniques": ["erm"], "seeds": 2, "arms": {"erm": {"label": "ERM", "values": domains}}},
               "dr_tune": {"techniques": ["dr_tune"], "seeds": 2,
                           "arms": {"dr_tune": {"label": "DR-Tune", "values": {"target": [0.9, 0.9]}}}}}
    settings = {"domains": ["upright", "rotated", "coloured", "noisy", "inverted"], "held_out": None}
    claims = {"domainbed": ("domains", settings, {"erm": {}}), "dr_tune": ("finetune", {}, {"dr_tune": {}})}
    page = render_results_table("domain_generalization", cards, claims, results)
    assert "| Arm | Claim | Seeds | upright | rotated | coloured | noisy | inverted | average | oracle/average |" in page
    assert ("| ERM (`erm`) | [domainbed](domainbed.md) | 2 | 0.800 ± 0.141 | 0.600 ± 0.141 | 0.300 ± 0.000 | "
            "0.800 ± 0.000 | 0.300 ± 0.141 | 0.560 ± 0.028 | 0.600 ± 0.000 |") in page
    assert "dr_tune" not in page  # the fine-tuning claim measures none of the domains: not in this table
