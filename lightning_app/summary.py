"""What a finished run prints: the measured numbers and where everything went."""

from __future__ import annotations

from pathlib import Path

from lightning import Trainer
from rich.console import Console

SUMMARY_METRICS = {
    "test/acc": "test accuracy (clean labels)",
    "test/ece": "test calibration error (ECE)",
    "val/acc": "validation accuracy",
    "test/miou": "test mean IoU (clean masks)",
    "val/miou": "validation mean IoU",
    "test/dice": "test Dice (foreground classes)",
    "test/recall_at_1": "test recall@1 (each test sample querying all the others)",
    "test/map_at_r": "test MAP@R",
    "val/recall_at_1": "validation recall@1",
    "train/memorized": "noisy training samples memorized (predicted as their wrong label), last epoch",
    "train/corrected": "noisy training samples corrected (predicted as their true label), last epoch",
}


def print_run_summary(trainer: Trainer, values: dict[str, float], run_dir: Path) -> None:
    """Print the run's headline metrics (last epoch, then test) and the paths of its outputs."""
    if trainer.global_rank != 0:
        return
    console = Console(soft_wrap=True)  # paths and numbers stay on one line in logs
    console.print(f"\n[bold]reglab run {run_dir}[/bold]")
    for key, label in SUMMARY_METRICS.items():
        if key in values:
            console.print(f"  {label} [dim]({key})[/dim]: [bold]{values[key]:.4f}[/bold]")
    console.print(f"  logs (metrics.csv, TensorBoard) and the config of every start (config*.yaml): {run_dir}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.last_model_path:
        console.print(f"  checkpoints: {Path(checkpoint.last_model_path).parent}")
    console.print(f"  resume it: the same command with --ckpt_path last (run name {run_dir.parent.name!r})")
