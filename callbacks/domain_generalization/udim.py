"""UDIM — Unknown Domain Inconsistency Minimization (Shin et al., ICLR 2024, paper 22).

SAM flattens the loss landscape of the source domains only. UDIM crafts an "unknown domain" by
perturbing the source inputs in the direction that most increases both the loss and its
sharpness, and aligns the loss landscape there with the source one. Per step, on a batch
``(x, y)`` of all training domains, with weights ``w``:

    1. SAM:     e = rho * g / ||g||,  g = grad_w CE(x; w);  task loss trained on at w + e
    2. unknown domain:   x~ = x + rho_x * normalize_0( grad_x [CE(x; w) + rho * ||grad_w CE(x; w)||] )
    3. inconsistency at w, from the per-sample gradients G of CE w.r.t. the linear classifier head
       (weight and bias) on x (source, S) and on x~ (perturbed, P):
         var_S = mean_i (G_S,i - mu_S)^2,   var_P = mean_i (G_P,i - mu_S)^2,   mu_S = mean_i G_S,i
         variance_gap  = lam * mean((var_S - var_P)^2) / 4
         gradient_norm = lam * sum over head parameters of mean_i ||G_P,i||^2 / (its element count)

    loss = CE(x; w + e) + variance_gap + gradient_norm

Source: the official code (github.com/aailabkaist/UDIM, ``domainbed/iada/iada_final.py``,
``IADA_FINAL``, and the PACS scripts ``bash/udim_pacs_*.sh``), whose defaults are used:
``rho = 0.05`` (SAM radius and the sharpness weight of the input ascent, ``rho_t = rho_s``),
``rho_x = 10`` (``--syn_lr 10``), ``lam = 1`` (``--worst_weight 1``), SAM alone for the first
fifth of training (``--sam_warm_up_ratio 5``; here counted in whole epochs, so a resumed run
follows the same schedule). Only the paper's abstract and introduction were at hand, not its method
section, so the formulas above are the code's. Details where we differ from, or make explicit, the code:

* ``normalize_0`` is the code's ``F.normalize(grad, p=2, dim=0)``: each input element's gradient
  is normalized over the *batch* dimension, not per sample (kept as the code does it);
* the perturbed variance is centred at the *source* mean ``mu_S`` (as in the code's
  ``_get_grads_var``); the gap ``sum_d ||var_d - mean_d var_d||^2 / 2`` of the code's two
  "domains" equals ``mean((var_S - var_P)^2) / 4`` over all head elements;
* per-sample head gradients in closed form, ``(softmax(z) - onehot(y)) h^T`` and
  ``softmax(z) - onehot(y)`` for a linear head ``z = W h + b`` (the code uses BackPACK on the
  classifier); their squared norms are the code's ``BatchL2Grad``;
* source and perturbed inputs go through the network in two passes (the code concatenates
  them into one), so batch-norm layers see each half's own batch statistics; the extra passes
  leave batch-norm running statistics untouched (the code removes them with functorch's
  ``replace_all_batch_norm_modules_``);
* the code switches to UDIM after a separate SAM warm-up run and reloads its checkpoint; here
  one fit adds the inconsistency terms from epoch ``round(warmup * epochs)`` on;
* losses use the data's hard labels (``labels``) and plain ``F.cross_entropy``, which has a
  double backward (the step 2 ascent differentiates a gradient norm); the Triton soft-CE kernel
  of the task loss has a single backward and is never differentiated twice here.

The SAM part is the step contract's ``perturb_weights`` stage (docs/architecture.md, "The step
contract"); the inconsistency terms are ordinary loss terms at ``w``, as in the code, where the
two gradients are summed (``merge_grad``).

Method card: ``udim.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.domain_generalization import UDIM
    >>> udim = UDIM(rho=0.05, input_rho=10.0, lam=1.0)   # Trainer(callbacks=[udim]), a linear-head model
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.step import forward_step_with
from reglab.technique import Technique, ascent_offsets, schedule_epochs, trainable_parameters


def head_gradients(features: Tensor, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of ``CE(z_i, y_i)`` w.r.t. a linear head ``z = W h + b``, in fp32:
    ``{"weight": (N, C*D), "bias": (N, C)}``, differentiable in ``features`` and ``logits``."""
    residual = logits.float().softmax(-1) - F.one_hot(labels, logits.shape[-1]).float()
    weight = residual[:, :, None] * features.float()[:, None, :]
    return {"weight": weight.flatten(1), "bias": residual}


def inconsistency(source: dict[str, Tensor], perturbed: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(variance gap, perturbed gradient norm)`` of per-sample head gradients (module docstring)."""
    gaps, norm = [], torch.zeros((), device=next(iter(source.values())).device)
    for name, grads in source.items():
        mean = grads.mean(0)
        gaps.append((grads - mean).square().mean(0) - (perturbed[name] - mean).square().mean(0))
        norm = norm + perturbed[name].square().sum(1).mean() / grads.shape[1]
    return torch.cat(gaps).square().mean() / 4, norm


class UDIM(Technique):
    """SAM plus the inconsistency between source and perturbed-input loss landscapes.

    Args:
        rho: SAM's radius, and the weight of the sharpness term in the input ascent.
        input_rho: step length of the input perturbation (the code's ``syn_lr``).
        lam: weight of the inconsistency terms (the code's ``worst_weight``).
        warmup: share of the training epochs trained with SAM alone (the code's
            ``1 / sam_warm_up_ratio``); ``0`` adds the terms from the first step.
        total_epochs: the epochs the warm-up share is taken of (default: ``trainer.max_epochs``).

    Needs a module whose ``forward_step`` returns ``features`` feeding a linear ``head``
    (``ClassificationModule``), and inputs in ``batch["input"]`` that can be differentiated.
    Logs ``train/udim/variance_gap`` and ``train/udim/gradient_norm``.
    """

    name = "udim"
    needs = frozenset({"features"})

    def __init__(self, rho: float = 0.05, input_rho: float = 10.0, lam: float = 1.0, warmup: float = 0.2,
                 total_epochs: int | None = None) -> None:
        if not rho > 0:
            raise ValueError(f"UDIM: rho must be > 0, got {rho}")
        if input_rho < 0 or lam < 0:
            raise ValueError(f"UDIM: input_rho and lam must be >= 0, got {input_rho} and {lam}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"UDIM: warmup must be a share of the epochs in [0, 1), got {warmup}")
        self.rho, self.input_rho, self.lam = rho, input_rho, lam
        self.warmup, self.total_epochs = warmup, total_epochs
        self.warmup_epochs = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, "head", None), nn.Linear):
            raise self.fail(
                f"its inconsistency terms use the closed-form per-sample gradients of a linear classifier "
                f"head, and {type(pl_module).__name__} has no `head` that is an nn.Linear on its features",
                "use reglab.tasks.ClassificationModule (its head is nn.Linear), or a module with such a `head`",
            )
        if self.warmup:
            self.warmup_epochs = round(self.warmup * schedule_epochs(self, trainer, self.total_epochs))

    def perturb_weights(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        return ascent_offsets(out.task_loss.mean(), trainable_parameters(module), self.rho)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if module.current_epoch < self.warmup_epochs:
            return {}
        perturbed = forward_step_with(module, {**out.batch, "input": self.perturbed_inputs(out, module)})
        gap, norm = inconsistency(head_gradients(out.features, out.logits, out.labels),
                                  head_gradients(perturbed.features, perturbed.logits, out.labels))
        return {"variance_gap": self.lam * gap, "gradient_norm": self.lam * norm}

    def perturbed_inputs(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        """The unknown domain's inputs ``x~`` (step 2 of the module docstring), detached."""
        inputs = out.batch["input"]
        if not torch.is_tensor(inputs) or not inputs.is_floating_point():
            raise self.fail(
                "it perturbs the inputs along their gradient, but batch['input'] is not a floating-point tensor",
                "use it on image or feature inputs (not token ids)",
            )
        start = inputs.detach().clone().requires_grad_(True)
        at_start = forward_step_with(module, {**out.batch, "input": start})
        loss = F.cross_entropy(at_start.logits.float(), out.labels)
        parameters = list(trainable_parameters(module).values())
        grads = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
        sharpness = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        (direction,) = torch.autograd.grad(loss + self.rho * sharpness, start)
        return (inputs + self.input_rho * F.normalize(direction, p=2.0, dim=0)).detach()
