"""TCM, the threshold-consistent margin regularizer (Zhang et al., "Threshold-Consistent Margin Loss
for Open-World Deep Metric Learning", ICLR 2024), added to the base metric loss.

On the batch's cosine similarities ``S_ij`` (every pair of the batch, no miner), TCM penalizes only
the hard pairs: same-class pairs less similar than ``margin_plus`` and different-class pairs more
similar than ``margin_minus``, each side averaged over its hard pairs alone:

    L_TCM = lambda_plus  * sum_{y_i = y_j} (m+ - S_ij) 1[S_ij <= m+] / sum_{y_i = y_j} 1[S_ij <= m+]
          + lambda_minus * sum_{y_i != y_j} (S_ij - m-) 1[S_ij >= m-] / sum_{y_i != y_j} 1[S_ij >= m-]
    loss  = base metric loss + L_TCM

(a side with no hard pair contributes 0). Averaging over the hard pairs only keeps the pull as
strong when few pairs are hard, so every class's pairs are pushed to the same two margins: one
threshold between them serves every class alike, which :class:`~reglab.metrics.OPIS` measures.

The loss is PyTorch Metric Learning's ``ThresholdConsistentMarginLoss`` (its docstring cites the
paper; its defaults, used here: ``lambda_plus = lambda_minus = 1``, ``margin_plus = 0.9``,
``margin_minus = 0.5``); this callback adds it to the module's task loss through the step contract
and logs it as ``train/tcm/tcm``. No official code of the paper was found in this session; the
formula above is PML's, which its own unit test checks by hand.

Method card (what it does, when it helps, what it costs): ``tcm.card.yaml``.

Example:
    >>> import torch
    >>> from reglab.callbacks.metric_learning import TCM
    >>> from reglab.step import StepOutput
    >>> tcm = TCM()
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # S_01 = 0.6, S_02 = 0, S_12 = 0.8
    >>> out = StepOutput(logits=embeddings @ embeddings.T, target=torch.tensor([0, 0, 1]), features=embeddings)
    >>> round(tcm.loss_terms(out, None)["tcm"].item(), 4)  # (0.9 - 0.6) + (0.8 - 0.5)
    0.6
"""

from __future__ import annotations

import lightning as L
from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique


class TCM(Technique):
    """Threshold-consistent margin regularizer on the batch's embeddings (module docstring).

    Args:
        lambda_plus: weight of the same-class (hard positive) side.
        lambda_minus: weight of the different-class (hard negative) side.
        margin_plus: same-class pairs with a cosine similarity at most this are penalized.
        margin_minus: different-class pairs with a cosine similarity at least this are penalized.
    """

    name = "tcm"
    needs = frozenset({"features"})

    def __init__(self, lambda_plus: float = 1.0, lambda_minus: float = 1.0, margin_plus: float = 0.9,
                 margin_minus: float = 0.5) -> None:
        if lambda_plus < 0 or lambda_minus < 0:
            raise self.fail(f"lambda_plus and lambda_minus must be non-negative, got {lambda_plus} and {lambda_minus}",
                            "use weights >= 0 (1.0 each is the default)")
        if not -1.0 <= margin_minus < margin_plus <= 1.0:
            raise self.fail(f"the margins must be cosine similarities with -1 <= margin_minus < margin_plus <= 1, got "
                            f"margin_minus={margin_minus}, margin_plus={margin_plus}",
                            "e.g. margin_plus=0.9, margin_minus=0.5")
        self.loss = ThresholdConsistentMarginLoss(lambda_plus=lambda_plus, lambda_minus=lambda_minus,
                                                  margin_plus=margin_plus, margin_minus=margin_minus)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        # fp32: the margins sit 0.1 apart in cosine, finer than bf16 resolves near 1
        return {"tcm": self.loss(out.features.float().flatten(1), out.labels)}
