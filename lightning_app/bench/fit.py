"""The ``fit`` protocol: one ``reglab`` fit then test per arm and seed.

Settings: ``configs`` (shared by every arm), ``overrides`` (extra CLI arguments for every arm,
e.g. ``--trainer.max_epochs=1`` in a smoke run), ``extra_seed_keys`` (CLI keys also set to the
seed, e.g. the label-noise seed), ``curves`` (per-epoch series to plot), ``means`` (derived
metrics, each the mean of logged test metrics: ``{test/rare_miou: [test/iou_class_8, ...]}``, e.g.
a group of classes chosen in advance), ``measures`` (dotted names of functions
``fn(model, datamodule) -> {metric: float}`` measured on every run's trained model after its test,
e.g. ``reglab.nn.fadc.dilation_stats``), ``figures`` (dotted names of functions
``fn(model, datamodule) -> matplotlib Figure`` drawn from each arm's first seed, e.g.
``reglab.tasks.segmentation.prediction_grid``; the claim file names them, so the protocol imports no
family). An arm's spec is ``configs`` (added to the shared ones). Each run sets ``seed_everything``
and the data seed to the seed and measures what ``trainer.test`` logs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import ClaimError, Protocol, import_object, register_protocol


PER_CLASS_KEY = re.compile(r".+_class_\d+")


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
    defaults = {"configs": [], "overrides": [], "extra_seed_keys": [], "curves": [], "means": {}, "measures": [],
                "figures": []}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        means = self.settings["means"]
        if not isinstance(means, dict) or not all(
            isinstance(keys, list) and keys and all(isinstance(key, str) for key in keys) for keys in means.values()
        ):
            raise ClaimError(
                f"claim {claim_name}: the fit setting `means` maps a new metric to a non-empty list of logged test"
                f" metrics, got {means!r}. Fix: write e.g. `means: {{test/rare_miou: [test/iou_class_9,"
                " test/iou_class_10]}`."
            )
        self.measures = [import_object(path) for path in self.settings["measures"]]
        self.figure_fns = {path.rpartition(".")[2]: import_object(path) for path in self.settings["figures"]}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) - {"configs"}:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a fit arm takes `configs` (and `label`), "
                             f"got {sorted(spec)}")
        for path in self.settings["configs"] + spec.get("configs", []):
            if not Path(path).is_file():
                raise ClaimError(f"claim {self.claim_name}, arm {arm}: config {path} not found. Fix: run from the "
                                 "repository root or correct the path.")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        cli, metrics = self.fit_and_test(self.arguments(spec, seed, workdir))
        for name, fn in self.figure_fns.items():
            self.keep_figure(arm, name, lambda fn=fn: fn(cli.model, cli.datamodule))
        return metrics

    def arguments(self, spec: dict[str, Any], seed: int, workdir: Path) -> list[str]:
        """The ``reglab fit`` arguments of an arm's run at ``seed`` (a protocol built on this one adds to them)."""
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
        return args

    def fit_and_test(self, args: list[str]) -> tuple[Any, dict[str, Any]]:
        """Fit and test one run of ``reglab fit`` arguments: its CLI (model, trainer) and what it measured."""
        cli, history = self.fit(args)
        return cli, self.test(cli, history)

    def fit(self, args: list[str]) -> tuple[Any, EpochHistory]:
        """Fit one run of ``reglab fit`` arguments: its CLI (the trainer's ``callback_metrics`` hold the last
        validation) and its per-epoch history, for :meth:`test`."""
        from reglab.cli import ReglabCLI, merge_technique_configs

        cli = ReglabCLI(args=merge_technique_configs(args), run=False)
        history = EpochHistory(self.settings["curves"])
        cli.trainer.callbacks.append(history)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return cli, history

    def test(self, cli: Any, history: EpochHistory) -> dict[str, Any]:
        """What ``trainer.test`` logs for a fitted run (with the ``means`` and the last epoch's curve values)."""
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        logged = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
        # per-class values are logged for inspection, not judged; `means` makes group metrics of them
        metrics: dict[str, Any] = {k: v for k, v in logged.items() if not PER_CLASS_KEY.fullmatch(k)}
        for name, keys in self.settings["means"].items():
            missing = sorted(set(keys) - set(logged))
            if missing:
                raise ClaimError(f"claim {self.claim_name}: `means` {name} needs {missing}, which the test did not log"
                                 f" (logged: {sorted(logged)}). Fix: name logged test metrics.")
            metrics[name] = sum(logged[key] for key in keys) / len(keys)
        for measure in self.measures:
            metrics.update({key: float(value) for key, value in measure(cli.model, cli.datamodule).items()})
        last = {f"{key} (last epoch)": series[-1] for key, series in history.values.items() if series}
        return {**metrics, **last, **{f"curve:{key}": series for key, series in history.values.items()}}

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        return self.curve_figure(runs, out_dir, claim_name) + super().figures(runs, out_dir, claim_name)

    def curve_figure(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        """The per-epoch ``curves`` of every arm, mean ± std over seeds."""
        if not self.settings["curves"]:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        keys = self.settings["curves"]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            lowest, highest = float("inf"), float("-inf")
            for arm, seeds in runs.items():
                series = [run.get(f"curve:{key}", []) for run in seeds]
                length = min((len(s) for s in series), default=0)
                if not length:
                    continue
                values = np.array([s[:length] for s in series])
                epochs = np.arange(1, length + 1)
                ax.plot(epochs, values.mean(0), label=arm)
                ax.fill_between(epochs, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
                lowest, highest = min(lowest, values.min()), max(highest, values.max())
            ax.set_title(key)
            ax.set_xlabel("epoch")
            if 0 <= lowest and highest <= 1:  # a rate on its whole scale; a loss on its own
                ax.set_ylim(0, 1)
            ax.legend()
        seeds = len(next(iter(runs.values())))
        fig.suptitle(f"{claim_name}: mean ± std over {seeds} seeds")
        fig.tight_layout()
        fig.savefig(out_dir / f"{claim_name}_curves.png", dpi=110)
        plt.close(fig)
        return ["## Per-epoch curves", "", f"![per-epoch curves]({claim_name}_curves.png)", ""]

