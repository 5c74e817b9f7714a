"""Peak training memory of one step, by what holds it (parameters, gradients, optimizer state, ...).

:class:`PeakTrainingMemory` is a callback that measures one training step (forward, backward and
optimizer step) of a real fit:

* on a CUDA device, ``torch.cuda.max_memory_allocated`` over the step (reset at its start);
* on the CPU, where PyTorch keeps no allocator statistics, PyTorch's profiler with
  ``profile_memory`` and its memory timeline (``Profiler.export_memory_timeline``), which follows
  every tensor the step allocates and frees and tells parameters, optimizer state, inputs,
  activations, gradients and temporaries apart. The peak is the largest total over the step's
  timeline; the breakdown is the one at that moment.

The step measured is the second by default (``step=1``): the optimizer creates its state (Adam's
two moments per trainable parameter) in the first one, which is part of what a PEFT method saves.
Profiling slows that one step down; the other steps run unobserved.

Example:
    >>> memory = PeakTrainingMemory()          # Trainer(callbacks=[memory]); after fit:
    >>> memory.result                           # {} until the step ran
    {}
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

MB = 2**20
#: columns of the profiler's memory timeline after its leading zero (torch.profiler._memory_profiler's
#: category order); ``other`` is memory the profiler could not attribute
TIMELINE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                       "autograd_detail", "other")


def peak_from_timeline(sizes: list[list[int]]) -> dict[str, float]:
    """``{"peak_mb": ..., "<category>_mb": ...}`` at the moment of the largest total, from the
    memory timeline's rows of byte counts (a leading zero, then one column per category)."""
    if not sizes:
        raise ValueError("the memory timeline is empty: the profiler saw no allocation in the step")
    totals = [sum(row[1:]) for row in sizes]
    at_peak = sizes[max(range(len(totals)), key=totals.__getitem__)][1:]
    return {"peak_mb": max(totals) / MB, **{f"{name}_mb": size / MB for name, size in zip(TIMELINE_CATEGORIES, at_peak)}}


class PeakTrainingMemory(L.Callback):
    """Measures the peak memory of training step ``step`` (see the module docstring).

    After that step, :attr:`result` holds ``peak_mb`` and, on the CPU, the breakdown at the peak
    (``parameter_mb``, ``optimizer_state_mb``, ``gradient_mb``, ``activation_mb``, ...).
    """

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.result: dict[str, float] = {}
        self._cuda_device: torch.device | None = None  # measuring a CUDA step
        self._profiler: Any = None  # measuring a CPU step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        measuring = self._cuda_device is not None or self._profiler is not None
        if trainer.global_step != self.step or self.result or measuring:
            return
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self._cuda_device = device
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                 with_stack=True)
        self._profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._cuda_device is not None:
            device, self._cuda_device = self._cuda_device, None
            torch.cuda.synchronize(device)
            self.result = {"peak_mb": torch.cuda.max_memory_allocated(device) / MB}
            return
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
            # deprecated in favour of CUDA memory snapshots, which do not exist for the CPU
            warnings.simplefilter("ignore", FutureWarning)
            path = Path(directory) / "memory.json"
            profiler.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())
        self.result = peak_from_timeline(sizes)
