"""PEFT claims on the embedded scenario: pretrain on digits 0-4, fine-tune on digits 5-9.

For each backbone (tiny ViT, small CNN) and seed: pretrain on the source classes, then fine-tune
a copy with each method on the target classes and measure

* target accuracy (test split of classes 5-9, argmax over all 10 logits),
* retention: source test accuracy (classes 0-4) with the prediction restricted to the source
  classes' logits (the task is known at test time, as in task-incremental evaluation),
* unseen domain: target test accuracy with the images rotated by ``UNSEEN_ANGLE`` degrees (a
  domain no run trains on; the claims of PEGO and SoMA are about it),
* trainable parameters, mean training-step time, and peak GPU memory (``-`` on CPU).

Each method is a :class:`Method`: how to build its technique from the pretrained checkpoint and
the fine-tuning learning rate its paper (or official code) uses, so methods are compared at their
own settings rather than one shared rate.

Writes ``docs/results/peft_claims.md`` with the command that produced it. Run:

    python benchmarks/peft_claims.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.peft import BitFit, FullFineTuning, LinearProbe, LoLDU, LoRA, LoRASB, SVFit  # noqa: E402
from datamodules import ClassSplitDataModule, DigitsDataModule  # noqa: E402
from datamodules.domains import rotate_images  # noqa: E402
from lightning_app.tasks import ClassificationModule  # noqa: E402
from lightning_app.technique import Technique  # noqa: E402

SOURCE, TARGET = 0, 1
#: the default fine-tuning learning rate (Adam) for methods whose papers give none for this setting
FINETUNE_LR = 3e-3
#: rotation (degrees) of the unseen test domain
UNSEEN_ANGLE = 30.0


@dataclass(frozen=True)
class Method:
    """One fine-tuning arm: ``make(pretrained_checkpoint)`` builds its technique; ``lr`` is its
    fine-tuning learning rate; ``source`` says where that rate comes from."""

    make: Callable[[str], Technique]
    lr: float = FINETUNE_LR
    source: str = "shared default"


METHODS: dict[str, Method] = {
    "full fine-tuning": Method(lambda ckpt: FullFineTuning(pretrained_checkpoint=ckpt)),
    "linear probe": Method(lambda ckpt: LinearProbe(pretrained_checkpoint=ckpt)),
    "BitFit": Method(lambda ckpt: BitFit(pretrained_checkpoint=ckpt)),
    "LoRA r=4": Method(lambda ckpt: LoRA(r=4, lora_alpha=8.0, pretrained_checkpoint=ckpt)),
    "SVFit (all σ)": Method(lambda ckpt: SVFit(pretrained_checkpoint=ckpt)),
    "LoLDU (full diag)": Method(lambda ckpt: LoLDU(pretrained_checkpoint=ckpt)),
    "LoRA-SB r=4": Method(lambda ckpt: LoRASB(rank=4, pretrained_checkpoint=ckpt)),
}
#: kept small so that 3 seeds of every method run in minutes on 2 CPU cores
BACKBONES = {"vit": {"depth": 2}, "cnn": {}}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def data(task: int, seed: int) -> ClassSplitDataModule:
    return ClassSplitDataModule(DigitsDataModule(batch_size=64, seed=seed), task=task)


def trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks)


@torch.no_grad()
def accuracy(module: ClassificationModule, datamodule: ClassSplitDataModule, classes: list[int] | None,
             angle: float = 0.0) -> float:
    module.eval()
    correct = total = 0
    for batch in datamodule.test_dataloader():
        logits = module(rotate_images(batch["input"], angle).to(module.device))
        if classes is not None:
            logits = logits[:, classes]
            prediction = torch.tensor(classes, device=logits.device)[logits.argmax(-1)]
        else:
            prediction = logits.argmax(-1)
        correct += (prediction.cpu() == batch["target"]).sum().item()
        total += len(batch["target"])
    return correct / total


def run(backbone: str, seed: int, pretrain_epochs: int, finetune_epochs: int, workdir: Path,
        methods: list[str]) -> dict[str, dict]:
    L.seed_everything(seed, verbose=False)
    source = data(SOURCE, seed)
    model = ClassificationModule(backbone, num_classes=10, input_shape=(1, 8, 8), backbone_kwargs=BACKBONES[backbone])
    pretrainer = trainer(pretrain_epochs, [])
    pretrainer.fit(model, datamodule=source)
    checkpoint = str(workdir / f"{backbone}_{seed}.ckpt")
    pretrainer.save_checkpoint(checkpoint)
    source_classes = source.tasks[SOURCE]
    rows = {"pretrained": {"target": 0.0, "retention": accuracy(model, source, source_classes)}}
    for name in methods:
        method = METHODS[name]
        L.seed_everything(seed, verbose=False)
        module = ClassificationModule(backbone, num_classes=10, input_shape=(1, 8, 8),
                                      backbone_kwargs=BACKBONES[backbone], lr=method.lr)
        technique, timer = method.make(checkpoint), StepTimer()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        target = data(TARGET, seed)
        trainer(finetune_epochs, [technique, timer]).fit(module, datamodule=target)
        rows[name] = {
            "target": accuracy(module, target, None),
            "unseen": accuracy(module, target, None, UNSEEN_ANGLE),
            "retention": accuracy(module, source, source_classes),
            "trainable": technique.parameter_counts["trainable"],
            "total": technique.parameter_counts["total"],
            "step_ms": 1000 * statistics.median(timer.times),
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }
        print(f"[{backbone} seed {seed}] {name}: {rows[name]}", flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def metric(per_seed: list[dict], method: str, key: str) -> list[float]:
    return [rows[method][key] for rows in per_seed]


def within_points_with_fewer_params(method: str, reference: str, points: float) -> Callable[[list[dict]], bool]:
    """Mean target accuracy at most ``points`` below ``reference``'s, with fewer trainable parameters."""
    def holds(per_seed: list[dict]) -> bool:
        gap = statistics.fmean(metric(per_seed, reference, "target")) - statistics.fmean(metric(per_seed, method, "target"))
        return gap <= points and per_seed[0][method]["trainable"] < per_seed[0][reference]["trainable"]
    return holds


def paired_better(method: str, reference: str, key: str) -> Callable[[list[dict]], bool]:
    """The effect benchmark's rule: mean paired difference (same seed) above two standard errors."""
    def holds(per_seed: list[dict]) -> bool:
        diffs = [a - b for a, b in zip(metric(per_seed, method, key), metric(per_seed, reference, key))]
        stderr = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
        return statistics.fmean(diffs) > 2 * stderr
    return holds


def mean_at_least(method: str, reference: str, key: str) -> Callable[[list[dict]], bool]:
    def holds(per_seed: list[dict]) -> bool:
        return statistics.fmean(metric(per_seed, method, key)) >= statistics.fmean(metric(per_seed, reference, key))
    return holds


@dataclass(frozen=True)
class Claim:
    text: str
    holds: Callable[[list[dict]], bool]
    #: the methods the claim compares; it is judged only in runs that include all of them
    methods: tuple[str, ...]


#: the issue's claims on this scenario, each judged per backbone
CLAIMS = [
    Claim(f"{name} within 2 points of LoRA's target accuracy with fewer trainable parameters",
          within_points_with_fewer_params(name, "LoRA r=4", 0.02), (name, "LoRA r=4"))
    for name in ("SVFit (all σ)", "LoLDU (full diag)", "LoRA-SB r=4")
]


def report(results: dict[str, list[dict]], command: str, seeds: int, methods: list[str]) -> str:
    lines = [
        "# PEFT on the embedded scenario (digits 0-4 → 5-9)",
        "",
        f"Produced by: `{command}`",
        "",
        "Pretrain on classes 0-4 (Adam, lr 1e-3), fine-tune on 5-9 (Adam, each method at the lr in its row). "
        "Target: test accuracy on 5-9 (argmax over all 10 classes). "
        f"Unseen {UNSEEN_ANGLE:g}°: the same test images rotated by {UNSEEN_ANGLE:g}°, a domain no run trains on. "
        "Retention: test accuracy on 0-4 with the prediction restricted to classes 0-4. "
        f"Mean ± std over {seeds} seeds; step time is the median training step (2 CPU cores unless a GPU "
        "was used); peak memory is the GPU's (`-` on CPU).",
    ]
    for backbone, per_seed in results.items():
        lines += ["", f"## {backbone}", "",
                  f"| method | lr (source) | target acc | unseen {UNSEEN_ANGLE:g}° | retention | trainable / total params | step ms | peak MB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines.append(f"| pretrained (before fine-tuning) | — | — | — | {mean_std(metric(per_seed, 'pretrained', 'retention'))} | — | — | — |")
        for name in methods:
            method, rows = METHODS[name], [r[name] for r in per_seed]
            peak = "-" if rows[0]["peak_mb"] is None else f"{statistics.fmean(r['peak_mb'] for r in rows):.0f}"
            lines.append(
                f"| {name} | {method.lr:g} ({method.source}) | {mean_std(metric(per_seed, name, 'target'))} | "
                f"{mean_std(metric(per_seed, name, 'unseen'))} | {mean_std(metric(per_seed, name, 'retention'))} | "
                f"{rows[0]['trainable']:,} / {rows[0]['total']:,} | {statistics.fmean(r['step_ms'] for r in rows):.1f} | "
                f"{peak} |"
            )
        lines += ["", "| claim | verdict |", "|---|---|"]
        lines += [f"| {claim.text} | {'claim shown' if claim.holds(per_seed) else 'claim not reproduced'} |"
                  for claim in CLAIMS if set(claim.methods) <= set(methods)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain_epochs", type=int, default=12)
    parser.add_argument("--finetune_epochs", type=int, default=6)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="the arms to run (default: all); a claim is judged when all its methods ran")
    parser.add_argument("--out", default="docs/results/peft_claims.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: extra threads only contend
    command = "python benchmarks/peft_claims.py " + " ".join(sys.argv[1:])
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="reglab-peft-") as workdir:
        for backbone in args.backbones:
            results[backbone] = [run(backbone, seed, args.pretrain_epochs, args.finetune_epochs, Path(workdir), args.methods)
                                 for seed in range(args.seeds)]
    Path(args.out).write_text(report(results, command, args.seeds, args.methods))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
