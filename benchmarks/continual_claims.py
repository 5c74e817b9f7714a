"""Paper-40 claim on split digits: L2 to the previous parameters, EWC and LwF forget less than
sequential fine-tuning (forgetting = max − last, lower is better), over seeds.

The effect harness fits once per arm; a claim about a task sequence needs the task runner, so it
lives here. Every (arm, seed) run is ``lightning_app.continual.TaskSequenceRunner`` on
``configs/experiment/split_digits.yaml``'s setting (5 tasks x 2 classes, seeded class order, MLP)
with the data seed, class order and initialisation set to the seed. The verdict per technique
uses the effect benchmark's rule: the mean paired difference (technique − fine-tuning, same seed)
must go the claimed way by more than two standard errors.

    python benchmarks/continual_claims.py --seeds 3 [--scenario class|task] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L

from callbacks import EWC, L2ToPreviousTask, LwF
from datamodules import DigitsDataModule, TaskSequenceDataModule
from lightning_app.bench.effects import mean_std
from lightning_app.continual.metrics import summary
from lightning_app.continual.runner import TaskSequenceRunner
from lightning_app.tasks import ClassificationModule

ARMS = {
    "fine-tuning": lambda: [],
    "L2": lambda: [L2ToPreviousTask(lam=10.0)],
    "EWC": lambda: [EWC(lam=5000.0)],
    "LwF": lambda: [LwF(temperature=2.0, lam=1.0)],
}


def run_arm(arm: str, seed: int, scenario: str, epochs: int, workdir: Path) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=32, seed=seed), num_tasks=5, scenario=scenario)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (128, 128)}, lr=1e-3)
    trainer_kwargs = dict(accelerator="cpu", devices=1, max_epochs=epochs, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    runner = TaskSequenceRunner(module, data, ARMS[arm](), trainer_kwargs, run_dir=workdir / f"{arm}_{seed}", log=False)
    return summary(runner.run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenario", choices=("class", "task"), default="class")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            for arm in ARMS:
                results[arm].append(run_arm(arm, seed, args.scenario, args.epochs, Path(workdir)))
                print(arm, seed, results[arm][-1], flush=True)
    baseline = [r["forgetting"] for r in results["fine-tuning"]]
    lines = [
        f"# Paper 40 on split digits ({args.scenario}-incremental): forgetting vs sequential fine-tuning", "",
        f"Produced by: `{command}`", "",
        f"5 tasks x 2 classes, seeded class order, MLP (128, 128), Adam 1e-3, {args.epochs} epochs per task, "
        f"batch 32; seeds 0..{args.seeds - 1} (data, class order, init). Forgetting: max − last (Chaudhry et al. 2018).", "",
        "| arm | forgetting ↓ | average accuracy ↑ | backward transfer | paired Δ forgetting vs fine-tuning (s.e.) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        forget = [r["forgetting"] for r in runs]
        cells = [mean_std(forget), mean_std([r["average_accuracy"] for r in runs]), mean_std([r["backward_transfer"] for r in runs])]
        if arm == "fine-tuning":
            cells += ["—", "—"]
        else:
            diffs = [t - b for t, b in zip(forget, baseline)]
            stderr = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
            mean = statistics.fmean(diffs)
            cells += [f"{mean:+.4f} ({stderr:.4f})", "claim shown" if mean < 0 and -mean > 2 * stderr else "claim not reproduced"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out) / f"continual_split_digits_{args.scenario}.md"
    out.write_text(table)


if __name__ == "__main__":
    main()
