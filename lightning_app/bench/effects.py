"""Effect benchmarks: does a technique do what its paper claims, on embedded data, over seeds?

A claim is a YAML file ``benchmarks/effects/<name>.yaml``::

    name: elr
    claim: "digits with 40% symmetric label noise: ELR's clean-test accuracy above CE's"
    techniques: [elr]                 # the card ids this claim judges
    protocol: fit                     # how an arm runs (default fit; see reglab.bench.protocols)
    module: null                      # the module that registers the protocol, unless built in
    seeds: 3
    first_seed: 0                     # seeds first_seed .. first_seed + seeds - 1 (1: seed 0 chose a recipe)
    settings: {configs: [configs/experiment/noisy_digits.yaml]}   # the protocol's shared settings
    arms:                             # one or more; each spec is the protocol's
      ce: {label: CE}
      elr: {label: ELR, configs: [configs/technique/elr.yaml]}
    checks:
      - {metric: test/acc, direction: higher, arm: elr, against: ce}
    smoke: {settings: {overrides: [--trainer.max_epochs=1]}}   # merged in by --smoke (CI)
    notes: "why the margins are what they are, caveats"

Every check goes through :func:`verdict`, one of three kinds:

* superiority (``higher``/``lower``, ``against`` an arm): on the paired differences
  d_s = arm_s − against_s (same seed s), with mean d̄ and standard error se = std(d)/√n, signed so
  that better is positive: shown when sign·d̄ − 2·se > 0;
* non-inferiority (``at_least``/``at_most`` with ``against`` and a ``margin`` m ≥ 0 fixed in the
  file before the runs): shown when sign·d̄ − 2·se > −m;
* bound (``at_least``/``at_most`` with a fixed ``bound`` b and no ``against``): on one arm's
  values, shown when sign·(mean − b) − 2·se > 0 (e.g. forgotten-class accuracy at most
  chance + 0.05).

A claim is shown when every check is. Each run writes ``<out>/<name>.md`` (the human page) and
``<out>/<name>.json`` (machine-readable, the format in docs/architecture.md "Benchmarks").
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from reglab.bench.protocols import ClaimError, Protocol, get_protocol

# direction -> sign that makes "better" positive
DIRECTIONS = {"higher": 1.0, "lower": -1.0, "at_least": 1.0, "at_most": -1.0}
NON_INFERIORITY = ("at_least", "at_most")
SHOWN, NOT_REPRODUCED = "claim shown", "claim not reproduced"


@dataclass(frozen=True)
class Check:
    """One judged statement: ``arm``'s ``metric`` moves the ``direction`` way against another arm
    (superiority / non-inferiority with ``margin``) or against a fixed ``bound``."""

    metric: str
    direction: str
    arm: str
    against: str | None = None
    margin: float = 0.0
    bound: float | None = None

    def __post_init__(self) -> None:
        where = f"check on {self.metric!r}"
        if not isinstance(self.metric, str) or not self.metric:
            raise ClaimError(f"{where}: metric must be a measured metric name such as 'test/acc'")
        if self.direction not in DIRECTIONS:
            raise ClaimError(f"{where}: direction must be one of {sorted(DIRECTIONS)}, got {self.direction!r}")
        if (self.against is None) == (self.bound is None):
            raise ClaimError(f"{where}: give exactly one of `against` (an arm) or `bound` (a fixed number)")
        if self.bound is not None and self.direction not in NON_INFERIORITY:
            raise ClaimError(f"{where}: a bound check needs direction at_least or at_most, got {self.direction!r}")
        if self.margin < 0 or (self.margin and self.kind != "non_inferiority"):
            raise ClaimError(
                f"{where}: margin {self.margin} needs direction at_least/at_most against an arm and must be >= 0 "
                "(higher/lower are superiority checks without a margin; a bound check puts its tolerance in the bound)"
            )

    @property
    def kind(self) -> str:
        if self.bound is not None:
            return "bound"
        return "non_inferiority" if self.direction in NON_INFERIORITY else "superiority"

    @property
    def rule(self) -> str:
        better = "higher" if DIRECTIONS[self.direction] > 0 else "lower"
        if self.kind == "bound":
            side = "−" if better == "higher" else "+"
            return f"bound: the mean {side} two standard errors is {'above' if better == 'higher' else 'below'} {self.bound:g}"
        if self.kind == "non_inferiority":
            return (f"non-inferiority, {better} is better: the mean paired difference in the better direction, "
                    f"minus two standard errors, is above −{self.margin:g}")
        return f"superiority: the mean paired difference goes the claimed way, {better}, by more than two standard errors"

    def describe(self) -> str:
        target = self.against if self.against is not None else f"{self.bound:g}"
        margin = f", margin {self.margin:g}" if self.kind == "non_inferiority" else ""
        return f"{self.metric}: {self.arm} {self.direction} {target}{margin}"


@dataclass(frozen=True)
class Verdict:
    shown: bool
    #: superiority / non-inferiority: mean paired difference arm − against (not signed by direction);
    #: bound: mean of the arm minus the bound, signed so that positive is good
    difference: float
    stderr: float

    @property
    def outcome(self) -> str:
        return SHOWN if self.shown else NOT_REPRODUCED


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (inf for one value: one seed never shows anything)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf


def verdict(check: Check, values: list[float], against: list[float] | None = None) -> Verdict:
    """Judge ``check`` on the arm's per-seed ``values`` and, unless it is a bound check, the
    ``against`` arm's, paired by position (same seed)."""
    sign = DIRECTIONS[check.direction]
    if check.kind == "bound":
        if against is not None:
            raise ValueError(f"{check.describe()}: a bound check takes one arm's values, not two")
        if not values:
            raise ValueError(f"{check.describe()}: no values")
        mean, stderr = mean_stderr(values)
        difference = sign * (mean - check.bound)
        return Verdict(shown=difference - 2 * stderr > 0, difference=difference, stderr=stderr)
    if against is None or len(values) != len(against) or not values:
        raise ValueError(f"{check.describe()}: need the same non-zero number of seeds per arm, "
                         f"got {len(values)} and {None if against is None else len(against)}")
    mean, stderr = mean_stderr([v - a for v, a in zip(values, against)])
    return Verdict(shown=sign * mean - 2 * stderr > -check.margin, difference=mean, stderr=stderr)


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: mappings merge key by key, ``null`` removes the key
    (e.g. a reference arm a smoke run can skip), anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Claim:
    name: str
    claim: str
    arms: dict[str, dict[str, Any]]
    checks: list[Check]
    protocol: str = "fit"
    module: str | None = None
    techniques: list[str] = field(default_factory=list)
    seeds: int = 3
    #: the first seed run: a claim whose recipe was looked at on seed 0 starts at 1, so each seed it
    #: reports is independent of that choice
    first_seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.arms, dict) or len(self.arms) < 1:
            raise ClaimError(f"claim {self.name}: `arms` must map arm names to their specs")
        self.arms = {arm: dict(spec or {}) for arm, spec in self.arms.items()}
        try:
            self.checks = [c if isinstance(c, Check) else Check(**c) for c in self.checks]
        except TypeError as error:
            raise ClaimError(f"claim {self.name}: bad check ({error}); fields: metric, direction, arm, against, margin, bound")
        if not self.checks:
            raise ClaimError(f"claim {self.name}: give a non-empty `checks` list")
        if not isinstance(self.first_seed, int) or self.first_seed < 0:
            raise ClaimError(f"claim {self.name}: first_seed {self.first_seed!r}. Fix: give a seed >= 0.")
        for check in self.checks:
            for arm in (check.arm, check.against):
                if arm is not None and arm not in self.arms:
                    raise ClaimError(f"claim {self.name}: {check.describe()} names arm {arm!r}; arms: {sorted(self.arms)}")

    @classmethod
    def from_dict(cls, raw: dict, smoke: bool = False) -> "Claim":
        """Read a claim file's mapping; ``smoke`` merges its ``smoke:`` section in (one seed)."""
        try:
            claim = cls(**raw)
        except TypeError as error:
            raise ClaimError(f"claim {raw.get('name')}: {error}. Fix: use the fields of reglab.bench.effects.Claim.")
        if smoke:
            body = {k: v for k, v in raw.items() if k != "smoke"}
            claim = cls(**{**deep_merge(body, claim.smoke), "seeds": 1})
        return claim

    def label(self, arm: str) -> str:
        return self.arms[arm].get("label", arm)

    def make_protocol(self) -> Protocol:
        protocol = get_protocol(self.protocol, self.module)(self.name, self.settings)
        for arm, spec in self.arms.items():
            protocol.check_arm(arm, {k: v for k, v in spec.items() if k != "label"})
        return protocol


def load_claims(claims_dir: Path, only: list[str] | None = None, smoke: bool = False) -> list[Claim]:
    """The claim files of ``claims_dir`` (those named in ``only``), validated before any run."""
    paths = sorted(claims_dir.glob("*.yaml"))
    known = [p.stem for p in paths]
    if only:
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise SystemExit(f"unknown claim(s) {unknown}; known: {known}")
        paths = [p for p in paths if p.stem in only]
    claims = []
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        if raw.get("name") != path.stem:
            raise ClaimError(f"{path}: name {raw.get('name')!r} must be the file stem {path.stem!r}")
        claims.append(Claim.from_dict(raw, smoke=smoke))
    return claims


class ArmRunner:
    """Runs arms through their protocols, once per (protocol, settings, arm spec, seed)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.memo: dict[str, dict[str, Any]] = {}

    def run(self, claim: Claim, protocol: Protocol, arm: str, seed: int) -> dict[str, Any]:
        spec = {k: v for k, v in claim.arms[arm].items() if k != "label"}
        key = json.dumps([protocol.name, protocol.settings, spec, seed], sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = protocol.run_arm(arm, spec, seed, self.workdir)
        return self.memo[key]


def judge(claim: Claim, values: dict[str, dict[str, list[float]]]) -> list[tuple[Check, Verdict]]:
    judged = []
    for check in claim.checks:
        missing = [a for a in (check.arm, check.against) if a is not None and check.metric not in values[a]]
        if missing:
            raise RuntimeError(f"claim {claim.name}: arm(s) {missing} measured no {check.metric!r}; "
                               f"measured: {sorted(values[missing[0]])}")
        against = values[check.against][check.metric] if check.against is not None else None
        judged.append((check, verdict(check, values[check.arm][check.metric], against)))
    return judged


def per_arm_values(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """arm -> metric -> per-seed values (the scalar metrics every seed measured)."""
    values = {}
    for arm, seeds in runs.items():
        names = [k for k, v in seeds[0].items() if not isinstance(v, list)]
        values[arm] = {k: [float(run[k]) for run in seeds] for k in names if all(k in run for run in seeds)}
    return values


def mean_std(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):  # a metric undefined on some seed (no sample of that group)
        return f"nan ({sum(math.isnan(v) for v in values)} of {len(values)} seeds)"
    mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    if abs(mean) >= 100:  # counts (parameters): no decimals
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.4f} ± {std:.4f}"


def git_commit(out_dir: Path) -> str:
    """``git rev-parse HEAD`` of the working directory, plus ``-dirty`` if the tree has changes
    other than results in ``out_dir`` (earlier claims' pages do not change what runs)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

        head, top = git("rev-parse", "HEAD"), Path(git("rev-parse", "--show-toplevel"))
        inside = out_dir.resolve().is_relative_to(top.resolve())
        dirty = git("status", "--porcelain", "--", str(top), *([f":(exclude){out_dir.resolve()}"] if inside else []))
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if dirty else "")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.platform()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {gpu}"


@dataclass
class Provenance:
    command: str
    commit: str
    machine: str
    date: str


def result_record(claim: Claim, values: dict[str, dict[str, list[float]]], judged: list[tuple[Check, Verdict]],
                  provenance: Provenance, wall_s: float) -> dict[str, Any]:
    """The results JSON of one claim (format: docs/architecture.md, "Benchmarks")."""
    return {
        "claim": claim.name,
        "techniques": claim.techniques,
        "statement": claim.claim,
        "protocol": claim.protocol,
        "seeds": len(next(iter(next(iter(values.values())).values()))),
        "first_seed": claim.first_seed,
        "arms": {arm: {"label": claim.label(arm), "values": metrics} for arm, metrics in values.items()},
        "checks": [
            {"metric": c.metric, "kind": c.kind, "direction": c.direction, "arm": c.arm, "against": c.against,
             "margin": c.margin, "bound": c.bound, "difference": v.difference,
             "stderr": v.stderr if math.isfinite(v.stderr) else None, "shown": v.shown, "outcome": v.outcome}
            for c, v in judged
        ],
        "verdict": SHOWN if all(v.shown for _, v in judged) else NOT_REPRODUCED,
        "command": provenance.command,
        "commit": provenance.commit,
        "machine": provenance.machine,
        "date": provenance.date,
        "wall_s": round(wall_s, 1),
    }


def report_lines(claim: Claim, protocol: Protocol, record: dict[str, Any], figures: list[str]) -> list[str]:
    """The human results page of one claim, from its JSON record."""
    arms = record["arms"]
    metrics = list(dict.fromkeys(m for arm in arms.values() for m in arm["values"]))
    lines = [
        f"# Claim: {claim.name}", "",
        claim.claim, "",
        f"**Verdict: {record['verdict']}** ({record['seeds']} seeds"
        + (f", {record['first_seed']} to {record['first_seed'] + record['seeds'] - 1}" if record["first_seed"] else "")
        + "; every check below must be shown).", "",
        f"Produced by: `{record['command']}` (protocol `{claim.protocol}`; commit {record['commit']}; "
        f"{record['machine']}; {record['date']}; {record['wall_s']:.0f} s).", "",
        *protocol.describe(),
        "Settings:", "", "```yaml", yaml.safe_dump(protocol.settings, sort_keys=False).rstrip(), "```", "",
        "Arms:", "",
        *[f"- `{arm}` ({claim.label(arm)}): `{json.dumps({k: v for k, v in spec.items() if k != 'label'})}`"
          for arm, spec in claim.arms.items()], "",
    ]
    if claim.notes:
        lines += [claim.notes.strip(), ""]
    lines += ["## Checks", "", "| check | kind | Δ ± s.e. | rule | verdict |", "|---|---|---|---|---|"]
    for check in record["checks"]:
        c = Check(check["metric"], check["direction"], check["arm"], check["against"], check["margin"], check["bound"])
        stderr = "∞" if check["stderr"] is None else f"{check['stderr']:.4f}"
        what = "mean − bound, signed" if c.kind == "bound" else f"{c.arm} − {c.against}, paired"
        lines.append(f"| {c.describe()} | {c.kind} | {check['difference']:+.4f} ± {stderr} ({what}) | {c.rule} | "
                     f"**{check['outcome']}** |")
    lines += ["", "## Arms (mean ± std over seeds)", "", "| arm | " + " | ".join(metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for arm, data in arms.items():
        cells = [mean_std(data["values"][m]) if m in data["values"] else "—" for m in metrics]
        lines.append(f"| {data['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per seed", ""]
    for metric in metrics:
        seeds = range(record["first_seed"], record["first_seed"] + record["seeds"])
        lines += [f"{metric}:", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * record["seeds"]]
        lines += [f"| {data['label']} | " + " | ".join(f"{v:.4g}" for v in data["values"][metric]) + " |"
                  for data in arms.values() if metric in data["values"]]
        lines.append("")
    return lines + figures


def write_results(claim: Claim, protocol: Protocol, runs: dict[str, list[dict[str, Any]]], out_dir: Path,
                  provenance: Provenance, wall_s: float) -> dict[str, Any]:
    """Judge ``runs`` and write ``<out_dir>/<name>.json`` and ``.md``; return the JSON record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    values = per_arm_values(runs)
    record = result_record(claim, values, judge(claim, values), provenance, wall_s)
    (out_dir / f"{claim.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    figures = protocol.figures(runs, out_dir, claim.name)
    (out_dir / f"{claim.name}.md").write_text("\n".join(report_lines(claim, protocol, record, figures)) + "\n")
    return record


def claim_command(name: str, seeds: int | None, smoke: bool) -> str:
    """The command that reproduces one claim's results on its own."""
    return f"reglab bench effects --only {name}" + (f" --seeds {seeds}" if seeds else "") + (" --smoke" if smoke else "")


def run_claims(claims: list[Claim], seeds: int | None, out_dir: Path, smoke: bool = False,
               runner: ArmRunner | None = None) -> dict[str, str]:
    """Run every claim (arms shared between claims run once) and write its results; claim -> verdict.
    ``runner``: reuse another call's arm runs (the smoke tests share one)."""
    protocols = {claim.name: claim.make_protocol() for claim in claims}  # every file checked before any run
    # the tree as it was when the command started: the code that runs is imported from it
    commit, host = git_commit(out_dir), machine()
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="reglab-bench-") as workdir:
        runner = runner or ArmRunner(Path(workdir))
        for claim in claims:
            provenance = Provenance(claim_command(claim.name, seeds, smoke), commit, host,
                                    datetime.now(timezone.utc).strftime("%Y-%m-%d"))
            protocol, start = protocols[claim.name], time.perf_counter()
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in claim.arms}
            count = 1 if smoke else seeds or claim.seeds
            for seed in range(claim.first_seed, claim.first_seed + count):
                for arm in claim.arms:
                    runs[arm].append(runner.run(claim, protocol, arm, seed))
                    shown = {k: round(v, 4) for k, v in runs[arm][-1].items() if not isinstance(v, list)}
                    print(f"[{claim.name}] seed {seed} {arm}: {shown}", flush=True)
            record = write_results(claim, protocol, runs, out_dir, provenance, time.perf_counter() - start)
            verdicts[claim.name] = record["verdict"]
            print(f"[{claim.name}] {record['verdict']} -> {out_dir / (claim.name + '.md')}", flush=True)
    return verdicts
