"""FreqFusion and FADC (reglab.nn, papers 31 and 58) against hand-computed cases, and the U-Net options
that use them. The claims' smoke runs (tests/test_claims.py) train both through `reglab fit`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reglab.models.unet import LateralFusion, TinyUNet
from reglab.nn.fadc import FrequencyAdaptiveDilatedConv, FrequencySelection, band_windows, dilation_stats
from reglab.nn.freqfusion import FreqFusion, _OffsetResampler, carafe, local_similarity, normalize_kernels


def _delta_kernels(tap: int, size: tuple[int, int], taps: int = 9) -> torch.Tensor:
    kernels = torch.zeros(1, taps, *size)
    kernels[:, tap] = 1.0
    return kernels


def test_carafe_reassembles_each_child_from_its_parent_neighbourhood():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # a 3x3 box: every output sums the whole 2x2 map (zeros outside) over 9
    box = carafe(x, torch.full((1, 9, 2, 2), 1 / 9), 3, 1)
    assert torch.allclose(box, torch.full_like(box, 10 / 9))
    # centre tap at scale 2: nearest upsampling; right tap (row 1, column 2): each 2x2 block reads its parent's right neighbour
    assert carafe(x, _delta_kernels(4, (4, 4)), 3, 2).tolist() == [[[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]]
    assert carafe(x, _delta_kernels(5, (4, 4)), 3, 2).tolist() == [[[[2, 2, 0, 0], [2, 2, 0, 0], [4, 4, 0, 0], [4, 4, 0, 0]]]]


def test_kernels_are_softmax_normalized_and_windowed():
    uniform = normalize_kernels(torch.zeros(1, 9, 2, 2))
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / 9))
    window = torch.tensor([0.08, 1.0, 0.08]).outer(torch.tensor([0.08, 1.0, 0.08])).flatten()  # numpy's hamming(3)
    windowed = normalize_kernels(torch.zeros(1, 9, 1, 1), window)
    assert torch.allclose(windowed[0, :, 0, 0], window / window.sum())


def test_local_similarity_is_the_cosine_with_dilated_neighbours():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = 1.0  # every pixel (1, 0) ...
    x[0, :, :, 2] = torch.tensor([0.0, 1.0]).view(2, 1)  # ... except the last column, (0, 1)
    sim = local_similarity(x, window=3, dilation=2)  # 8 neighbours at distance 2, centre dropped
    # corner (0, 0): right neighbour (0, 2) is orthogonal, lower (2, 0) equal, lower right (2, 2) orthogonal, the rest outside
    assert sim[0, :, 0, 0].tolist() == [0, 0, 0, 0, 0.0, 0, 1.0, 0.0]
    assert sim[0, :, 1, 1].tolist() == [0] * 8  # the centre's neighbours at distance 2 are all outside


def test_offset_resampler_with_zero_convolutions_is_the_identity():
    resampler = _OffsetResampler(channels=8, groups=4, kernel_size=3)
    for conv in (resampler.offset, resampler.direct_scale, resampler.hr_offset, resampler.hr_direct_scale):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    features = torch.randn(2, 16, 8, 8)
    out = resampler(torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), features)
    assert torch.allclose(out, features, atol=1e-5)


def test_freqfusion_low_pass_keeps_flat_coarse_features_and_high_pass_keeps_flat_fine_ones():
    torch.manual_seed(0)
    fusion = FreqFusion(8, 8, feature_resample=False)
    for encoder in (fusion.content_encoder, fusion.content_encoder2):
        torch.nn.init.normal_(encoder.weight, std=1.0)  # far from uniform kernels
    hr_value, lr_value = torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1)
    kernels, hr_out, lr_up = fusion(hr_value.expand(2, 8, 12, 12) + 0.0, lr_value.expand(2, 8, 6, 6) + 0.0)
    assert torch.allclose(kernels.sum(1), torch.ones(2, 12, 12), atol=1e-5) and (kernels >= 0).all()
    # away from the zero padding a low-pass kernel (weights >= 0, sum 1) keeps a constant, and x - lowpass(x) is 0
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert torch.allclose(lr_up[inner], lr_value.expand_as(lr_up[inner]), atol=1e-5)
    assert torch.allclose(hr_out[..., 2:-2, 2:-2], hr_value.expand(2, 8, 8, 8), atol=1e-5)


def test_freqfusion_shapes_gradients_and_refusals():
    fusion = FreqFusion(hr_channels=16, lr_channels=32)
    kernels, hr, lr_up = fusion(torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4))
    assert (kernels.shape, hr.shape, lr_up.shape) == ((2, 25, 8, 8), (2, 16, 8, 8), (2, 32, 8, 8))
    (hr.square().sum() + lr_up.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    with pytest.raises(ValueError, match="hr must be twice lr's size.*Fix"):
        fusion(torch.randn(1, 16, 8, 8), torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="at least 8 compressed channels.*Fix"):
        FreqFusion(8, 8, compressed_channels=4)


def _neutral_fadc(dilation: int) -> FrequencyAdaptiveDilatedConv:
    """FADC at its start, epsilon 0 and AdaKern's attentions at exactly 1 (2·sigmoid(0))."""
    conv = FrequencyAdaptiveDilatedConv(3, 4, dilation=dilation, epsilon=0.0, k_list=(2,))
    for attention in (conv.low_attention, conv.high_attention):
        torch.nn.init.zeros_(attention.channel_fc.weight)
        torch.nn.init.zeros_(attention.filter_fc.weight)
    torch.nn.init.normal_(conv.bias)
    return conv


@pytest.mark.parametrize("dilation", [1, 2])
def test_fadc_starts_as_the_dilated_convolution_of_its_rate(dilation):
    torch.manual_seed(0)
    conv = _neutral_fadc(dilation)
    x = torch.randn(2, 3, 8, 8)
    # taps at p + dilation·(i, j) on the replicate-padded input (zeros beyond it), modulated by the mask's sigmoid(0)
    expected = 0.5 * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), conv.weight, padding=dilation - 1, dilation=dilation)
    assert torch.allclose(conv(x), expected + conv.bias.view(1, -1, 1, 1), atol=1e-5)
    assert torch.allclose(conv.dilation_map(x), torch.full((2, 1, 8, 8), dilation - 1.0))


def test_adakern_scales_the_mean_and_the_rest_of_the_kernel_separately():
    torch.manual_seed(0)
    conv = _neutral_fadc(1)
    x = torch.randn(2, 3, 8, 8)
    # high part's filter attention 2·sigmoid(-inf) = 0: only each filter's mean over the taps is left
    torch.nn.init.constant_(conv.high_attention.filter_fc.bias, -1e4)
    mean = conv.weight.mean(dim=(-2, -1), keepdim=True).expand_as(conv.weight)
    expected = 0.5 * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), mean) + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_frequency_selection_reweights_spectrum_bands():
    assert band_windows(8, [2, 4, 8]) == [(2, 6), (3, 5), (4, 4)]
    selection = FrequencySelection(1, k_list=(2, 4))
    rows = torch.arange(8)
    checkerboard = (-1.0) ** (rows.view(-1, 1) + rows.view(1, -1))  # the highest frequency, outside the first window
    x = (0.3 + 0.2 * checkerboard).view(1, 1, 8, 8)
    assert torch.allclose(selection(x), x, atol=1e-6)  # zero-initialized weights: 2·sigmoid(0) = 1, the identity
    torch.nn.init.constant_(selection.weights[0].bias, -1e4)  # band 0's weight 0: the checkerboard goes, the mean stays
    assert torch.allclose(selection(x), torch.full_like(x, 0.3), atol=1e-6)
    torch.nn.init.constant_(selection.weights[0].bias, math.log(3))  # weight 2·sigmoid(ln 3) = 1.5
    assert torch.allclose(selection(x), 0.3 + 1.5 * 0.2 * checkerboard.view(1, 1, 8, 8), atol=1e-5)
    with pytest.raises(ValueError, match="empty spectrum window on a 8×8 map.*Fix"):
        FrequencySelection(1, k_list=(2, 4, 8))(x)


def test_unet_options_place_the_modules_and_refuse_unknown_names():
    plain = TinyUNet((1, 32, 32), fusion="add", bottleneck_dilation=2)
    fused = TinyUNet((1, 32, 32), fusion="freqfusion", bottleneck_dilation=2, dilated_conv="fadc")
    assert [f.freqfusion is None for f in plain.fuse] == [True, True] and not hasattr(plain, "upsample")
    assert [type(f.freqfusion).__name__ for f in fused.fuse] == ["FreqFusion", "FreqFusion"]
    assert [m.dilation for m in plain.down[-1] if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (2, 2)]
    fadcs = [m for m in fused.down[-1] if isinstance(m, FrequencyAdaptiveDilatedConv)]
    assert [(m.dilation, m.freq_select.k_list) for m in fadcs] == [(2, [2, 4]), (2, [2, 4])]
    assert sum(p.numel() for p in TinyUNet((1, 32, 32)).parameters()) == 117_056  # the default network is unchanged
    with pytest.raises(ValueError, match="fusion='sum'.*Fix: fusion is one of"):
        TinyUNet((1, 32, 32), fusion="sum")
    assert LateralFusion(8, 4)(torch.ones(1, 4, 4, 4), torch.zeros(1, 8, 2, 2)).shape == (1, 4, 4, 4)


def test_both_modules_train_under_bf16_autocast():
    torch.manual_seed(0)
    net = TinyUNet((1, 16, 16), fusion="freqfusion", bottleneck_dilation=2, dilated_conv="fadc")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = net.forward_with_bottleneck(torch.rand(4, 1, 16, 16))
        loss = features.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_dilation_stats_reads_the_learnt_dilation_of_every_fadc_layer():
    net = TinyUNet((1, 32, 32), bottleneck_dilation=2, dilated_conv="fadc")
    data = SimpleNamespace(test_dataloader=lambda: [{"input": torch.rand(2, 1, 32, 32)}])
    assert dilation_stats(net, data) == pytest.approx({"fadc/dilation_mean": 1.0, "fadc/dilation_max": 1.0}, abs=1e-3)
    first, second = [m for m in net.down[-1] if isinstance(m, FrequencyAdaptiveDilatedConv)]
    # zero offset weights: D = |bias| · rate everywhere, 1.5·2 = 3 in the first layer, 1 in the second
    torch.nn.init.zeros_(first.conv_offset.weight)
    torch.nn.init.constant_(first.conv_offset.bias, -1.5)
    net.train()
    assert dilation_stats(net, data) == pytest.approx({"fadc/dilation_mean": 2.0, "fadc/dilation_max": 3.0}, abs=1e-3)
    assert net.training  # measured in eval mode, the mode restored
    assert dilation_stats(TinyUNet((1, 32, 32), bottleneck_dilation=2), data) == {}
