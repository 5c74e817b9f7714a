"""Hessian alignment's maths against explicit Hessians (callbacks/domain_generalization/hessian_alignment.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reglab.step
from reglab.callbacks.domain_generalization import hessian_alignment as ha
from reglab.callbacks.domain_generalization.hessian_alignment import (
    HessianAlignment,
    hessian_gradient_product,
    hutchinson_diagonal,
)
from reglab.mixins import StepOutput
from reglab.technique import TechniqueConfigError


def all_signs(size: int) -> torch.Tensor:
    """Every Rademacher vector of this size: the probes' expectation, exactly."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=size)))


def test_hutchinson_over_every_sign_vector_is_the_diagonal():
    a = torch.tensor([[2.0, 0.5, -1.0], [0.5, 3.0, 0.25], [-1.0, 0.25, -4.0]])
    w = torch.tensor([0.3, -0.2, 0.7], requires_grad=True)
    loss = 0.5 * w @ a @ w + w.sum()  # Hessian a
    grad = torch.autograd.grad(loss, [w], create_graph=True)[0]
    torch.testing.assert_close(hutchinson_diagonal(grad, [w], all_signs(3)), torch.diagonal(a))
    # one probe leaks the off-diagonal entries: the average over probes is what cancels them
    one = torch.tensor([[1.0, 1.0, -1.0]])
    assert not torch.allclose(hutchinson_diagonal(grad, [w], one), torch.diagonal(a))


def _linear_head_loss(features, target, weight, bias):
    return F.cross_entropy(features @ weight.T + bias, target)


def _explicit_hessian(features, target, weight, bias):
    """The cross-entropy's Hessian over the head's flattened (weight, bias), by torch.autograd.functional."""
    shapes = [weight.shape, bias.shape]

    def loss(flat):
        w, b = flat[: weight.numel()].view(shapes[0]), flat[weight.numel():].view(shapes[1])
        return _linear_head_loss(features, target, w, b)

    flat = torch.cat([weight.detach().flatten(), bias.detach().flatten()])
    return torch.autograd.functional.hessian(loss, flat)


def _head_and_data(seed=0, samples=12, dim=3, classes=2):
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, dim, generator=generator))
        head.bias.copy_(torch.randn(classes, generator=generator))
    features = torch.randn(samples, dim, generator=generator)
    target = torch.randint(0, classes, (samples,), generator=generator)
    return head, features, target


def test_hessian_gradient_product_is_the_explicit_hessian_times_the_gradient():
    head, features, target = _head_and_data()
    params = list(head.parameters())
    loss = _linear_head_loss(features, target, head.weight, head.bias)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, create_graph=True)])
    hessian = _explicit_hessian(features, target, head.weight, head.bias)
    torch.testing.assert_close(hessian_gradient_product(grad, params), hessian @ grad.detach())


class Module(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head


def _step(head, features, target, domain):
    return StepOutput(logits=head(features), target=target, features=features, batch={"domain": domain})


def _expected(features, target, domain, head, curvature):
    """alpha-free and beta-free penalties from explicit per-domain Hessians."""
    grads, hessians = [], []
    for d in domain.unique():
        rows = domain == d
        loss = _linear_head_loss(features[rows], target[rows], head.weight, head.bias)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(head.parameters()))]))
        hessians.append(_explicit_hessian(features[rows], target[rows], head.weight, head.bias))
    mean_grad, mean_hessian = torch.stack(grads).mean(0), torch.stack(hessians).mean(0)
    c = [curvature(h, g) for h, g in zip(hessians, grads)]
    c_bar = curvature(mean_hessian, mean_grad) if curvature is _hgp else torch.stack(c).mean(0)
    return (torch.stack([(ci - c_bar).square().sum() for ci in c]).mean(),
            torch.stack([(g - mean_grad).square().sum() for g in grads]).mean())


def _hgp(hessian, grad):
    return hessian @ grad


def _diagonal(hessian, grad):
    return torch.diagonal(hessian)


@pytest.mark.parametrize("estimator, curvature", [("hgp", _hgp), ("hutchinson", _diagonal)])
def test_penalty_is_the_spread_of_the_domains_hessians_and_gradients(estimator, curvature, monkeypatch):
    head, features, target = _head_and_data(samples=15)
    domain = torch.arange(15) % 3
    size = sum(p.numel() for p in head.parameters())  # 8: all 256 sign vectors make Hutchinson exact
    monkeypatch.setattr(ha, "rademacher", lambda samples, like: all_signs(size))
    technique = HessianAlignment(estimator, alpha=2.0, beta=3.0)
    terms = technique.loss_terms(_step(head, features, target, domain), Module(head))
    hessian, gradient = _expected(features, target, domain, head, curvature)
    assert float(gradient) > 0 and float(hessian) > 0
    torch.testing.assert_close(terms["hessian"], 2.0 * hessian)
    torch.testing.assert_close(terms["gradient"], 3.0 * gradient)


def test_official_defaults_per_estimator():
    assert (HessianAlignment("hgp").alpha, HessianAlignment("hgp").beta) == (1e-4, 5e-3)
    assert (HessianAlignment("hutchinson").alpha, HessianAlignment("hutchinson").samples) == (1e-3, 300)


def test_a_batch_of_one_domain_has_nothing_to_align():
    head, features, target = _head_and_data()
    terms = HessianAlignment().loss_terms(_step(head, features, target, torch.zeros(12, dtype=torch.long)), Module(head))
    assert float(terms["hessian"]) == 0.0 and float(terms["gradient"]) == 0.0


@pytest.mark.parametrize("estimator", ["hgp", "hutchinson"])
def test_soft_targets_avoid_the_triton_kernel_and_the_penalty_reaches_the_features(estimator, monkeypatch):
    """The penalty is differentiated twice: its losses must not take the fused kernel (one backward)."""
    kernel = reglab.step.soft_cross_entropy

    def torch_only(*args, implementation="auto", **kwargs):
        assert implementation == "torch", "a twice-differentiated loss went to the auto (Triton on GPU) path"
        return kernel(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(reglab.step, "soft_cross_entropy", torch_only)
    head, features, target = _head_and_data()
    features.requires_grad_(True)
    soft = F.one_hot(target, 2).float() * 0.9 + 0.05
    out = _step(head, features, soft, torch.arange(12) % 2)
    terms = HessianAlignment(estimator, samples=8).loss_terms(out, Module(head))
    (terms["hessian"] + terms["gradient"]).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_a_module_without_the_head_is_refused_with_the_fix():
    with pytest.raises(TechniqueConfigError, match="head=<the attribute"):
        HessianAlignment(head="classifier").head_parameters(Module(nn.Linear(3, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel's fast path)")
def test_on_cuda_the_task_loss_keeps_the_kernel_and_the_penalty_still_backpropagates():
    from reglab.kernels import soft_cross_entropy
    from reglab.kernels.soft_cross_entropy import _triton_is_the_fast_path

    head, features, target = _head_and_data()
    head, features = head.cuda(), features.cuda().requires_grad_(True)
    soft = (F.one_hot(target, 2).float() * 0.9 + 0.05).cuda()
    out = _step(head, features, soft, (torch.arange(12) % 2).cuda())
    if not _triton_is_the_fast_path(out.logits, soft):
        pytest.skip("triton is not installed")
    grad = torch.autograd.grad(soft_cross_entropy(out.logits, soft), list(head.parameters()), create_graph=True)
    with pytest.raises(RuntimeError):  # the kernel's backward is not differentiable again
        grad[0].square().sum().backward(retain_graph=True)
    terms = HessianAlignment("hgp").loss_terms(out, Module(head))
    (reglab.step.cross_entropy_per_sample(out.logits, soft).mean() + terms["hessian"] + terms["gradient"]).backward()
    assert features.grad.abs().sum() > 0
