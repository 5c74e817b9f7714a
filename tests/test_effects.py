"""The claims harness's verdict rules, claim files, protocol registry and results writers (no
training: fake per-seed results). The claims themselves run in tests/test_claims.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from reglab.bench.effects import Check, Claim, Provenance, load_claims, mean_std, run_claims, verdict, write_results
from reglab.bench.protocols import ClaimError, Protocol, get_protocol, register_protocol

REPO = Path(__file__).resolve().parents[1]


def sup(direction: str = "higher", **kwargs) -> Check:
    return Check("test/acc", direction, arm="technique", against="baseline", **kwargs)


# -- superiority ------------------------------------------------------------------------------------
def test_superiority_rule_against_a_hand_computation():
    # diffs 0.02, 0.04, 0.06: mean 0.04, std 0.02, s.e. 0.02/sqrt(3) = 0.011547; 0.04 - 0.023094 > 0.
    judged = verdict(sup(), [0.72, 0.74, 0.76], [0.70, 0.70, 0.70])
    assert judged.shown and judged.outcome == "claim shown"
    assert judged.difference == pytest.approx(0.04)
    assert judged.stderr == pytest.approx(0.02 / math.sqrt(3))
    # diffs 0.00, 0.04, 0.08: mean 0.04, s.e. 0.04/sqrt(3) = 0.023094; 0.04 - 0.046188 < 0.
    failing = verdict(sup(), [0.70, 0.74, 0.78], [0.7] * 3)
    assert not failing.shown and failing.outcome == "claim not reproduced"


def test_lower_flips_the_sign():
    baseline, technique = [0.10, 0.10, 0.10], [0.07, 0.08, 0.09]  # ECE falls by 0.02 ± 0.0058
    assert verdict(sup("lower"), technique, baseline).shown
    assert not verdict(sup("higher"), technique, baseline).shown
    assert verdict(sup("lower"), technique, baseline).difference == pytest.approx(-0.02)


def test_a_deterministic_difference_has_zero_stderr_and_is_judged_by_its_sign():
    # parameter counts: identical per seed, so se = 0 and only the sign decides
    fewer = Check("trainable", "lower", arm="svfit", against="lora")
    assert verdict(fewer, [787.0] * 3, [4782.0] * 3).shown
    assert not verdict(fewer, [4782.0] * 3, [787.0] * 3).shown


# -- non-inferiority --------------------------------------------------------------------------------
def test_non_inferiority_rule_uses_the_margin():
    # diffs -0.01, 0.00, +0.01: mean 0, s.e. 0.01/sqrt(3) = 0.005774, so mean - 2 s.e. = -0.011547.
    baseline, technique = [0.70, 0.70, 0.70], [0.69, 0.70, 0.71]
    assert verdict(sup("at_least", margin=0.012), technique, baseline).shown
    assert not verdict(sup("at_least", margin=0.011), technique, baseline).shown
    assert not verdict(sup("higher"), technique, baseline).shown
    # at_most mirrors at_least for lower-is-better metrics.
    assert verdict(sup("at_most", margin=0.012), technique, baseline).shown
    assert not verdict(sup("at_most", margin=0.011), technique, baseline).shown


# -- bound ------------------------------------------------------------------------------------------
def test_bound_rule_against_a_hand_computation():
    # forgotten-class accuracy 0.10, 0.12, 0.14: mean 0.12, s.e. 0.02/sqrt(3) = 0.011547
    at_most = Check("forget", "at_most", arm="gs_lora", bound=0.15)
    judged = verdict(at_most, [0.10, 0.12, 0.14])
    assert judged.difference == pytest.approx(0.03)  # bound − mean: positive is good
    assert judged.stderr == pytest.approx(0.02 / math.sqrt(3))
    assert judged.shown  # 0.12 + 0.0231 < 0.15
    assert not verdict(Check("forget", "at_most", arm="gs_lora", bound=0.14), [0.10, 0.12, 0.14]).shown
    # mean above the bound: fails, with a negative difference
    above = verdict(at_most, [0.20, 0.20, 0.20])
    assert not above.shown and above.difference == pytest.approx(-0.05)
    at_least = Check("acc", "at_least", arm="a", bound=0.9)
    assert verdict(at_least, [0.95, 0.96, 0.97]).shown
    assert not verdict(at_least, [0.89, 0.96, 0.97]).shown  # mean 0.94, 2 s.e. 0.05
    with pytest.raises(ValueError, match="one arm's values"):
        verdict(at_most, [0.1], [0.2])


def test_one_seed_never_shows_a_claim():
    for check, args in ((sup("at_least", margin=0.5), ([0.9], [0.5])),
                        (Check("forget", "at_most", arm="a", bound=0.5), ([0.0],))):
        judged = verdict(check, *args)
        assert math.isinf(judged.stderr) and not judged.shown


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"direction": "up", "against": "b"}, "direction must be one of"),
        ({"direction": "higher", "against": "b", "margin": 0.01}, "needs direction at_least/at_most"),
        ({"direction": "at_least", "against": "b", "margin": -0.01}, "must be >= 0"),
        ({"direction": "higher"}, "exactly one of `against`"),
        ({"direction": "at_most", "against": "b", "bound": 0.1}, "exactly one of `against`"),
        ({"direction": "lower", "bound": 0.1}, "bound check needs direction at_least or at_most"),
        ({"direction": "at_most", "bound": 0.1, "margin": 0.01}, "puts its tolerance in the bound"),
    ],
)
def test_bad_checks_fail_early(kwargs, message):
    with pytest.raises(ClaimError, match=message):
        Check("test/acc", arm="a", **kwargs)


def test_unpaired_values_are_rejected():
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        verdict(sup(), [0.1, 0.2], [0.3])


# -- claim files ------------------------------------------------------------------------------------
BASE = {"name": "c", "claim": "text", "arms": {"baseline": {}, "technique": {"configs": []}}}


def test_a_check_must_name_arms_of_the_claim():
    with pytest.raises(ClaimError, match="names arm 'other'"):
        Claim.from_dict({**BASE, "checks": [{"metric": "m", "direction": "higher", "arm": "other", "against": "baseline"}]})
    with pytest.raises(ClaimError, match="non-empty `checks`"):
        Claim.from_dict({**BASE, "checks": []})
    with pytest.raises(ClaimError, match="unexpected keyword"):
        Claim.from_dict({**BASE, "checks": [], "metric": "test/acc"})


def test_smoke_merges_its_overrides_and_runs_one_seed():
    raw = {**BASE, "checks": [{"metric": "m", "direction": "higher", "arm": "technique", "against": "baseline"}],
           "settings": {"configs": ["a.yaml"], "overrides": []},
           "smoke": {"settings": {"overrides": ["--trainer.max_epochs=1"]}, "arms": {"technique": {"configs": ["b.yaml"]}}}}
    full, smoke = Claim.from_dict(raw), Claim.from_dict(raw, smoke=True)
    assert full.settings["overrides"] == [] and full.seeds == 3
    assert smoke.settings == {"configs": ["a.yaml"], "overrides": ["--trainer.max_epochs=1"]}
    assert smoke.arms["technique"] == {"configs": ["b.yaml"]} and smoke.seeds == 1


def test_every_claim_file_loads_names_its_file_and_has_a_smoke_section():
    claims = load_claims(REPO / "benchmarks/effects")
    assert {"elr", "l2_previous", "svfit", "gs_lora", "mvp", "soup", "teen"} <= {c.name for c in claims}
    for path in sorted((REPO / "benchmarks/effects").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["name"] == path.stem and raw.get("smoke"), path


def test_a_protocol_is_found_through_the_module_the_claim_names(tmp_path, monkeypatch):
    (tmp_path / "my_family_claims.py").write_text(
        "from reglab.bench.protocols import Protocol, register_protocol\n"
        "@register_protocol('my_family_protocol')\n"
        "class MyProtocol(Protocol):\n"
        "    defaults = {'steps': 1}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ClaimError, match="unknown protocol 'my_family_protocol'.*Fix: add `module:"):
        get_protocol("my_family_protocol")
    protocol = get_protocol("my_family_protocol", "my_family_claims")
    assert protocol.__name__ == "MyProtocol" and protocol.name == "my_family_protocol"
    with pytest.raises(ClaimError, match="has no setting.*'stepz'"):
        protocol("c", {"stepz": 2})


def test_core_bench_imports_no_family():
    import subprocess
    import sys

    code = ("import sys, reglab.bench.effects, reglab.bench.protocols, reglab.bench.fit; "
            "print(sorted(m for m in sys.modules if m.startswith(('reglab.callbacks', 'reglab.continual', "
            "'reglab.peft', 'reglab.soup'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"the core bench imports family modules: {loaded}"


# -- results writers --------------------------------------------------------------------------------
@register_protocol("test_fake")
class FakeProtocol(Protocol):
    defaults = {"steps": 1}


def test_results_json_and_page_hold_every_arm_seed_and_check(tmp_path):
    claim = Claim.from_dict({
        "name": "c", "claim": "technique beats baseline; forgets at most 0.15", "techniques": ["technique"],
        "protocol": "test_fake", "arms": {"baseline": {"label": "CE"}, "technique": {"label": "T"}, "extra": {}},
        "checks": [{"metric": "acc", "direction": "higher", "arm": "technique", "against": "baseline"},
                   {"metric": "acc", "direction": "at_least", "margin": 0.01, "arm": "extra", "against": "baseline"},
                   {"metric": "forget", "direction": "at_most", "bound": 0.15, "arm": "technique"}],
    })
    runs = {"baseline": [{"acc": 0.70, "forget": 0.9}] * 3,
            "technique": [{"acc": a, "forget": 0.1, "curve:x": [0.1, 0.2]} for a in (0.72, 0.74, 0.76)],
            "extra": [{"acc": a, "forget": 0.5} for a in (0.60, 0.70, 0.80)]}
    provenance = Provenance("reglab bench effects --only c --seeds 3", "abc123-dirty", "Linux, 2 CPUs, no GPU", "2026-12-01")
    record = write_results(claim, claim.make_protocol(), runs, tmp_path, provenance, wall_s=12.34)
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert on_disk == record
    assert record["claim"] == "c" and record["techniques"] == ["technique"] and record["protocol"] == "test_fake"
    assert record["seeds"] == 3 and record["commit"] == "abc123-dirty" and record["wall_s"] == 12.3
    assert record["arms"]["technique"] == {"label": "T", "values": {"acc": [0.72, 0.74, 0.76], "forget": [0.1] * 3}}
    kinds = [(c["kind"], c["outcome"]) for c in record["checks"]]
    assert kinds == [("superiority", "claim shown"), ("non_inferiority", "claim not reproduced"), ("bound", "claim shown")]
    assert record["checks"][2]["difference"] == pytest.approx(0.05) and record["checks"][2]["stderr"] == 0.0
    assert record["verdict"] == "claim not reproduced"  # one check fails
    page = (tmp_path / "c.md").read_text()
    assert "**Verdict: claim not reproduced**" in page and provenance.command in page
    assert page.count("**claim shown**") == 2 and page.count("**claim not reproduced**") == 1
    assert "| T | 0.72 | 0.74 | 0.76 |" in page  # per-seed values


@register_protocol("test_seed_echo")
class SeedEchoProtocol(Protocol):
    """Measures the seed it ran with."""

    def run_arm(self, arm, spec, seed, workdir):
        return {"seed": float(seed)}


def test_a_claim_with_a_first_seed_runs_and_reports_the_seeds_from_it(tmp_path):
    claim = Claim.from_dict({"name": "c", "claim": "t", "protocol": "test_seed_echo", "seeds": 2, "first_seed": 1,
                             "arms": {"a": {}, "b": {}},
                             "checks": [{"metric": "seed", "direction": "higher", "arm": "a", "against": "b"}]})
    run_claims([claim], None, tmp_path)
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["first_seed"] == 1 and record["seeds"] == 2
    assert record["arms"]["a"]["values"]["seed"] == [1.0, 2.0]
    page = (tmp_path / "c.md").read_text()
    assert "(2 seeds, 1 to 2;" in page and "| arm | seed 1 | seed 2 |" in page
    with pytest.raises(ClaimError, match="first_seed -1. Fix: give a seed >= 0"):
        Claim.from_dict({"name": "c", "claim": "t", "arms": {"a": {}}, "first_seed": -1,
                         "checks": [{"metric": "m", "direction": "at_most", "bound": 0.1, "arm": "a"}]})


def test_a_check_on_an_unmeasured_metric_fails_loudly(tmp_path):
    claim = Claim.from_dict({"name": "c", "claim": "t", "protocol": "test_fake", "arms": {"a": {}, "b": {}},
                             "checks": [{"metric": "missing", "direction": "higher", "arm": "a", "against": "b"}]})
    runs = {"a": [{"acc": 1.0}], "b": [{"acc": 0.0}]}
    provenance = Provenance("cmd", "sha", "machine", "date")
    with pytest.raises(RuntimeError, match="measured no 'missing'"):
        write_results(claim, claim.make_protocol(), runs, tmp_path, provenance, 1.0)


def test_cli_stops_on_a_bad_claim_file_before_any_run(tmp_path):
    from reglab.bench.cli import main

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({
        "name": "bad", "claim": "t", "protocol": "nowhere", "arms": {"a": {}},
        "checks": [{"metric": "m", "direction": "at_most", "bound": 0.1, "arm": "a"}]}))
    with pytest.raises(SystemExit, match="unknown protocol 'nowhere'"):
        main(["effects", "--claims-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"unknown claim\(s\) \['nope'\]"):
        main(["effects", "--only", "nope", "--claims-dir", str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_overhead_bench_times_a_technique_on_its_harness_cases_data_against_a_reference_there(tmp_path):
    """CORAL needs batches with `domain`: on the harness model it runs on the domain data, divided by the
    plain module on that data; the realistic model has no such data, so there it is reported, not run."""
    from reglab.cli import main

    out = tmp_path / "overhead.md"
    main(["bench", "overhead", "--only", "coral", "--repeats", "1", "--steps", "1", "--warmup", "1", "--calls", "1",
          "--realistic_repeats", "1", "--realistic_steps", "1", "--out", str(out)])
    page = out.read_text()
    realistic, harness = page.split("## Every technique on the harness model")
    assert "| coral | failed: needs its harness case's data (domains)" in realistic
    assert "| (no technique, data domains) |" in harness and "| coral | " in harness
    assert "failed" not in harness


def test_overhead_bench_writes_the_contract_realistic_and_harness_tables(tmp_path):
    """`reglab bench overhead` end to end on a tiny budget: every table it promises is there."""
    from reglab.cli import main

    out = tmp_path / "overhead.md"
    main(["bench", "overhead", "--only", "elr", "--repeats", "1", "--steps", "1", "--warmup", "1", "--calls", "1",
          "--realistic_repeats", "1", "--realistic_steps", "1", "--out", str(out)])
    page = out.read_text()
    for heading in ("## The step contract's own cost", "## Every technique on the realistic model",
                    "## Every technique on the harness model", "## EMA: update and swap cost per call"):
        assert heading in page
    assert "failed" not in page
    assert page.count("| elr |") == 2



def test_mean_std_says_a_metric_is_undefined_instead_of_failing():
    # NCD's pool has no known-class sample: its old-class accuracy is nan on every seed
    assert mean_std([float("nan")] * 3) == "nan (3 of 3 seeds)"
    assert mean_std([0.5, float("nan")]) == "nan (1 of 2 seeds)"
    assert mean_std([0.5, 0.7]) == "0.6000 ± 0.1414"
