"""L2 to the previous task's parameters (paper 40, "A Closer Look at Rehearsal-Free Continual Learning").

After every task the parameters are remembered as theta*; while learning the next task every
trainable parameter is pulled back towards them with equal weight:

    loss = CE + lam * sum_i (theta_i - theta*_i)^2

The paper's finding: with a pretrained backbone this plain pull does at least as well as EWC's
Fisher-weighted one. Only the latest anchor is kept (as the "online" regularizers of the
GT-RIPL Continual-Learning-Benchmark code the paper builds on). ``lam`` is a per-benchmark choice
in the paper; the default here is the one tuned on split digits (the claim ``benchmarks/effects/l2_previous.yaml``).

Method card (what it does, when it helps, what it costs): ``l2_previous.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import L2ToPreviousTask
    >>> l2 = L2ToPreviousTask(lam=1.0)    # with `reglab fit-tasks` (reglab.continual)
"""

from __future__ import annotations

from reglab.callbacks.continual.anchors import AnchoredParameterPenalty

DEFAULT_LAM = 1.0


class L2ToPreviousTask(AnchoredParameterPenalty):
    """``lam * ||theta - theta*||^2`` to the parameters at the end of the previous task (0 before).

    Args:
        lam: weight of the pull.
    """

    name = "l2_previous"

    def __init__(self, lam: float = DEFAULT_LAM) -> None:
        super().__init__(lam)
