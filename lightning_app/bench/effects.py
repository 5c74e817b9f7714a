"""Effect benchmarks: does a technique do what its paper claims, on embedded data, over seeds?

A claim is a YAML file in ``benchmarks/effects/``. The single-metric form::

    name: elr
    claim: "digits, 40% symmetric noise: clean-test accuracy of ELR above CE"
    metric: test/acc            # read after trainer.test
    direction: higher           # higher | lower | at_least | at_most
    seeds: 3
    configs: [configs/experiment/bench_noisy_digits.yaml]   # shared by both arms
    baseline: []                                           # added for the baseline arm
    technique: [configs/technique/elr.yaml]                # added for the technique arm
    curves: [train/memorized, train/corrected]             # per-epoch series to plot

or several checks judged on the same runs (one set of fits gives every verdict)::

    checks:
      - {metric: test/acc, direction: higher}
      - {metric: test/ece, direction: lower}
      - {metric: test/acc, direction: at_least, margin: 0.01}

Every (arm, seed) run is a ``reglab`` fit then test with ``seed_everything`` and the data seed
set to the seed. Each check's verdict comes from :func:`verdict` on the paired differences d_s =
technique_s − baseline_s (same seed s), with mean d̄ and standard error se = std(d)/√n, signed so
that "better" is positive (sign +1 for ``higher``/``at_least``, −1 for ``lower``/``at_most``):

* superiority (``higher``, ``lower``): claim shown when sign·d̄ − 2·se > 0 (the technique is better
  by more than two standard errors);
* non-inferiority (``at_least``, ``at_most``, with a stated ``margin`` m ≥ 0): claim shown when
  sign·d̄ − 2·se > −m (the technique is at worst m worse, at about 97.5% one-sided confidence).

Otherwise "claim not reproduced". Results go to ``<out>/<name>.md`` (with the command that
produced them) and ``<out>/<name>_curves.png``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import yaml

ARMS = ("baseline", "technique")
# direction -> (sign that makes "better" positive, whether it is a non-inferiority check)
DIRECTIONS = {"higher": (1.0, False), "lower": (-1.0, False), "at_least": (1.0, True), "at_most": (-1.0, True)}


@dataclass(frozen=True)
class Check:
    """One metric of a claim, the way it should move and, for non-inferiority, the allowed loss."""

    metric: str
    direction: str
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"check {self}: metric must be a logged metric name such as 'test/acc'")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"check on {self.metric}: direction must be one of {sorted(DIRECTIONS)}, got {self.direction!r}")
        non_inferiority = DIRECTIONS[self.direction][1]
        if self.margin < 0 or (self.margin and not non_inferiority):
            raise ValueError(
                f"check on {self.metric}: margin {self.margin} needs direction at_least/at_most and must be >= 0 "
                "(higher/lower are superiority checks without a margin)"
            )

    @property
    def rule(self) -> str:
        better = "higher" if DIRECTIONS[self.direction][0] > 0 else "lower"
        if DIRECTIONS[self.direction][1]:
            return (f"non-inferiority, {better} is better: the mean paired difference in the better direction, "
                    f"minus two standard errors, is above −{self.margin:g}")
        return f"the mean paired difference goes the claimed way, {better}, by more than two standard errors"


@dataclass(frozen=True)
class Verdict:
    shown: bool
    difference: float  # mean paired difference, technique − baseline (unsigned by direction)
    stderr: float

    @property
    def outcome(self) -> str:
        return "claim shown" if self.shown else "claim not reproduced"


def verdict(check: Check, baseline: list[float], technique: list[float]) -> Verdict:
    """Judge one check on per-seed values of both arms, paired by position (same seed)."""
    if len(baseline) != len(technique) or not baseline:
        raise ValueError(f"check on {check.metric}: need the same non-zero number of seeds per arm, "
                         f"got {len(baseline)} and {len(technique)}")
    sign = DIRECTIONS[check.direction][0]
    diffs = [t - b for b, t in zip(baseline, technique)]
    mean = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return Verdict(shown=sign * mean - 2 * stderr > -check.margin, difference=mean, stderr=stderr)


@dataclass
class Claim:
    name: str
    claim: str
    configs: list[str]
    checks: list[Check] = field(default_factory=list)
    baseline: list[str] = field(default_factory=list)
    technique: list[str] = field(default_factory=list)
    seeds: int = 3
    curves: list[str] = field(default_factory=list)
    extra_seed_keys: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=lambda: {"baseline": "baseline", "technique": "technique"})

    def __post_init__(self) -> None:
        self.checks = [c if isinstance(c, Check) else Check(**c) for c in self.checks]
        if not self.checks:
            raise ValueError(f"claim {self.name}: give metric/direction or a non-empty checks list")

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(c.metric for c in self.checks))

    @classmethod
    def from_dict(cls, raw: dict) -> "Claim":
        """Read a claim file's mapping; ``metric``/``direction``/``margin`` at top level is one check."""
        raw = dict(raw)
        single = {key: raw.pop(key) for key in ("metric", "direction", "margin") if key in raw}
        if single and "checks" in raw:
            raise ValueError(f"claim {raw.get('name')}: give either metric/direction[/margin] or checks, not both")
        if single:
            raw["checks"] = [single]
        return cls(**raw)


@dataclass
class RunResult:
    metrics: dict[str, float]
    curves: dict[str, list[float]]


class EpochHistory(L.Callback):
    """Keeps the value of chosen metrics at the end of every training epoch.

    Callbacks' ``on_train_epoch_end`` runs before the module's, where epoch metrics are logged,
    so an epoch's values are read when the next epoch starts (and when training ends).
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.values: dict[str, list[float]] = defaultdict(list)

    def _record(self, trainer: L.Trainer) -> None:
        for key in self.keys:
            if key in trainer.callback_metrics:
                self.values[key].append(float(trainer.callback_metrics[key]))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)


def load_claims(claims_dir: Path, only: list[str] | None = None) -> list[Claim]:
    claims = [Claim.from_dict(yaml.safe_load(path.read_text())) for path in sorted(claims_dir.glob("*.yaml"))]
    if only:
        unknown = set(only) - {c.name for c in claims}
        if unknown:
            raise SystemExit(f"unknown claim(s) {sorted(unknown)}; known: {sorted(c.name for c in claims)}")
        claims = [c for c in claims if c.name in only]
    return claims


def run_arm(claim: Claim, arm: str, seed: int, workdir: Path) -> RunResult:
    """Fit and test one arm of a claim with one seed, in this process."""
    from reglab.cli import ReglabCLI, merge_technique_configs

    args: list[str] = []
    for path in claim.configs + getattr(claim, arm):
        args += ["--config", path]
    args += [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        *[f"--{key}={seed}" for key in claim.extra_seed_keys],
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--runs_dir={workdir}",
    ]
    cli = ReglabCLI(args=merge_technique_configs(args), run=False)
    history = EpochHistory(claim.curves)
    cli.trainer.callbacks.append(history)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    missing = [m for m in claim.metrics if m not in metrics]
    if missing:
        raise RuntimeError(f"claim {claim.name}: the run logged no {missing}; it logged {sorted(metrics)}")
    return RunResult(metrics=metrics, curves=dict(history.values))


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def check_lines(claim: Claim, check: Check, results: dict[str, list[RunResult]]) -> tuple[list[str], Verdict]:
    """The per-arm table and the verdict sentence of one check."""
    per_arm = {arm: [r.metrics[check.metric] for r in results[arm]] for arm in ARMS}
    judged = verdict(check, per_arm["baseline"], per_arm["technique"])
    margin = f", margin {check.margin:g}" if DIRECTIONS[check.direction][1] else ""
    lines = [
        f"### {check.metric}, {check.direction}{margin}",
        "",
        f"| arm | {check.metric} (mean ± std, {len(per_arm['baseline'])} seeds) | per seed |",
        "|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(f"| {claim.labels[arm]} | {mean_std(per_arm[arm])} | {', '.join(f'{v:.4f}' for v in per_arm[arm])} |")
    lines += [
        "",
        f"Paired difference ({claim.labels['technique']} − {claim.labels['baseline']}, same seed): "
        f"{judged.difference:+.4f} (standard error {judged.stderr:.4f}). Verdict: **{judged.outcome}** "
        f"(rule: {check.rule}).",
        "",
    ]
    return lines, judged


def write_report(claim: Claim, results: dict[str, list[RunResult]], out_dir: Path, command: str) -> str:
    """Write ``<out_dir>/<name>.md`` (and the curves figure); return the outcome, one part per check."""
    lines = [
        f"# Effect: {claim.name}",
        "",
        f"Claim: {claim.claim}",
        "",
        f"Produced by: `{command}`",
        "",
        f"Configs: shared {claim.configs}; baseline adds {claim.baseline}; technique adds {claim.technique}.",
        "",
    ]
    outcomes = []
    for check in claim.checks:
        check_text, judged = check_lines(claim, check, results)
        lines += check_text
        outcomes.append(f"{check.metric} {check.direction}: {judged.outcome}")
    if len(claim.checks) > 1:
        lines += ["Verdicts: " + "; ".join(outcomes) + ".", ""]
    other_metrics = sorted(set(results["baseline"][0].metrics) - set(claim.metrics))
    secondary = [m for m in other_metrics if not m.split("/")[-1].startswith("acc_class_")]
    if secondary:
        lines += [f"| other metric | {claim.labels['baseline']} | {claim.labels['technique']} |", "|---|---|---|"]
        for metric in secondary:
            row = [mean_std([r.metrics[metric] for r in results[arm]]) for arm in ARMS]
            lines.append(f"| {metric} | {row[0]} | {row[1]} |")
    for key in claim.curves:
        finals = {arm: [r.curves[key][-1] for r in results[arm] if r.curves.get(key)] for arm in ARMS}
        if all(finals.values()):
            lines.append(
                f"\nLast-epoch {key}: {claim.labels['baseline']} {mean_std(finals['baseline'])}, "
                f"{claim.labels['technique']} {mean_std(finals['technique'])}."
            )
    if claim.curves:
        plot_curves(claim, results, out_dir / f"{claim.name}_curves.png")
        lines += ["", f"![per-epoch curves]({claim.name}_curves.png)"]
    (out_dir / f"{claim.name}.md").write_text("\n".join(lines) + "\n")
    return outcomes[0].split(": ", 1)[1] if len(outcomes) == 1 else "; ".join(outcomes)


def plot_curves(claim: Claim, results: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(claim.curves), figsize=(5 * len(claim.curves), 3.6), squeeze=False)
    for ax, key in zip(axes[0], claim.curves):
        for arm, style in zip(ARMS, ("--", "-")):
            series = [r.curves.get(key, []) for r in results[arm]]
            length = min((len(s) for s in series), default=0)
            if not length:
                continue
            values = np.array([s[:length] for s in series])
            epochs = np.arange(1, length + 1)
            mean, std = values.mean(0), values.std(0)
            ax.plot(epochs, mean, style, label=claim.labels[arm])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle(f"{claim.name}: mean ± std over {len(results['baseline'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_claims(claims: list[Claim], seeds: int | None, out_dir: Path, command: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="reglab-bench-") as workdir:
        for claim in claims:
            results: dict[str, list[RunResult]] = {arm: [] for arm in ARMS}
            for seed in range(seeds or claim.seeds):
                for arm in ARMS:
                    results[arm].append(run_arm(claim, arm, seed, Path(workdir)))
                    values = ", ".join(f"{m} = {results[arm][-1].metrics[m]:.4f}" for m in claim.metrics)
                    print(f"[{claim.name}] seed {seed} {arm}: {values}", flush=True)
            outcomes[claim.name] = write_report(claim, results, out_dir, command)
            print(f"[{claim.name}] {outcomes[claim.name]} -> {out_dir / (claim.name + '.md')}", flush=True)
    return outcomes
