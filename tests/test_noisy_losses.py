"""SCE, focal loss, Co-teaching and feature compression: their maths on hand-computed cases, the
peer network (trained, saved, restored, compressed in either config order) and the refusals."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from harness import noisy_digits, quiet_trainer, small_module, start_ranks
from reglab.callbacks.baselines.co_teaching import PEER, CoTeaching, co_teaching_loss, forget_rate_at, small_loss_mask
from reglab.callbacks.baselines.focal_loss import FocalLoss, focal_loss
from reglab.callbacks.baselines.sce import symmetric_cross_entropy
from reglab.callbacks.noisy_labels.compressing_features import (
    CompressedHead,
    FeatureCompression,
    NestedDropout,
    best_channels,
    truncation_correct,
    truncation_probabilities,
)
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule
from reglab.technique import Technique, TechniqueConfigError

LOGITS = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)


# -- SCE ---------------------------------------------------------------------------------------

def test_sce_hard_label_by_hand():
    # CE = -log 0.75; reverse CE = -log(1e-4) * (1 - 0.75)
    expected = 0.1 * -math.log(0.75) + 1.0 * -math.log(1e-4) * 0.25
    assert symmetric_cross_entropy(LOGITS, torch.tensor([1]), 0.1, 1.0, 1e-4).item() == pytest.approx(expected, rel=1e-6)


def test_sce_paper_constant_and_soft_target_by_hand():
    # the paper's A = -4: reverse CE of a hard label is 4 * (1 - p_y)
    assert symmetric_cross_entropy(LOGITS, torch.tensor([1]), 0.0, 1.0, math.exp(-4)).item() == pytest.approx(1.0, rel=1e-5)
    soft = torch.tensor([[0.5, 0.5]])
    ce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    reverse = -(0.25 * math.log(0.5) + 0.75 * math.log(0.5))
    assert symmetric_cross_entropy(LOGITS, soft, 0.1, 1.0, 1e-4).item() == pytest.approx(0.1 * ce + reverse, rel=1e-6)


# -- focal loss --------------------------------------------------------------------------------

def test_focal_loss_by_hand():
    hard = focal_loss(LOGITS, torch.tensor([1]), gamma=2.0)
    assert hard.item() == pytest.approx(0.25**2 * -math.log(0.75), rel=1e-6)
    weighted = focal_loss(LOGITS.repeat(2, 1), torch.tensor([0, 1]), gamma=2.0, alpha=torch.tensor([2.0, 0.5]))
    expected = [2.0 * 0.75**2 * -math.log(0.25), 0.5 * 0.25**2 * -math.log(0.75)]
    torch.testing.assert_close(weighted, torch.tensor(expected))
    soft = focal_loss(LOGITS, torch.tensor([[0.5, 0.5]]), gamma=2.0)
    assert soft.item() == pytest.approx(0.5 * 0.75**2 * -math.log(0.25) + 0.5 * 0.25**2 * -math.log(0.75), rel=1e-6)


def test_focal_loss_gamma_zero_is_cross_entropy_and_masked_logits_add_nothing():
    logits = torch.randn(5, 4)
    target = torch.randint(0, 4, (5,))
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), nn.functional.cross_entropy(logits, target, reduction="none"))
    masked = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
    loss = focal_loss(masked, torch.tensor([[0.5, 0.0, 0.5]]), gamma=2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(masked.grad).all()


def test_focal_loss_alpha_must_match_the_classes():
    trainer = quiet_trainer(max_steps=1, callbacks=[FocalLoss(alpha=[1.0, 2.0])])
    with pytest.raises(TechniqueConfigError, match="alpha has 2 weights but the data has 10 classes"):
        trainer.fit(small_module(), datamodule=noisy_digits())


# -- Co-teaching -------------------------------------------------------------------------------

def test_forget_rate_schedule_follows_the_official_rate_schedule():
    # official: rate_schedule = linspace(0, 0.4, 10), training epochs 1.. use rate_schedule[epoch]
    official = [0.4 * i / 9 for i in range(10)] + [0.4] * 5
    assert [forget_rate_at(e, 0.4, 10, 1.0) for e in range(14)] == pytest.approx(official[1:15])
    # exponent 2: the ramp ends at 0.5**2, then the rate jumps to 0.5 (as the code)
    assert forget_rate_at(8, 0.5, 10, 2.0) == pytest.approx(0.25)
    assert forget_rate_at(9, 0.5, 10, 2.0) == pytest.approx(0.5)


def test_small_loss_selection_and_exchange_on_a_hand_made_batch():
    net = torch.tensor([0.1, 2.0, 0.5, 3.0], requires_grad=True)
    peer = torch.tensor([1.0, 0.2, 0.3, 4.0], requires_grad=True)
    per_sample, by_net, by_peer = co_teaching_loss(net, peer, forget_rate=0.5)  # keep int(0.5 * 4) = 2
    assert by_net.tolist() == [1.0, 0.0, 1.0, 0.0] and by_peer.tolist() == [0.0, 1.0, 1.0, 0.0]
    # net trains on the peer's picks {1, 2}, the peer on the net's picks {0, 2}
    assert per_sample.mean().item() == pytest.approx((2.0 + 0.5) / 2 + (1.0 + 0.3) / 2)
    per_sample.mean().backward()
    assert net.grad.tolist() == [0.0, 0.5, 0.5, 0.0] and peer.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert small_loss_mask(torch.tensor([1.0, 1.0, 0.0]), 2).tolist() == [1.0, 0.0, 1.0]  # ties: lower position


def test_a_given_ranking_decides_the_selection_and_the_training_losses_the_gradient():
    net = torch.tensor([0.1, 2.0, 0.5, 3.0], requires_grad=True)
    peer = torch.tensor([1.0, 0.2, 0.3, 4.0], requires_grad=True)
    ranking = (torch.tensor([9.0, 0.0, 9.0, 1.0]), torch.tensor([0.0, 9.0, 9.0, 1.0]))
    per_sample, by_net, by_peer = co_teaching_loss(net, peer, 0.5, ranking)
    assert by_net.tolist() == [0.0, 1.0, 0.0, 1.0] and by_peer.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert per_sample.mean().item() == pytest.approx((0.1 + 3.0) / 2 + (0.2 + 4.0) / 2)


def test_evaluation_mode_selection_trains_and_leaves_the_modes_as_they_were():
    module, technique = small_module(), CoTeaching(forget_rate=0.4, selection="eval")
    compression = FeatureCompression(std=5.0)
    seen = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(all(layer.training for layer in pl_module.modules()))

    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=[compression, technique, Modes()])
    trainer.fit(module, datamodule=noisy_digits())
    assert seen == [True, True, True]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def _peer(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(module, PEER).state_dict().items()}


def test_peer_is_a_fresh_network_that_trains_saves_and_loads(tmp_path):
    module = small_module()
    technique = CoTeaching(forget_rate=0.4, num_gradual=2)
    trainer = quiet_trainer(max_steps=6, callbacks=[technique], enable_checkpointing=True, default_root_dir=tmp_path)
    data = noisy_digits()
    technique.setup(trainer, module, "validate")  # the peer exists from setup on, re-initialised
    initial = _peer(module)
    assert not torch.equal(initial["head.weight"], module.head.weight)
    trainer.fit(module, datamodule=data)
    trained = _peer(module)
    assert all(not torch.equal(initial[k], trained[k]) for k in initial if k.endswith("weight")), "the peer did not train"
    assert trainer.callback_metrics["train/co_teaching/forget_rate"] == pytest.approx(0.4)  # epoch 1: full rate
    assert 0.0 < float(trainer.callback_metrics["train/co_teaching/label_precision"]) <= 1.0
    path = tmp_path / "peer.ckpt"
    trainer.save_checkpoint(path)
    loaded = ClassificationModule.load_from_checkpoint(path)  # a bare module: the restore hook adds the peer
    for key, value in trained.items():
        torch.testing.assert_close(getattr(loaded, PEER).state_dict()[key], value, rtol=0, atol=0)


def test_forget_rate_needs_a_noise_rate():
    trainer = quiet_trainer(max_steps=1, callbacks=[CoTeaching()])
    with pytest.raises(TechniqueConfigError, match="forget_rate is unset"):
        trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=256))


class AddsParameters(Technique):
    """Adds a trainable layer to the model at setup (as an adapter-injecting technique would)."""

    def setup(self, trainer, pl_module, stage):
        pl_module.extra = nn.Linear(2, 2)


def test_parameters_added_after_the_peer_copy_are_refused():
    trainer = quiet_trainer(max_steps=1, callbacks=[CoTeaching(forget_rate=0.4), AddsParameters()])
    with pytest.raises(TechniqueConfigError, match=r"added to the model after its peer network was copied \(extra.weight"):
        trainer.fit(small_module(), datamodule=noisy_digits())


# -- feature compression -----------------------------------------------------------------------

def test_nested_dropout_masks_a_prefix_in_training_and_keeps_the_chosen_channels_in_eval():
    torch.manual_seed(0)
    layer = NestedDropout(features=6, std=2.0)
    x = torch.ones(3, 6)
    kept = []
    for _ in range(400):
        out = layer(x)
        k = int(out[0].sum())
        assert torch.equal(out, torch.cat([torch.ones(3, k), torch.zeros(3, 6 - k)], 1)), "not one prefix per batch"
        kept.append(k)
    frequencies = torch.bincount(torch.tensor(kept), minlength=7)[1:].float() / len(kept)
    torch.testing.assert_close(frequencies, truncation_probabilities(6, 0.0, 2.0), atol=0.06, rtol=0)
    layer.eval()
    assert torch.equal(layer(x), x)  # all channels until a K is chosen
    layer.channels.fill_(2)
    assert torch.equal(layer(x), torch.tensor([[1.0, 1, 0, 0, 0, 0]]).expand(3, 6))


def test_truncation_distribution_and_channel_choice_by_hand():
    weights = torch.tensor([math.exp(-1), math.exp(-4), math.exp(-9)])
    torch.testing.assert_close(truncation_probabilities(3, 0.0, 1.0), weights / weights.sum())
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, -5.0], [0.0, 1.0, 5.0]]))
    features = torch.tensor([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # logits with the first 1 channel: (2, 0), (0, 0) -> classes 0, 0; 2 channels: 0, 1; all 3: 1, 1
    assert truncation_correct(features, head, torch.tensor([0, 1])).tolist() == [1.0, 2.0, 1.0]
    assert best_channels(torch.tensor([1.0, 2.0, 1.0]), 2) == 2
    assert best_channels(torch.tensor([2.0, 2.0, 2.0]), 2) == 1  # ties go to fewer channels


def _count_compression_calls(module) -> list[int]:
    calls = []
    module.head[0].register_forward_hook(lambda layer, args, output: calls.append(1) if layer.training else None)
    return calls


@pytest.mark.parametrize("compression_first", [True, False])
def test_compression_reaches_the_peer_in_either_config_order(compression_first):
    module, compression, co_teaching = small_module(), FeatureCompression(std=5.0), CoTeaching(forget_rate=0.4)
    techniques = [compression, co_teaching] if compression_first else [co_teaching, compression]
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=techniques)

    class Count(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.calls = _count_compression_calls(pl_module)

    counter = Count()
    trainer.callbacks.append(counter)
    trainer.fit(module, datamodule=noisy_digits())
    assert isinstance(module.head, CompressedHead)
    assert len(counter.calls) == 2 * 3, "net 1 and its peer each pass the compression once per step"
    assert 1 <= int(module.head[0].channels) <= module.backbone.feature_dim


def test_compressed_model_loads_from_its_checkpoint(tmp_path):
    module = small_module()
    trainer = quiet_trainer(max_epochs=1, callbacks=[FeatureCompression(std=5.0)])
    trainer.fit(module, datamodule=noisy_digits())
    chosen = int(module.head[0].channels)
    assert 1 <= chosen <= module.backbone.feature_dim
    trainer.save_checkpoint(tmp_path / "compressed.ckpt")
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "compressed.ckpt")
    assert isinstance(loaded.head, CompressedHead) and int(loaded.head[0].channels) == chosen
    x = torch.rand(4, 64)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


def test_compression_refuses_a_module_without_a_separate_head():
    module = small_module()
    module.head = None
    trainer = quiet_trainer(max_steps=1, callbacks=[FeatureCompression()])
    with pytest.raises(TechniqueConfigError, match="no `head` module"):
        trainer.fit(module, datamodule=noisy_digits())


# -- DDP ---------------------------------------------------------------------------------------

class PeerAcrossRanks(L.Callback):
    """After a DDP fit: whether the peer's weights are the same on both ranks and were trained."""

    def __init__(self, report: str) -> None:
        self.report = report

    def on_fit_start(self, trainer, pl_module):
        self.initial = _peer(pl_module)

    def on_train_end(self, trainer, pl_module):
        result = {}
        for key, value in getattr(pl_module, PEER).state_dict().items():
            gathered = pl_module.all_gather(value)
            result[key] = [bool(torch.equal(gathered[0], gathered[1])), not torch.equal(self.initial[key], value)]
        if trainer.global_rank == 0:
            torch.save(result, self.report)


def _ddp_worker(rank: int, port: int, report: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    torch.manual_seed(rank)  # different RNG per rank: DDP's broadcast must still give one peer
    callbacks = [FeatureCompression(std=5.0), CoTeaching(forget_rate=0.4), PeerAcrossRanks(report)]
    trainer = quiet_trainer(max_steps=4, devices=2, strategy="ddp", callbacks=callbacks)
    module = small_module()
    torch.manual_seed(rank)
    trainer.fit(module, datamodule=noisy_digits(batch_size=128))


@pytest.mark.slow
def test_ddp_peer_is_one_network_on_both_ranks(tmp_path):
    import socket


    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = str(tmp_path / "peer.pt")
    start_ranks(_ddp_worker, port, report)
    result = torch.load(report)
    assert result, "no peer state"
    for key, (same, trained) in result.items():
        assert same, f"{key} differs across ranks"
        if key.endswith("weight"):
            assert trained, f"{key} was never updated"
