"""Music FaderNets (Tan & Herremans, "Music FaderNets: Controllable Music Generation Based On High-Level
Features via Low-Level Feature Modelling", ISMIR 2020): latent dimensions tied to low-level attributes
("faders") by attribute regularization, and a Gaussian-mixture prior whose components are the classes of a
high-level attribute (arousal), trained semi-supervised — on :class:`reglab.tasks.VAEModule`.

Read from the official code (``gudgud96/music-fader-nets``, ``trainer_gmm.py`` and ``gmm_model.py``):

* **Faders** (``latent_regularized_loss_function``, "Pati et al. 2019"): for attribute ``a`` tied to latent
  dimension ``d``, over every pair ``(i, j)`` of the batch, the mean squared error between
  ``tanh(delta (z_i[d] - z_j[d]))`` and ``sign(a_i - a_j)`` (:func:`attribute_regularization`), on the
  sampled ``z``; the official code uses ``delta`` 1 and adds each attribute's term with weight 1 (kept: the
  defaults). Pati & Lerch's own AR-VAE uses the L1 distance and ``delta`` 10 (not used).
* **GM-VAE** for the high-level attribute: the module's mixture prior (``prior_components``: one component
  per class, the official ``num_clusters`` 2 for low/high arousal; its fixed log-variance -4). Samples with a
  label train on ``KL(q(z | x) || p(z | y))`` in place of the module's unsupervised mixture KL, plus the
  cross-entropy of ``q(y | x)`` against the label (weight ``classification_weight``, 1 as there; the official
  code passes the softmax probabilities to ``CrossEntropyLoss``, here the logits ``log p(z | y) + log 1/K``
  are its input, the cross-entropy of q(y | x) itself). The others keep the module's unsupervised term.
  Which samples have a label is ``labelled_fraction``: those whose training index is a multiple of
  ``round(1 / labelled_fraction)`` (the paper labels 1% of its data; the official trainer runs the labelled
  VGMIDI set supervised and the Yamaha set unsupervised).

Adapted to reglab's scale: the official model has a recurrent encoder per attribute (rhythm, note) with a
128-d latent each, fader at dimension 0 of each, a mixture prior per encoder and a global GRU decoder over
event tokens, trained with beta 0.2 annealed from step 1,000 on; here one MLP VAE on piano rolls, one latent
whose first dimensions are the faders (``attribute_dims``: attribute ``k`` tied to dimension ``k`` by
default), one mixture prior over the whole latent and the module's fixed ``beta`` (no annealing).

Mechanism in the step contract: ``task_loss`` is the module's (reconstruction + beta KL) with the labelled
samples' KL replaced; ``loss_terms`` adds the per-attribute regularization (logged ``ar_<k>``) and the
classification term. The batch's ``attributes`` (``(N, A)``) and ``target`` (the high-level class) come from
the DataModule (:class:`reglab.datamodules.MusicDataModule`). The plain-VAE baseline is the module alone.

Method card (what it does, when it helps, what it costs): ``fadernets.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.tasks import VAEModule
    >>> module = VAEModule(input_shape=(1, 4, 8), latent_dim=4, hidden_dims=(16,), prior_components=2)
    >>> batch = {"input": torch.rand(6, 1, 4, 8).round(), "target": torch.tensor([0, 1] * 3),
    ...          "index": torch.arange(6), "attributes": torch.rand(6, 2)}
    >>> faders = FaderNets()
    >>> out = module.forward_step(batch)
    >>> sorted(faders.loss_terms(out, module)), faders.task_loss(out, module).shape
    (['ar_0', 'ar_1', 'classification'], torch.Size([6]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from reglab.step import StepOutput
from reglab.technique import Technique


def attribute_regularization(z: Tensor, attribute: Tensor, delta: float = 1.0) -> Tensor:
    """The pairwise loss tying the ``(N,)`` latent coordinate ``z`` to the ``(N,)`` ``attribute``:
    ``mean_ij (tanh(delta (z_i - z_j)) - sign(a_i - a_j))^2`` (the official Music FaderNets loss)."""
    z, attribute = z.float(), attribute.float()
    return (torch.tanh(delta * (z[:, None] - z[None, :])) - torch.sign(attribute[:, None] - attribute[None, :])
            ).square().mean()


class FaderNets(Technique):
    """Faders (attribute-regularized latent dimensions) and a semi-supervised GM-VAE prior (module docstring).

    Args:
        attribute_dims: the latent dimension of each attribute column (default: attribute ``k`` on dimension ``k``).
        regularization_weight: weight of each attribute's regularization term (official: 1).
        delta: the tanh's scale of latent differences (official: 1).
        classification_weight: weight of the cross-entropy of q(y | x) on labelled samples (official: 1).
        labelled_fraction: the share of training samples whose high-level label is used (module docstring).
    """

    name = "fadernets"
    needs = frozenset({"attributes", "index"})

    def __init__(self, attribute_dims: Optional[Sequence[int]] = None, regularization_weight: float = 1.0,
                 delta: float = 1.0, classification_weight: float = 1.0, labelled_fraction: float = 1.0) -> None:
        if regularization_weight < 0 or classification_weight < 0 or delta <= 0:
            raise self.fail(f"regularization_weight={regularization_weight}, classification_weight="
                            f"{classification_weight}, delta={delta}", "use weights >= 0 and delta > 0 (official: 1)")
        if not 0 <= labelled_fraction <= 1:
            raise self.fail(f"labelled_fraction={labelled_fraction} is not in [0, 1]",
                            "give the share of labelled training samples, e.g. 0.01 (the paper's) or 1")
        dims = None if attribute_dims is None else [int(d) for d in attribute_dims]
        if dims is not None and len(set(dims)) != len(dims):
            raise self.fail(f"attribute_dims {dims} repeat a dimension", "tie each attribute to its own dimension")
        self.attribute_dims, self.delta = dims, float(delta)
        self.regularization_weight, self.classification_weight = float(regularization_weight), float(classification_weight)
        # every period-th training index is labelled; 0: none
        self.period = round(1 / labelled_fraction) if labelled_fraction > 0 else 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        hparams = getattr(pl_module, "hparams", {})
        if not callable(getattr(pl_module, "component_kl", None)) or "latent_dim" not in hparams:
            raise self.fail(f"{type(pl_module).__name__} is not a VAE with a mixture prior",
                            "use it on reglab.tasks.VAEModule with prior_components: 2 (one per high-level class)")
        if hparams.get("prior_components", 0) < 2:
            raise self.fail("the VAE's prior is N(0, I), not a Gaussian mixture for the high-level attribute",
                            "set model.init_args.prior_components to the number of high-level classes (2)")
        dims = self.attribute_dims or []
        if dims and not all(0 <= d < hparams["latent_dim"] for d in dims):
            raise self.fail(f"attribute_dims {dims} lie outside the latent's {hparams['latent_dim']} dimensions",
                            "pick dimensions below latent_dim, or a larger latent_dim")
        num_classes = getattr(trainer.datamodule, "num_classes", None)
        if num_classes is not None and num_classes != hparams["prior_components"]:
            raise self.fail(f"the data has {num_classes} high-level classes but the prior "
                            f"{hparams['prior_components']} components", f"set prior_components: {num_classes}")

    def dims(self, attributes: int, latent_dim: int) -> list[int]:
        """The latent dimension of each of ``attributes`` attribute columns."""
        dims = self.attribute_dims if self.attribute_dims is not None else list(range(attributes))
        if len(dims) != attributes or attributes > latent_dim:
            raise self.fail(f"the batches carry {attributes} attributes but {len(dims)} latent dimensions are tied "
                            f"(latent_dim {latent_dim})", "give one attribute_dims entry per attribute column")
        return dims

    def labelled(self, index: Tensor) -> Tensor:
        """``(N,)`` bool: the samples whose high-level label trains (module docstring)."""
        if not self.period:
            return torch.zeros_like(index, dtype=torch.bool)
        return index % self.period == 0

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        extras = out.extras
        kl = extras["kl"]
        labelled = self.labelled(out.batch["index"])
        if bool(labelled.any()):
            supervised = module.component_kl(extras["mu"], extras["logvar"]).gather(
                1, out.batch["target"].long().unsqueeze(1)).squeeze(1)
            kl = torch.where(labelled, supervised, kl)
        return extras["reconstruction"] + module.hparams.beta * kl

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        attributes = out.batch["attributes"]
        z = out.extras["z"]
        terms = {f"ar_{k}": self.regularization_weight * attribute_regularization(z[:, d], attributes[:, k], self.delta)
                 for k, d in enumerate(self.dims(attributes.shape[1], z.shape[1]))}
        labelled = self.labelled(out.batch["index"])
        if bool(labelled.any()) and self.classification_weight:
            logits = out.extras["component_logits"][labelled]
            terms["classification"] = self.classification_weight * torch.nn.functional.cross_entropy(
                logits, out.batch["target"][labelled].long())
        return terms
