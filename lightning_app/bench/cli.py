"""``reglab bench``: effect benchmarks (and, later, overhead benchmarks)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from lightning_app.bench.effects import load_claims, run_claims


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="reglab bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    effects = commands.add_parser("effects", help="run registered claims over seeds")
    effects.add_argument("--only", nargs="+", help="claim names (default: all)")
    effects.add_argument("--seeds", type=int, help="seeds per arm (default: the claim's)")
    effects.add_argument("--claims-dir", type=Path, default=Path("benchmarks/effects"))
    effects.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    command = "reglab bench " + " ".join(shlex.quote(a) for a in argv)
    run_claims(load_claims(args.claims_dir, args.only), args.seeds, args.out, command)
