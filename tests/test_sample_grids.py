"""The sample grids that the generative claims put on their results pages pick the right samples and
name their rows: each sample here is one grey level (its index), read back from the drawn image."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import nn

from reglab.generative.generalization import pairs_grid
from reglab.generative.personalization import prompt_grid
from reglab.generative.sample import GRID_COLUMNS, claim_grid

SIZE, PAD = 2, 1  # 2x2 samples; make_grid's padding of grid_figure


def coded(count: int) -> torch.Tensor:
    """``count`` 1x2x2 samples, sample i a constant i / count (distinct grey levels)."""
    return (torch.arange(count, dtype=torch.float32) / count).view(count, 1, 1, 1).expand(count, 1, SIZE, SIZE)


def cells(figure) -> tuple[torch.Tensor, list[str]]:
    """The grey level of every grid cell (rows x columns) and the row names of a drawn grid figure."""
    (ax,) = figure.axes
    image = torch.as_tensor(ax.images[0].get_array())[..., 0]
    rows = (image.shape[0] - PAD) // (SIZE + PAD)
    columns = (image.shape[1] - PAD) // (SIZE + PAD)
    levels = torch.tensor([[float(image[PAD + r * (SIZE + PAD), PAD + c * (SIZE + PAD)]) for c in range(columns)]
                           for r in range(rows)])
    names = [label.get_text() for label in ax.get_yticklabels()]
    plt.close(figure)
    return levels, names


class Conditional(nn.Module):
    num_classes = 3
    hparams = {"class_names": ["zero", "one", "two"]}


def test_claim_grid_shows_the_first_samples_of_every_class():
    per_class = GRID_COLUMNS + 2
    samples = coded(3 * per_class)
    labels = torch.arange(3).repeat_interleave(per_class)
    levels, names = cells(claim_grid(samples, labels, Conditional(), per_class))
    expected = torch.stack([torch.arange(r * per_class, r * per_class + GRID_COLUMNS) for r in range(3)]) / (3 * per_class)
    torch.testing.assert_close(levels, expected)
    assert names == ["zero", "one", "two"]


def test_claim_grid_of_an_unconditional_model_is_rows_of_ten():
    samples = coded(100)
    levels, names = cells(claim_grid(samples, None, nn.Module(), 10))
    torch.testing.assert_close(levels, torch.arange(10 * GRID_COLUMNS).view(GRID_COLUMNS, 10) / 100)
    assert names == []


def test_prompt_grid_shows_every_prompt_a_row():
    count = 3  # fewer than GRID_COLUMNS: every sample is shown
    concept, composed = coded(count), coded(2 * count) + 1
    levels, names = cells(prompt_grid([concept, composed], [["x two"], ["x zero", "x one"]], count))
    assert names == ["x two", "x zero", "x one"]
    expected = torch.cat([torch.arange(count).view(1, count) / count,
                          (torch.arange(2 * count).view(2, count) / (2 * count) + 1).clamp(max=1)])
    torch.testing.assert_close(levels, expected)  # the drawn image is clamped to [0, 1]


def test_pairs_grid_puts_model_a_above_model_b_for_each_size():
    first, second = coded(8), coded(8) * 0.5
    levels, names = cells(pairs_grid({32: [second, first], 8: [first, second]}))
    assert names == ["N=8 A", "N=8 B", "N=32 A", "N=32 B"]
    torch.testing.assert_close(levels, torch.stack([first[:, 0, 0, 0], second[:, 0, 0, 0],
                                                    second[:, 0, 0, 0], first[:, 0, 0, 0]]))
