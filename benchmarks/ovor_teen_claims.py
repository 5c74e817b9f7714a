"""Claims of OVOR (paper 08) and TEEN (paper 47) on digits, over seeds, with the task runner.

OVOR — "virtual outlier regularization raises the final average accuracy of rehearsal-free
class-incremental learning". The setting mirrors OVOR's prompt setting (a strong pretrained
backbone, only a small part trained, past-task logits masked while a task trains) and was fixed
before any result was seen:

* split digits, class-incremental, 5 tasks x 2 classes (seeded class order);
* the MLP (128, 128) backbone is pretrained on a class-stratified half of the training images
  (all 10 classes, 20 epochs, as configs/experiment/split_digits_pretrain.yaml;
  ``TaskSequenceDataModule(pretrain_fraction=0.5, pretraining=True)``)
  — the stand-in for an ImageNet-pretrained ViT — then frozen; the tasks train a linear head on
  the other half;
* while a task trains, only its own classes' logits are live (past ones masked, as in the
  official OnePrompt / L2P learners); evaluation picks among every class seen so far;
* 10 epochs per task, Adam 1e-3, batch 32; OVOR with the official defaults, regularizing the
  last 2 epochs of every task (the official 16 + 4 schedule, scaled);
* arms: the same run without outliers vs with OVOR; metric: final average accuracy.

TEEN — "training-free calibration raises new-class accuracy over uncalibrated prototypes in
few-shot sessions". Digits, a base session of 6 classes (all their training images, 20 epochs, a
cosine classifier with temperature 16, MLP (128, 128), Adam 1e-3, batch 32), then 2 sessions of
2 ways x 5 shots, training-free. Arms: TEEN with its official defaults (alpha = 0.5, tau = 16) vs
alpha = 1 (the uncalibrated prototypes, everything else identical). Metric: accuracy on the
novel classes' test images after the last session (mean over the sessions' tasks), among all
10 classes.

Every (arm, seed) run seeds data, class order and initialisation with the seed; the verdict uses
the effect benchmark's rule (mean paired difference the claimed way by more than two standard
errors).

    python benchmarks/ovor_teen_claims.py --claim ovor --seeds 3
    python benchmarks/ovor_teen_claims.py --claim teen --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks import OVOR, TEEN
from reglab.callbacks.continual.ovor import dataset_features, energy, synthesize_outliers
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule
from reglab.bench.effects import Check, mean_std, verdict
from reglab.continual.metrics import average_accuracy
from reglab.continual.runner import TaskSequenceRunner
from reglab.tasks import ClassificationModule
from reglab.technique import Technique

HIDDEN = (128, 128)
QUIET = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


class CurrentTaskLogits(L.Callback):
    """While a task trains, only its own classes' logits are live (the official OVOR learners
    mask past tasks' logits); the runner evaluates among all seen classes regardless."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: ClassificationModule) -> None:
        data = trainer.datamodule
        mask = torch.zeros_like(pl_module.active_classes)
        mask[data.tasks[data.task]] = True
        pl_module.active_classes.copy_(mask)


# -- OVOR -----------------------------------------------------------------------------------------
def split_digits(seed: int, pretraining: bool = False) -> TaskSequenceDataModule:
    return TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=32, seed=seed), num_tasks=5,
                                  pretrain_fraction=0.5, pretraining=pretraining)


def pretrained_backbone(seed: int, epochs: int) -> dict[str, Tensor]:
    L.seed_everything(seed, verbose=False)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": HIDDEN})
    L.Trainer(max_epochs=epochs, logger=False, **QUIET).fit(module, datamodule=split_digits(seed, pretraining=True))
    return module.backbone.state_dict()


def run_ovor_arm(
    techniques: list[Technique], seed: int, backbone: dict[str, Tensor], epochs: int, workdir: Path
) -> tuple[Tensor, tuple[float, float]]:
    """The accuracy matrix and :func:`last_task_energies` of one run."""
    L.seed_everything(seed, verbose=False)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": HIDDEN})
    module.backbone.load_state_dict(backbone)
    module.backbone.requires_grad_(False)
    data = split_digits(seed)
    runner = TaskSequenceRunner(module, data, techniques, dict(max_epochs=epochs, **QUIET),
                                callbacks=[CurrentTaskLogits()], run_dir=workdir, log=False)
    return runner.run(), last_task_energies(module, data, seed)


@torch.no_grad()
def last_task_energies(module: ClassificationModule, data: TaskSequenceDataModule, seed: int) -> tuple[float, float]:
    """Diagnostic: mean energy (over the last task's classes) of the last task's training samples
    and of outliers synthesized from them with OVOR's defaults (the same draw for both arms), after
    the run. OVOR aims at ID energy <= -15 and outlier energy >= -3."""
    features, _ = dataset_features(module, data.train_dataset)
    outliers = synthesize_outliers(features, len(data.tasks[-1]), generator=torch.Generator().manual_seed(seed))
    classes = data.tasks[-1]
    return (float(energy(module.head(features)[:, classes]).mean()),
            float(energy(module.head(outliers)[:, classes]).mean()))


def ovor_claim(seeds: int, epochs: int, pretrain_epochs: int, workdir: Path) -> list[str]:
    arms: dict[str, Callable[[], list[Technique]]] = {
        "without outliers": lambda: [],
        "OVOR": lambda: [OVOR(start_epoch=epochs - max(1, epochs // 5))],
    }
    matrices: dict[str, list[Tensor]] = {arm: [] for arm in arms}
    energies: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for seed in range(seeds):
        backbone = pretrained_backbone(seed, pretrain_epochs)
        for arm, make in arms.items():
            matrix, arm_energies = run_ovor_arm(make(), seed, backbone, epochs, workdir / f"ovor_{arm}_{seed}")
            matrices[arm].append(matrix)
            energies[arm].append(arm_energies)
            print("ovor", arm, seed, average_accuracy(matrix), arm_energies, flush=True)
    final = {arm: [average_accuracy(m) for m in ms] for arm, ms in matrices.items()}
    check = Check("final average accuracy", "higher")
    judged = verdict(check, final["without outliers"], final["OVOR"])
    lines = [
        "| arm | final average accuracy ↑ | per seed | accuracy after each task (mean over seeds) | "
        "last task: energy of its training samples / of outliers around them |",
        "|---|---|---|---|---|",
    ]
    for arm, values in final.items():
        curve = [statistics.fmean(float(m[i, : i + 1].mean()) for m in matrices[arm]) for i in range(len(matrices[arm][0]))]
        id_energy, outlier_energy = (mean_std([e[i] for e in energies[arm]]) for i in (0, 1))
        lines.append(f"| {arm} | {mean_std(values)} | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{', '.join(f'{v:.3f}' for v in curve)} | {id_energy} / {outlier_energy} |")
    lines += ["", f"Paired difference OVOR − without outliers: {judged.difference:+.4f} (standard error "
              f"{judged.stderr:.4f}). Verdict: **{judged.outcome}** (rule: {check.rule})."]
    return lines


# -- TEEN -----------------------------------------------------------------------------------------
def run_teen_arm(alpha: float, seed: int, epochs: int, workdir: Path) -> Tensor:
    L.seed_everything(seed, verbose=False)
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=32, seed=seed), num_tasks=3,
                                  first_task_classes=6, shots=5)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": HIDDEN},
                                  cosine_head_temperature=16.0)
    runner = TaskSequenceRunner(module, data, [TEEN(alpha=alpha, tau=16.0)], dict(max_epochs=epochs, **QUIET),
                                run_dir=workdir, log=False)
    return runner.run()


def novel_accuracy(matrix: Tensor) -> float:
    """Accuracy on the sessions' (novel) classes after the last session: mean over tasks 1..T-1."""
    return float(matrix[-1, 1:].mean())


def teen_claim(seeds: int, epochs: int, workdir: Path) -> list[str]:
    arms = {"uncalibrated prototypes (alpha = 1)": 1.0, "TEEN (alpha = 0.5, tau = 16)": 0.5}
    matrices: dict[str, list[Tensor]] = {arm: [] for arm in arms}
    for seed in range(seeds):
        for arm, alpha in arms.items():
            matrices[arm].append(run_teen_arm(alpha, seed, epochs, workdir / f"teen_{alpha}_{seed}"))
            print("teen", arm, seed, novel_accuracy(matrices[arm][-1]), flush=True)
    novel = {arm: [novel_accuracy(m) for m in ms] for arm, ms in matrices.items()}
    baseline_arm, teen_arm = arms
    check = Check("novel-class accuracy", "higher")
    judged = verdict(check, novel[baseline_arm], novel[teen_arm])
    lines = [
        "| arm | novel-class accuracy after the last session ↑ | per seed | base-class accuracy after the last session | "
        "accuracy on each session's own classes right after it (sessions 1, 2) | average accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for arm, values in novel.items():
        ms = matrices[arm]
        own = [statistics.fmean(float(m[i, i]) for m in ms) for i in range(1, len(ms[0]))]
        lines.append(f"| {arm} | {mean_std(values)} | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{mean_std([float(m[-1, 0]) for m in ms])} | {', '.join(f'{v:.3f}' for v in own)} | "
                     f"{mean_std([average_accuracy(m) for m in ms])} |")
    lines += ["", f"Paired difference TEEN − uncalibrated: {judged.difference:+.4f} (standard error "
              f"{judged.stderr:.4f}). Verdict: **{judged.outcome}** (rule: {check.rule})."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim", choices=("ovor", "teen"), required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (OVOR: 10) / base session (TEEN: 20)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="OVOR: backbone pretraining epochs")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    with tempfile.TemporaryDirectory() as workdir:
        if args.claim == "ovor":
            epochs = args.epochs or 10
            title = "OVOR (paper 08) on split digits: virtual outliers vs the same run without them"
            setting = (f"Class-incremental, 5 tasks x 2 classes; MLP {HIDDEN} pretrained on half of the training "
                       f"images ({args.pretrain_epochs} epochs, all classes) and frozen; a linear head trained "
                       f"{epochs} epochs per task (Adam 1e-3, batch 32) with past-task logits masked; OVOR with the "
                       f"official defaults on the last {max(1, epochs // 5)} epochs of every task. "
                       "Final average accuracy = mean over tasks of the accuracy after the last task, among all classes.")
            lines = ovor_claim(args.seeds, epochs, args.pretrain_epochs, Path(workdir))
        else:
            epochs = args.epochs or 20
            title = "TEEN (paper 47) on few-shot digits sessions: calibrated vs uncalibrated prototypes"
            setting = (f"Base session of 6 classes ({epochs} epochs, MLP {HIDDEN}, cosine classifier with temperature "
                       "16, Adam 1e-3, batch 32), then 2 training-free sessions of 2 ways x 5 shots. Novel-class "
                       "accuracy = mean over the two sessions' test sets of the accuracy after the last session, "
                       "among all 10 classes.")
            lines = teen_claim(args.seeds, epochs, Path(workdir))
    text = "\n".join([f"# {title}", "", f"Produced by: `{command}`", "",
                      f"{setting} Seeds 0..{args.seeds - 1} (data split, class order, shots, initialisation).", "",
                      *lines]) + "\n"
    print(text)
    (Path(args.out) / f"{args.claim}.md").write_text(text)


if __name__ == "__main__":
    main()
