"""What a finished run prints: the measured numbers and where everything went."""

from __future__ import annotations

from pathlib import Path

from lightning import Trainer
from rich.console import Console
from rich.table import Table

SUMMARY_METRICS = {
    "test/acc": "clean-test accuracy",
    "test/ece": "test calibration error (ECE)",
    "val/acc": "validation accuracy",
    "train/memorized": "noisy training samples memorized (predicted as their wrong label)",
    "train/corrected": "noisy training samples corrected (predicted as their true label)",
}


def print_run_summary(trainer: Trainer, test_metrics: dict[str, float], run_dir: Path) -> None:
    """Print the headline metrics of the run (last epoch) and the paths of its outputs."""
    if trainer.global_rank != 0:
        return
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    values.update({k: float(v) for k, v in test_metrics.items()})
    table = Table(title=f"reglab run {run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in SUMMARY_METRICS.items():
        if key in values:
            table.add_row(f"{label} [{key}]", f"{values[key]:.4f}")
    console = Console()
    console.print(table)
    checkpoint = trainer.checkpoint_callback
    console.print(f"logs (CSV, TensorBoard) and config.yaml: {run_dir}")
    if checkpoint is not None and checkpoint.last_model_path:
        console.print(f"checkpoints: {Path(checkpoint.last_model_path).parent}")
    console.print(f"resume this run:  reglab fit ... --ckpt_path last   (run name {run_dir.parent.name!r})")
