"""docs/techniques.md is what `reglab docs` renders from the cards and the results JSON."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from reglab import registry
from reglab.docs import SECTIONS, render, render_repository, render_results_table

REPO = Path(__file__).resolve().parents[1]
CARDS = registry.load((REPO / "callbacks").resolve())


def test_committed_pages_are_what_the_cards_and_results_render():
    for path, page in render_repository(REPO).items():
        assert path.is_file() and path.read_text(encoding="utf-8") == page, f"{path} is stale: run `reglab docs` and commit it"


def test_every_paper_appears_exactly_once_and_every_card_has_a_row():
    page = render_repository(REPO)[REPO / "docs/techniques.md"]
    numbers = [int(n) for n in re.findall(r"^\| (\d\d) \|", page, re.M)]
    assert sorted(numbers) == list(range(1, 70))
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| Paper #")]
    for card in CARDS.values():
        assert any(f" | {card.title} | " in row for row in rows), f"{card.id} has no row"


def _result(claim: str, verdict: str, **extra) -> dict:
    checks = [{"metric": "test/acc", "kind": "superiority", "direction": "higher", "arm": "technique",
               "against": "baseline", "margin": 0.0, "bound": None, "difference": 0.2213, "stderr": 0.0271,
               "shown": verdict == "claim shown", "outcome": verdict}]
    return {"claim": claim, "techniques": ["x"], "statement": "s", "protocol": "fit", "seeds": 3, "arms": {},
            "checks": checks, "verdict": verdict, "command": f"reglab bench effects --only {claim}", **extra}


def _row(page: str, title: str) -> str:
    return next(line for line in page.splitlines() if f" | {title} | " in line)


def test_result_comes_from_the_first_claims_json(tmp_path):
    (tmp_path / "elr.json").write_text(json.dumps(_result("elr", "claim shown")))
    (tmp_path / "ps_kd_noisy.json").write_text(json.dumps(_result("ps_kd_noisy", "claim not reproduced")))
    # a planned card (none may be left on the board): DictAS's as it was before it was built
    cards = {**CARDS, "dictas": dataclasses.replace(CARDS["dictas"], status="planned", claims=())}
    page = render(cards, tmp_path)
    elr = _row(page, CARDS["elr"].title)
    assert "| claim shown | " in elr
    assert "claim shown: Δ test/acc +0.221 ± 0.027; 3 seeds ([results](results/elr.md))" in elr
    # PS-KD's first claim (ps_kd) has no JSON: implemented, even though a later claim has one
    assert "| implemented | " in _row(page, CARDS["ps_kd"].title)
    # a claim id with no JSON and a planned card
    assert _row(page, CARDS["ovor"].title).endswith("| implemented | higher final average accuracy than without | — |")
    assert "| planned | " in _row(page, CARDS["dictas"].title)


def test_other_claims_are_listed_after_the_first(tmp_path):
    for claim, verdict in [("ps_kd", "claim not reproduced"), ("ps_kd_noisy_sgd", "claim shown")]:
        (tmp_path / f"{claim}.json").write_text(json.dumps(_result(claim, verdict)))
    row = _row(render(CARDS, tmp_path), CARDS["ps_kd"].title)
    assert "| claim not reproduced | " in row
    assert row.endswith("; also [ps_kd_noisy_sgd](results/ps_kd_noisy_sgd.md) claim shown |")


def test_a_baseline_without_its_own_claim_shows_its_values_as_an_arm(tmp_path):
    elr = _result("elr", "claim shown")
    elr["checks"][0].update(arm="elr", against="ce")
    elr["arms"] = {"ce": {"label": "CE", "values": {"test/acc": [0.7, 0.8, 0.9]}},
                   "elr": {"label": "ELR", "values": {"test/acc": [0.9, 0.9, 1.0]}}}
    (tmp_path / "elr.json").write_text(json.dumps(elr))
    page = render(CARDS, tmp_path)
    ce = _row(page, CARDS["ce"].title)
    assert ce.endswith("| measured | reference for " + ce.split("| reference for ")[1].split(" |")[0]
                       + " | as an arm (3 seeds): [elr](results/elr.md) test/acc 0.800 ± 0.100 |")
    # a built baseline that is nobody's arm stays implemented; a paper row never lists arm values
    assert "| implemented | " in _row(page, CARDS["gce"].title)
    assert "as an arm" not in _row(page, CARDS["elr"].title)


def test_a_card_in_an_unknown_section_is_refused(tmp_path):
    card = CARDS["elr"]
    stray = {**CARDS, "elr": type(card)(**{**card.__dict__, "sections": ("no_such_section",)})}
    with pytest.raises(ValueError, match="no_such_section.*Fix"):
        render(stray, tmp_path)


def test_every_card_is_in_a_board_section():
    known = {section for section, *_ in SECTIONS}
    assert {s for c in CARDS.values() for s in c.sections} <= known


def test_reglab_docs_check_fails_on_a_stale_page(tmp_path, capsys):
    from reglab.cli import main

    (tmp_path / "callbacks").symlink_to(REPO / "callbacks")
    (tmp_path / "docs").mkdir()
    main(["docs", "--root", str(tmp_path)])  # writes the page
    main(["docs", "--root", str(tmp_path), "--check"])
    page = tmp_path / "docs/techniques.md"
    page.write_text(page.read_text() + "hand edit\n")
    with pytest.raises(SystemExit):
        main(["docs", "--root", str(tmp_path), "--check"])
    assert "run `reglab docs`" in capsys.readouterr().err


def test_reglab_docs_outside_a_checkout_says_where_to_run_it(tmp_path):
    from reglab.docs import main

    with pytest.raises(SystemExit, match="no callbacks/ folder.*Fix: run it in the root of a reglab checkout"):
        main(["--root", str(tmp_path)])


def test_differences_are_given_to_the_standard_error_s_precision():
    from reglab.docs import difference_with_error

    assert difference_with_error(0.2213, 0.0271) == "+0.221 ± 0.027"
    assert difference_with_error(-0.00151, 0.00072) == "-0.00151 ± 0.00072"
    assert difference_with_error(0.0, 0.0) == "+0.000 ± 0.000"


def test_results_table_groups_arms_by_scenario_and_shows_a_shared_arm_once():
    def arms(**labels):
        return {arm: {"label": label, "values": {"target": [0.5, 0.7], "trainable": [1200.0, 1200.0]}}
                for arm, label in labels.items()}

    results = {
        "loldu": {**_result("loldu", "claim shown"), "techniques": ["loldu"], "arms": arms(lora="LoRA", loldu="LoLDU")},
        "svfit": {**_result("svfit", "claim shown"), "techniques": ["svfit"], "arms": arms(lora="LoRA", svfit="SVFit")},
        "svfit_text": {**_result("svfit_text", "claim shown"), "techniques": ["svfit"], "arms": arms(lora="LoRA")},
        "elr": {**_result("elr", "claim shown"), "techniques": ["elr"], "arms": arms(ce="CE")},
    }
    digits, lora = {"scenario": "digits", "backbone": "cnn", "backbone_kwargs": {}}, {"lr": 0.01}
    claims = {"loldu": ("finetune", digits, {"lora": lora}), "svfit": ("finetune", digits, {"lora": lora}),
              "svfit_text": ("finetune", {"scenario": "text", "backbone": "hf:m", "backbone_kwargs": {"num_hidden_layers": 2}},
                             {"lora": lora}),
              "elr": ("fit", {}, {})}
    page = render_results_table("peft", CARDS, claims, results)
    digits, text = page.split("## ")[1:]
    assert digits.startswith('`finetune` scenario "digits", backbone "cnn", backbone_kwargs {}')
    assert text.startswith('`finetune` scenario "text", backbone "hf:m", backbone_kwargs {"num_hidden_layers": 2}')
    # LoRA runs alike in the two digits claims: one row, from the first claim
    assert digits.count("(`lora`)") == 1 and "| LoRA (`lora`) | [loldu](loldu.md) | 3 | 0.600 ± 0.141 |" in digits
    claims["svfit"][2]["lora"] = {"lr": 0.1}  # at another rate it is another run
    assert render_results_table("peft", CARDS, claims, results).split("## ")[1].count("(`lora`)") == 2
    assert "(`svfit`) | [svfit](svfit.md)" in digits and "(`lora`) | [svfit_text](svfit_text.md)" in text
    assert "1,200 ± 0" in digits and "CE" not in page  # counts without decimals; another family's claim is left out
