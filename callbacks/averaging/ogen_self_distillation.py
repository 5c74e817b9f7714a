"""OGEN's adaptive self-distillation between model states (Zang et al., ICLR 2024, paper 01) — only
this part of OGEN; its class-conditional feature generator for unknown classes is not built.

Training keeps the model states at the end of the last epochs (and the initial one). At the start
of epoch e the teacher is the mean of the weights of the last m_e states, a "local mean teacher"
whose window m_e grows over training, and every step distils it into the student:

    m_e       = m_min + floor((m_max - m_min) * e / (E - 1) + 1/2)  (E: max_epochs or total_epochs)
    theta_T   = (1 / m) * sum of the last m = min(m_e, states kept) epoch-end states
    loss      = CE(z, y) + lambda * T^2 * mean_i KL(softmax(z_T,i / T) || softmax(z_i / T))

The KL is :func:`reglab.callbacks.averaging.mean_teacher.distillation_kl`; the teacher's forward pass
runs under ``no_grad`` in eval mode with its weights swapped into the module without a copy.

What the paper's text confirms, and what it does not. Found: the abstract (in the project's paper
list) — "our adaptive self-distillation mechanism to regularize our feature generation model
during joint optimization, i.e., adaptively transferring knowledge between model states to
further prevent overfitting". The released code (github.com/apple/ml-ogen, ``trainers/ogen.py``)
builds a second CLIP model ``model_teacher``, keeps an empty ``model_list`` and saves a
``state_dict_teacher``, but computes no distillation loss, so it confirms that a teacher copy and a
list of model states exist and nothing about how they are used. Third-party summaries call the
mechanism an "adaptive local mean-teacher distillation" (sciencestack.ai) that teaches "the current
status of the model using outputs from earlier checkpoints" (emergentmind.com); the project's
technique list says "EMA teacher with adaptive window". NOT found: the method section (the paper's
equations for the teacher, the window schedule, the loss and their hyper-parameters), so these are
assumptions, each the plainest reading of the sources above:

1. model states are taken once per epoch, plus the state before training;
2. the teacher is the uniform mean of the weights of the states in the window (a mean teacher
   restricted to a local window), not an EMA over them and not an ensemble of their predictions;
3. "adaptive" is a window that grows linearly from ``min_window`` to ``max_window`` epochs over
   the run, following the paper's argument that overfitting grows with the length of finetuning;
4. the distillation loss, its weight and temperature are those of :class:`MeanTeacher`
   (lambda = 1, T = 1); no value here comes from the paper.

Method card (what it does, when it helps, what it costs): ``ogen_self_distillation.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import OGENSelfDistillation
    >>> distil = OGENSelfDistillation(min_window=1, max_window=5)
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.averaging.mean_teacher import distillation_kl
from reglab.averaging import WeightAverage, WeightAveraging, teacher_logits
from reglab.mixins import StepOutput
from reglab.technique import schedule_epochs


def adaptive_window(epoch: int, total_epochs: int, min_window: int, max_window: int) -> int:
    """Number of model states the teacher of ``epoch`` averages: ``min_window`` in the first epoch,
    growing linearly to ``max_window`` in the last (assumption 3 of the module docstring)."""
    if total_epochs <= 1:
        return max_window
    fraction = min(epoch, total_epochs - 1) / (total_epochs - 1)
    return min_window + int(fraction * (max_window - min_window) + 0.5)


class OGENSelfDistillation(WeightAveraging):
    """Self-distillation from the mean of the last epoch-end model states (see the module docstring).

    Args:
        lam: weight of the distillation term.
        temperature: softmax temperature T of both predictions.
        min_window, max_window: the teacher's window in model states at the first and last epoch.
        total_epochs: E of the window schedule; the trainer's ``max_epochs`` when not given.
    """

    name = "ogen_self_distillation"

    evaluates_average = False

    def __init__(
        self,
        lam: float = 1.0,
        temperature: float = 1.0,
        min_window: int = 1,
        max_window: int = 5,
        total_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if lam < 0 or temperature <= 0:
            raise ValueError(f"OGENSelfDistillation: need lam >= 0 and temperature > 0, got {lam}, {temperature}")
        if not 1 <= min_window <= max_window:
            raise ValueError(f"OGENSelfDistillation: need 1 <= min_window <= max_window, got {min_window}, {max_window}")
        self.lam = lam
        self.temperature = temperature
        self.min_window = min_window
        self.max_window = max_window
        self.total_epochs = total_epochs
        self.states: list[WeightAverage] = []  # oldest first; self.average is the teacher

    def create_average(self, pl_module: L.LightningModule) -> WeightAverage:
        teacher = super().create_average(pl_module)
        self.states = [teacher.clone()]  # the state before training
        return teacher

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for state in self.states:
            state.to(pl_module.device)

    def update_average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing per step: the teacher changes at epoch boundaries only."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = schedule_epochs(self, trainer, self.total_epochs)
        window = adaptive_window(trainer.current_epoch, epochs, self.min_window, self.max_window)
        self.average.set_mean_(self.states[-window:])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Reuse the oldest state's memory once the window is full.
        state = self.states.pop(0) if len(self.states) >= self.max_window else self.average.clone()
        state.copy_from()
        self.states.append(state)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        teacher = teacher_logits(module, self.average, out.batch)
        return {"distillation": self.lam * distillation_kl(out.logits, teacher, self.temperature)}

    def extra_state(self) -> dict[str, Tensor]:
        state = {"num_states": torch.tensor(len(self.states))}
        for k, snapshot in enumerate(self.states):
            state.update(snapshot.state_dict(f"state{k}."))
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        count = int(state["num_states"])
        self.states = [self.states[k] if k < len(self.states) else self.average.clone() for k in range(count)]
        for k, snapshot in enumerate(self.states):
            snapshot.load_state_dict(state, f"state{k}.")
