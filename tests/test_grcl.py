"""GRCL / RMSCL (paper 44): the gated regularizer's gates and penalty, the reconstruction-based
selection on hand-computed cases, and the drifting stream they are claimed on."""

from __future__ import annotations

import doctest

import lightning as L
import pytest
import torch
from torch import nn

import reglab.callbacks.continual.grcl as grcl_module
import reglab.datamodules.drifting_stream as drifting_module
from reglab.callbacks import GRCL
from reglab.callbacks.continual.grcl import mas_importance, reconstruction_selection, representative_code, top_fraction
from reglab.datamodules import DriftingDigitsDataModule
from reglab.datamodules.drifting_stream import drifting_order, rotate_each
from reglab.mixins import StepOutput
from reglab.technique import TechniqueConfigError


# -- RMSCL: the group-sparse self-representation ----------------------------------------------------
def test_representative_code_shrinks_each_atoms_column_by_its_norm():
    # orthonormal atoms: one proximal step from 0 solves it, column j scaled by (1 − λ / ||q_:j||)+
    queries = torch.tensor([[3.0, 0.3, 0.0], [4.0, 0.4, 1.0]])  # column norms 5, 0.5, 1
    code = representative_code(torch.eye(3), queries, sparsity=1.0, steps=3)
    expected = torch.stack([queries[:, 0] * (1 - 1 / 5), torch.zeros(2), queries[:, 2] * 0.0], 1)
    torch.testing.assert_close(code, expected)
    # λ = 0: least squares, the queries themselves
    torch.testing.assert_close(representative_code(torch.eye(3), queries, sparsity=0.0, steps=2), queries)


def test_representative_code_reaches_the_group_lasso_optimum_for_a_correlated_dictionary():
    atoms = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    queries = torch.tensor([[0.6, 0.8]])  # exactly atom 1
    code = representative_code(atoms, queries, sparsity=0.1, steps=2000)
    # optimality: the gradient (Q − C D) Dᵀ equals λ · C_j / ||C_j|| on every used atom, and is at most λ elsewhere
    gradient = (queries - code @ atoms) @ atoms.T
    used = code.norm(dim=0) > 1e-6
    assert used.tolist() == [False, True]
    torch.testing.assert_close(gradient[:, used], 0.1 * code[:, used] / code[:, used].norm(dim=0), atol=1e-5, rtol=0)
    assert gradient[:, ~used].abs().max() <= 0.1 + 1e-6


def test_selection_keeps_one_of_two_near_duplicates_and_the_sample_apart():
    memory = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    chosen = reconstruction_selection(memory, torch.tensor([[0.0, 0.0, 2.0]]), count=3, sparsity=0.3, steps=500)
    assert sorted(chosen.tolist())[1:] == [2, 3] and len({0, 1} & set(chosen.tolist())) == 1
    assert reconstruction_selection(memory, memory[:1], count=10, sparsity=0.3, steps=5).numel() == 4


# -- GRCL: importance, gates, penalty ----------------------------------------------------------------
class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.layer(x)


def test_mas_importance_is_the_absolute_gradient_of_the_mean_squared_output():
    module = Linear()
    with torch.no_grad():
        module.layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # f = w·x: outputs 1 and −2; d/dw mean f² = mean 2 f x = [(2·1·1 + 0)/2, (0 + 2·(−2)·1)/2] = [1, −2]
    importance = mas_importance(module, {"input": x})
    torch.testing.assert_close(importance["layer.weight"], torch.tensor([[1.0, 2.0]]))
    assert module.training


def test_top_fraction_opens_on_the_largest_entries_and_at_least_one():
    assert top_fraction(torch.tensor([[0.1, 0.9], [0.5, 0.3]]), 0.25).tolist() == [[False, True], [False, False]]
    assert top_fraction(torch.tensor([0.2, 0.1]), 0.01).tolist() == [True, False]


def test_gates_age_out_after_their_slots_and_only_gated_entries_are_pulled():
    module = Linear()
    with torch.no_grad():
        module.layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    grcl = GRCL(buffer_size=2, gate_fraction=0.5, gate_slots=2, lam=3.0)
    grcl._store({"input": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "target": torch.zeros(2, dtype=torch.long)})
    grcl.update_gates(None, module)  # importance [1, 2]: the second weight is gated, anchored at −2
    assert grcl.age["layer.weight"].tolist() == [[2, 0]]
    with torch.no_grad():
        module.layer.weight.copy_(torch.tensor([[5.0, -1.0]]))
    out = StepOutput(logits=torch.zeros(1, 1), target=torch.zeros(1, dtype=torch.long))
    # only the gated weight: 3 · (−1 − (−2))² = 3; the free one moved by 4 and costs nothing
    assert grcl.loss_terms(out, module)["gated_penalty"].item() == pytest.approx(3.0)
    with torch.no_grad():
        module.layer.weight.copy_(torch.tensor([[20.0, -1.0]]))  # importance now [20, 1]: the first is gated
    grcl.update_gates(None, module)
    assert grcl.age["layer.weight"].tolist() == [[0, 1]]  # the old gate is still in its second slot
    grcl.update_gates(None, module)
    assert grcl.age["layer.weight"].tolist() == [[0, 2]]  # ... and now aged out
    assert grcl.anchor["layer.weight"][0, 0].item() == 20.0


def test_without_a_gate_the_penalty_is_zero_and_with_the_regularizer_off_there_is_no_term():
    out = StepOutput(logits=torch.zeros(1, 1), target=torch.zeros(1, dtype=torch.long))
    assert GRCL().loss_terms(out, Linear())["gated_penalty"].item() == 0.0
    assert GRCL(gated_regularizer=False, memory_selection=True).loss_terms(out, Linear()) == {}


def test_bad_settings_fail_at_construction_naming_the_fix():
    with pytest.raises(TechniqueConfigError, match="plain experience replay"):
        GRCL(gated_regularizer=False, memory_selection=False)
    with pytest.raises(TechniqueConfigError, match="gate_fraction must be in"):
        GRCL(gate_fraction=0.0)


# -- the drifting stream ------------------------------------------------------------------------------
def test_drifting_stream_drifts_in_class_and_in_angle():
    data = DriftingDigitsDataModule(batch_size=8, seed=1, class_spread=0.0, max_angle=40.0)
    data.setup("fit")
    targets = data.train_dataset.targets
    # spread 0: each class is one contiguous run of the stream
    runs = targets[torch.cat([torch.tensor([True]), targets[1:] != targets[:-1]])]
    assert sorted(runs.tolist()) == list(range(10))
    time = data.train_dataset.extras["time"]
    assert time[0] == 0 and time[-1] == 1
    batch = next(iter(data.train_dataloader()))
    assert batch["index"].tolist() == list(range(8)), "the loader walks the stream in order"
    still = DriftingDigitsDataModule(batch_size=8, seed=1, class_spread=0.0, max_angle=0.0)
    still.setup("fit")
    assert torch.equal(still.train_dataset.inputs[0], data.train_dataset.inputs[0])  # angle 0 at τ = 0
    assert not torch.equal(still.train_dataset.inputs[-1], data.train_dataset.inputs[-1])  # 40° at τ = 1


def test_rotate_each_turns_each_image_by_its_own_angle():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 3] = 1.0  # top right
    turned = rotate_each(image.repeat(3, 1, 1, 1), torch.tensor([0.0, 90.0, 180.0]))
    corners = [tuple(t[0].nonzero()[0].tolist()) for t in turned]
    assert corners == [(0, 3), (0, 0), (3, 0)]  # counter-clockwise: top left, then bottom left


def test_drifting_order_is_seeded():
    targets = torch.arange(50) % 5
    first, again = (drifting_order(targets, 5, 0.1, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, again) and sorted(first.tolist()) == list(range(50))


def test_docstring_examples_run():
    for module in (grcl_module, drifting_module):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__
