"""Scores of a task sequence from its accuracy matrix.

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks ``0..i`` (``j <= i``; the
upper triangle is NaN). With T tasks:

* average accuracy (Chaudhry et al. 2018):  ``A = mean_j R[T-1, j]``;
* forgetting, the max − last definition (Chaudhry et al. 2018):
  ``F = mean_{j < T-1} ( max_{i < T-1} R[i, j] − R[T-1, j] )``;
* backward transfer (Lopez-Paz & Ranzato 2017): ``BWT = mean_{j < T-1} ( R[T-1, j] − R[j, j] )``;
* forward transfer (Lopez-Paz & Ranzato 2017, as Avalanche's ``ForwardTransfer``):
  ``FWT = mean_{1 <= j < T} ( R[j-1, j] − b_j )``, the accuracy on task j *before* it is trained
  (after task j-1) minus ``b_j``, the accuracy on task j of the model before the first task (its
  random initialisation). ``R[j-1, j]`` and ``b_j`` use the candidate classes that ``R[j, j]`` will
  use, so the three are the same test at three times.

Both evaluation rules are kept side by side, as Mammoth reports them: *class-incremental* (predict
among every class seen so far, no task label) and *task-incremental* (the logits masked to the
task's own classes). A run's own scenario decides which one its accuracy matrix ``R`` is; the
other is reported beside it (:func:`incremental_scores`).

Example:
    >>> import torch
    >>> R = accuracy_matrix([[0.9], [0.5, 0.8]])
    >>> round(average_accuracy(R), 2), round(forgetting(R), 2), round(backward_transfer(R), 2)
    (0.65, 0.4, -0.4)
    >>> round(forward_transfer(next_task=[0.3], initial=[0.5, 0.1]), 2)   # 0.3 − 0.1
    0.2
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def accuracy_matrix(rows: list[list[float]]) -> Tensor:
    """A ``(T, T)`` float64 matrix from the rows after each task (row i has i+1 entries)."""
    size = len(rows)
    matrix = torch.full((size, size), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return matrix


def average_accuracy(matrix: Tensor) -> float:
    last = len(matrix) - 1
    return float(matrix[last, : last + 1].mean())


def forgetting(matrix: Tensor) -> float:
    """Max − last forgetting averaged over all tasks but the last (0 for a single task)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    best_before = torch.stack([matrix[j:last, j].max() for j in range(last)])
    return float((best_before - matrix[last, :last]).mean())


def backward_transfer(matrix: Tensor) -> float:
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return float((matrix[last, :last] - matrix.diagonal()[:last]).mean())


RULES = ("class_il", "task_il")  # the two evaluation rules, class- and task-incremental


def forward_transfer(next_task: Sequence[float], initial: Sequence[float]) -> float:
    """FWT from ``next_task[j-1]`` (accuracy on task j after training tasks 0..j-1) and
    ``initial[j]`` (on task j before any training); 0 for a single task, like :func:`backward_transfer`."""
    if len(initial) != len(next_task) + 1:
        raise ValueError(
            f"forward_transfer: {len(next_task)} next-task accuracies need {len(next_task) + 1} initial ones "
            f"(one per task), got {len(initial)}."
        )
    if not next_task:
        return 0.0
    return float((torch.tensor(next_task, dtype=torch.float64) - torch.tensor(initial[1:], dtype=torch.float64)).mean())


def incremental_scores(rows: dict[str, list[list[float]]], next_task: dict[str, list[float]],
                       initial: dict[str, list[float]]) -> dict[str, float]:
    """Average accuracy, forgetting, BWT and FWT under each evaluation rule (``class_il``,
    ``task_il``), keyed ``<rule>/<score>``; FWT only where the initial accuracies were measured."""
    scores: dict[str, float] = {}
    for rule, rule_rows in rows.items():
        matrix = accuracy_matrix(rule_rows)
        scores.update({f"{rule}/{name}": value for name, value in summary(matrix).items()})
        if len(initial.get(rule, [])) == len(rule_rows) and len(next_task.get(rule, [])) == len(rule_rows) - 1:
            scores[f"{rule}/forward_transfer"] = forward_transfer(next_task[rule], initial[rule])
    return scores


def summary(matrix: Tensor) -> dict[str, float]:
    return {
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "backward_transfer": backward_transfer(matrix),
    }


def markdown_table(matrix: Tensor) -> str:
    """The matrix as a markdown table (rows: after task i; columns: task j), then the scores."""
    size = len(matrix)
    lines = ["| after task | " + " | ".join(f"task {j}" for j in range(size)) + " |",
             "|---|" + "---|" * size]
    for i in range(size):
        cells = [f"{matrix[i, j]:.3f}" if j <= i else "" for j in range(size)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    scores = summary(matrix)
    lines += ["", f"Average accuracy {scores['average_accuracy']:.4f}, forgetting (max − last) "
              f"{scores['forgetting']:.4f}, backward transfer {scores['backward_transfer']:.4f}."]
    return "\n".join(lines)


def rules_table(scores: dict[str, float]) -> str:
    """The scores of both evaluation rules side by side (keys ``<rule>/<score>``, as
    :func:`incremental_scores` gives them)."""
    names = ("average_accuracy", "forgetting", "backward_transfer", "forward_transfer")
    lines = ["| rule | " + " | ".join(name.replace("_", " ") for name in names) + " |", "|---|" + "---|" * len(names)]
    for rule, label in zip(RULES, ("class-incremental", "task-incremental")):
        cells = [f"{scores[f'{rule}/{name}']:.4f}" if f"{rule}/{name}" in scores else "" for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(matrix: Tensor, path: Path, title: str = "accuracy matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * size, 0.8 + 0.7 * size))
    image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(size):
        for j in range(i + 1):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
