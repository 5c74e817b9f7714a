"""SaRA's maths on hand-made layers: selection, the in-place sparse write and its gradient, the
nuclear norm, the re-selection, and what the optimizer holds."""

import pytest
import torch
from torch import nn

from reglab.callbacks.peft.sara import SaRA, SparseUpdateLayer, nuclear_norm
from reglab.technique import TechniqueConfigError
from tiny_bert import TinyBertClassifier


class Net(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.body = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head = nn.Linear(weight.shape[0], 2)
        with torch.no_grad():
            self.body.weight.copy_(weight)

    def forward(self, x):
        return self.head(self.body(x))


WEIGHT = torch.tensor([[0.5, -0.001, 0.2], [0.0015, -0.3, -0.004]])


def test_threshold_selects_the_entries_below_it():
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    layer = net.body
    assert isinstance(layer, SparseUpdateLayer)
    assert layer.index.tolist() == [1, 3]  # -0.001 and 0.0015 (flat positions); -0.004 is above 2e-3
    assert torch.equal(layer.values.detach(), torch.tensor([-0.001, 0.0015]))


def test_fraction_selects_that_share_of_the_smallest():
    net = Net(WEIGHT)
    sara = SaRA(fraction=0.5)  # 3 of 6 entries: |-0.001|, |0.0015|, |-0.004|
    sara.prepare(net)
    assert net.body.index.tolist() == [1, 3, 5]
    assert sara.threshold is None and 0.004 < sara.cutoff < 0.2


def test_forward_uses_the_values_and_their_gradient_is_the_weights_at_the_selection():
    torch.manual_seed(0)
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    with torch.no_grad():
        net.body.values.copy_(torch.tensor([0.7, -0.9]))
    x = torch.randn(5, 3)
    net(x).sum().backward()

    dense = WEIGHT.clone()
    dense.view(-1)[torch.tensor([1, 3])] = torch.tensor([0.7, -0.9])
    dense.requires_grad_(True)
    reference = net.head(x @ dense.T).sum()
    reference.backward()
    torch.testing.assert_close(net(x), net.head(x @ dense.T))
    torch.testing.assert_close(net.body.values.grad, dense.grad.view(-1)[torch.tensor([1, 3])])
    assert net.body.base_layer.weight.grad is None  # the frozen weight holds no gradient


def test_two_forwards_in_one_step_backpropagate():
    # the second forward must not rewrite the weight in place under the first one's graph
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    x = torch.randn(4, 3)
    (net(x).sum() + net(x).sum()).backward()
    assert net.body.values.grad is not None


def test_nuclear_norm_and_its_gradient_by_hand():
    matrix = torch.tensor([[3.0, 0.0], [0.0, -4.0]], requires_grad=True)
    norm = nuclear_norm(matrix)
    norm.backward()
    assert norm.item() == pytest.approx(7.0)
    torch.testing.assert_close(matrix.grad, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))  # U V^T


def test_sparse_matrix_holds_only_the_trained_entries():
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    expected = torch.zeros(2, 3)
    expected[0, 1], expected[1, 0] = -0.001, 0.0015
    torch.testing.assert_close(net.body.sparse_matrix(), expected)


def test_nuclear_norm_term_applies_only_to_wide_enough_layers():
    net = Net(WEIGHT)
    official = SaRA(threshold=2e-3)  # both sides must exceed 64: this 2 x 3 layer does not
    official.prepare(net)
    assert official.rank_eligible() == []
    net = Net(WEIGHT)
    small = SaRA(threshold=2e-3, rank_min_dim=1)
    small.prepare(net)
    assert small.rank_eligible() == [net.body]


def test_reselection_freezes_the_entries_that_grew_past_the_threshold():
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    layer = net.body
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.05, 0.0012]))  # the first grew past 2e-3, the second did not
    layer.reselect(2e-3)
    assert layer.active.tolist() == [False, True]
    # an optimizer with weight decay moves the frozen value, yet the layer keeps it at 0.05
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, weight_decay=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(4, 3)).sum().backward()
        assert layer.values.grad[0] == 0
        optimizer.step()
    assert layer.current()[0].item() == pytest.approx(0.05)
    assert layer.current()[1].item() != pytest.approx(0.0012)
    net(torch.randn(1, 3))
    assert layer.base_layer.weight[0, 1].item() == pytest.approx(0.05)


def test_optimizer_state_covers_only_the_selected_entries():
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state[net.body.values]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == 2
    assert net.body.base_layer.weight not in optimizer.state


def test_merge_puts_the_trained_values_into_the_plain_layer():
    net = Net(WEIGHT)
    sara = SaRA(threshold=2e-3)
    sara.prepare(net)
    with torch.no_grad():
        net.body.values.copy_(torch.tensor([0.7, -0.9]))
    x = torch.randn(3, 3)
    expected = net(x)
    assert sara.merge(net) == 1
    assert type(net.body) is nn.Linear
    torch.testing.assert_close(net(x), expected)


def test_a_threshold_that_selects_nothing_fails_at_setup():
    with pytest.raises(TechniqueConfigError, match="no weight of the layers"):
        SaRA(threshold=1e-6).prepare(Net(WEIGHT))


@pytest.mark.parametrize("kwargs", [{"fraction": 1.5}, {"threshold": 0.0}, {"progressive_step": 0},
                                    {"lambda_rank": -1.0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="SaRA"):
        SaRA(**kwargs)


def test_trains_a_bert_models_linear_layers():
    model = TinyBertClassifier()
    sara = SaRA(fraction=0.1, rank_min_dim=8)
    sara.prepare(model)
    assert "backbone.encoder.layer.0.attention.self.query" in sara.layers
    assert len(sara.rank_eligible()) == len(sara.layers)  # every 16 x 16 / 32 x 16 weight exceeds 8
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert all(layer.values.grad is not None for layer in sara.layers.values())


def test_weights_loaded_under_the_layer_get_the_trained_values_again():
    net = Net(WEIGHT)
    SaRA(threshold=2e-3).prepare(net)
    with torch.no_grad():
        net.body.values.copy_(torch.tensor([0.7, -0.9]))
    x = torch.randn(3, 3)
    expected = net(x)
    with torch.no_grad():
        net.body.base_layer.weight.copy_(WEIGHT)  # e.g. a frozen weight reloaded from the pretrained one
    torch.testing.assert_close(net(x), expected)
