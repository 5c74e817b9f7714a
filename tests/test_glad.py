"""GLAD's regularized gradient against hand-computed quadratics (the SGD step of lr 1 is ``w - gradient``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from harness import noisy_digits, quiet_trainer, small_module
from test_sam import RHO, START, Quadratic, fit, sam_gradient
from reglab.callbacks.baselines import SAM
from reglab.callbacks.peft import LoRA
from reglab.callbacks.vision_language import GLAD
from reglab.technique import TechniqueConfigError, check_precision

ROWS = [[1.0, 3.0], [3.0, 1.0]]  # mean curvature a = (2, 2): g = (2, 4), ||g|| = sqrt(20)


class RecordTerm(L.Callback):
    def on_train_end(self, trainer, pl_module):  # logged per epoch: one step here
        self.term = float(trainer.callback_metrics["train/glad/gradient_penalty"])


def test_the_step_mixes_the_gradient_and_sams_by_alpha():
    alpha = 0.8
    plain = [2.0 * w for w in START]  # grad L(w) = a w
    expected = [w - ((1 - alpha) * g + alpha * s) for w, g, s in zip(START, plain, sam_gradient(ROWS, START))]
    # by hand: e = 0.05 (2, 4) / sqrt(20); the SAM gradient is a (w + e)
    e = [RHO * 2 / math.sqrt(20), RHO * 4 / math.sqrt(20)]
    assert expected == pytest.approx([1 - 0.2 * 2 - 0.8 * 2 * (1 + e[0]), 2 - 0.2 * 4 - 0.8 * 2 * (2 + e[1])])
    module = fit(ROWS, [GLAD(rho=RHO, alpha=alpha)])
    assert torch.allclose(module.w.detach(), torch.tensor(expected), atol=1e-6)
    plain_step = fit(ROWS, []).w.detach()  # the test tells GLAD from the plain step
    assert not torch.allclose(module.w.detach(), plain_step, atol=1e-3)


def test_alpha_one_is_sams_step():
    torch.testing.assert_close(fit(ROWS, [GLAD(rho=RHO, alpha=1.0)]).w.detach(), fit(ROWS, [SAM(rho=RHO)]).w.detach())


def test_the_logged_penalty_is_alpha_times_the_loss_rise_at_the_ascent_point():
    alpha, record = 0.5, RecordTerm()
    fit(ROWS, [GLAD(rho=RHO, alpha=alpha), record])
    norm = math.sqrt(20)
    moved = [w + RHO * g / norm for w, g in zip(START, [2.0, 4.0])]
    loss = lambda w: 0.5 * sum(2.0 * x * x for x in w)  # mean of the two samples' quadratics
    assert record.term == pytest.approx(alpha * (loss(moved) - loss(START)), rel=1e-5)
    # to first order the penalty is lambda ||g|| with lambda = alpha * rho
    assert record.term == pytest.approx(alpha * RHO * norm, rel=0.05)


def test_accumulation_mixes_each_micro_batch_with_its_own_ascent():
    alpha = 0.8
    per_batch = [[(1 - alpha) * a * w + alpha * s for a, w, s in zip(row, START, sam_gradient([row], START))]
                 for row in ROWS]
    mean = [(g0 + g1) / 2 for g0, g1 in zip(*per_batch)]
    module = fit(ROWS, [GLAD(rho=RHO, alpha=alpha)], batch_size=1, accumulate_grad_batches=2)
    assert torch.allclose(module.w.detach(), torch.tensor([w - g for w, g in zip(START, mean)]), atol=1e-6)


def test_bad_settings_sam_beside_it_and_16_bit_are_refused_with_the_fix():
    for rho, alpha in ((0.0, 0.5), (0.05, 0.0), (0.05, 1.5)):
        with pytest.raises(TechniqueConfigError, match="rho > 0 and 0 < alpha <= 1"):
            GLAD(rho=rho, alpha=alpha)
    with pytest.raises(TechniqueConfigError, match="precision='16-mixed'.*bf16-mixed"):
        check_precision(GLAD(), SimpleNamespace(precision="16-mixed"))
    with pytest.raises(TechniqueConfigError, match="SAM"):
        fit(ROWS, [GLAD(), SAM()], module=Quadratic())


def test_an_owned_lora_adapts_the_module_and_only_its_adapters_and_head_train():
    module = small_module()
    quiet_trainer(max_steps=1, callbacks=[GLAD(lora=LoRA(r=2))]).fit(module, datamodule=noisy_digits())
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "head" in name for name in trainable)
    assert any("lora_" in name for name in trainable)
