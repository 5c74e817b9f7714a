"""Mamba-FSCIL (paper 57): the projector's scan, the class-sensitive losses on hand-computed cases,
and the few-shot sessions (what trains, the memory, exact resume at a session boundary)."""

from __future__ import annotations

import doctest
import importlib
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reglab.callbacks import MambaFSCIL
from reglab.callbacks.continual.mamba_fscil import (DualSelectiveProjector, SelectiveSSMBranch, attach_projector,
                                                    separation, suppression)
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule
from reglab.kernels import selective_scan_reference
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

TASK_TRAINER = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def test_the_four_scan_orders_of_a_two_by_two_grid():
    orders = SelectiveSSMBranch(features=4, d_state=2, side=2).orders(torch.device("cpu"))
    assert [o.tolist() for o in orders] == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3], [3, 1, 2, 0]]


def test_a_branch_with_one_token_per_scan_is_the_explicit_two_step_recurrence():
    """side 1 x 1 is one token; with a sequence of two made by hand the branch's scan call must
    equal the explicit loop h_t = exp(delta A) h + delta B x, y = C h + D x (two steps)."""
    torch.manual_seed(0)
    u, delta = torch.randn(1, 2, 2), torch.rand(1, 2, 2)
    A, B, C, D = -torch.rand(2, 3), torch.randn(1, 3, 2), torch.randn(1, 3, 2), torch.randn(2)
    h = torch.zeros(2, 3)
    expected = []
    for t in range(2):
        h = torch.exp(delta[0, :, t, None] * A) * h + delta[0, :, t, None] * B[0, None, :, t] * u[0, :, t, None]
        expected.append((h * C[0, None, :, t]).sum(-1) + D * u[0, :, t])
    torch.testing.assert_close(selective_scan_reference(u, delta, A, B, C, D), torch.stack(expected, -1)[None])


def test_the_new_branch_starts_at_zero_so_a_session_starts_from_the_base_projection():
    torch.manual_seed(0)
    projector = DualSelectiveProjector(features=6, d_state=4)
    features = torch.randn(5, 6)
    base_form = projector(features)
    projector.incremental = True
    projected, scan = projector.project(features)
    torch.testing.assert_close(projected, base_form)
    assert scan.gate.abs().max() == 0 and scan.gate.shape == (5, 6, 4)
    assert scan.dt.shape == scan.B.shape == scan.C.shape == (5, 4, 4)


def test_in_a_session_only_the_new_branch_gets_gradients():
    torch.manual_seed(0)
    projector = DualSelectiveProjector(features=6, d_state=4)
    projector.incremental = True
    with torch.no_grad():
        projector.new.in_proj.weight.normal_()  # a gate that is not zero any more
    features = torch.randn(5, 6, requires_grad=True)
    projector(features).square().sum().backward()
    assert features.grad is None  # the backbone is cut from the graph (detach_residual)
    assert all(p.grad is None for p in projector.base.parameters())
    assert all(p.grad is not None for p in projector.new.parameters())


def test_suppression_is_the_frobenius_norm_over_the_element_count_of_the_selected_rows():
    gate = torch.tensor([[[3.0, 4.0]], [[1.0, 1.0]], [[0.0, 2.0]]])  # (3, 1, 2)
    rows = torch.tensor([True, False, True])
    torch.testing.assert_close(suppression(gate, rows), torch.tensor(math.sqrt(9 + 16 + 4) / 4))
    assert suppression(gate, torch.zeros(3, dtype=torch.bool)) == 0


def test_suppression_has_a_zero_gradient_at_a_zero_gate():
    gate = torch.zeros(2, 3, 4, requires_grad=True)
    suppression(gate, torch.tensor([True, False])).backward()
    assert torch.equal(gate.grad, torch.zeros_like(gate))


def test_separation_is_the_mean_confusion_of_the_two_groups_mean_parameters():
    # base rows average (1, 0) over rows and the two tokens, novel rows (1, 1): cosine 1/sqrt 2
    parameters = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    base = torch.tensor([True, True, False])
    # |I - S| = [[0, c], [c, 0]] with c = 1/sqrt 2: mean = c / 2
    torch.testing.assert_close(separation(parameters, base), torch.tensor(0.5 / math.sqrt(2)))
    assert separation(parameters, torch.ones(3, dtype=torch.bool)) == 0  # no novel rows: no term


def harness_module(hidden: int = 8) -> ClassificationModule:
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (hidden,)},
                                cosine_head_temperature=16.0, lr=1e-2)


def test_loss_terms_in_a_session_match_their_definitions():
    torch.manual_seed(0)
    module = harness_module()
    technique = MambaFSCIL(d_state=4)
    technique.base_classes = [0, 1]
    technique.memory_features, technique.memory_labels = torch.randn(2, 8), torch.tensor([0, 1])
    attach_projector(module, technique.arguments(8))  # the surgery of setup, without a trainer
    technique._set_trainable(module)
    with torch.no_grad():
        module.mamba_fscil.new.in_proj.weight.normal_()
    features = torch.randn(3, 8)
    labels = torch.tensor([0, 5, 6])
    out = StepOutput(logits=module.head(features), target=labels, labels=labels, features=features)
    terms = technique.loss_terms(out, module)
    logits = module.head(technique.memory_features)
    torch.testing.assert_close(terms["replay"], F.cross_entropy(logits, torch.tensor([0, 1]), reduction="sum") / 3)
    _, scan = module.mamba_fscil.new(torch.cat([features, technique.memory_features]))
    base = torch.tensor([True, False, False, True, True])
    torch.testing.assert_close(terms["suppress_base"], 100.0 * scan.gate[base].norm() / scan.gate[base].numel())
    torch.testing.assert_close(terms["suppress_novel"], -1e-5 * scan.gate[~base].norm() / scan.gate[~base].numel())
    means = torch.stack([scan.B[base].mean((0, 2)), scan.B[~base].mean((0, 2))])
    cosine = F.cosine_similarity(means[0], means[1], dim=0)
    torch.testing.assert_close(terms["separate_B"], 1e-3 * cosine.abs() / 2, rtol=1e-4, atol=1e-7)
    static = MambaFSCIL(dual=False, d_state=4)
    static.base_classes, static.memory_features, static.memory_labels = [0, 1], technique.memory_features, technique.memory_labels
    assert set(static.loss_terms(out, module)) == {"replay"}
    assert MambaFSCIL().loss_terms(out, module) == {}  # the base session: no term


def sessions_run(tmp_path, name: str, technique: MambaFSCIL, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=32), num_tasks=3, first_task_classes=6, shots=5)
    runner = TaskSequenceRunner(harness_module(), data, [technique], TASK_TRAINER, run_dir=tmp_path / name, log=False)
    return runner, runner.run(ckpt_path)


def test_sessions_train_only_the_new_branch_and_the_head_and_replay_every_earlier_class(tmp_path):
    technique = MambaFSCIL(d_state=4)
    runner, matrix = sessions_run(tmp_path, "straight", technique)
    module, data = runner.module, runner.datamodule
    assert technique.base_classes == data.tasks[0]
    assert technique.memory_labels.tolist() == [c for task in data.tasks for c in task]
    base_end = torch.load(tmp_path / "straight/checkpoints/task_0_end.ckpt", weights_only=False)["state_dict"]
    changed = {key for key, value in module.state_dict().items() if not torch.equal(value, base_end[key])}
    assert changed and all(key.startswith(("mamba_fscil.new.", "head.")) for key in changed), changed
    assert any(key.startswith("mamba_fscil.new.") for key in changed)
    assert matrix.shape == (3, 3) and not torch.isnan(matrix.tril()).any()

    # resumed from the first session's boundary with a fresh module and technique: the same end
    resumed, resumed_matrix = sessions_run(tmp_path, "resumed", MambaFSCIL(d_state=4),
                                           ckpt_path=tmp_path / "straight/checkpoints/task_1_end.ckpt")
    torch.testing.assert_close(resumed_matrix, matrix, equal_nan=True)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0, msg=key)

    # a bare module loads the checkpoint (the restore hook adds the projector) and predicts alike
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "straight/checkpoints/task_2_end.ckpt")
    inputs = torch.randn(4, 64)
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(inputs), module(inputs))


def test_bad_arguments_and_a_module_without_a_head_are_refused():
    with pytest.raises(TechniqueConfigError, match="d_state and side"):
        MambaFSCIL(d_state=0)
    with pytest.raises(TechniqueConfigError, match="loss weights"):
        MambaFSCIL(suppress_weight=-1.0)
    module = L.LightningModule()
    module.head = None
    trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(batch_keys=None), strategy=None)
    with pytest.raises(TechniqueConfigError, match="no `head` module"):
        MambaFSCIL().setup(trainer, module, "predict")


def test_docstring_examples_run():
    # import_module: the package attribute reglab.kernels.selective_scan is the function, not the module
    for name in ("reglab.callbacks.continual.mamba_fscil", "reglab.kernels.selective_scan"):
        assert doctest.testmod(importlib.import_module(name), verbose=False).failed == 0
