"""The layer contract: the core imports no family, families don't import each other, no cycles,
nothing installed imports the tests.

reglab's packages live in three folders (lightning_app/, callbacks/, datamodules/) that are one
package only once installed, and import-linter (grimp) reads a package from one folder. So the
checks run on a folder of symbolic links laid out as the wheel is, ``<tmp>/reglab/...``, in a
subprocess that finds that ``reglab`` first. The declared contracts are in pyproject.toml
(``[tool.importlinter]``); what they cannot say is checked here on grimp's import graph.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"callbacks": REPO / "callbacks", "datamodules": REPO / "datamodules"}
# family code that lives in the core folder, by the family it belongs to
FAMILY_APP_MODULES = {
    "reglab.analysis": "reglab.callbacks.analysis",
    "reglab.condensation": "reglab.callbacks.condensation",
    "reglab.continual": "reglab.callbacks.continual",
    "reglab.dense_retrieval_claims": "reglab.callbacks.fine_tuning",
    "reglab.discovery": "reglab.callbacks.category_discovery",
    "reglab.domain_claims": "reglab.callbacks.domain_generalization",
    "reglab.generative": "reglab.callbacks.generative",
    "reglab.language_model_claims": "reglab.callbacks.fine_tuning",
    "reglab.peft_claims": "reglab.callbacks.peft",
    "reglab.peft_surgery": "reglab.callbacks.peft",
    "reglab.retrieval_claims": "reglab.callbacks.metric_learning",
    "reglab.soup_claims": "reglab.callbacks.fine_tuning",
    "reglab.soups": "reglab.callbacks.fine_tuning",
    "reglab.ssl_claims": "reglab.callbacks.self_supervised",
    "reglab.vision_language_claims": "reglab.callbacks.vision_language",
}
GRAPH_SCRIPT = """
import json, sys, grimp
graph = grimp.build_graph("reglab", exclude_type_checking_imports=True)
print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))
"""


@pytest.fixture(scope="module")
def wheel_layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    package = root / "reglab"
    package.mkdir()
    for entry in (REPO / "lightning_app").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in FOLDERS.items():
        (package / name).symlink_to(folder)
    return root


def run_with(layout: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imports(wheel_layout) -> dict[str, list[str]]:
    result = run_with(wheel_layout, sys.executable, "-c", GRAPH_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def family_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "callbacks":
        return ".".join(parts[:3])
    for app_module, family in FAMILY_APP_MODULES.items():
        if module == app_module or module.startswith(app_module + "."):
            return family
    return None


def test_import_linter_contracts_hold(wheel_layout):
    lint = Path(sys.executable).with_name("lint-imports")
    result = run_with(wheel_layout, str(lint), str(REPO / "pyproject.toml"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_family_folder_is_in_the_independence_contract():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (independence,) = [c for c in contracts if c["type"] == "independence"]
    families = {f"reglab.callbacks.{p.name}" for p in FOLDERS["callbacks"].iterdir() if (p / "__init__.py").is_file()}
    assert families == set(independence["modules"])


def test_family_app_modules_import_only_their_own_family_and_the_core(imports):
    crossings = [
        (module, target)
        for module, targets in imports.items()
        for target in targets
        if family_of(module) and family_of(target) and family_of(module) != family_of(target)
    ]
    assert not crossings, crossings


def test_no_import_cycles(imports):
    """Tarjan's strongly connected components over module imports (function-level ones too)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for target in imports.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(imports):
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_nothing_installed_reaches_into_the_tests():
    offenders = []
    for folder in [REPO / "lightning_app", *FOLDERS.values()]:
        for path in folder.rglob("*.py"):
            text = path.read_text()
            if re.search(r"sys\.path\.(insert|append)|^\s*(import|from) (harness|tests|conftest)\b", text, re.M):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
