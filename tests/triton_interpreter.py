"""Triton kernel checks on CPU, under triton's interpreter, for the kernel tests.

The interpreter only takes effect if ``TRITON_INTERPRET=1`` is set before a kernel module is first
imported. Rather than depend on nothing else in the pytest session importing triton first, a test
file runs itself as a script in a subprocess with the variable set (:func:`verdicts`); the script
runs every check and prints one JSON verdict per check (:func:`main`), and the parametrised test
asserts its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

RUN_FLAG = "--run-interpreter-checks"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_checks(checks: dict[str, Callable[[str], None]]) -> dict[str, str | None]:
    """Run every check on CPU; map its name to a failure message or None."""
    verdicts: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check("cpu")
        except Exception as error:  # noqa: BLE001 - every failure becomes that check's verdict
            verdicts[name] = f"{type(error).__name__}: {error}"
        else:
            verdicts[name] = None
    return verdicts


def verdicts(test_file: str) -> dict[str, str | None]:
    """Run ``test_file`` as a script under the interpreter; its checks' verdicts (skips without triton)."""
    if not TRITON_INSTALLED:
        pytest.skip("triton is not installed")
    completed = subprocess.run([sys.executable, test_file, RUN_FLAG], cwd=REPO_ROOT,
                               env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"interpreter subprocess failed:\n{completed.stderr[-4000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(checks: dict[str, Callable[[str], None]]) -> None:
    """The script side: print the verdicts as JSON when asked with :data:`RUN_FLAG`."""
    if sys.argv[1:] == [RUN_FLAG]:
        print(json.dumps(run_checks(checks)))
