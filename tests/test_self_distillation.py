"""PS-KD, knowledge distillation and the batch-mixing baselines against hand values and references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reglab.callbacks import PSKD, CutMix, KnowledgeDistillation, Mixup
from reglab.callbacks.baselines.cutmix import Box, cut_box, kept_share, paste_box
from reglab.callbacks.baselines.label_smoothing import smooth_targets
from reglab.callbacks.baselines.mixing import MixingPlan, mix_targets, sample_mixing_share
from reglab.callbacks.self_distillation.knowledge_distillation import distillation_loss
from reglab.callbacks.self_distillation.ps_kd import pskd_alpha, pskd_targets
from reglab.datamodules import DigitsDataModule
from harness import distillation_teacher, quiet_trainer, small_module
from reglab.mixins import StepOutput, cross_entropy_per_sample
from reglab.technique import Technique, TechniqueConfigError

# -- PS-KD ------------------------------------------------------------------------------------


def test_pskd_alpha_follows_the_official_zero_based_schedule():
    assert [round(pskd_alpha(epoch, 10, 0.8), 6) for epoch in (0, 4, 9)] == [0.08, 0.4, 0.8]
    assert pskd_alpha(15, 10, 0.8) == pytest.approx(0.8)  # held after the planned epochs


def test_pskd_targets_hand_values():
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    previous = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(pskd_targets(labels, previous, alpha=0.4), torch.tensor([[0.8, 0.12, 0.08]]))


def test_pskd_rows_without_a_prediction_keep_their_targets():
    """Epoch 0: nothing stored yet, so every target is the incoming one (one-hot here)."""
    labels = F.one_hot(torch.tensor([2, 0]), 3).float()
    previous = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.1, 0.8]])
    targets = pskd_targets(labels, previous, alpha=0.5)
    torch.testing.assert_close(targets[0], labels[0])
    torch.testing.assert_close(targets[1], torch.tensor([0.55, 0.05, 0.4]))


class StepRecorder(Technique):
    """Listed after PS-KD: records the targets PS-KD produced and the predictions of each step."""

    def __init__(self):
        self.targets, self.predictions = [], []

    def transform_targets(self, out, module):
        self.targets.append((module.current_epoch, out.index.clone(), out.labels.clone(), out.target.clone()))
        return out.target

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = outputs["step_output"]
        self.predictions.append((trainer.current_epoch, step.index.clone(), step.logits.float().softmax(-1)))


def test_pskd_targets_use_the_previous_epochs_predictions_and_the_table_holds_the_latest():
    pskd, recorder = PSKD(alpha_T=0.8), StepRecorder()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[pskd, recorder])
    trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=256))
    num_samples = pskd.predictions.table.shape[0]

    def by_sample(records, epoch):
        table = torch.zeros(num_samples, 10)
        for record_epoch, index, *_, values in records:
            if record_epoch == epoch:
                table[index] = values
        return table

    labels = torch.zeros(num_samples, dtype=torch.long)
    for _, index, step_labels, _ in recorder.targets:
        labels[index] = step_labels
    one_hot = F.one_hot(labels, 10).float()
    # T = max_epochs = 2: alpha_0 = 0.4, alpha_1 = 0.8
    torch.testing.assert_close(by_sample(recorder.targets, 0), one_hot)
    expected_epoch_1 = 0.2 * one_hot + 0.8 * by_sample(recorder.predictions, 0)
    torch.testing.assert_close(by_sample(recorder.targets, 1), expected_epoch_1)
    torch.testing.assert_close(pskd.predictions.table, by_sample(recorder.predictions, 1))


def test_pskd_loss_ignores_classes_masked_to_minus_infinity():
    """ClassificationModule.active_classes sets inactive logits to -inf; PS-KD's targets are 0 there
    (the stored softmax is), so the loss equals the loss over the active classes instead of NaN."""
    torch.manual_seed(0)
    active = torch.tensor([True, True, False, True, False, True])
    logits = torch.randn(4, 6)
    masked_logits = logits.masked_fill(~active, float("-inf")).requires_grad_()
    previous = masked_logits.detach().softmax(-1)
    labels = F.one_hot(torch.tensor([0, 1, 3, 5]), 6).float()
    loss = cross_entropy_per_sample(masked_logits, pskd_targets(labels, previous, alpha=0.5))
    loss.sum().backward()
    active_logits = logits[:, active]
    expected = F.cross_entropy(active_logits, pskd_targets(labels, previous, alpha=0.5)[:, active], reduction="none")
    torch.testing.assert_close(loss, expected)
    assert masked_logits.grad.isfinite().all() and (masked_logits.grad[:, ~active] == 0).all()


def test_pskd_without_an_epoch_budget_says_what_to_set():
    trainer = quiet_trainer(max_steps=2, callbacks=[PSKD()])
    with pytest.raises(TechniqueConfigError, match="PSKD: .*max_epochs.*total_epochs"):
        trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=256))


# -- Mixup / CutMix ---------------------------------------------------------------------------


def test_mix_targets_hand_values():
    plan = MixingPlan(permutation=torch.tensor([1, 0, 2]), lam=0.7)
    mixed = mix_targets(torch.tensor([0, 1, 2]), 3, plan)
    torch.testing.assert_close(mixed, torch.tensor([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]]))


def test_mixing_and_label_smoothing_compose_in_either_order():
    plan = MixingPlan(permutation=torch.tensor([2, 0, 1]), lam=0.35)
    labels = torch.tensor([0, 1, 3])
    smoothed_then_mixed = mix_targets(smooth_targets(labels, 4, 0.1), 4, plan)
    mixed_then_smoothed = smooth_targets(mix_targets(labels, 4, plan), 4, 0.1)
    torch.testing.assert_close(smoothed_then_mixed, mixed_then_smoothed)
    torch.testing.assert_close(smoothed_then_mixed.sum(-1), torch.ones(3))


def test_mixing_share_is_beta_distributed():
    torch.manual_seed(0)
    uniform = torch.tensor([sample_mixing_share(1.0) for _ in range(4000)])
    assert abs(uniform.mean().item() - 0.5) < 0.02 and abs(uniform.var().item() - 1 / 12) < 0.005
    peaked = torch.tensor([sample_mixing_share(0.2) for _ in range(4000)])
    assert ((peaked < 0.1) | (peaked > 0.9)).float().mean() > 0.6  # Beta(0.2, 0.2) is U-shaped


def _step_through(technique, batch, num_classes=3):
    """Run a technique's batch and target transforms as the step contract would."""
    mixed = technique.transform_batch(batch, module=None)
    out = StepOutput(logits=torch.zeros(len(batch["target"]), num_classes), target=mixed["target"], batch=mixed)
    return mixed, technique.transform_targets(out, module=None)


def test_mixup_mixes_inputs_and_targets_with_the_same_plan():
    torch.manual_seed(0)
    batch = {"input": torch.randn(4, 5), "target": torch.tensor([0, 1, 2, 1])}
    mixed, targets = _step_through(Mixup(alpha=1.0), batch)
    plan = mixed["mixup_plan"]
    torch.testing.assert_close(mixed["input"], plan.lam * batch["input"] + (1 - plan.lam) * batch["input"][plan.permutation])
    torch.testing.assert_close(targets, mix_targets(batch["target"], 3, plan))
    assert batch["input"].shape == mixed["input"].shape and "mixup_plan" not in batch  # the loader's batch is untouched


def test_cut_box_hand_values_and_the_share_follows_the_clipped_box():
    # lam = 0.75: sides cut to sqrt(0.25) = 1/2 of 8, i.e. 2 pixels on each side of the centre
    assert cut_box(8, 8, 0.75, centre=(4, 4)) == Box(2, 6, 2, 6)
    assert kept_share(Box(2, 6, 2, 6), 8, 8) == 0.75
    corner = cut_box(8, 8, 0.75, centre=(0, 7))  # clipped at the top and right borders
    assert corner == Box(0, 2, 5, 8)
    assert kept_share(corner, 8, 8) == 1 - 6 / 64


def test_paste_box_takes_the_partners_pixels_inside_the_box_only():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    mixed = paste_box(images, torch.tensor([1, 0]), Box(1, 3, 0, 2))
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 0:2] = True
    torch.testing.assert_close(mixed[0, 0][inside], images[1, 0][inside])
    torch.testing.assert_close(mixed[0, 0][~inside], images[0, 0][~inside])


def test_cutmix_on_flat_inputs_cuts_the_images_they_flatten_and_mixes_targets_by_area():
    torch.manual_seed(0)
    batch = {"input": torch.rand(6, 64), "target": torch.tensor([0, 1, 2, 0, 1, 2])}
    mixed, targets = _step_through(CutMix(probability=1.0, image_shape=(1, 8, 8)), batch)
    plan = mixed["cutmix_plan"]
    from_partner = (mixed["input"] == batch["input"][plan.permutation]) & (mixed["input"] != batch["input"])
    pasted_share = from_partner.float().mean().item()
    unmoved = plan.permutation == torch.arange(6)
    assert pasted_share == pytest.approx((1 - plan.lam) * (~unmoved).float().mean().item())
    torch.testing.assert_close(targets, mix_targets(batch["target"], 3, plan))


def test_cutmix_refuses_flat_inputs_without_an_image_shape():
    batch = {"input": torch.rand(4, 64), "target": torch.tensor([0, 1, 2, 0])}
    with pytest.raises(TechniqueConfigError, match="CutMix: .*shape \\(4, 64\\).*image_shape"):
        CutMix(probability=1.0).transform_batch(batch, module=None)


def test_unmixed_batches_keep_inputs_and_targets():
    batch = {"input": torch.rand(4, 1, 8, 8), "target": torch.tensor([0, 1, 2, 0])}
    mixed, targets = _step_through(CutMix(probability=0.0), batch)
    assert mixed is batch and torch.equal(targets, batch["target"])


# -- knowledge distillation -------------------------------------------------------------------


def test_distillation_loss_is_t_squared_kl_div():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(8, 10), torch.randn(8, 10), 4.0
    reference = F.kl_div(
        F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"
    ) * temperature**2
    torch.testing.assert_close(distillation_loss(student, teacher, temperature), reference)


def test_knowledge_distillation_trains_against_a_frozen_eval_teacher():
    checkpoint = distillation_teacher()
    kd = KnowledgeDistillation(checkpoint, temperature=4.0, weight=0.9)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[kd])
    trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=256))
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in kd.teacher.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert float(trainer.callback_metrics["train/knowledge_distillation/kl"]) > 0


def test_knowledge_distillation_without_its_teacher_file_says_so(tmp_path):
    trainer = quiet_trainer(max_steps=1, callbacks=[KnowledgeDistillation(str(tmp_path / "missing.ckpt"))])
    with pytest.raises(TechniqueConfigError, match="KnowledgeDistillation: the teacher checkpoint .*missing.ckpt.* does not exist"):
        trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=256))
    with pytest.raises(ValueError, match="exactly one of teacher_checkpoint and teacher_config"):
        KnowledgeDistillation()
