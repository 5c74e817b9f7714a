"""The averaging core (reglab.averaging) and the techniques on it (reglab.callbacks.averaging):
their math against naive or reference computations, the swap, and the checkpoint protocol."""

from __future__ import annotations

import doctest
import importlib
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from harness import noisy_digits, quiet_trainer, small_module
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import update_bn

from reglab.callbacks import EMA, SWA, MeanTeacher, OGENSelfDistillation
from reglab.callbacks.averaging.mean_teacher import distillation_kl
from reglab.callbacks.averaging.ogen_self_distillation import adaptive_window
from reglab.averaging import (
    TRAINING_WEIGHTS_KEY,
    WeightAverage,
    ema_decay,
    recompute_batchnorm_statistics,
    teacher_logits,
)
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def perturb(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn_like(tensor))


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


# -- the math --------------------------------------------------------------------------------------

def test_foreach_ema_update_equals_a_naive_loop():
    net = conv_net()
    average = WeightAverage(net)
    naive = float_state(net)
    for t in range(5):
        perturb(net)
        decay = ema_decay(t, 0.9, warmup=True)
        average.lerp_(1.0 - decay)
        naive = {k: decay * v + (1 - decay) * net.state_dict()[k] for k, v in naive.items()}
    assert average.names == list(naive)  # parameters and BatchNorm statistics, not num_batches_tracked
    for name, tensor in zip(average.names, average.tensors):
        torch.testing.assert_close(tensor, naive[name], msg=name)


def test_ema_warmup_schedule():
    assert ema_decay(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay(80, 0.999, warmup=True) == pytest.approx(0.9)
    assert ema_decay(890, 0.999, warmup=True) == pytest.approx(0.99)
    assert ema_decay(10**6, 0.999, warmup=True) == 0.999  # capped at the decay
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_running_average_equals_the_mean_of_snapshots():
    net = conv_net()
    average, snapshots = WeightAverage(net), []
    for n in range(4):
        perturb(net)
        snapshots.append(float_state(net))
        average.lerp_(1.0 / (n + 1))  # SWA's update
    for name, tensor in zip(average.names, average.tensors):
        torch.testing.assert_close(tensor, torch.stack([s[name] for s in snapshots]).mean(0), msg=name)


def test_set_mean_averages_copies():
    net = conv_net()
    copies = []
    for _ in range(3):
        perturb(net)
        copies.append(WeightAverage(net))
    mean = copies[0].clone()
    mean.set_mean_(copies)
    for i in range(len(mean)):
        torch.testing.assert_close(mean.tensors[i], torch.stack([c.tensors[i] for c in copies]).mean(0))


def test_distillation_kl_equals_reference_and_hand_value():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    for temperature in (1.0, 3.0):
        reference = F.kl_div(
            F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"
        ) * temperature**2
        torch.testing.assert_close(distillation_kl(student, teacher, temperature), reference)
    p, q = torch.tensor([0.4, 0.6]), torch.tensor([0.5, 0.5])  # teacher p, student q (T = 1)
    hand = float((p * (p / q).log()).sum())
    value = distillation_kl(q.log().unsqueeze(0), p.log().unsqueeze(0), 1.0)
    assert math.isclose(value.item(), hand, rel_tol=1e-5)
    teacher.requires_grad_(True)
    distillation_kl(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None  # gradient through the student only


def test_distillation_kl_ignores_classes_masked_to_minus_infinity():
    """Student and teacher both masked by active_classes (-inf logits): the KL over the active
    classes, not NaN from 0 * -inf."""
    active = torch.tensor([True, False, True, True])
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    masked_student = student.masked_fill(~active, float("-inf")).requires_grad_()
    value = distillation_kl(masked_student, teacher.masked_fill(~active, float("-inf")), 2.0)
    value.backward()
    torch.testing.assert_close(value, distillation_kl(student[:, active], teacher[:, active], 2.0))
    assert masked_student.grad.isfinite().all()


def test_adaptive_window_grows_from_min_to_max():
    assert [adaptive_window(e, 5, 1, 5) for e in range(5)] == [1, 2, 3, 4, 5]
    assert [adaptive_window(e, 3, 1, 2) for e in range(3)] == [1, 2, 2]
    assert adaptive_window(0, 1, 1, 4) == 4 and adaptive_window(9, 5, 1, 3) == 3


def test_batchnorm_recomputation_matches_torch_update_bn():
    net, batches = conv_net(), [torch.randn(8, 1, 8, 8) for _ in range(3)]
    expected = conv_net()
    update_bn(batches, expected)
    norm = net[1]
    norm.momentum, tracked_before = 0.3, norm.num_batches_tracked.clone()
    net.eval()
    rng_before = torch.get_rng_state()
    recompute_batchnorm_statistics(net, batches, net)
    torch.testing.assert_close(norm.running_mean, expected[1].running_mean)
    torch.testing.assert_close(norm.running_var, expected[1].running_var)
    assert norm.momentum == 0.3 and torch.equal(norm.num_batches_tracked, tracked_before) and not net.training
    assert torch.equal(torch.get_rng_state(), rng_before)


# -- the swap --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # pointer swap / copying swap
def test_swap_in_computes_with_the_average_and_swap_out_restores_bitwise(dtype):
    net = conv_net()
    average = WeightAverage(net)
    perturb(net)
    net.to(dtype).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reference = conv_net().to(dtype).eval()  # the unperturbed weights, i.e. the average
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    for _ in range(2):  # the copying swap reuses its buffer
        with average.swapped_in():
            torch.testing.assert_close(net(x), reference(x))
            assert all(p.dtype == dtype for p in net.parameters())
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_teacher_forward_uses_the_teacher_in_eval_mode_and_restores_the_module():
    module = small_module()
    teacher = WeightAverage(module)
    perturb(module)
    module.train()
    module.backbone.eval()  # a submodule frozen in eval mode on purpose stays so
    batch = {"input": torch.randn(4, 64), "target": torch.zeros(4, dtype=torch.long)}
    reference = small_module().eval()
    torch.testing.assert_close(teacher_logits(module, teacher, batch), reference.forward_step(batch).logits)
    assert module.training and module.head.training and not module.backbone.training


# -- Lightning: checkpoints, any LightningModule, composition ---------------------------------------

class RecordTrainingWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_checkpoint_holds_the_average_and_the_training_weights(tmp_path):
    ema, recorder = EMA(decay=0.9), RecordTrainingWeights()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    module = small_module()
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, callbacks=[recorder, ema, checkpoint])
    trainer.fit(module, datamodule=noisy_digits())
    path = tmp_path / "epoch=0-step=3.ckpt"

    averaged = ema.average.module_state()
    loaded = ClassificationModule.load_from_checkpoint(path)
    for name, value in averaged.items():
        assert torch.equal(loaded.state_dict()[name], value), name
        assert torch.equal(module.state_dict()[name], value), name  # after fit the module is the average
    saved = torch.load(path, weights_only=True)
    for name, value in recorder.weights.items():
        assert torch.equal(saved[TRAINING_WEIGHTS_KEY][name], value), name
    assert not any(key.startswith("average.") for key in saved["callbacks"][ema.state_key])  # stored once

    # Outside fit the checkpoint's weights are the model: testing from it evaluates the average.
    tested = small_module(seed=3)
    quiet_trainer(callbacks=[EMA()]).test(tested, datamodule=noisy_digits(), ckpt_path=path, verbose=False)
    for name, value in averaged.items():
        assert torch.equal(tested.state_dict()[name], value), name


class PlainConvNet(L.LightningModule):
    """No step contract: tuple batches, its own training_step, BatchNorm."""

    def __init__(self):
        super().__init__()
        self.net = conv_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def plain_loaders():
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    data = torch.utils.data.TensorDataset(inputs, labels)
    return torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=16)


@pytest.mark.parametrize("make", [lambda: EMA(decay=0.5), lambda: SWA(start_epoch=1)])
def test_averaging_works_with_any_lightning_module(make):
    technique, module = make(), PlainConvNet()
    train, val = plain_loaders()
    quiet_trainer(max_epochs=3, callbacks=[technique]).fit(module, train, val)
    assert technique.has_average
    for name, value in technique.average.module_state().items():  # after fit the module is the average
        assert torch.equal(module.state_dict()[name], value), name
    if isinstance(technique, SWA):  # whose BatchNorm statistics are recomputed, not averaged
        assert technique.num_averaged == 2  # epochs 1 and 2
        expected = PlainConvNet()
        expected.load_state_dict(technique.average.module_state(), strict=False)
        update_bn(train, expected)
        torch.testing.assert_close(module.net[1].running_mean, expected.net[1].running_mean)
        torch.testing.assert_close(module.net[1].running_var, expected.net[1].running_var)


def test_ogen_teacher_is_the_mean_of_the_window_of_epoch_end_states():
    class RecordEpochEnds(L.Callback):
        def __init__(self):
            self.states = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    ogen, recorder = OGENSelfDistillation(min_window=1, max_window=2, total_epochs=3), RecordEpochEnds()
    module = small_module()
    quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[ogen, recorder]).fit(module, datamodule=noisy_digits())
    # last epoch (2): window 2 = the states after epochs 0 and 1
    for name, value in ogen.average.module_state().items():
        torch.testing.assert_close(value, (recorder.states[0][name] + recorder.states[1][name]) / 2, msg=name)
    assert len(ogen.states) == 2  # the window never needs more


def test_mean_teacher_term_is_logged_and_two_evaluated_averages_are_refused():
    teacher = MeanTeacher()
    trainer = quiet_trainer(max_steps=2, callbacks=[teacher, EMA()])  # EMA evaluates, the teacher does not
    trainer.fit(small_module(), datamodule=noisy_digits())
    assert "train/mean_teacher/distillation" in trainer.callback_metrics
    with pytest.raises(TechniqueConfigError, match="EMA: both it and SWA"):
        quiet_trainer(max_steps=1, callbacks=[EMA(), SWA()]).fit(small_module(), datamodule=noisy_digits())


MODULES = ["reglab.averaging", *(f"reglab.callbacks.averaging.{m}" for m in ("ema", "swa", "mean_teacher", "ogen_self_distillation"))]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    assert doctest.testmod(importlib.import_module(name), verbose=False).failed == 0
