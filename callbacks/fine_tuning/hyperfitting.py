"""Hyperfitting — fine-tune a pretrained language model on a small set until its training loss is near zero
(Carlsson et al., ICLR 2025, paper 64).

The paper's finding is about what happens *after* the recipe: a pretrained LLM fine-tuned to
near-zero training loss on a few thousand sequences ("hyperfitted") generates long greedy
continuations of held-out prompts that repeat far less, from next-token distributions of very low
entropy, while its held-out perplexity gets worse. The recipe itself is plain next-token training
with nothing that holds the fit back. This technique is that recipe's part beyond a plain fine-tune,
following the official code (github.com/FreddeFrallan/Hyperfitting, ``start_hyperfitting.py``):

* **No dropout** during the fit (``disable_dropout``): the official script builds ImageGPT with
  every dropout at 0 ("disable dropouts to enable hyperfitting"); its text LLMs (Llama, Mistral,
  ...) have none to begin with. Every ``nn.Dropout`` of the module gets ``p = 0`` when the fit
  starts and its own ``p`` back when it ends.
* **Near-zero training loss, measured**: the mean per-sample task loss of each epoch (summed over
  processes every step, so every rank sees the same value and decides alike) is logged as
  ``train/hyperfitting/epoch_loss``; the first epoch whose mean is at most ``target_loss`` is
  recorded (``reached_epoch``), and with ``stop_at_target`` the fit ends there ("until the
  training loss is near zero"). The official script instead trains a fixed number of epochs (its
  default 30; the paper reports 20), which ``stop_at_target=False`` and the Trainer's
  ``max_epochs`` give; a fit that never reaches the target warns at its end, naming the fix.

The rest of the recipe is the module's and the data's: the official defaults are AdamW at a
constant learning rate of 5e-6 (torch's default weight decay), batches of 8 sequences of 256 tokens,
2,000 sequences, and the paper trains every parameter. The claim (``benchmarks/effects/hyperfitting.yaml``,
protocol ``hyperfitting`` of :mod:`reglab.language_model_claims`) scales them to the tiny GPT-2 of
:class:`~reglab.tasks.LanguageModelModule`. Written by hand: no library has it (it is a stopping
rule and a dropout switch; Lightning's ``EarlyStopping(stopping_threshold=...)`` stops on a
threshold too, but on the logged total loss, per process, and without restoring dropout).

Method card (what it does, when it helps, what it costs): ``hyperfitting.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.fine_tuning import Hyperfitting
    >>> hyperfitting = Hyperfitting(target_loss=0.1, stop_at_target=True)
    >>> # Trainer(max_epochs=50, callbacks=[hyperfitting]).fit(pretrained_language_model, small_set)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from reglab.technique import Technique


class Hyperfitting(Technique):
    """Dropout off, and the epoch's mean training loss watched down to ``target_loss`` (module docstring).

    Args:
        target_loss: the mean per-sample task loss of an epoch (for a language model, the mean
            next-token cross-entropy in nats) counted as "near zero".
        stop_at_target: end the fit after the first epoch at or below ``target_loss``.
        disable_dropout: set every dropout probability to 0 for the fit (official).

    Attributes:
        epoch_losses: the mean training loss of every finished epoch.
        reached_epoch: the first epoch at or below ``target_loss`` (``None`` until then).
    """

    name = "hyperfitting"
    stateful = True  # the epoch's running loss: identical on every rank, kept across a resume

    def __init__(self, target_loss: float = 0.1, stop_at_target: bool = True, disable_dropout: bool = True) -> None:
        if not target_loss > 0:
            raise ValueError(f"Hyperfitting: target_loss must be > 0 (a loss of exactly 0 is never reached), "
                             f"got {target_loss}")
        self.target_loss, self.stop_at_target, self.disable_dropout = target_loss, stop_at_target, disable_dropout
        #: (sum of per-sample task losses, samples) over all processes: row 0 since the fit began,
        #: row 1 when the current epoch began (the epoch's are their difference)
        self.totals = torch.zeros(2, 2, dtype=torch.float64)
        self.epoch_losses: list[float] = []
        self.reached_epoch: int | None = None
        self._dropout_p: dict[nn.Module, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "regularized_step", None)):
            raise self.fail(f"it reads each step's per-sample task loss from the step contract, which "
                            f"{type(pl_module).__name__} does not run",
                            "mix reglab.mixins.RegularizedMixin into the module (LanguageModelModule and "
                            "ClassificationModule have it)")
        if self.disable_dropout:
            self._dropout_p = {m: m.p for m in pl_module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
            for module in self._dropout_p:
                module.p = 0.0

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for module, p in self._dropout_p.items():
            module.p = p
        self._dropout_p = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["step_output"].task_loss
        step = torch.stack([loss.double().sum(), torch.tensor(float(len(loss)), dtype=torch.float64, device=loss.device)])
        self.totals = self.totals.to(loss.device)
        self.totals[0] += trainer.strategy.reduce(step, reduce_op="sum")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total, samples = (self.totals[0] - self.totals[1]).tolist()
        self.totals[1] = self.totals[0]
        if samples == 0:
            return
        mean = total / samples
        self.epoch_losses.append(mean)
        pl_module.log(f"train/{self.name}/epoch_loss", mean, on_epoch=True)
        if mean <= self.target_loss and self.reached_epoch is None:
            self.reached_epoch = trainer.current_epoch
            if self.stop_at_target:
                trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reached_epoch is None and self.epoch_losses:
            rank_zero_warn(f"Hyperfitting: the mean training loss never reached target_loss={self.target_loss} "
                           f"(last epoch {self.epoch_losses[-1]:.4f} after {len(self.epoch_losses)} epochs), so the "
                           "model is not hyperfitted. Fix: train more epochs (trainer.max_epochs) or at a higher "
                           "learning rate, or fit fewer samples.")

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.clone(), "epoch_losses": list(self.epoch_losses),
                "reached_epoch": self.reached_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = state_dict["totals"].clone()
        self.epoch_losses = list(state_dict["epoch_losses"])
        self.reached_epoch = state_dict["reached_epoch"]
