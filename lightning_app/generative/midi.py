"""Piano rolls as MIDI files (pretty-midi), so that a person can listen to generated music.

A roll is ``(pitches, steps)`` (a leading channel axis of 1 is dropped), row 0 the MIDI note
``lowest_pitch``; a note is a run of consecutive sounding steps in a row (values above 0.5), starting at
``step * step_seconds``. The default 0.125 s a step is sixteenth notes at 120 beats per minute.

Example:
    >>> import torch, tempfile, pathlib
    >>> roll = torch.zeros(2, 4); roll[1, 0:2] = 1
    >>> path = roll_to_midi(roll, pathlib.Path(tempfile.mkdtemp()) / "a.mid")
    >>> [(n.pitch, float(n.start), float(n.end)) for n in midi_notes(path)]
    [(61, 0.0, 0.25)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def roll_notes(roll: Tensor) -> list[tuple[int, int, int]]:
    """The ``(row, first step, steps)`` of every note of a ``(pitches, steps)`` roll, by start then row."""
    sounding = (roll.squeeze(0) > 0.5).cpu()
    padded = torch.nn.functional.pad(sounding.int(), (1, 1))
    change = padded[:, 1:] - padded[:, :-1]  # +1 where a run starts, -1 one past its end
    notes = []
    for row in range(sounding.shape[0]):
        starts = (change[row] == 1).nonzero().flatten().tolist()
        ends = (change[row] == -1).nonzero().flatten().tolist()
        notes += [(row, start, end - start) for start, end in zip(starts, ends)]
    return sorted(notes, key=lambda note: (note[1], note[0]))


def roll_to_midi(roll: Tensor, path: Path | str, lowest_pitch: int = 60, step_seconds: float = 0.125,
                 velocity: int = 80, program: int = 0) -> Path:
    """Write a ``(pitches, steps)`` roll as a one-track MIDI file at ``path`` (a new file: an existing one is
    kept and refused)."""
    import pretty_midi

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"roll_to_midi: {path} exists and is kept. Fix: write to a new path.")
    music = pretty_midi.PrettyMIDI(initial_tempo=60 / (4 * step_seconds))
    track = pretty_midi.Instrument(program=program)
    for row, start, length in roll_notes(roll):
        track.notes.append(pretty_midi.Note(velocity=velocity, pitch=lowest_pitch + row, start=start * step_seconds,
                                            end=(start + length) * step_seconds))
    music.instruments.append(track)
    path.parent.mkdir(parents=True, exist_ok=True)
    music.write(str(path))
    return path


def midi_notes(path: Path | str) -> list[Any]:
    """The notes of a MIDI file's tracks (pretty-midi ``Note`` objects), by start then pitch."""
    import pretty_midi

    music = pretty_midi.PrettyMIDI(str(path))
    return sorted((note for track in music.instruments for note in track.notes), key=lambda n: (n.start, n.pitch))
