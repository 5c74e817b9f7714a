"""Overhead benchmark: what every technique costs per training step, and how our EMA compares.

``reglab bench overhead`` measures, in one process:

1. **The step contract's own cost**: a plain LightningModule ``training_step`` against
   ``RegularizedMixin`` with no technique, on the same network, data, loss and logging.
2. **Every technique** (each built technique of the registry, built from its card's harness
   example): the median time of a training step (``on_train_batch_start`` to
   ``on_train_batch_end``: forward, the technique's stages, backward, optimizer step and the
   technique's post-step hooks) against the same run without a technique, on a realistic model
   (timm resnet18 on 3x32x32 images, batch 64) and on the harness's tiny model. On CPU the time is this process's CPU time, with one torch thread: the cores are
   shared with other jobs, and wall time then measures the scheduler more than the technique.
   On CUDA it is wall time between device synchronisations. The runs of all techniques are interleaved, repeat after repeat, so that a change
   in machine load hits every technique alike; a technique's figure is the median over repeats of
   its per-run median. Memory: on CUDA the peak allocated memory of the run
   (``torch.cuda.max_memory_allocated``); on CPU there is no allocator statistic for torch
   tensors (``tracemalloc`` does not see them), so the table reports the memory the technique
   keeps between steps instead: the bytes of the tensors in its ``state_dict()``.
3. **EMA update and swap cost on the same model**, per call: ``reglab.averaging``'s
   ``WeightAverage`` (foreach lerp; pointer swap, or copying swap for bf16 weights), timm's
   ``ModelEmaV3`` (foreach lerp over the state dict) and Lightning's ``EMAWeightAveraging``
   (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_avg_fn``, a per-tensor loop, and a
   swap that clones every tensor).

Results go to ``<out>`` (``docs/results/overhead.md``) with the command that produced them.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.averaging import WeightAverage, ema_decay
from reglab.datamodules import DigitsDataModule, LabelNoise
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.registry import built_technique_names, card, example_data, example_module, example_technique, example_trainer
from reglab.tasks import ClassificationModule
from reglab.technique import Technique

BASELINE = "(no technique)"


class StepTimer(L.Callback):
    """Time of every training step after the first ``skip`` (put it last in the callbacks, so
    that the techniques' ``on_train_batch_end`` work is inside the measured interval)."""

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


class DigitsImages(DigitsDataModule):
    """The digits, upsampled to ``size`` x ``size`` and repeated to 3 channels: real images at the
    shape a CIFAR-sized network takes, without a download."""

    def __init__(self, size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.input_shape = (3, size, size)

    def _load_splits(self) -> dict[str, Any]:
        self.input_shape = (1, 8, 8)  # the digits as the base class loads them
        splits = super()._load_splits()
        self.input_shape = (3, self.size, self.size)
        resize = lambda x: F.interpolate(x, size=(self.size, self.size), mode="bilinear").repeat(1, 3, 1, 1)
        return {name: (resize(inputs), targets, *rest) for name, (inputs, targets, *rest) in splits.items()}


@dataclass(frozen=True)
class Setting:
    """A model (built by ``task_module(seed)``) and the data its steps are timed on."""

    label: str
    tag: str
    task_module: Callable[[int], L.LightningModule]
    data: Callable[[], L.LightningDataModule]


def realistic_module(seed: int = 0) -> ClassificationModule:
    """timm's resnet18 as a ``ClassificationModule`` for 3x32x32 digits, seeded like the harness's."""
    L.seed_everything(seed, verbose=False)
    return ClassificationModule("timm:resnet18", num_classes=10, input_shape=(3, 32, 32), lr=1e-2)


SETTINGS = {
    # the harness's model and data: tiny, so ratios show each technique's fixed per-step cost
    "harness": Setting("harness MLP 64-32-10 on flat digits with 40% label noise, batch 256", "mlp",
                       example_module, example_data),
    # a realistic reference: the arithmetic of a real network dominates, as in a user's run
    "realistic": Setting("timm resnet18 (11.2M params) on digits upsampled to 3x32x32 with 40% label noise, batch 64",
                         "resnet18", realistic_module,
                         lambda: DigitsImages(size=32, batch_size=64, label_noise=LabelNoise(rate=0.4))),
}


class PlainClassifier(L.LightningModule):
    """The same network and loss as the task module, with a hand-written ``training_step``: what a
    user's own LightningModule costs, without reglab's step contract."""

    def __init__(self, network: ClassificationModule) -> None:
        super().__init__()
        self.backbone, self.head = network.backbone, network.head

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.head(self.backbone(batch["input"])), batch["target"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ContractClassifier(RegularizedMixin, PlainClassifier):
    """:class:`PlainClassifier` under reglab's step contract (``RegularizedMixin``, no technique)."""

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        features = self.backbone(batch["input"])
        return StepOutput(logits=self.head(features), target=batch["target"], features=features,
                          index=batch.get("index"), batch=batch)


def timed_fit(module: L.LightningModule, data: L.LightningDataModule, techniques: list[Technique],
              steps: int, warmup: int, accelerator: str) -> dict[str, float]:
    """One fit of ``warmup + steps`` steps: median step seconds, the techniques' state bytes and, on
    CUDA, the peak allocated bytes."""
    timer = StepTimer(skip=warmup)
    trainer = example_trainer(max_steps=warmup + steps, limit_val_batches=0, accelerator=accelerator,
                              callbacks=[*techniques, timer])
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    state = [v for t in techniques for v in t.state_dict().values() if isinstance(v, Tensor)]
    return {
        "seconds": statistics.median(timer.seconds),
        "state_bytes": sum(v.numel() * v.element_size() for v in state),
        "peak_bytes": torch.cuda.max_memory_allocated() if accelerator == "gpu" else float("nan"),
    }


def interleaved(arms: dict[str, Callable[[], dict[str, float]]], repeats: int, tag: str) -> dict[str, dict[str, Any]]:
    """Run every arm ``repeats`` times, interleaved, and keep the median of each measure; an arm
    that fails is reported with its error instead of hiding the others' figures."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    failures: dict[str, str] = {}
    order = list(arms)
    for repeat in range(repeats):
        # rotated so that no arm always runs first after the previous repeat's fits, and
        # collected so that garbage left by earlier trainers is not paid inside a timed step
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            if name in failures:
                continue
            gc.collect()
            try:
                runs[name].append(arms[name]())
                print(f"[overhead:{tag}] repeat {repeat} {name}: {runs[name][-1]['seconds'] * 1e3:.2f} ms", flush=True)
            except Exception as error:  # noqa: BLE001 — reported in the table
                failures[name] = f"{type(error).__name__}: {error}"
                print(f"[overhead:{tag}] {name} failed: {failures[name]}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name, measured in runs.items():
        if name in failures:
            results[name] = {"failed": failures[name]}
            continue
        seconds = [m["seconds"] for m in measured]
        results[name] = {
            "seconds": statistics.median(seconds), "spread": (min(seconds), max(seconds)),
            "state_bytes": measured[-1]["state_bytes"],
            "peak_bytes": statistics.median(m["peak_bytes"] for m in measured),
        }
    return results


def harness_case(name: str) -> tuple[str | None, dict[str, Any] | None]:
    """The data and backbone kwargs a technique's harness case names (``None``: the defaults)."""
    spec = card(name).harness
    return spec.get("data"), spec.get("backbone_kwargs") or None


def technique_overheads(setting: Setting, names: list[str], repeats: int, steps: int, warmup: int,
                        accelerator: str, per_case: bool = False) -> dict[str, dict[str, Any]]:
    """The task module with each technique (built from its card's harness example) and without.

    With ``per_case`` (the harness setting), a technique whose harness case names its own data
    (``domains``: batches with ``domain``) or backbone kwargs (batch norms for test-time
    adaptation) runs on them, and its ratio is to the task module on the same ones (an extra
    reference arm, its ``reference``). Another setting has no such data, so a technique that
    names its data is reported there, not run."""

    def arm(name: str | None, module: Callable[[int], L.LightningModule],
            data: Callable[[], L.LightningDataModule]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            # a previous model / teacher of the same architecture where the technique needs one
            techniques = [] if name is None else [example_technique(name, module)]
            return timed_fit(module(0), data(), techniques, steps, warmup, accelerator)
        return run

    arms, references, unrun = {BASELINE: arm(None, setting.task_module, setting.data)}, {}, {}
    for name in names:
        data, backbone_kwargs = harness_case(name)
        if data is None and (backbone_kwargs is None or not per_case):
            # backbone kwargs shape the harness MLP only; another setting's model is its own
            arms[name] = arm(name, setting.task_module, setting.data)
        elif not per_case:
            unrun[name] = {"failed": f"needs its harness case's data ({data}): timed on the harness model only"}
        else:
            reference = f"{BASELINE[:-1]}, " + ", ".join(
                ([f"data {data}"] if data else []) + [f"{k} {v}" for k, v in (backbone_kwargs or {}).items()]) + ")"
            module = functools.partial(example_module, backbone_kwargs=backbone_kwargs, data=data)
            make_data = functools.partial(example_data, data=data)
            arms.setdefault(reference, arm(None, module, make_data))
            arms[name], references[name] = arm(name, module, make_data), reference
    results = interleaved(arms, repeats, setting.tag)
    for name, reference in references.items():
        results[name]["reference"] = reference
    for reference in {BASELINE, *references.values()}:
        results[reference]["is_reference"] = True
    return {**results, **unrun}


def contract_cost(setting: Setting, repeats: int, steps: int, warmup: int, accelerator: str) -> dict[str, dict[str, Any]]:
    """A plain LightningModule ``training_step`` against ``RegularizedMixin`` without a technique."""

    def arm(kind: type[L.LightningModule]) -> Callable[[], dict[str, float]]:
        return lambda: timed_fit(kind(setting.task_module(0)), setting.data(), [], steps, warmup, accelerator)

    return interleaved({"plain training_step": arm(PlainClassifier), "RegularizedMixin, no technique": arm(ContractClassifier)},
                       repeats, f"contract {setting.tag}")


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


CONTRACT_TARGET, TECHNIQUE_TARGET = 1.02, 1.05


def _ratio(result: dict[str, Any], reference: dict[str, Any]) -> float:
    return result["seconds"] / reference["seconds"]


def technique_table(overheads: dict[str, dict[str, Any]], on_gpu: bool, target: float | None) -> list[str]:
    """One row per technique: median step time, spread, ratio to its reference (no technique, on
    the same model and data), memory[, target]."""
    header = "| technique | step ms (median) | min–max over repeats | ratio | " + (
        "peak CUDA MB | ratio |" if on_gpu else "state kept between steps |")
    rule = "|---|---|---|---|" + ("---|---|" if on_gpu else "---|")
    if target is not None:
        header, rule = header + f" loss-changing: ≤ {target:.2f}x? |", rule + "---|"
    lines = [header, rule]
    for name, result in overheads.items():
        if "failed" in result:
            lines.append(f"| {name} | failed: {result['failed'][:100]} |" + " |" * (rule.count("|") - 3))
            continue
        low, high = result["spread"]
        baseline = overheads[result.get("reference", BASELINE)]
        memory = (f"{result['peak_bytes'] / 2**20:.1f} | {result['peak_bytes'] / baseline['peak_bytes']:.2f}x |"
                  if on_gpu else f"{result['state_bytes'] / 2**10:.1f} KiB |")
        row = (f"| {name} | {result['seconds'] * 1e3:.2f} | {low * 1e3:.2f}–{high * 1e3:.2f} | "
               f"{_ratio(result, baseline):.2f}x | {memory}")
        if target is not None:
            changes_loss = not result.get("is_reference") and bool(technique_stages(name))
            row += (" " + ("yes" if _ratio(result, baseline) <= target else "**no**") + " |") if changes_loss else " — |"
        lines.append(row)
    return lines


def misses_and_why(overheads: dict[str, dict[str, Any]], target: float) -> list[str]:
    """The loss-changing techniques above ``target``, each with the cost its method card states."""
    ratios = [(name, _ratio(result, overheads[result.get("reference", BASELINE)])) for name, result in overheads.items()
              if not result.get("is_reference") and "failed" not in result and technique_stages(name)]
    misses = [(name, ratio) for name, ratio in ratios if ratio > target]
    if not misses:
        return []
    lines = ["", f"Above {target:.2f}x, with the cost each method card states (what the method adds by design):", ""]
    for name, ratio in misses:
        costs = " ".join(card(name).method_card.get("costs", "no cost stated on its card").split())
        lines.append(f"* `{name}` ({ratio:.2f}x): {costs}")
    return lines


def technique_stages(name: str) -> frozenset[str]:
    return type(example_technique(name)).stages


def write_report(results: dict[str, Any], settings: dict[str, Any], out: Path, command: str) -> None:
    on_gpu = settings["accelerator"] == "gpu"
    lines = [
        "# Overhead of the step contract and of every technique",
        "",
        f"Produced by: `{command}`",
        "",
        f"Machine: {settings['machine']}. {settings['note']}",
        "",
        "A step is forward, the techniques' stages, backward, optimizer step and post-step hooks; "
        f"{settings['steps']} timed steps after {settings['warmup']} warm-up steps per fit, the fits of "
        "one table interleaved repeat after repeat (rotated order, garbage collected before each), and "
        "each figure the median over repeats of a fit's median step. Ratios divide by the reference "
        "arm measured in the same run.",
        "",
        "## The step contract's own cost",
        "",
        f"The same network, loss, optimizer and logging, once as a plain LightningModule `training_step` "
        f"and once under `RegularizedMixin` with no technique attached (target ≤ {CONTRACT_TARGET:.2f}x, "
        "meant for a real network: on the tiny harness model a step takes a few milliseconds, so the "
        "contract's fixed per-step Python work — building the `StepOutput`, dispatching the stages, the "
        "detached copy handed to post-step hooks — is a visible share of it).",
        "",
        "| setting | plain training_step ms | RegularizedMixin ms | ratio | within target? |",
        "|---|---|---|---|---|",
    ]
    for key, contract in results["contract"].items():
        plain, mixin = contract["plain training_step"], contract["RegularizedMixin, no technique"]
        if "failed" in plain or "failed" in mixin:
            lines.append(f"| {SETTINGS[key].label} | {plain.get('failed', '')} | {mixin.get('failed', '')} | | |")
            continue
        ratio = _ratio(mixin, plain)
        lines.append(f"| {SETTINGS[key].label} | {plain['seconds'] * 1e3:.2f} | {mixin['seconds'] * 1e3:.2f} | "
                     f"{ratio:.3f}x | {'yes' if ratio <= CONTRACT_TARGET else '**no**'} |")
    for key, heading, target, repeats in (
        ("realistic", "Every technique on the realistic model", TECHNIQUE_TARGET, settings["realistic_repeats"]),
        ("harness", "Every technique on the harness model", None, settings["repeats"]),
    ):
        if key not in results["techniques"]:
            continue
        lines += ["", f"## {heading}", "", f"{SETTINGS[key].label}; {repeats} repeats. The reference is the "
                  "task module (`ClassificationModule`) without a technique"
                  + (", on the data and model of the technique's harness case where that names its own (an extra "
                     "reference row each)." if key == "harness" else ".")
                  + (" Loss-changing techniques (those with step-contract stages) have the target "
                     f"≤ {target:.2f}x; what a technique adds by design (a teacher's forward pass, a second "
                     "model, extra passes) is its method card's cost, in `docs/techniques.md`."
                     if target else " This model is tiny, so these ratios show each technique's fixed "
                     "per-step cost (Python, extra passes, copies) more than its arithmetic."),
                  "", *technique_table(results["techniques"][key], on_gpu, target)]
        if target is not None:
            lines += misses_and_why(results["techniques"][key], target)
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
    for model_name, rows in results["ema"].items():
        for operation, implementation, seconds in rows:
            lines.append(f"| {model_name} | {operation} | {implementation} | {seconds * 1e3:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def run_overhead(
    only: list[str] | None, repeats: int, steps: int, warmup: int, calls: int, accelerator: str, out: Path,
    command: str, realistic_repeats: int = 3, realistic_steps: int = 10,
) -> None:
    known = built_technique_names()
    names = only or known
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown technique(s) {sorted(unknown)}; known: {known}")
    if accelerator == "cpu":
        torch.set_num_threads(1)  # CPU time then counts work, not threads spinning on a busy machine
    results: dict[str, Any] = {
        "contract": {key: contract_cost(SETTINGS[key], n, s, warmup, accelerator)
                     for key, n, s in (("harness", repeats, steps), ("realistic", realistic_repeats, realistic_steps))},
        "techniques": {},
    }
    if realistic_repeats:
        results["techniques"]["realistic"] = technique_overheads(
            SETTINGS["realistic"], names, realistic_repeats, realistic_steps, warmup, accelerator)
    results["techniques"]["harness"] = technique_overheads(SETTINGS["harness"], names, repeats, steps, warmup, accelerator,
                                                           per_case=True)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    results["ema"] = {name: ema_comparison(net, calls, device) for name, net in comparison_models().items()}
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
    settings = dict(repeats=repeats, realistic_repeats=realistic_repeats, steps=steps, warmup=warmup, calls=calls,
                    accelerator=accelerator, machine=machine, note=note)
    write_report(results, settings, out, command)
    print(f"[overhead] -> {out}", flush=True)
