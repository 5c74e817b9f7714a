"""Parameters anchored to reference values: the quadratic pull that several families share.

L2 to the previous task and EWC (continual learning), SI, and L2-SP (fine-tuning baselines) all
penalise ``sum_i Omega_i (theta_i - theta*_i)^2`` between the trainable parameters and an anchor
``theta*`` they keep as state. What they share lives here, in the core:

* :func:`trainable_parameters` — the trainable parameters by name (as in the uncompiled module);
* :func:`quadratic_penalty` — the weighted squared distance to the anchor, in fp32;
* :func:`flatten_state` / :func:`unflatten_state` — named tensors as top-level entries of a
  technique's ``state_dict`` (so checkpoints and the harness see each one), and back;
* :func:`tensors_on` — a name -> tensor map on the device the parameters are on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def trainable_parameters(module: torch.nn.Module) -> dict[str, Tensor]:
    # named as in the uncompiled module, so a compiled one matches an anchor taken without compile
    return {name.replace("_orig_mod.", ""): p for name, p in module.named_parameters() if p.requires_grad}


def quadratic_penalty(
    parameters: Mapping[str, Tensor], anchor: Mapping[str, Tensor], importance: Mapping[str, Tensor] | None
) -> Tensor:
    """``sum_i Omega_i (theta_i - theta*_i)^2`` over the anchored parameters, in fp32
    (``importance=None`` means Omega = 1)."""
    total = torch.zeros((), device=next(iter(parameters.values())).device)
    for name, reference in anchor.items():
        squared = (parameters[name].float() - reference).pow(2)
        total = total + (squared if importance is None else importance[name] * squared).sum()
    return total


def flatten_state(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{prefix.name: tensor}``: top-level tensors, so checkpoints and the harness see each one."""
    return {f"{prefix}.{name}": t.detach().cpu().clone() for name, t in tensors.items()}


def unflatten_state(prefix: str, state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}


def tensors_on(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``tensors`` on ``device`` (the same dict when they already are)."""
    if all(t.device == device for t in tensors.values()):
        return tensors
    return {name: t.to(device) for name, t in tensors.items()}
