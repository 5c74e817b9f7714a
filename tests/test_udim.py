"""UDIM's maths against hand-computed cases and independent computations (paper 22)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import noisy_digits, quiet_trainer, small_module
from reglab.callbacks.domain_generalization import UDIM
from reglab.callbacks.domain_generalization.udim import head_gradients, inconsistency
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import TechniqueConfigError


def test_inconsistency_by_hand():
    # one head element, two samples: source gradients (1, 3): mean 2, variance 1; perturbed
    # gradients (2, 6) around the source mean: ((2-2)^2 + (6-2)^2) / 2 = 8
    source, perturbed = {"bias": torch.tensor([[1.0], [3.0]])}, {"bias": torch.tensor([[2.0], [6.0]])}
    gap, norm = inconsistency(source, perturbed)
    assert gap.item() == pytest.approx((1 - 8) ** 2 / 4)  # the code's sum_d ||var_d - mean var||^2 / 2
    assert norm.item() == pytest.approx((2**2 + 6**2) / 2)  # mean squared norm / 1 element


def test_inconsistency_takes_means_over_all_head_elements_and_norms_per_parameter():
    source = {"weight": torch.tensor([[0.0, 2.0], [2.0, 0.0]]), "bias": torch.tensor([[1.0], [1.0]])}
    perturbed = {"weight": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "bias": torch.tensor([[3.0], [1.0]])}
    # source variances: weight (1, 1), bias 0; perturbed around the source means (1, 1) and 1:
    # weight (0, 0), bias ((3-1)^2 + 0) / 2 = 2; gaps (1, 1, -2) over the 3 elements
    gap, norm = inconsistency(source, perturbed)
    assert gap.item() == pytest.approx((1 + 1 + 4) / 3 / 4)
    assert norm.item() == pytest.approx((2 + 2) / 2 / 2 + (9 + 1) / 2 / 1)


def test_closed_form_head_gradients_are_the_per_sample_autograd_gradients():
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(4, 3)
    features, labels = torch.randn(5, 4, generator=generator), torch.tensor([0, 2, 1, 1, 0])
    grads = head_gradients(features, head(features), labels)
    for i in range(5):
        weight, bias = torch.autograd.grad(F.cross_entropy(head(features[i:i + 1]), labels[i:i + 1]), [head.weight, head.bias])
        torch.testing.assert_close(grads["weight"][i], weight.flatten())
        torch.testing.assert_close(grads["bias"][i], bias)


class LinearModel(RegularizedMixin, L.LightningModule):
    """``logits = head(x)`` with the inputs as the features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 2)

    def forward_step(self, batch):
        return StepOutput(logits=self.head(batch["input"]), target=batch["target"], features=batch["input"], batch=batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_perturbed_inputs_climb_loss_plus_sharpness_normalized_over_the_batch():
    module, udim = LinearModel(), UDIM(rho=0.05, input_rho=0.3)
    x, y = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0]]), torch.tensor([0, 1, 1])
    out = module.forward_step({"input": x, "target": y})
    moved = udim.perturbed_inputs(out, module)

    # independently: the head's gradient in closed form, (1/N) sum_i r_i [x_i, 1], differentiated in x
    start = x.clone().requires_grad_(True)
    logits = module.head(start)
    residual = logits.softmax(-1) - F.one_hot(y, 2)
    grad_w, grad_b = residual.T @ start / 3, residual.mean(0)
    objective = F.cross_entropy(logits, y) + 0.05 * torch.cat([grad_w.flatten(), grad_b]).norm()
    (direction,) = torch.autograd.grad(objective, start)
    expected = x + 0.3 * direction / direction.norm(dim=0, keepdim=True)
    torch.testing.assert_close(moved, expected)
    assert not moved.requires_grad
    # normalized over the batch: each input element's column moves by input_rho in L2
    torch.testing.assert_close((moved - x).norm(dim=0), torch.full((3,), 0.3))


def test_warmup_trains_with_sam_alone_first():
    seen: dict[int, set[str]] = {}

    class Terms(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, set()).update(outputs["terms"])

    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[UDIM(warmup=0.5), Terms()])
    trainer.fit(small_module(), datamodule=noisy_digits())
    assert seen[0] == {"task_loss"}
    assert seen[1] == {"task_loss", "udim/variance_gap", "udim/gradient_norm"}


def test_a_module_without_a_linear_head_is_refused_at_setup():
    class NoHead(LinearModel):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Linear(3, 2))

    trainer = quiet_trainer(max_steps=1, callbacks=[UDIM(warmup=0.0)])
    loader = torch.utils.data.DataLoader([{"input": torch.zeros(3), "target": torch.tensor(0)}] * 4, batch_size=2)
    with pytest.raises(TechniqueConfigError, match="linear classifier head.*ClassificationModule"):
        trainer.fit(NoHead(), train_dataloaders=loader)
