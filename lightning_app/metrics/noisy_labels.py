"""Metrics for training on noisy labels.

:class:`NoisyLabelMemorization` measures the quantities of Figure 1 of the ELR paper (Liu et al.,
"Early-Learning Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020): among the
training samples whose label was corrupted, the share the model predicts as the *false* label
("memorized") and the share it predicts as the *true* label ("corrected"). Under plain cross-entropy
the corrected share rises early in training and then falls as the memorized share climbs; ELR is
meant to keep the memorized share low.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class NoisyLabelMemorization(Metric):
    """Share of wrongly-labelled samples predicted as their noisy label vs. their clean label.

    Only samples with ``noisy_target != clean_target`` count; correctly-labelled samples are
    ignored. A noisy sample predicted as some third class is neither memorized nor corrected, so
    the two shares may sum to less than one.

    ``compute()`` returns a dict:

    * ``"memorized"``: share of noisy samples predicted as their noisy label (lower is better);
    * ``"corrected"``: share of noisy samples predicted as their clean label (higher is better);
    * ``"noisy_samples"``: how many noisy samples were seen (an integer tensor).

    When no noisy sample has been seen, both shares are ``0.0`` rather than NaN, so that logging a
    clean validation split (or an epoch before noise is injected) stays finite.

    All states are sums, so under DDP each process counts its own samples and ``compute()``
    sums the counts across processes before dividing.

    Example:
        >>> import torch
        >>> metric = NoisyLabelMemorization()
        >>> noisy_target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> clean_target = torch.tensor([0, 1, 2, 1, 2, 0])  # the last three labels are wrong
        >>> preds = torch.tensor([0, 1, 2, 0, 2, 1])  # class indices, or (N, C) logits
        >>> metric.update(preds, noisy_target, clean_target)
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'memorized': 0.3333, 'corrected': 0.3333, 'noisy_samples': 3}
    """

    is_differentiable = False
    # The two shares point in opposite directions (memorized: lower is better, corrected: higher
    # is better), so no single direction can be declared for the dict this metric returns.
    higher_is_better = None
    full_state_update = False

    noisy_samples: Tensor
    memorized: Tensor
    corrected: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for state in ("noisy_samples", "memorized", "corrected"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, noisy_target: Tensor, clean_target: Tensor) -> None:
        """Count the noisy samples of a batch.

        Args:
            preds: logits or probabilities of shape ``(N, C)``, or predicted class indices of
                shape ``(N,)`` (integer dtype).
            noisy_target: the labels the model was trained on, shape ``(N,)``.
            clean_target: the true labels, shape ``(N,)``.
        """
        predicted_class = _predicted_class(preds)
        if not (predicted_class.shape == noisy_target.shape == clean_target.shape):
            raise ValueError(
                "preds, noisy_target and clean_target must describe the same N samples, got "
                f"shapes {tuple(preds.shape)}, {tuple(noisy_target.shape)}, "
                f"{tuple(clean_target.shape)}"
            )
        is_noisy = noisy_target != clean_target
        self.noisy_samples += is_noisy.sum()
        self.memorized += (is_noisy & (predicted_class == noisy_target)).sum()
        self.corrected += (is_noisy & (predicted_class == clean_target)).sum()

    def compute(self) -> dict[str, Tensor]:
        """Return the memorized and corrected shares and the number of noisy samples seen."""
        # clamp_min avoids 0/0; torch.where then replaces those shares by 0 without a
        # data-dependent Python branch (which would force a device sync).
        denominator = self.noisy_samples.clamp_min(1).float()
        has_noisy = self.noisy_samples > 0
        zero = torch.zeros((), device=self.device)
        return {
            "memorized": torch.where(has_noisy, self.memorized / denominator, zero),
            "corrected": torch.where(has_noisy, self.corrected / denominator, zero),
            "noisy_samples": self.noisy_samples,
        }


def _predicted_class(preds: Tensor) -> Tensor:
    if preds.ndim == 2:
        return preds.argmax(dim=1)
    if preds.ndim == 1 and not preds.is_floating_point():
        return preds
    # A 1-D float tensor is most likely binary probabilities, which would almost never equal an
    # integer label and so silently count as "neither"; refuse instead of guessing.
    raise ValueError(
        "preds must be (N, C) logits/probabilities or (N,) integer class indices, got shape "
        f"{tuple(preds.shape)} with dtype {preds.dtype}"
    )
