"""The ``fit`` protocol: one ``reglab`` fit then test per arm and seed.

Settings: ``configs`` (shared by every arm), ``overrides`` (extra CLI arguments for every arm,
e.g. ``--trainer.max_epochs=1`` in a smoke run), ``extra_seed_keys`` (CLI keys also set to the
seed, e.g. the label-noise seed), ``curves`` (per-epoch series to plot), ``class_groups``
(named lists of class ids, e.g. ``{tail: [7, 8, 9]}``: every per-class test metric
``<prefix><metric>_class_<i>`` also gives the group mean ``<prefix><metric>_<group>``, such as
``test/acc_tail`` or ``test/iou_rare``; the per-class values themselves are not judged). An arm's
spec is ``configs`` (added to the shared ones). Each run sets ``seed_everything`` and the data seed
to the seed and measures what ``trainer.test`` logs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import ClaimError, Protocol, register_protocol


PER_CLASS_KEY = re.compile(r"(?P<metric>.+)_class_(?P<index>\d+)")


def class_group_means(metrics: dict[str, float], groups: dict[str, list[int]]) -> dict[str, float]:
    """The metrics without their per-class entries (``<metric>_class_<i>``), plus the mean of each
    per-class metric over each group's classes (``<metric>_<group>``).

    Example:
        >>> class_group_means({"test/acc": 0.8, "test/acc_class_0": 1.0, "test/acc_class_1": 0.5,
        ...                    "test/acc_class_2": 0.0}, {"tail": [1, 2]})
        {'test/acc': 0.8, 'test/acc_tail': 0.25}
    """
    kept: dict[str, float] = {}
    per_class: dict[str, dict[int, float]] = defaultdict(dict)
    for key, value in metrics.items():
        match = PER_CLASS_KEY.fullmatch(key)
        if match:
            per_class[match["metric"]][int(match["index"])] = value
        else:
            kept[key] = value
    for metric, values in per_class.items():
        for group, classes in groups.items():
            missing = [c for c in classes if c not in values]
            if missing:
                raise ClaimError(f"class group {group!r} names classes {missing}, but the run logged "
                                 f"{metric}_class_<i> only for {sorted(values)}. Fix: list classes the model has.")
            kept[f"{metric}_{group}"] = sum(values[c] for c in classes) / len(classes)
    return kept


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


@register_protocol("fit")
class FitProtocol(Protocol):
    defaults = {"configs": [], "overrides": [], "extra_seed_keys": [], "curves": [], "class_groups": {}}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        groups = self.settings["class_groups"]
        if not isinstance(groups, dict) or not all(
            isinstance(classes, list) and classes and all(isinstance(c, int) for c in classes)
            for classes in groups.values()
        ):
            raise ClaimError(f"claim {claim_name}: class_groups must map a group name to a non-empty list of "
                             f"class ids, got {groups!r}. Fix: write e.g. `class_groups: {{tail: [7, 8, 9]}}`.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) - {"configs"}:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a fit arm takes `configs` (and `label`), "
                             f"got {sorted(spec)}")
        for path in self.settings["configs"] + spec.get("configs", []):
            if not Path(path).is_file():
                raise ClaimError(f"claim {self.claim_name}, arm {arm}: config {path} not found. Fix: run from the "
                                 "repository root or correct the path.")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        from reglab.cli import ReglabCLI, merge_technique_configs

        args: list[str] = []
        for path in self.settings["configs"] + spec.get("configs", []):
            args += ["--config", path]
        args += [
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
            *[f"--{key}={seed}" for key in self.settings["extra_seed_keys"]],
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--runs_dir={workdir}",
            *self.settings["overrides"],
        ]
        cli = ReglabCLI(args=merge_technique_configs(args), run=False)
        history = EpochHistory(self.settings["curves"])
        cli.trainer.callbacks.append(history)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        logged = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
        metrics = class_group_means(logged, self.settings["class_groups"])
        last = {f"{key} (last epoch)": series[-1] for key, series in history.values.items() if series}
        return {**metrics, **last, **{f"curve:{key}": series for key, series in history.values.items()}}

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        if not self.settings["curves"]:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        keys = self.settings["curves"]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for arm, seeds in runs.items():
                series = [run.get(f"curve:{key}", []) for run in seeds]
                length = min((len(s) for s in series), default=0)
                if not length:
                    continue
                values = np.array([s[:length] for s in series])
                epochs = np.arange(1, length + 1)
                ax.plot(epochs, values.mean(0), label=arm)
                ax.fill_between(epochs, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.set_ylim(0, 1)
            ax.legend()
        seeds = len(next(iter(runs.values())))
        fig.suptitle(f"{claim_name}: mean ± std over {seeds} seeds")
        fig.tight_layout()
        fig.savefig(out_dir / f"{claim_name}_curves.png", dpi=110)
        plt.close(fig)
        return ["## Per-epoch curves", "", f"![per-epoch curves]({claim_name}_curves.png)", ""]
