"""docs/techniques.md and configs/technique/ stay in step with what callbacks exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import reglab.callbacks

REPO = Path(__file__).resolve().parents[1]
ROWS = [line for line in (REPO / "docs/techniques.md").read_text().splitlines() if line.startswith("| ")]
STATUSES = {"planned", "implemented", "claim shown", "claim not reproduced"}


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


def test_one_row_per_paper_with_a_valid_status():
    papers = [cells(r) for r in ROWS if re.match(r"^\| *\d+ *\|", r)]
    assert sorted(int(c[0]) for c in papers) == list(range(1, 70))
    assert all(c[4] in STATUSES for c in papers), [c[:5] for c in papers if c[4] not in STATUSES]


def test_every_exported_technique_has_a_built_row_and_config():
    for name in reglab.callbacks.__all__:
        rows = [c for c in map(cells, ROWS) if re.search(rf"`reglab\.callbacks\.[\w.]*\b{name}`", c[2])]
        assert rows, f"{name} has no row in docs/techniques.md"
        for row in rows:
            assert row[4] != "planned", f"{name} is built but its row says planned"
            config = REPO / row[3].strip("`")
            assert config.is_file(), f"{name}: config {row[3]} does not exist"
            class_paths = [t["class_path"] for t in yaml.safe_load(config.read_text())["techniques"].values()]
            assert any(path.endswith(f".{name}") for path in class_paths)


def test_measured_rows_link_their_results_and_command():
    for row in ROWS:
        if "| claim shown |" in row or "| claim not reproduced |" in row:
            link = re.search(r"\(results/([\w.-]+\.md)\)", row)
            assert link and (REPO / "docs/results" / link.group(1)).is_file(), row[:80]
            assert re.search(r"`(reglab bench|python benchmarks/)[^`]*`", row), "a measured row must name its command"


def test_technique_configs_name_exported_techniques():
    for path in sorted((REPO / "configs/technique").glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text())["techniques"].values():
            assert entry["class_path"].split(".")[-1] in reglab.callbacks.__all__, path.name
