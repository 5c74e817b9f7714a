"""Measures of generated token sequences: repetition, diversity, and the sharpness of the predictions.

torchmetrics has perplexity (:class:`torchmetrics.text.Perplexity`, which the language model
logs) but none of these, so they are written here as torchmetrics ``Metric``\\ s (states summed or
concatenated across processes):

* :class:`NgramRepetition` — Welleck et al.'s (2019) ``seq-rep-n``: per generation, the share of its
  n-grams that repeat an earlier one, ``1 - |unique n-grams| / |n-grams|``, averaged over generations;
* :class:`DistinctN` — Li et al.'s (2016) ``distinct-n``: distinct n-grams over all generations
  together divided by their total count;
* :class:`PredictiveEntropy` — the mean entropy (nats) of next-token distributions, e.g. the ones a
  greedy decoder picked its tokens from (hyperfitting makes them near one-hot).

Generations are ``(N, T)`` integer tensors of the generated tokens only (no prompt, no padding).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def ngrams(tokens: Tensor, n: int) -> Tensor:
    """``(N, T - n + 1, n)``: the n-grams of each row of ``(N, T)`` ``tokens``."""
    if tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"expected (N, T) integer token ids, got {tuple(tokens.shape)} of {tokens.dtype}")
    if tokens.shape[1] < n:
        raise ValueError(f"generations of {tokens.shape[1]} tokens have no {n}-grams. Fix: generate at least {n} tokens.")
    return tokens.unfold(1, n, 1)


def check_order(name: str, n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: n must be an integer >= 1, got {n!r}")


class NgramRepetition(Metric):
    """Mean over generations of the share of repeated n-grams, ``1 - unique / total`` (seq-rep-n).

    Example:
        >>> metric = NgramRepetition(n=2)
        >>> metric.update(torch.tensor([[1, 2, 1, 2, 1], [1, 2, 3, 4, 5]]))  # 2 of 4 bigrams repeat; none
        >>> metric.compute()
        tensor(0.2500)
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, n: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        check_order(type(self).__name__, n)
        self.n = n
        self.add_state("repeated_share", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("generations", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens: Tensor) -> None:
        grams = ngrams(tokens, self.n)
        unique = torch.tensor([len(torch.unique(row, dim=0)) for row in grams], dtype=torch.float64,
                              device=self.repeated_share.device)
        self.repeated_share += (1 - unique / grams.shape[1]).sum()
        self.generations += len(grams)

    def compute(self) -> Tensor:
        return (self.repeated_share / self.generations).float()


class DistinctN(Metric):
    """Distinct n-grams over all generations divided by the number of n-grams (distinct-n).

    Example:
        >>> metric = DistinctN(n=1)
        >>> metric.update(torch.tensor([[1, 2, 1], [2, 3, 3]]))  # {1, 2, 3} among 6 tokens
        >>> metric.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        check_order(type(self).__name__, n)
        self.n = n
        self.add_state("grams", default=[], dist_reduce_fx="cat")

    def update(self, tokens: Tensor) -> None:
        self.grams.append(ngrams(tokens, self.n).reshape(-1, self.n))

    def compute(self) -> Tensor:
        grams = torch.cat(self.grams) if isinstance(self.grams, list) else self.grams
        return torch.tensor(len(torch.unique(grams, dim=0)) / len(grams))


class PredictiveEntropy(Metric):
    """Mean entropy (nats) of the next-token distributions given as logits ``(..., V)``.

    Example:
        >>> metric = PredictiveEntropy()
        >>> metric.update(torch.tensor([[0.0, 0.0], [0.0, -float("inf")]]))  # log 2 and 0
        >>> metric.compute()
        tensor(0.3466)
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        # 0 * log 0 = 0 for tokens a processor masked to -inf
        entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
        self.total += entropy.sum().double()
        self.count += entropy.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()
