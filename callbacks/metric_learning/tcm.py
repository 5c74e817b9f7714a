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
``margin_minus = 0.5``), computed here in matrix form on the batch's similarity matrix: PML gathers
the pairs' embeddings by index, whose backward accumulates in a thread-dependent order on CPU, so
two identical runs (and a run and its resume) would drift apart bitwise. ``tests/test_tcm.py``
checks the two agree. This callback adds the term to the module's task loss through the step
contract and logs it as ``train/tcm/tcm``. No official code of the paper was found in this session;
the formula above is PML's (its own unit test checks it by hand) and the paper's abstract's.

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
import torch
import torch.nn.functional as F
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
        self.lambda_plus, self.lambda_minus = lambda_plus, lambda_minus
        self.margin_plus, self.margin_minus = margin_plus, margin_minus

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        # fp32: bf16 resolves cosines near the margin 0.9 to about 0.004
        return {"tcm": self.margin_loss(out.features.float().flatten(1), out.labels)}

    def margin_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``L_TCM`` of the module docstring over every pair of ``embeddings``."""
        normalized = F.normalize(embeddings, dim=1)
        similarity = normalized @ normalized.T
        same = labels[:, None] == labels[None, :]
        off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        hard_positive = same & off_diagonal & (similarity <= self.margin_plus)
        hard_negative = ~same & (similarity >= self.margin_minus)
        # a side without hard pairs adds 0: the clamped count keeps 0/0 out
        positive = ((self.margin_plus - similarity) * hard_positive).sum() / hard_positive.sum().clamp_min(1)
        negative = ((similarity - self.margin_minus) * hard_negative).sum() / hard_negative.sum().clamp_min(1)
        return self.lambda_plus * positive + self.lambda_minus * negative
