"""PEFT claims on the embedded scenario: pretrain on digits 0-4, fine-tune on digits 5-9.

For each backbone (tiny ViT, small CNN) and seed: pretrain on the source classes, then fine-tune
a copy with each method on the target classes and measure

* target accuracy (test split of classes 5-9, argmax over all 10 logits),
* retention: source test accuracy (classes 0-4) with the prediction restricted to the source
  classes' logits (the task is known at test time, as in task-incremental evaluation),
* trainable parameters, mean training-step time, and peak GPU memory (``-`` on CPU).

Writes ``docs/results/peft_claims.md`` with the command that produced it. Run:

    python benchmarks/peft_claims.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.peft import BitFit, FullFineTuning, LinearProbe, LoLDU, LoRA, LoRASB, SVFit  # noqa: E402
from datamodules import ClassSplitDataModule, DigitsDataModule  # noqa: E402
from lightning_app.tasks import ClassificationModule  # noqa: E402

SOURCE, TARGET = 0, 1
METHODS = {
    "full fine-tuning": lambda ckpt: FullFineTuning(pretrained_checkpoint=ckpt),
    "linear probe": lambda ckpt: LinearProbe(pretrained_checkpoint=ckpt),
    "BitFit": lambda ckpt: BitFit(pretrained_checkpoint=ckpt),
    "LoRA r=4": lambda ckpt: LoRA(r=4, lora_alpha=8.0, pretrained_checkpoint=ckpt),
    "SVFit (all σ)": lambda ckpt: SVFit(pretrained_checkpoint=ckpt),
    "LoLDU (full diag)": lambda ckpt: LoLDU(pretrained_checkpoint=ckpt),
    "LoRA-SB r=4": lambda ckpt: LoRASB(rank=4, pretrained_checkpoint=ckpt),
}
#: kept small so that 3 seeds of every method run in minutes on 2 CPU cores
BACKBONES = {"vit": {"depth": 2}, "cnn": {}}
FINETUNE_LR = 3e-3


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
def accuracy(module: ClassificationModule, datamodule: ClassSplitDataModule, classes: list[int] | None) -> float:
    module.eval()
    correct = total = 0
    for batch in datamodule.test_dataloader():
        logits = module(batch["input"].to(module.device))
        if classes is not None:
            logits = logits[:, classes]
            prediction = torch.tensor(classes, device=logits.device)[logits.argmax(-1)]
        else:
            prediction = logits.argmax(-1)
        correct += (prediction.cpu() == batch["target"]).sum().item()
        total += len(batch["target"])
    return correct / total


def run(backbone: str, seed: int, pretrain_epochs: int, finetune_epochs: int, workdir: Path) -> dict[str, dict]:
    L.seed_everything(seed, verbose=False)
    source = data(SOURCE, seed)
    model = ClassificationModule(backbone, num_classes=10, input_shape=(1, 8, 8), backbone_kwargs=BACKBONES[backbone])
    pretrainer = trainer(pretrain_epochs, [])
    pretrainer.fit(model, datamodule=source)
    checkpoint = str(workdir / f"{backbone}_{seed}.ckpt")
    pretrainer.save_checkpoint(checkpoint)
    source_classes = source.tasks[SOURCE]
    rows = {"pretrained": {"target": 0.0, "retention": accuracy(model, source, source_classes)}}
    for name, make in METHODS.items():
        L.seed_everything(seed, verbose=False)
        module = ClassificationModule(backbone, num_classes=10, input_shape=(1, 8, 8),
                                      backbone_kwargs=BACKBONES[backbone], lr=FINETUNE_LR)
        technique, timer = make(checkpoint), StepTimer()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        target = data(TARGET, seed)
        trainer(finetune_epochs, [technique, timer]).fit(module, datamodule=target)
        rows[name] = {
            "target": accuracy(module, target, None),
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


def report(results: dict[str, list[dict]], command: str, seeds: int) -> str:
    lines = [
        "# PEFT on the embedded scenario (digits 0-4 → 5-9)",
        "",
        f"Produced by: `{command}`",
        "",
        "Pretrain on classes 0-4 (Adam, lr 1e-3), fine-tune on 5-9 (Adam, lr 3e-3, every method). Target: test accuracy on 5-9 (argmax over all 10 "
        "classes). Retention: test accuracy on 0-4 with the prediction restricted to classes 0-4. "
        f"Mean ± std over {seeds} seeds; step time is the median training step (2 CPU cores unless a GPU "
        "was used); peak memory is the GPU's (`-` on CPU). The claim column: within 2 points of LoRA's "
        "mean target accuracy with fewer trainable parameters.",
    ]
    for backbone, per_seed in results.items():
        lora = statistics.fmean(r["LoRA r=4"]["target"] for r in per_seed)
        lines += ["", f"## {backbone}", "",
                  "| method | target acc | retention | trainable / total params | step ms | peak MB | within 2 pts of LoRA, fewer params |",
                  "|---|---|---|---|---|---|---|"]
        base = [r["pretrained"]["retention"] for r in per_seed]
        lines.append(f"| pretrained (before fine-tuning) | — | {mean_std(base)} | — | — | — | — |")
        for name in METHODS:
            rows = [r[name] for r in per_seed]
            target = [r["target"] for r in rows]
            fewer = rows[0]["trainable"] < per_seed[0]["LoRA r=4"]["trainable"]
            verdict = ("yes" if lora - statistics.fmean(target) <= 0.02 and fewer else "no") if name in (
                "SVFit (all σ)", "LoLDU (full diag)", "LoRA-SB r=4") else ""
            peak = "-" if rows[0]["peak_mb"] is None else f"{statistics.fmean(r['peak_mb'] for r in rows):.0f}"
            lines.append(
                f"| {name} | {mean_std(target)} | {mean_std([r['retention'] for r in rows])} | "
                f"{rows[0]['trainable']:,} / {rows[0]['total']:,} | {statistics.fmean(r['step_ms'] for r in rows):.1f} | "
                f"{peak} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain_epochs", type=int, default=12)
    parser.add_argument("--finetune_epochs", type=int, default=6)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--out", default="docs/results/peft_claims.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: extra threads only contend
    command = "python benchmarks/peft_claims.py " + " ".join(sys.argv[1:])
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="reglab-peft-") as workdir:
        for backbone in args.backbones:
            results[backbone] = [run(backbone, seed, args.pretrain_epochs, args.finetune_epochs, Path(workdir))
                                 for seed in range(args.seeds)]
    Path(args.out).write_text(report(results, command, args.seeds))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
