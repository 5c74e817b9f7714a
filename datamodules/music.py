"""Generated symbolic music: monophonic piano-roll bars with controllable low-level attributes and a
high-level "arousal" label derived from them (Music FaderNets' setting, paper 34, without its datasets).

A sample is a binary piano roll ``(1, pitches, steps)`` on a sixteenth-note grid (default 24 pitches from
C4, 32 steps: two 4/4 bars, the official code's 32 time steps). The seeded generator draws, per sample, a
number of notes, a syncopation level and a pitch window, and places notes accordingly; the attributes are
then *measured* on the roll by pure functions (never taken from the generator's controls), so a decoded
roll is measured the same way:

* :func:`note_density` — note onsets per step (the official code's "note density" counts notes per step);
* :func:`rhythm_complexity` — the share of onset steps off the beat (syncopation; the official code's
  second low-level attribute is the rhythm density, which here the note density already is for a
  monophonic line, so the rhythmic attribute is where the onsets fall instead);
* :func:`pitch_range` — (highest - lowest sounding pitch) / (pitches - 1).

The high-level label is :func:`arousal`: high (1) when the mean of the note density (scaled by the
generator's largest density) and the rhythm complexity exceeds one half — like the paper's arousal, a
function of rhythm and density the model is not told. Batches carry ``target`` (the arousal class) and
``attributes`` (``(N, 3)``, in :data:`ATTRIBUTES` order).

Example:
    >>> data = MusicDataModule(num_samples=200, batch_size=8)
    >>> data.setup("fit")
    >>> batch = next(iter(data.train_dataloader()))
    >>> batch["input"].shape, batch["attributes"].shape, data.num_classes
    (torch.Size([8, 1, 24, 32]), torch.Size([8, 3]), 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import ClassificationDataModule, Split
from .splits import check_holdout_fractions, stratified_split

#: the measured low-level attributes, in the order of a batch's ``attributes`` columns
ATTRIBUTES = ("note_density", "rhythm_complexity", "pitch_range")
#: sixteenth-note steps per beat: onsets at multiples of it are on the beat
STEPS_PER_BEAT = 4


def onsets(roll: Tensor) -> Tensor:
    """``(..., P, T)`` bool: where a note starts (a sounding cell whose previous step at that pitch is silent)."""
    sounding = roll > 0.5
    before = torch.nn.functional.pad(sounding[..., :-1], (1, 0))
    return sounding & ~before


def note_density(roll: Tensor) -> Tensor:
    """``(...)`` note onsets per step of ``(..., P, T)`` rolls."""
    return onsets(roll).sum((-2, -1)).float() / roll.shape[-1]


def rhythm_complexity(roll: Tensor) -> Tensor:
    """``(...)`` the share of the steps with an onset that lie off the beat (0 for a roll without onsets)."""
    steps = onsets(roll).any(-2)
    off_beat = torch.arange(roll.shape[-1], device=roll.device) % STEPS_PER_BEAT != 0
    return (steps & off_beat).sum(-1).float() / steps.sum(-1).clamp_min(1).float()


def pitch_range(roll: Tensor) -> Tensor:
    """``(...)`` (highest - lowest sounding pitch) / (P - 1); 0 for a roll with fewer than two pitches."""
    pitches = (roll > 0.5).any(-1)
    index = torch.arange(roll.shape[-2], device=roll.device).float()
    highest = torch.where(pitches, index, -1.0).amax(-1)
    lowest = torch.where(pitches, index, float(roll.shape[-2])).amin(-1)
    return (highest - lowest).clamp_min(0) / (roll.shape[-2] - 1)


def attributes(roll: Tensor) -> Tensor:
    """``(..., 3)`` the :data:`ATTRIBUTES` of ``(..., P, T)`` rolls (a channel axis before ``P`` is kept)."""
    return torch.stack([note_density(roll), rhythm_complexity(roll), pitch_range(roll)], -1)


def arousal(values: Tensor, max_density: float) -> Tensor:
    """``(...)`` long: 1 (high arousal) where ``(note_density / max_density + rhythm_complexity) / 2 > 0.5``
    for ``(..., 3)`` :data:`ATTRIBUTES` values."""
    return ((values[..., 0] / max_density + values[..., 1]) / 2 > 0.5).long()


def generate_rolls(count: int, pitches: int, steps: int, min_notes: int, max_notes: int, seed: int) -> Tensor:
    """``(count, 1, pitches, steps)`` monophonic rolls from a seeded generator.

    Per roll: ``n`` notes (uniform in ``[min_notes, max_notes]``); onset steps drawn without replacement,
    on-beat steps weighted ``3 (1 - s)`` and off-beat ones ``s`` for a syncopation level ``s`` ~ U(0, 1); a
    pitch window of width ``w`` = round(U(0.1, 1) (pitches - 1)) (at least 2) at a random height, each
    note's pitch uniform in it but never the previous note's (so touching notes stay two onsets); each
    note lasts 1 to 4 steps, never past the next onset.
    """
    rng = np.random.default_rng(seed)
    rolls = np.zeros((count, 1, pitches, steps), dtype=np.float32)
    on_beat = np.arange(steps) % STEPS_PER_BEAT == 0
    for roll in rolls[:, 0]:
        n = int(rng.integers(min_notes, max_notes + 1))
        syncopation = rng.uniform()
        # on-beat steps weighted by the off-beat ones per beat, so the expected off-beat share is s
        weights = np.where(on_beat, (STEPS_PER_BEAT - 1) * (1 - syncopation), syncopation) + 1e-3
        starts = np.sort(rng.choice(steps, size=n, replace=False, p=weights / weights.sum()))
        width = max(2, round(rng.uniform(0.1, 1.0) * (pitches - 1)))
        low = int(rng.integers(0, pitches - width))
        previous = -1
        for k, start in enumerate(starts):
            pitch = low + int(rng.integers(0, width + 1))
            if pitch == previous:  # shift within the window, wrapping: still uniform over the other pitches
                pitch = low + (pitch - low + 1 + int(rng.integers(0, width))) % (width + 1)
            end = starts[k + 1] if k + 1 < n else steps
            roll[pitch, start:start + int(rng.integers(1, min(4, end - start) + 1))] = 1.0
            previous = pitch
    return torch.from_numpy(rolls)


class MusicDataModule(ClassificationDataModule):
    """Generated piano-roll bars (module docstring): ``target`` the arousal class, ``attributes`` the
    measured low-level attributes; generated and split (stratified by arousal) with the DataModule's ``seed``.

    Args:
        num_samples: rolls generated in total, before the split.
        pitches: the roll's pitch rows (from MIDI note ``lowest_pitch`` up).
        steps: sixteenth-note steps (a multiple of 4).
        min_notes, max_notes: the range of notes per roll (``max_notes`` at most the on-beat plus off-beat
            steps, i.e. ``steps``); the note density's largest value is ``max_notes / steps``.
        lowest_pitch: the MIDI note of the lowest row (for the MIDI export).
        val_fraction, test_fraction: held out per arousal class.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.
    """

    num_classes = 2

    def __init__(self, num_samples: int = 3000, pitches: int = 24, steps: int = 32, min_notes: int = 2,
                 max_notes: int = 12, lowest_pitch: int = 60, val_fraction: float = 0.15, test_fraction: float = 0.2,
                 **kwargs: Any) -> None:
        name = type(self).__name__
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        if pitches < 3 or steps < STEPS_PER_BEAT or steps % STEPS_PER_BEAT:
            raise ValueError(f"{name}: pitches={pitches}, steps={steps}. Fix: at least 3 pitches and a positive "
                             f"multiple of {STEPS_PER_BEAT} steps.")
        if not 1 <= min_notes <= max_notes <= steps:
            raise ValueError(f"{name}: min_notes={min_notes}, max_notes={max_notes}. Fix: 1 <= min_notes <= "
                             f"max_notes <= steps ({steps}).")
        self.num_samples, self.pitches, self.steps = num_samples, pitches, steps
        self.min_notes, self.max_notes, self.lowest_pitch = min_notes, max_notes, lowest_pitch
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.input_shape = (1, pitches, steps)
        super().__init__(**kwargs)

    @property
    def max_density(self) -> float:
        """The note density's largest value, ``max_notes / steps`` (the arousal's scale)."""
        return self.max_notes / self.steps

    def _load_splits(self) -> dict[str, Split]:
        rolls = generate_rolls(self.num_samples, self.pitches, self.steps, self.min_notes, self.max_notes, self.seed)
        values = attributes(rolls[:, 0])
        targets = arousal(values, self.max_density)
        positions = stratified_split(targets, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        return {split: (rolls[members], targets[members], {"attributes": values[members]})
                for split, members in positions.items()}
