"""LegoGCD (Cao et al., CVPR 2024): local entropy regularization and the dual-view KL on the
SimGCD-style baseline, so that learning the novel classes does not forget the known ones."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.step import StepOutput
from reglab.tasks import DiscoveryModule
from reglab.technique import Technique


def confident_known(student_logits: Tensor, unlabelled: Tensor, threshold: float, num_known_classes: int) -> Tensor:
    """LER's sample mask: unlabelled rows whose top class probability (at the student temperature)
    is at least ``threshold`` and whose top class is a known one (``mask_old`` of the official code).

    Example:
        >>> logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
        >>> confident_known(logits, torch.tensor([True, True, False, True]), 0.7, num_known_classes=2).tolist()
        [True, False, False, False]
    """
    top, predicted = F.softmax(student_logits.float(), dim=-1).max(-1)
    return unlabelled & (top >= threshold) & (predicted < num_known_classes)


def local_entropy(cosine: Tensor, mask: Tensor, temperature: float, log_prior: Tensor, debias: float) -> Tensor:
    """LER: per row ``-sum_c p_c log q_c`` with ``p = softmax(cosine / temperature)`` and ``q`` the
    same logits shifted by ``debias * log_prior`` (the code's debiased pseudo-label, ``qhat``), on
    the masked rows; averaged over *all* rows (unmasked rows count as zero, as the code's
    ``nll_loss.mean()``). With ``debias=0`` it is the mean entropy of the masked predictions; both
    factors carry gradient, as in the code.

    Example:
        >>> cosine = torch.tensor([[0.1, 0.1], [1.0, 0.0]])
        >>> uniform = torch.full((2,), 0.5).log()
        >>> round(float(local_entropy(cosine, torch.tensor([True, False]), 0.05, uniform, 0.4)), 4)  # log 2 / 2
        0.3466
    """
    p = F.softmax(cosine.float() / temperature, dim=-1)
    log_q = F.log_softmax(cosine.float() / temperature + debias * log_prior, dim=-1)
    return (-(p * log_q).sum(-1) * mask).mean()


def dual_view_kl(student_logits: Tensor) -> Tensor:
    """DKL: ``KL(p1 || p2)`` between the predictions of a batch's two views (rows ``[view1; view2]``),
    averaged over samples; gradient through both views (the code detaches neither).

    Example:
        >>> same = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
        >>> float(dual_view_kl(same))
        0.0
    """
    log_p1, log_p2 = F.log_softmax(student_logits.float(), dim=-1).chunk(2)
    return (log_p1.exp() * (log_p1 - log_p2)).sum(-1).mean()


class LegoGCD(Technique):
    """LegoGCD's two terms on :class:`~reglab.tasks.DiscoveryModule` (the SimGCD-style baseline).

    * **LER** (local entropy regularization): the unlabelled samples that the classifier puts in a
      *known* class with probability at least ``threshold`` get their prediction sharpened, an
      entropy at the sharper ``ler_temperature`` (:func:`local_entropy`), weighted ``ler_weight``;
      the cross-entropy's target is debiased by ``debias * log qhat``, ``qhat`` an EMA (momentum
      ``prior_momentum``) of the batches' mean class distribution, as in the code.
    * **DKL** (dual-view KL): ``KL(p_view1 || p_view2)`` of the student predictions
      (:func:`dual_view_kl`), weighted ``dkl_weight`` (default ``1 - sup_weight`` of the module: the
      code adds it inside SimGCD's clustering loss, which carries that weight).

    Logged as ``train/lego_gcd/{ler,dkl}`` (weighted) and ``train/lego_gcd/confident_known`` (the
    share of rows LER acts on).

    Follows the official code (github.com/Cliffia123/LegoGCD, ``train.py`` and ``model.py``'s
    ``DistillLoss``): threshold 0.7 (its default; its CIFAR-100 script uses 0.85), LER weight 2 at
    temperature 0.05 with debias 0.4 and ``qhat`` momentum 0.999, ``qhat`` the mean softmax of the
    raw cosine scores (no temperature, as the code). Where code and paper disagree: the code's DKL
    applies ``log_softmax`` to the already-softmaxed predictions (a KL between two flattened
    distributions); this module computes the KL of the predictions themselves, as the paper writes
    it. The code's debiasing of the LER target by ``qhat`` is not in the paper's description of LER;
    it is kept (the code's default) and ``debias=0`` turns it off.

    State: ``qhat`` (saved in checkpoints; under DDP each step's batch mean is averaged across
    ranks, so every rank keeps the same prior).

    Args:
        threshold: minimum top-class probability for a sample to be regularized.
        ler_weight, ler_temperature: LER's weight and its temperature on the cosine scores.
        debias, prior_momentum: the ``qhat`` debiasing factor and its EMA momentum.
        dkl_weight: DKL's weight (``None``: ``1 - sup_weight`` of the module).

    Example:
        >>> from reglab.datamodules import DiscoveryDataModule
        >>> data = DiscoveryDataModule("blobs", known_classes=[0, 1, 2], batch_size=64)
        >>> module = DiscoveryModule("mlp", input_shape=data.input_shape, num_classes=data.num_classes,
        ...                          num_known_classes=data.num_known_classes)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[LegoGCD()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train/lego_gcd/"))
        ['train/lego_gcd/confident_known', 'train/lego_gcd/dkl', 'train/lego_gcd/ler']
    """

    name = "lego_gcd"
    stateful = True

    def __init__(self, threshold: float = 0.7, ler_weight: float = 2.0, ler_temperature: float = 0.05,
                 debias: float = 0.4, prior_momentum: float = 0.999, dkl_weight: Optional[float] = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise self.fail(f"threshold {threshold} must lie in (0, 1]", "use e.g. the code's 0.7")
        if ler_temperature <= 0:
            raise self.fail(f"ler_temperature {ler_temperature} must be positive", "use e.g. the code's 0.05")
        if not 0.0 <= prior_momentum < 1.0:
            raise self.fail(f"prior_momentum {prior_momentum} must lie in [0, 1)", "use e.g. the code's 0.999")
        if ler_weight < 0 or (dkl_weight is not None and dkl_weight < 0):
            raise self.fail("ler_weight and dkl_weight must not be negative", "use weights >= 0")
        self.threshold, self.ler_weight, self.ler_temperature = threshold, ler_weight, ler_temperature
        self.debias, self.prior_momentum, self.dkl_weight = debias, prior_momentum, dkl_weight
        self.qhat: Optional[Tensor] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, DiscoveryModule):
            raise self.fail(f"it needs a DiscoveryModule (its cosine scores, views and labelled mask), got "
                            f"{type(pl_module).__name__}", "train a reglab.tasks.DiscoveryModule")
        super().setup(trainer, pl_module, stage)
        num_classes = pl_module.hparams.num_classes
        if self.qhat is None:
            self.qhat = torch.full((num_classes,), 1.0 / num_classes)
        elif len(self.qhat) != num_classes:
            raise self.fail(f"its class prior has {len(self.qhat)} classes, the module {num_classes}",
                            "build a new LegoGCD for a model with another class count")

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if out.extras.get("views") != 2:
            return {}
        h = module.hparams
        mask = confident_known(out.logits.detach(), ~out.extras["labelled"], self.threshold, h.num_known_classes)
        log_prior = self.qhat.to(out.logits.device).log()
        ler = local_entropy(out.extras["cosine"], mask, self.ler_temperature, log_prior, self.debias)
        dkl_weight = 1.0 - h.sup_weight if self.dkl_weight is None else self.dkl_weight
        if module._trainer is not None:
            module.log(f"train/{self.name}/confident_known", mask.float().mean(), on_step=False, on_epoch=True,
                       batch_size=len(mask))
        return {"ler": self.ler_weight * ler, "dkl": dkl_weight * dual_view_kl(out.logits)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        out = outputs["step_output"]
        if out.extras.get("views") != 2:
            return
        batch_prior = F.softmax(out.extras["cosine"].float(), dim=-1).mean(0)
        batch_prior = trainer.strategy.reduce(batch_prior, reduce_op="mean")
        self.qhat = self.prior_momentum * self.qhat.to(batch_prior.device) + (1 - self.prior_momentum) * batch_prior

    def state_dict(self) -> dict[str, Any]:
        return {} if self.qhat is None else {"qhat": self.qhat.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "qhat" in state_dict:
            self.qhat = state_dict["qhat"].clone()
