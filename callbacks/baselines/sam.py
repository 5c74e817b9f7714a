"""SAM — sharpness-aware minimization (Foret et al., ICLR 2021), as a step-contract technique.

SAM minimizes the worst loss in a small L2 ball around the weights, to first order:

    e    = rho * g / ||g||,      g = grad_w L(w)        (one norm over all trainable parameters)
    step = optimizer step with grad_w L(w + e)

ASAM (Kwon et al., 2021; ``adaptive=True``) scales the ball by ``|w|`` element-wise:
``e = rho * w^2 g / ||w g||``.

Defaults follow the official code (google-research/sam, ``sam_jax/training_utils/flax_training.py``)
and the PyTorch port DomainBed-style codebases use (davda54/sam, ``sam.py``): ``rho = 0.05``,
``adaptive = False``, ``e`` divided by ``||g|| + 1e-12``. As in the official code
(``sync_perturbations = False``) and the paper's m-sharpness, every process perturbs with the
gradient of its own samples; here also every micro-batch of gradient accumulation does, and the
applied gradient is the (DDP- and accumulation-) mean of the micro-batches' ``grad L_i(w + e_i)``.
As in davda54/sam's advice, the perturbed pass does not update batch-norm running statistics.

How it runs (docs/architecture.md, "The step contract"): SAM answers the contract's
``perturb_weights`` stage with ``e``; the step evaluates the task loss again at ``w + e`` and
returns that loss, whose gradient reaches the unmoved weights. So the module's own optimizer,
LR schedule, gradient clipping and checkpoints are untouched: no optimizer wrapper, no
``optimizer.step(closure)``. Other techniques' loss terms are evaluated at ``w`` (SAM perturbs
the task loss only). The contract refuses ``16-mixed`` at setup for every ``perturb_weights``
technique (the ascent gradient is taken on the unscaled loss, outside the gradient scaler;
``bf16-mixed`` is fine), and FSDP (the perturbed pass substitutes whole weights).

Method card: ``sam.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import SAM
    >>> sam = SAM(rho=0.05)   # add to Trainer(callbacks=[sam]) with a RegularizedMixin module
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique, ascent_offsets, trainable_parameters


class SAM(Technique):
    """Sharpness-aware minimization of the task loss (see the module docstring).

    Args:
        rho: radius of the L2 ball of weight perturbations (the paper's rho).
        adaptive: ASAM's scale-invariant ball (use a larger rho, ~10x, as the ASAM paper does).
    """

    name = "sam"

    def __init__(self, rho: float = 0.05, adaptive: bool = False) -> None:
        if not rho > 0:
            raise ValueError(f"SAM: rho must be > 0, got {rho}")
        self.rho, self.adaptive = rho, adaptive

    def perturb_weights(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        return ascent_offsets(out.task_loss.mean(), trainable_parameters(module), self.rho, self.adaptive)
