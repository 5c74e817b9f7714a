"""DomainBed's baselines CORAL, IRM, VREx, Fishr and Fish against hand-computed cases and against
their DomainBed formulations written out plainly (autograd's dummy-scale derivative for IRM,
per-sample gradients from torch.func for Fishr, an explicit clone-and-step loop for Fish), plus
the annealing schedule, the optimizer reset, the moving average under gradient accumulation, and
the refusals at setup."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reglab import registry
from reglab.callbacks.baselines import CORAL, IRM, SAM, Fish, Fishr, VREx
from reglab.callbacks.baselines.coral import coral_penalty
from reglab.nn.domain_groups import domain_masks, group_means
from reglab.callbacks.baselines.fishr import head_gradient_variances, variance_distance
from reglab.callbacks.baselines.irm import irm_penalty, scale_gradients
from reglab.callbacks.baselines.vrex import risk_variance
from reglab.datamodules import DigitsDataModule, RotatedDigitsDataModule
from reglab.step import StepOutput
from reglab.technique import TechniqueConfigError


def _fake_trainer(global_step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_step=global_step, strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))


# -- per-domain groups ---------------------------------------------------------------------------
def test_domain_masks_keep_groups_with_enough_samples_in_domain_order():
    masks, ids = domain_masks(torch.tensor([3, 1, 3, 0, 3, 1]), min_size=2)
    assert ids.tolist() == [1, 3]
    assert masks.tolist() == [[0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 1, 0]]
    means = group_means(masks, torch.tensor([[1.0], [2.0], [3.0], [9.0], [5.0], [4.0]]))
    assert means.flatten().tolist() == [3.0, 3.0]


# -- CORAL ---------------------------------------------------------------------------------------
def test_coral_penalty_by_hand_with_domains_interleaved():
    # domain 0: (0,0), (2,0): mean (1,0), covariance [[2,0],[0,0]];
    # domain 1: (0,1), (0,3): mean (0,2), covariance [[0,0],[0,2]]
    features = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [2.0, 0.0]])
    masks, _ = domain_masks(torch.tensor([1, 0, 1, 0]), min_size=2)
    mean_gap = (1 + 4) / 2          # mean of (1 - 0)^2, (0 - 2)^2
    covariance_gap = (4 + 4) / 4    # mean of (2 - 0)^2, 0, 0, (0 - 2)^2
    assert coral_penalty(features, masks).item() == pytest.approx(mean_gap + covariance_gap)


def test_coral_penalty_averages_domainbeds_pairwise_distance():
    generator = torch.Generator().manual_seed(0)
    features, domain = torch.randn(18, 4, generator=generator), torch.arange(18) % 3

    def mean_cov(x):  # DomainBed's AbstractMMD.mmd with kernel_type mean_cov, written out
        mean = x.mean(0, keepdim=True)
        centred = x - mean
        return mean, centred.t() @ centred / (len(x) - 1)

    parts = [mean_cov(features[domain == d]) for d in range(3)]
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    expected = sum((parts[i][0] - parts[j][0]).pow(2).mean() + (parts[i][1] - parts[j][1]).pow(2).mean()
                   for i, j in pairs) / len(pairs)
    torch.testing.assert_close(coral_penalty(features, domain_masks(domain, 2)[0]), expected)
    assert coral_penalty(features, domain_masks(torch.zeros(18, dtype=torch.long), 2)[0]).item() == 0.0


# -- IRM -----------------------------------------------------------------------------------------
def test_irm_scale_gradient_by_hand():
    # z = (ln 3, 0), label 0: p = (3/4, 1/4), d CE(s z)/ds = (p0 - 1) ln 3 + p1 * 0 = -ln(3) / 4
    slopes = scale_gradients(torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]), torch.tensor([0, 0]))
    torch.testing.assert_close(slopes, torch.tensor([-math.log(3.0) / 4, 3 * math.log(3.0) / 4]))
    # a class masked to -inf (an inactive class of a task sequence) adds nothing instead of nan
    masked = torch.tensor([[math.log(3.0), 0.0, -math.inf]])
    torch.testing.assert_close(scale_gradients(masked, torch.tensor([0])), slopes[:1])
    # the two halves of the one domain: penalty = slope_0 * slope_1
    penalty = irm_penalty(slopes, domain_masks(torch.tensor([5, 5]), 2)[0])
    assert penalty.item() == pytest.approx(-3 * math.log(3.0) ** 2 / 16)


def test_irm_penalty_equals_domainbeds_dummy_scale_autograd():
    generator = torch.Generator().manual_seed(1)
    logits, target = torch.randn(20, 5, generator=generator), torch.randint(0, 5, (20,), generator=generator)
    domain = torch.tensor([0, 1] * 10)

    def domainbed(logits, y):  # DomainBed's IRM._irm_penalty
        scale = torch.tensor(1.0, requires_grad=True)
        grad_1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), [scale], create_graph=True)[0]
        grad_2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
        return grad_1 * grad_2

    expected = sum(domainbed(logits[domain == d], target[domain == d]) for d in (0, 1)) / 2
    torch.testing.assert_close(irm_penalty(scale_gradients(logits, target), domain_masks(domain, 2)[0]), expected)


def test_annealed_weight_and_optimizer_reset_follow_the_optimizer_steps():
    irm = IRM(lam=100.0, anneal_iters=3)
    assert [irm.penalty_weight(SimpleNamespace(trainer=_fake_trainer(s))) for s in (0, 2, 3, 9)] == [1.0, 1.0, 100.0, 100.0]
    assert Fishr(anneal_iters=3).penalty_weight(SimpleNamespace(trainer=_fake_trainer(2))) == 0.0
    # Adam restarts at step anneal_iters: after 4 optimizer steps its step count is 4 - 2, with accumulation too
    for accumulate in (1, 2):
        module = registry.example_module()
        trainer = registry.example_trainer(max_steps=4, accumulate_grad_batches=accumulate,
                                           callbacks=[IRM(lam=10.0, anneal_iters=2)])
        trainer.fit(module, datamodule=RotatedDigitsDataModule(flatten=True, batch_size=64))
        steps = {float(state["step"]) for state in trainer.optimizers[0].state.values()}
        assert steps == {2.0}, (accumulate, steps)


def test_domain_techniques_refuse_data_without_domain():
    module = registry.example_module()
    trainer = registry.example_trainer(max_steps=1, callbacks=[VREx()])
    with pytest.raises(TechniqueConfigError, match="VREx: it needs `domain` in every training batch"):
        trainer.fit(module, datamodule=DigitsDataModule(flatten=True, batch_size=64))


# -- VREx ----------------------------------------------------------------------------------------
def test_vrex_penalty_is_the_variance_of_domain_risks():
    # risks: domain 0 -> (1 + 3) / 2 = 2, domain 4 -> (5 + 7) / 2 = 6; mean 4; variance (4 + 4) / 2 = 4
    losses, domain = torch.tensor([1.0, 5.0, 3.0, 7.0]), torch.tensor([0, 4, 0, 4])
    assert risk_variance(losses, domain_masks(domain)[0]).item() == pytest.approx(4.0)
    out = StepOutput(logits=torch.zeros(4, 2), target=torch.zeros(4, dtype=torch.long), batch={"domain": domain})
    out.task_loss = losses
    vrex = VREx(lam=10.0, anneal_iters=1)
    assert vrex.loss_terms(out, SimpleNamespace(trainer=_fake_trainer(0)))["penalty"].item() == pytest.approx(4.0)
    assert vrex.loss_terms(out, SimpleNamespace(trainer=_fake_trainer(1)))["penalty"].item() == pytest.approx(40.0)


# -- Fishr ---------------------------------------------------------------------------------------
def _fishr_case():
    # features 1, logits 0: p = (1/2, 1/2), per-sample gradient p - onehot(y) for W (2x1) and for b
    # domain 0: labels 0, 0 -> identical gradients, variance 0 on all 4 coordinates
    # domain 1: labels 0, 1 -> gradients +-(1/2, -1/2), variance 1/4 on all 4 coordinates
    return torch.zeros(4, 2), torch.ones(4, 1), torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])


def test_fishr_variances_and_distance_by_hand():
    logits, features, target, domain = _fishr_case()
    variances = head_gradient_variances(logits, features, target, domain_masks(domain)[0])
    torch.testing.assert_close(variances, torch.tensor([[0.0] * 4, [0.25] * 4]))
    # mean variance 1/8 everywhere: each domain is 1/8 away on every coordinate
    assert variance_distance(variances).item() == pytest.approx(0.125**2)


def test_fishr_variances_equal_per_sample_gradients_of_a_linear_head():
    generator = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(6, 4)
    features, target = torch.randn(24, 6, generator=generator), torch.randint(0, 4, (24,), generator=generator)
    domain = torch.arange(24) % 3
    params = dict(head.named_parameters())

    def sample_loss(p, f, y):
        return F.cross_entropy(torch.func.functional_call(head, p, (f[None],)), y[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, features, target)
    flat = torch.cat([grads["weight"].flatten(1), grads["bias"]], 1)
    expected = torch.stack([flat[domain == d].var(0, unbiased=False) for d in range(3)])
    actual = head_gradient_variances(head(features), features, target, domain_masks(domain)[0])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_fishr_moving_average_moves_once_per_optimizer_step():
    logits, features, target, domain = _fishr_case()
    fishr = Fishr(lam=1.0, anneal_iters=0, ema=0.95, num_domains=2)
    fishr.averages, fishr.pending, fishr.pending_count = torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2)
    module = SimpleNamespace(trainer=_fake_trainer(0))
    out = StepOutput(logits=logits, target=target, features=features, batch={"domain": domain})
    # first step, two micro-batches: no history, so the smoothed variance is the batch's own
    for _ in range(2):
        assert fishr.penalty(out, module).item() == pytest.approx(0.125**2)
    fishr.on_before_optimizer_step(_fake_trainer(1), module, SimpleNamespace(state={}))
    # one move with the micro-batches' mean variance: m = 0.05 * v, not 0.05 * v + 0.0475 * v
    torch.testing.assert_close(fishr.averages, torch.tensor([[0.0] * 4, [0.0125] * 4]))
    # next step: (0.95 * 0.05 v + 0.05 v) / 0.05 = 1.95 v, so the distance grows by 1.95^2
    assert fishr.penalty(out, module).item() == pytest.approx((1.95 * 0.125) ** 2)


def test_fishr_refuses_a_head_that_is_not_linear():
    module = registry.example_module()
    module.head = torch.nn.Sequential(module.head)
    trainer = registry.example_trainer(max_steps=1, callbacks=[Fishr()])
    with pytest.raises(TechniqueConfigError, match="Fishr: its per-sample gradients are those of a linear"):
        trainer.fit(module, datamodule=RotatedDigitsDataModule(flatten=True, batch_size=64))


# -- Fish ----------------------------------------------------------------------------------------
class SGDModule(type(registry.example_module())):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class FirstBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def test_fish_step_is_domainbeds_clone_inner_loop_and_interpolation():
    L.seed_everything(0, verbose=False)
    module = SGDModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)})
    start = copy.deepcopy(module)
    seen = FirstBatches()
    trainer = registry.example_trainer(max_steps=1, callbacks=[seen, Fish(meta_lr=0.5)])
    trainer.fit(module, datamodule=RotatedDigitsDataModule(flatten=True, batch_size=48))
    (batch,) = seen.batches
    # DomainBed's update, written out: a clone takes one SGD step per domain, in domain order
    clone = copy.deepcopy(start)
    for domain in batch["domain"].unique():
        rows = batch["domain"] == domain
        clone.zero_grad()
        F.cross_entropy(clone(batch["input"][rows]), batch["target"][rows]).backward()
        with torch.no_grad():
            for p in clone.parameters():
                p -= 0.5 * p.grad
    for (name, p), p0, p1 in zip(module.named_parameters(), start.parameters(), clone.parameters()):
        torch.testing.assert_close(p, p0 + 0.5 * (p1 - p0), msg=name)


def test_fish_keeps_the_inner_adam_state_one_step_per_domain_and_optimizer_step():
    for accumulate, max_steps in ((1, 2), (2, 1)):
        fish = Fish()
        trainer = registry.example_trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[fish])
        module = registry.example_module()
        trainer.fit(module, datamodule=RotatedDigitsDataModule(flatten=True, batch_size=48))
        # three training domains: three inner steps per optimizer step, whatever the accumulation
        assert {float(state["step"]) for state in fish.inner_state.values()} == {3.0 * max_steps}
        # the module's optimizer never stepped (Fish moved the weights itself)
        assert not trainer.optimizers[0].state


def test_fish_refuses_16_mixed_precision():
    trainer = registry.example_trainer(max_steps=1, precision="bf16-mixed", callbacks=[Fish()])
    trainer.precision_plugin.precision = "16-mixed"  # what a GPU trainer has (on CPU Lightning swaps in bf16)
    with pytest.raises(TechniqueConfigError, match="Fish: it cannot run with precision='16-mixed': its inner loop"):
        trainer.fit(registry.example_module(), datamodule=RotatedDigitsDataModule(flatten=True, batch_size=48))


def test_fish_refuses_a_technique_that_moves_the_weights_of_the_step():
    trainer = registry.example_trainer(max_steps=1, callbacks=[Fish(), SAM()])
    with pytest.raises(TechniqueConfigError, match="Fish: it replaces the optimizer step, whose gradient SAM takes"):
        trainer.fit(registry.example_module(), datamodule=RotatedDigitsDataModule(flatten=True, batch_size=48))


def test_resume_before_the_anneal_jump_is_exact(tmp_path):
    """The schedule and the optimizer reset come from trainer.global_step: stopped at step 7 and
    resumed, a run whose jump is at step 9 ends with the weights of an uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, checkpoint=None):
        module = registry.example_module()
        callbacks = [VREx(lam=50.0, anneal_iters=9)] + ([checkpoint] if checkpoint else [])
        trainer = registry.example_trainer(max_steps=max_steps, enable_checkpointing=checkpoint is not None, callbacks=callbacks)
        trainer.fit(module, datamodule=RotatedDigitsDataModule(flatten=True, batch_size=256), ckpt_path=ckpt_path)
        return module

    straight = run(12)
    run(7, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1))
    resumed = run(12, ckpt_path=str(tmp_path / "epoch=1-step=7.ckpt"))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
