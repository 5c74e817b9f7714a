"""Overhead benchmark: what every technique costs per training step, and how our EMA compares.

``reglab bench overhead`` measures, in one process:

1. **Every technique exported by** ``callbacks`` (discovered from ``reglab.callbacks.__all__``, each
   built by its entry in ``tests/harness.py``'s ``HARNESS``, the registry of small-run settings
   every technique already has): the median time of a training step (``on_train_batch_start`` to
   ``on_train_batch_end``: forward, the technique's stages, backward, optimizer step and the
   technique's post-step hooks), with the harness's model and data, against the same run without
   a technique. On CPU the time is this process's CPU time, with one torch thread: the cores are
   shared with other jobs, and wall time then measures the scheduler more than the technique.
   On CUDA it is wall time between device synchronisations. The runs of all techniques are interleaved, repeat after repeat, so that a change
   in machine load hits every technique alike; a technique's figure is the median over repeats of
   its per-run median. Memory: on CUDA the peak allocated memory of the run
   (``torch.cuda.max_memory_allocated``); on CPU there is no allocator statistic for torch
   tensors (``tracemalloc`` does not see them), so the table reports the memory the technique
   keeps between steps instead: the bytes of the tensors in its ``state_dict()``.
2. **EMA update and swap cost on the same model**, per call: ``reglab.averaging``'s
   ``WeightAverage`` (foreach lerp; pointer swap, or copying swap for bf16 weights), timm's
   ``ModelEmaV3`` (foreach lerp over the state dict) and Lightning's ``EMAWeightAveraging``
   (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_avg_fn``, a per-tensor loop, and a
   swap that clones every tensor).

Results go to ``<out>`` (``docs/results/overhead.md``) with the command that produced them.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import reglab.callbacks
from reglab.averaging import WeightAverage, ema_decay

BASELINE = "(no technique)"


class StepTimer(L.Callback):
    """Wall time of every training step after the first ``skip`` (put it last in the callbacks,
    so that the techniques' ``on_train_batch_end`` work is inside the measured interval)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = _now(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = _now(pl_module.device) - self._start
        if trainer.global_step > self.skip:
            self.seconds.append(elapsed)


def _now(device: torch.device) -> float:
    """Seconds on the benchmark's clock: wall time after a device sync on CUDA, this process's
    CPU time on CPU (robust to other jobs on shared cores)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def load_harness() -> Any:
    """``tests/harness.py`` of this checkout (the bench builds techniques the way the tests do)."""
    tests_dir = Path(__file__).resolve().parents[2] / "tests"
    if not (tests_dir / "harness.py").is_file():
        raise SystemExit(
            "reglab bench overhead builds every technique from tests/harness.py (HARNESS); "
            "run it from a source checkout of reglab"
        )
    sys.path.insert(0, str(tests_dir))
    import harness

    return harness


def time_step(harness: Any, name: str, steps: int, warmup: int, accelerator: str) -> dict[str, float]:
    """One fit of ``warmup + steps`` steps with technique ``name`` (or none): median step seconds,
    the technique's state bytes and, on CUDA, the peak allocated bytes."""
    techniques = [] if name == BASELINE else [harness.HARNESS[name].make()]
    timer = StepTimer(skip=warmup)
    trainer = harness.quiet_trainer(
        max_steps=warmup + steps, limit_val_batches=0, accelerator=accelerator, callbacks=[*techniques, timer]
    )
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(harness.small_module(), datamodule=harness.noisy_digits())
    state = techniques[0].state_dict() if techniques else {}
    return {
        "seconds": statistics.median(timer.seconds),
        "state_bytes": sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)),
        "peak_bytes": torch.cuda.max_memory_allocated() if accelerator == "gpu" else float("nan"),
    }


def technique_overheads(
    names: list[str], repeats: int, steps: int, warmup: int, accelerator: str
) -> dict[str, dict[str, Any]]:
    harness = load_harness()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [BASELINE, *names]}
    failures: dict[str, str] = {}
    order = list(runs)
    for repeat in range(repeats):
        # rotated so that no technique always runs first after the previous repeat's fits, and
        # collected so that garbage left by earlier trainers is not paid inside a timed step
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            if name in failures:
                continue
            gc.collect()
            try:
                runs[name].append(time_step(harness, name, steps, warmup, accelerator))
                print(f"[overhead] repeat {repeat} {name}: {runs[name][-1]['seconds'] * 1e3:.2f} ms", flush=True)
            except Exception as error:  # one broken technique must not hide the others' figures
                failures[name] = f"{type(error).__name__}: {error}"
                print(f"[overhead] {name} failed: {failures[name]}", flush=True)
    results = {}
    for name, measured in runs.items():
        if name in failures:
            results[name] = {"failed": failures[name]}
            continue
        results[name] = {
            "seconds": statistics.median(m["seconds"] for m in measured),
            "spread": (min(m["seconds"] for m in measured), max(m["seconds"] for m in measured)),
            "state_bytes": measured[-1]["state_bytes"],
            "peak_bytes": statistics.median(m["peak_bytes"] for m in measured),
        }
    return results


class _Wrapped(L.LightningModule):
    """A LightningModule around a network, as Lightning's EMAWeightAveraging needs one."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _median_call_seconds(call: Callable[[int], None], calls: int, device: torch.device) -> float:
    for t in range(5):
        call(t)
    seconds = []
    for t in range(5, 5 + calls):
        start = _now(device)
        call(t)
        seconds.append(_now(device) - start)
    return statistics.median(seconds)


def ema_comparison(net: nn.Module, calls: int, device: torch.device) -> list[tuple[str, str, float]]:
    """(operation, implementation, median seconds per call) on ``net``; decay 0.999 with warm-up."""
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from timm.utils import ModelEmaV3

    module = _Wrapped(net).to(device)
    ours = WeightAverage(module)
    timm_ema = ModelEmaV3(module, decay=0.999, use_warmup=True)
    lightning_ema = EMAWeightAveraging(decay=0.999)
    lightning_ema.setup(None, module, "fit")  # builds its AveragedModel, as at the start of fit
    bf16_module = copy.deepcopy(module).to(torch.bfloat16)
    ours_bf16 = WeightAverage(bf16_module)

    def swap_in_out(average: WeightAverage) -> Callable[[int], None]:
        def call(t: int) -> None:
            average.swap_in()
            average.swap_out()
        return call

    def lightning_swap(t: int) -> None:
        lightning_ema._swap_models(module)  # what its on_validation_epoch_start/_end do
        lightning_ema._swap_models(module)

    rows = [
        ("EMA update", "reglab WeightAverage.lerp_", lambda t: ours.lerp_(1.0 - ema_decay(t, 0.999, True))),
        ("EMA update", "timm ModelEmaV3.update", lambda t: timm_ema.update(module, step=t)),
        ("EMA update", "Lightning EMAWeightAveraging (AveragedModel.update_parameters)",
         lambda t: lightning_ema._average_model.update_parameters(module)),
        ("swap in + out", "reglab, pointer swap (fp32 weights)", swap_in_out(ours)),
        ("swap in + out", "reglab, copying swap (bf16 weights)", swap_in_out(ours_bf16)),
        ("swap in + out", "Lightning EMAWeightAveraging._swap_models x2", lightning_swap),
    ]
    with torch.no_grad():
        return [(op, impl, _median_call_seconds(call, calls, device)) for op, impl, call in rows]


def comparison_models() -> dict[str, nn.Module]:
    import timm

    from reglab.models import create_backbone

    torch.manual_seed(0)
    return {
        "SmallCNN (digits, 57k params)": nn.Sequential(create_backbone("cnn", (1, 8, 8)), nn.Linear(64, 10)),
        "timm resnet18 (11.7M params)": timm.create_model("resnet18", num_classes=10),
    }


def write_report(
    overheads: dict[str, dict[str, Any]], comparisons: dict[str, list[tuple[str, str, float]]],
    settings: dict[str, Any], out: Path, command: str,
) -> None:
    baseline = overheads[BASELINE]["seconds"]
    on_gpu = settings["accelerator"] == "gpu"
    lines = [
        "# Overhead of every technique",
        "",
        f"Produced by: `{command}`",
        "",
        f"Machine: {settings['machine']}. {settings['note']}",
        "",
        "## Training step, with and without each technique",
        "",
        f"Harness model and data (`tests/harness.py`: MLP 64-32-10 on flat digits, batch 256), "
        f"{settings['steps']} timed steps after {settings['warmup']} warm-up steps per run, "
        f"{settings['repeats']} interleaved repeats; a step is forward, the technique's stages, "
        "backward, optimizer step and post-step hooks. The ratio divides the median step time by "
        "the median without a technique. This model is tiny, so the ratios show each technique's "
        "fixed per-step cost (Python, extra passes, copies) more than its arithmetic.",
        "",
        "| technique | step ms (median) | min–max over repeats | ratio | "
        + ("peak CUDA MB | ratio |" if on_gpu else "state kept between steps |"),
        "|---|---|---|---|" + ("---|---|" if on_gpu else "---|"),
    ]
    for name, result in overheads.items():
        if "failed" in result:
            lines.append(f"| {name} | failed: {result['failed'][:80]} | | | |")
            continue
        low, high = result["spread"]
        memory = (
            f"{result['peak_bytes'] / 2**20:.1f} | {result['peak_bytes'] / overheads[BASELINE]['peak_bytes']:.2f}x |"
            if on_gpu else f"{result['state_bytes'] / 2**10:.1f} KiB |"
        )
        lines.append(
            f"| {name} | {result['seconds'] * 1e3:.2f} | {low * 1e3:.2f}–{high * 1e3:.2f} | "
            f"{result['seconds'] / baseline:.2f}x | {memory}"
        )
    lines += [
        "",
        "## EMA: update and swap cost per call, same model",
        "",
        f"Median of {settings['calls']} calls after 5 warm-up calls, under `torch.no_grad()`. "
        "Lightning's `EMAWeightAveraging` is timed through the objects its `setup` builds (the "
        "`AveragedModel` it updates after every step, and `_swap_models`, which it calls at the "
        "start and end of every validation).",
        "",
        "| model | operation | implementation | ms per call |",
        "|---|---|---|---|",
    ]
    for model_name, rows in comparisons.items():
        for operation, implementation, seconds in rows:
            lines.append(f"| {model_name} | {operation} | {implementation} | {seconds * 1e3:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def run_overhead(
    only: list[str] | None, repeats: int, steps: int, warmup: int, calls: int, accelerator: str, out: Path, command: str
) -> None:
    names = only or sorted(reglab.callbacks.__all__)
    unknown = set(names) - set(reglab.callbacks.__all__)
    if unknown:
        raise SystemExit(f"unknown technique(s) {sorted(unknown)}; callbacks exports {sorted(reglab.callbacks.__all__)}")
    if accelerator == "cpu":
        torch.set_num_threads(1)  # CPU time then counts work, not threads spinning on a busy machine
    overheads = technique_overheads(names, repeats, steps, warmup, accelerator)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    comparisons = {name: ema_comparison(net, calls, device) for name, net in comparison_models().items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        torch.cuda.get_device_name() if accelerator == "gpu"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s))"
    )
    note = (
        "CPU figures are what this project has without a GPU. Times are this process's CPU time "
        f"with one torch thread, because other jobs shared the cores (1-minute load average {load:.1f} "
        "when the run ended); read ratios rather than absolute times."
        if accelerator != "gpu" else "Times are wall time between CUDA synchronisations."
    )
    settings = dict(
        repeats=repeats, steps=steps, warmup=warmup, calls=calls, accelerator=accelerator, machine=machine, note=note
    )
    write_report(overheads, comparisons, settings, out, command)
    print(f"[overhead] -> {out}", flush=True)
