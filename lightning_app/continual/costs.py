"""What an experience (one task of a sequence) costs: wall time, peak memory, bytes of stored state.

Avalanche's timing and memory metrics (``timing_metrics(experience=True)``, ``MaxGPU``, ``MaxRAM``,
``disk_usage_metrics``) and Mammoth's memory-buffer size, measured per task by the runner:

* wall time of the task's ``fit`` and of its evaluation, ``time.perf_counter`` around each;
* peak memory during the fit: on a CUDA device ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` at the task's start (so it is the task's own peak); on the CPU the
  process's resident-set high-water mark (``getrusage``), which the operating system never resets —
  a running maximum over the process so far, not the task's own (``memory_kind`` says which);
* stored bytes: every tensor a technique keeps in its ``state_dict`` (a replay buffer, anchors,
  importance weights), i.e. what the technique carries from task to task beyond the model.

Example:
    >>> import torch
    >>> class Buffer:
    ...     def state_dict(self):
    ...         return {"inputs": torch.zeros(10, 4), "seen": torch.tensor(10), "nested": {"t": torch.zeros(2)}}
    >>> state_bytes(Buffer())   # 10·4·4 + 8 + 2·4
    176
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from torch import Tensor


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) dict / list / tuple."""
    if isinstance(value, Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def state_bytes(stateful: Any) -> int:
    """Bytes of the tensors in ``stateful.state_dict()``."""
    return tensor_bytes(stateful.state_dict())


def process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports kilobytes


class ExperienceMeter:
    """Times a block and records the peak memory during it (see the module docstring).

    Example:
        >>> meter = ExperienceMeter(torch.device("cpu"))
        >>> with meter:
        ...     _ = torch.ones(3).sum()
        >>> meter.seconds >= 0 and meter.peak_memory_bytes > 0 and meter.memory_kind
        'process_rss_high_water'
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.memory_kind = "cuda_max_allocated" if self.cuda else "process_rss_high_water"
        self.seconds = 0.0
        self.peak_memory_bytes = 0

    def __enter__(self) -> ExperienceMeter:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
        self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else process_peak_rss_bytes()


def experiences_table(experiences: list[dict[str, Any]]) -> str:
    """The cost of each experience as a markdown table (the runner's ``experiences.json`` rows)."""
    lines = ["| task | fit (s) | evaluation (s) | peak memory (MiB) | stored by techniques (KiB) |", "|---|---|---|---|---|"]
    for e in experiences:
        lines.append(f"| {e['task']} | {e['fit_s']:.2f} | {e['eval_s']:.2f} | {e['peak_memory_bytes'] / 2**20:.1f} | "
                     f"{sum(e['stored_bytes'].values()) / 2**10:.1f} |")
    kind = experiences[0]["memory_kind"] if experiences else "none"
    return "\n".join(lines + ["", f"Peak memory: {kind.replace('_', ' ')}."])
