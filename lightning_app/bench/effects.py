"""Effect benchmarks: does a technique do what its paper claims, on embedded data, over seeds?

A claim is a YAML file in ``benchmarks/effects/``::

    name: elr
    claim: "digits, 40% symmetric noise: clean-test accuracy of ELR above CE"
    metric: test/acc            # read after trainer.test
    direction: higher           # or lower
    seeds: 3
    configs: [configs/experiment/bench_noisy_digits.yaml]   # shared by both arms
    baseline: []                                           # added for the baseline arm
    technique: [configs/technique/elr.yaml]                # added for the technique arm
    curves: [train/memorized, train/corrected]             # per-epoch series to plot

Every (arm, seed) run is a ``reglab`` fit then test with ``seed_everything`` and the data seed
set to the seed. The verdict is "claim shown" when the mean paired difference (technique minus
baseline, same seed) goes the claimed way by more than two standard errors, else "claim not
reproduced". Results go to ``<out>/<name>.md`` (with the command that produced them) and
``<out>/<name>_curves.png``.
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


@dataclass
class Claim:
    name: str
    claim: str
    metric: str
    direction: str
    configs: list[str]
    baseline: list[str] = field(default_factory=list)
    technique: list[str] = field(default_factory=list)
    seeds: int = 3
    curves: list[str] = field(default_factory=list)
    extra_seed_keys: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=lambda: {"baseline": "baseline", "technique": "technique"})

    def __post_init__(self) -> None:
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"claim {self.name}: direction must be 'higher' or 'lower', got {self.direction!r}")


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
    claims = [Claim(**yaml.safe_load(path.read_text())) for path in sorted(claims_dir.glob("*.yaml"))]
    if only:
        unknown = set(only) - {c.name for c in claims}
        if unknown:
            raise SystemExit(f"unknown claim(s) {sorted(unknown)}; known: {sorted(c.name for c in claims)}")
        claims = [c for c in claims if c.name in only]
    return claims


def run_arm(claim: Claim, arm: str, seed: int, workdir: Path) -> RunResult:
    """Fit and test one arm of a claim with one seed, in this process."""
    from lightning_app.cli import ReglabCLI, merge_technique_configs

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
    if claim.metric not in metrics:
        raise RuntimeError(f"claim {claim.name}: the run logged no {claim.metric!r}; it logged {sorted(metrics)}")
    return RunResult(metrics=metrics, curves=dict(history.values))


def verdict(claim: Claim, baseline: list[float], technique: list[float]) -> tuple[str, float, float]:
    """(verdict, mean paired difference, its standard error)."""
    sign = 1.0 if claim.direction == "higher" else -1.0
    diffs = [sign * (t - b) for b, t in zip(baseline, technique)]
    mean = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    shown = mean > 0 and mean > 2 * stderr
    return ("claim shown" if shown else "claim not reproduced"), sign * mean, stderr


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def write_report(claim: Claim, results: dict[str, list[RunResult]], out_dir: Path, command: str) -> str:
    per_arm = {arm: [r.metrics[claim.metric] for r in results[arm]] for arm in ARMS}
    outcome, diff, stderr = verdict(claim, per_arm["baseline"], per_arm["technique"])
    lines = [
        f"# Effect: {claim.name}",
        "",
        f"Claim: {claim.claim}",
        "",
        f"Produced by: `{command}`",
        "",
        f"Configs: shared {claim.configs}; baseline adds {claim.baseline}; technique adds {claim.technique}.",
        "",
        f"| arm | {claim.metric} (mean ± std, {len(per_arm['baseline'])} seeds) | per seed |",
        "|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(f"| {claim.labels[arm]} | {mean_std(per_arm[arm])} | {', '.join(f'{v:.4f}' for v in per_arm[arm])} |")
    lines += [
        "",
        f"Paired difference ({claim.labels['technique']} − {claim.labels['baseline']}, same seed): {diff:+.4f} (standard error {stderr:.4f}). "
        f"Verdict: **{outcome}** (rule: the mean paired difference goes the claimed way, "
        f"{claim.direction}, by more than two standard errors).",
    ]
    other_metrics = sorted(set(results["baseline"][0].metrics) - {claim.metric})
    secondary = [m for m in other_metrics if not m.split("/")[-1].startswith("acc_class_")]
    if secondary:
        lines += ["", f"| other metric | {claim.labels['baseline']} | {claim.labels['technique']} |", "|---|---|---|"]
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
    return outcome


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
                    print(f"[{claim.name}] seed {seed} {arm}: {claim.metric} = {results[arm][-1].metrics[claim.metric]:.4f}", flush=True)
            outcomes[claim.name] = write_report(claim, results, out_dir, command)
            print(f"[{claim.name}] {outcomes[claim.name]} -> {out_dir / (claim.name + '.md')}", flush=True)
    return outcomes
