"""``reglab bench``: effect benchmarks and the overhead benchmark."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from reglab.bench.effects import load_claims, run_claims
from reglab.bench.protocols import ClaimError
from reglab.bench.overhead import run_overhead


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="reglab bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    effects = commands.add_parser("effects", help="run registered claims over seeds")
    effects.add_argument("--only", nargs="+", help="claim names (default: all)")
    effects.add_argument("--seeds", type=int, help="seeds per arm (default: the claim's)")
    effects.add_argument("--smoke", action="store_true", help="one seed, each claim's `smoke:` overrides (CI)")
    effects.add_argument("--claims-dir", type=Path, default=Path("benchmarks/effects"))
    effects.add_argument("--out", type=Path, default=Path("docs/results"))
    overhead = commands.add_parser("overhead", help="step time and memory of every technique; EMA implementations compared")
    overhead.add_argument("--only", nargs="+", help="technique ids (default: every built technique of the registry)")
    overhead.add_argument("--repeats", type=int, default=5, help="interleaved fits per technique")
    overhead.add_argument("--steps", type=int, default=30, help="timed training steps per fit")
    overhead.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each fit")
    overhead.add_argument("--calls", type=int, default=20, help="timed calls per EMA operation")
    overhead.add_argument("--realistic_repeats", type=int, default=3,
                          help="interleaved fits per technique on the realistic model (0: skip that table)")
    overhead.add_argument("--realistic_steps", type=int, default=10, help="timed steps per fit on the realistic model")
    overhead.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    overhead.add_argument("--out", type=Path, default=Path("docs/results/overhead.md"))
    startup = commands.add_parser("startup", help="`reglab --help` against `import lightning.pytorch`: reglab's share")
    startup.add_argument("--repeats", type=int, default=7, help="alternated fresh processes per command")
    startup.add_argument("--out", type=Path, default=Path("docs/results/startup.md"))
    args = parser.parse_args(argv)
    command = "reglab bench " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "startup":
        from reglab.bench.startup import run_startup

        run_startup(args.repeats, args.out, command)
        return
    if args.command == "overhead":
        run_overhead(args.only, args.repeats, args.steps, args.warmup, args.calls, args.accelerator, args.out, command,
                     args.realistic_repeats, args.realistic_steps)
        return
    try:
        run_claims(load_claims(args.claims_dir, args.only, args.smoke), args.seeds, args.out, args.smoke)
    except ClaimError as error:
        raise SystemExit(f"reglab bench effects: {error}")
