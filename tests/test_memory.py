"""Peak training memory (reglab.bench.memory): the CPU breakdown matches what the step holds."""

from __future__ import annotations

import pytest

from reglab import registry
from reglab.bench.memory import TIMELINE_CATEGORIES, PeakTrainingMemory, peak_from_timeline
from reglab.callbacks import LoRA

MB = 2**20


def test_the_peak_is_the_row_with_the_largest_total_and_its_breakdown():
    rows = [[0, MB, 0, 0, 0, 0, 0, 0, 0], [0, MB, 2 * MB, 0, 0, 3 * MB, 0, 0, 0], [0, MB, 2 * MB, 0, 0, 0, MB, 0, 0]]
    result = peak_from_timeline(rows)
    assert result["peak_mb"] == 6.0 and result["activation_mb"] == 3.0 and result["gradient_mb"] == 0.0
    assert set(result) == {"peak_mb", *(f"{c}_mb" for c in TIMELINE_CATEGORIES)}
    with pytest.raises(ValueError, match="timeline is empty"):
        peak_from_timeline([])


def fitted_memory(*techniques) -> tuple[dict[str, float], float, float]:
    module, memory = registry.example_module(), PeakTrainingMemory()
    registry.example_trainer(max_steps=3, callbacks=[*techniques, memory]).fit(module, datamodule=registry.example_data())
    parameters = sum(p.numel() * p.element_size() for p in module.parameters()) / MB
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) / MB
    return memory.result, parameters, trainable


def test_cpu_breakdown_counts_the_parameters_and_adam_state_of_what_trains():
    full, parameters, trainable = fitted_memory()
    assert full["parameter_mb"] == pytest.approx(parameters, rel=1e-6)
    # Adam: two fp32 moments per trainable parameter (plus a step counter per tensor)
    assert full["optimizer_state_mb"] == pytest.approx(2 * trainable, rel=0.02)
    assert full["peak_mb"] >= full["parameter_mb"] + full["optimizer_state_mb"] + full["activation_mb"]
    lora, _, lora_trainable = fitted_memory(LoRA(r=4))
    assert lora_trainable < trainable
    assert lora["optimizer_state_mb"] == pytest.approx(2 * lora_trainable, rel=0.05)
    assert lora["optimizer_state_mb"] < full["optimizer_state_mb"]
