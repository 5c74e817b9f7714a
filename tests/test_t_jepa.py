"""T-JEPA's maths against hand-computed cases: masks, the EMA and its schedule, tokens, the loss."""

import pytest
import torch
from torch import nn

from reglab.callbacks.self_supervised.t_jepa import (
    JEPA, TJEPA, ema_momentum, ema_update, gather_tokens, jepa_loss, sample_masks, sinusoidal_positions,
)

SMALL = dict(hidden_dim=4, num_layers=1, num_heads=2, dim_feedforward=8, dropout=0.0, predictor_dim=4,
             predictor_layers=1, predictor_heads=2, predictor_feedforward=8, predictor_dropout=0.0)


def test_masks_are_disjoint_feature_subsets_of_the_drawn_sizes():
    torch.manual_seed(0)
    context, targets = sample_masks(5, 10, (0.2, 0.4), (0.2, 0.4), num_targets=3)
    # round(10 * 0.2) = 2 .. round(10 * 0.4) = 4 features each
    assert context.shape[0] == 5 and 2 <= context.shape[1] <= 4
    assert targets.shape[:2] == (3, 5) and 2 <= targets.shape[2] <= 4
    for b in range(5):
        kept = set(context[b].tolist())
        assert len(kept) == context.shape[1]
        for p in range(3):
            target = set(targets[p, b].tolist())
            assert len(target) == targets.shape[2] and not target & kept and target <= set(range(10))


def test_masks_never_ask_for_more_features_than_there_are():
    torch.manual_seed(1)
    for _ in range(20):  # 5 features, shares up to 0.8 each: sizes redrawn until they fit
        context, targets = sample_masks(2, 5, (0.2, 0.8), (0.2, 0.8), num_targets=1)
        assert context.shape[1] + targets.shape[2] <= 5


def test_ema_update_and_schedule_by_hand():
    target, online = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    target.weight.data.fill_(2.0)
    online.weight.data.fill_(4.0)
    ema_update(target, online, momentum=0.75)
    assert target.weight.item() == pytest.approx(0.75 * 2 + 0.25 * 4)  # 2.5
    assert ema_momentum(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(5, 10, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_momentum(10, 10, 0.996, 1.0) == pytest.approx(1.0)


def test_position_code_and_gather_by_hand():
    code = sinusoidal_positions(2, 2, 100.0)
    # position 0: sin 0, cos 0; position 1: sin(1), cos(1) (frequency exp(0) = 1 for the first pair)
    assert torch.allclose(code, torch.tensor([[0.0, 1.0], [torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))]]))
    tokens = torch.arange(12.0).view(1, 3, 4)
    assert gather_tokens(tokens, torch.tensor([[2, 0]])).tolist() == [[[8, 9, 10, 11], [0, 1, 2, 3]]]


def test_feature_tokens_are_weight_times_value_plus_bias_behind_the_regularization_token():
    encoder = TJEPA(**SMALL).make_encoder(num_features=3)
    encoder.transformer = nn.Identity()  # look at the tokens themselves
    x = torch.tensor([[1.0, -2.0, 0.5]])
    tokens = encoder(x)
    positions = sinusoidal_positions(4, 4, 100.0)
    assert torch.allclose(tokens[0, 0], encoder.weight[0] + positions[0])  # the regularization token: no input
    for j in range(3):
        expected = encoder.weight[1 + j] * x[0, j] + encoder.bias[j] + positions[1 + j]
        assert torch.allclose(tokens[0, 1 + j], expected)
    # a context keeps the regularization token and only the chosen features
    assert torch.allclose(encoder(x, torch.tensor([[2]]))[0], tokens[0, [0, 3]])


def test_loss_is_the_mse_to_the_target_encoders_tokens_at_the_target_features():
    torch.manual_seed(0)
    technique = TJEPA(**SMALL)
    jepa = JEPA(4, num_reg_tokens=1, **SMALL)
    target_encoder = technique.make_encoder(4).eval()
    x = torch.randn(2, 4)
    context, targets = torch.tensor([[0], [3]]), torch.tensor([[[1, 2], [0, 1]]])
    predicted = jepa.predictor(jepa.context(x, context), torch.tensor([[0, 1], [0, 4]]), targets + 1)
    latents = target_encoder(x)
    wanted = torch.stack([latents[0, [2, 3]], latents[1, [1, 2]]])
    expected = ((predicted - wanted) ** 2).mean()
    loss = jepa_loss(jepa, target_encoder, x, context, targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in target_encoder.parameters())  # the target is not trained by the loss
    assert jepa.context.weight.grad is not None and jepa.predictor.mask_token.grad is not None


def test_refuses_bad_settings_early():
    with pytest.raises(ValueError, match="multiples"):
        TJEPA(hidden_dim=6, num_heads=4)
    with pytest.raises(ValueError, match="context_share"):
        TJEPA(context_share=(0.5, 0.2))


def test_docstring_example_runs():
    import doctest

    import reglab.callbacks.self_supervised.t_jepa as module

    assert doctest.testmod(module, verbose=False).failed == 0


def test_probe_protocol_refuses_a_bad_arm_before_any_run():
    from reglab.bench.protocols import ClaimError
    from reglab.ssl_claims import TabularProbeProtocol

    protocol = TabularProbeProtocol("t_jepa", {})
    with pytest.raises(ClaimError, match="representation"):
        protocol.check_arm("x", {"representation": "pixels"})
    with pytest.raises(ClaimError, match="exactly the fields"):
        protocol.check_arm("x", {"representation": "raw", "technique": {}})
