"""EMA — evaluate with an exponential moving average of the weights (a baseline).

After every optimizer step the fp32 average moves towards the current weights:

    theta_ema <- d_t * theta_ema + (1 - d_t) * theta,     d_t = min(d, (1 + t) / (10 + t))  (warm-up)
                                                           or d_t = d                          (no warm-up)

where t counts the updates so far (:func:`reglab.averaging.ema_decay`). BatchNorm running
statistics (and any other float buffer) are averaged the same way. Validation during fit runs on
the average, the module holds it after fit, and checkpoints store it as the model's weights
(``load_from_checkpoint`` gives the EMA model; a resumed fit continues from the training weights).

Works with any LightningModule: it needs nothing from the training step.

Method card (what it does, when it helps, what it costs): ``ema.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import EMA
    >>> ema = EMA(decay=0.999)   # Trainer(callbacks=[ema]) with any LightningModule
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.averaging import WeightAveraging, ema_decay


class EMA(WeightAveraging):
    """Exponential moving average of the weights, used for evaluation and export.

    Args:
        decay: the EMA decay d (the average's horizon is about 1 / (1 - d) optimizer steps).
        warmup: cap the decay at ``(1 + t) / (10 + t)`` for update t, so that short runs and the
            first steps are not dominated by the initial weights.
    """

    name = "ema"

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"{type(self).__name__}: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def update_average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.average.lerp_(1.0 - ema_decay(self.num_updates, self.decay, self.warmup))
        self.num_updates += 1

    def extra_state(self) -> dict[str, Tensor]:
        return {"num_updates": torch.tensor(self.num_updates)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.num_updates = int(state["num_updates"])
