"""SAM and the step contract's perturb_weights stage, against hand-computed quadratics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness import noisy_digits, quiet_trainer, small_module, start_ranks
from test_harness import _free_port
from reglab.callbacks.baselines import SAM
from reglab.callbacks.domain_generalization import UDIM
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import TechniqueConfigError, ascent_offsets, check_precision

RHO = 0.05
START = [1.0, 2.0]


class Curvatures(Dataset):
    """Sample i is a row of curvatures ``a_i``; its loss is ``1/2 sum_j a_ij w_j^2``."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = torch.tensor(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.rows[i], "target": torch.tensor(0)}


class Quadratic(RegularizedMixin, L.LightningModule):
    """Weights ``w`` as every sample's "logits", task loss per sample ``1/2 sum_j a_ij w_j^2``, plain
    SGD with lr 1 (one step is ``w - gradient``); optionally a batch norm on the inputs, only to
    watch its running statistics."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(START))
        self.norm = nn.BatchNorm1d(2) if batch_norm else None

    def forward_step(self, batch):
        if self.norm is not None:
            self.norm(batch["input"])
        return StepOutput(logits=self.w.expand(len(batch["input"]), -1), target=batch["target"], batch=batch)

    def task_loss(self, out):
        return 0.5 * (out.batch["input"] * out.logits.square()).sum(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit(rows, techniques, module=None, **trainer):
    module = module or Quadratic()
    loader = DataLoader(Curvatures(rows), batch_size=trainer.pop("batch_size", len(rows)))
    quiet_trainer(max_steps=1, callbacks=techniques, **trainer).fit(module, train_dataloaders=loader)
    return module


def sam_gradient(curvatures: list[list[float]], w: list[float], rho: float = RHO) -> list[float]:
    """By hand: gradient of the mean quadratic at w + rho g/||g||, g = mean_i a_i * w."""
    a = [sum(row[j] for row in curvatures) / len(curvatures) for j in range(len(w))]
    g = [a[j] * w[j] for j in range(len(w))]
    norm = math.sqrt(sum(x * x for x in g))
    return [a[j] * (w[j] + rho * g[j] / norm) for j in range(len(w))]


def test_the_applied_gradient_is_the_one_at_w_plus_rho_g_over_norm_g():
    rows = [[1.0, 3.0], [3.0, 1.0]]  # mean curvature (2, 2): g = (2, 4), ||g|| = sqrt(20)
    expected = [w - g for w, g in zip(START, sam_gradient(rows, START))]
    assert torch.allclose(fit(rows, [SAM(rho=RHO)]).w.detach(), torch.tensor(expected), atol=1e-6)
    # without SAM the step is w - a w: the test tells the two apart
    plain = [w - 2.0 * w for w in START]
    assert torch.allclose(fit(rows, []).w.detach(), torch.tensor(plain), atol=1e-6)
    assert not torch.allclose(torch.tensor(expected), torch.tensor(plain), atol=1e-3)


def test_accumulation_perturbs_every_micro_batch_with_its_own_gradient():
    rows = [[1.0, 3.0], [4.0, 1.0]]  # two micro-batches of one sample each
    mean = [(a + b) / 2 for a, b in zip(sam_gradient(rows[:1], START), sam_gradient(rows[1:], START))]
    module = fit(rows, [SAM(rho=RHO)], batch_size=1, accumulate_grad_batches=2)
    assert torch.allclose(module.w.detach(), torch.tensor([w - g for w, g in zip(START, mean)]), atol=1e-6)
    # perturbing with the accumulated gradient instead would give another step
    whole = [w - g for w, g in zip(START, sam_gradient(rows, START))]
    assert not torch.allclose(module.w.detach(), torch.tensor(whole), atol=1e-4)


def test_adaptive_offsets_are_asam():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    loss = (torch.tensor([3.0, 1.0]) * w).sum()  # g = (3, 1)
    offsets = ascent_offsets(loss, {"w": w}, radius=0.5, adaptive=True)
    scaled_norm = math.sqrt((1 * 3) ** 2 + (2 * 1) ** 2)  # ||w * g||
    assert torch.allclose(offsets["w"], torch.tensor([0.5 * 1 * 3 / scaled_norm, 0.5 * 4 * 1 / scaled_norm]))


def test_the_perturbed_pass_leaves_batch_norm_statistics_alone():
    rows = [[1.0, 3.0], [3.0, 1.0]]
    with_sam = fit(rows, [SAM()], module=Quadratic(batch_norm=True))
    without = fit(rows, [], module=Quadratic(batch_norm=True))
    assert int(with_sam.norm.num_batches_tracked) == 1
    torch.testing.assert_close(with_sam.norm.running_mean, without.norm.running_mean)
    torch.testing.assert_close(with_sam.norm.running_var, without.norm.running_var)


def test_16_bit_precision_is_refused_with_the_fix():
    for technique in (SAM(), UDIM()):
        with pytest.raises(TechniqueConfigError, match="precision='16-mixed'.*bf16-mixed"):
            check_precision(technique, SimpleNamespace(precision="16-mixed"))
        check_precision(technique, SimpleNamespace(precision="bf16-mixed"))


def test_two_techniques_that_move_the_weights_are_refused():
    trainer = quiet_trainer(max_steps=1, callbacks=[SAM(), UDIM(warmup=0.0)])
    with pytest.raises(TechniqueConfigError, match="move the weights"):
        trainer.fit(small_module(), datamodule=noisy_digits())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU (Lightning runs bf16 on CPU)")
def test_16_mixed_is_refused_at_setup_on_gpu():
    trainer = quiet_trainer(max_steps=1, accelerator="gpu", precision="16-mixed", callbacks=[SAM()])
    with pytest.raises(TechniqueConfigError, match="16-mixed"):
        trainer.fit(small_module(), datamodule=noisy_digits())


# -- DDP: every process perturbs with its own gradient; the applied gradient is their mean --

DDP_ROWS = [[1.0, 3.0], [4.0, 1.0], [2.0, 5.0], [1.0, 1.0]]  # two samples per process


class RecordBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows = batch["input"].tolist()


def ddp_worker(rank: int, port: int, report: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    record = RecordBatch()
    module = fit(DDP_ROWS, [SAM(rho=RHO), record], batch_size=2, devices=2, strategy="ddp")
    # UDIM's extra passes (a double backward among them) inside DDP's forward: the ranks stay in sync
    udim_module = small_module()
    quiet_trainer(max_steps=2, devices=2, strategy="ddp", callbacks=[UDIM(warmup=0.0)]).fit(
        udim_module, datamodule=noisy_digits(batch_size=128))
    udim_weights = torch.cat([p.detach().flatten() for p in udim_module.parameters()]).tolist()
    Path(report, f"rank{rank}.json").write_text(
        json.dumps({"w": module.w.detach().tolist(), "rows": record.rows, "udim": udim_weights}))


@pytest.mark.slow
def test_ddp_averages_the_per_process_sam_gradients_and_udim_stays_in_sync(tmp_path):
    start_ranks(ddp_worker, _free_port(), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(reports[0]["rows"] + reports[1]["rows"]) == sorted(DDP_ROWS)  # each process its own half
    per_rank = [sam_gradient(report["rows"], START) for report in reports]
    expected = [w - (g0 + g1) / 2 for w, g0, g1 in zip(START, *per_rank)]
    for report in reports:
        assert torch.allclose(torch.tensor(report["w"]), torch.tensor(expected), atol=1e-6), (report, expected)
    synced = [w - g for w, g in zip(START, sam_gradient(DDP_ROWS, START))]
    assert not torch.allclose(torch.tensor(expected), torch.tensor(synced), atol=1e-4)
    assert reports[0]["udim"] == reports[1]["udim"]
