"""Every claim file runs end to end on its tiny ``smoke:`` budget (one seed, a few steps), so no
claim rots: its protocol is found, every arm runs, every check's metric is measured, the results
page and JSON are written (into tmp_path, never docs/results)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from reglab.bench.effects import ArmRunner, load_claims, run_claims

REPO = Path(__file__).resolve().parents[1]
CLAIMS = sorted(path.stem for path in (REPO / "benchmarks/effects").glob("*.yaml"))


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """One arm runner for every smoke run, so arms shared between claims (the fine-tuning
    baseline, LoRA) run once, as in one `reglab bench effects` command. One torch thread: on
    busy cores the intra-op threads of these tiny models spin-wait on each other (the smoke set
    takes several times longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ArmRunner(tmp_path_factory.mktemp("arms"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", CLAIMS)
def test_claim_smoke_run(name, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # claim files name configs relative to the repository root
    (claim,) = load_claims(REPO / "benchmarks/effects", [name], smoke=True)
    verdicts = run_claims([claim], None, tmp_path, smoke=True, runner=runner)
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert verdicts == {name: record["verdict"]}
    assert record["seeds"] == 1 and record["command"] == f"reglab bench effects --only {name} --smoke"
    assert set(record["arms"]) == set(claim.arms)
    for check in record["checks"]:
        for arm in (check["arm"], check["against"]):
            if arm is not None:
                assert len(record["arms"][arm]["values"][check["metric"]]) == 1
        assert not check["shown"]  # one seed has an infinite standard error: nothing is ever shown
    assert record["verdict"] == "claim not reproduced"
    page = (tmp_path / f"{name}.md").read_text()
    assert f"# Claim: {name}" in page
    # every figure the page shows was written beside it
    assert all((tmp_path / link).is_file() for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page))
