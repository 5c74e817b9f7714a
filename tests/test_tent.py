"""TENT and the eval-time adaptation mechanism: the entropy and its gradient against hand-computed
values, the first Adam step on the batch norms, episodes, and that a test run changes neither the
checkpoint it loads nor the model (unless keep_adapted)."""

from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from harness import start_ranks
from reglab.callbacks.baselines.tent import TENT, softmax_entropy
from reglab.callbacks.domain_generalization.cafa import CAFA
from reglab.datamodules import DigitsDataModule
from reglab.registry import example_module, example_trainer
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError, batch_norm_layers


def bn_module(seed: int = 0) -> ClassificationModule:
    return example_module(seed, backbone_kwargs={"norm": "batch"})


def digits(eval_batch_size: int | None = None) -> DigitsDataModule:
    return DigitsDataModule(flatten=True, batch_size=256, eval_batch_size=eval_batch_size)


def fitted(steps: int = 4) -> tuple[ClassificationModule, DigitsDataModule]:
    module, data = bn_module(), digits()
    example_trainer(max_steps=steps).fit(module, datamodule=data)
    return module, data


def test_entropy_and_its_gradient_match_the_hand_computed_values():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4), dH/dz_k = -p_k (ln p_k + H)
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], requires_grad=True)
    entropy = softmax_entropy(logits)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.tensor([h, math.log(2.0)]))
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    expected = [[-0.25 * (math.log(0.25) + h), -0.75 * (math.log(0.75) + h)], [0.0, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected))


def test_one_test_batch_takes_adams_first_step_on_the_batch_norms_only():
    """One batch (the whole test split): Adam's first step moves each affine parameter by
    lr * g / (|g| + eps) for the gradient g of the mean entropy with test-batch statistics;
    nothing else (weights, running statistics) moves, and the metrics are the pre-step forward's."""
    module, _ = fitted()
    data = digits(eval_batch_size=1000)
    data.setup("test")
    batch = {"input": data.test_dataset.inputs, "target": data.test_dataset.targets}
    reference = copy.deepcopy(module).train()
    for norm in batch_norm_layers(reference):
        norm.track_running_stats = False
    out = reference.forward_step(batch)
    names = [name for name, _ in TENT().adapted_parameters(reference)]
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(softmax_entropy(out.logits).mean(), [params[n] for n in names])
    before = {k: v.clone() for k, v in module.state_dict().items()}

    lr = 1e-3
    (logged,) = example_trainer(callbacks=[TENT(lr=lr, keep_adapted=True)]).test(module, datamodule=data, verbose=False)

    after = module.state_dict()
    for name, grad in zip(names, grads):
        torch.testing.assert_close(after[name] - before[name], -lr * grad / (grad.abs() + 1e-8), rtol=1e-4, atol=1e-7)
    for key in set(before) - set(names):
        assert torch.equal(after[key], before[key]), key
    ce = torch.nn.functional.cross_entropy(out.logits, batch["target"])
    assert logged["test/loss"] == pytest.approx(float(ce), rel=1e-5)


def test_episodes_start_from_the_source_model():
    """Online within a run: after 8 batches a parameter moves more than one step's lr; episodic
    (reset before every batch) leaves at most one step on it; a new run starts from the source."""
    module, _ = fitted()
    data = digits(eval_batch_size=64)
    source = {k: v.clone() for k, v in module.state_dict().items()}
    moves = {}
    for episodic in (False, True):
        module.load_state_dict(source)
        example_trainer(callbacks=[TENT(lr=1e-3, episodic=episodic, keep_adapted=True)]).test(
            module, datamodule=data, verbose=False)
        moves[episodic] = max(float((module.state_dict()[k] - source[k]).abs().max()) for k in source)
    assert moves[True] <= 1e-3 * (1 + 1e-4)
    assert moves[False] > 1.5e-3


def test_a_test_run_changes_neither_the_checkpoint_nor_the_model(tmp_path):
    module, data = bn_module(), digits()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="fitted")
    example_trainer(max_steps=4, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, datamodule=data)
    path = tmp_path / "fitted.ckpt"
    on_disk = path.read_bytes()
    saved = torch.load(path, weights_only=True)["state_dict"]

    trainer = example_trainer(callbacks=[TENT()])
    trainer.test(module, datamodule=data, ckpt_path=str(path), verbose=False)
    assert path.read_bytes() == on_disk
    for key, value in module.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert trainer.test_loop.inference_mode, "the loop's inference mode was not switched back"
    trainer.save_checkpoint(tmp_path / "after_test.ckpt")  # a checkpoint written after the run: the source model
    for key, value in torch.load(tmp_path / "after_test.ckpt", weights_only=True)["state_dict"].items():
        assert torch.equal(value, saved[key]), key

    example_trainer(callbacks=[TENT(keep_adapted=True)]).test(module, datamodule=data, ckpt_path=str(path), verbose=False)
    assert path.read_bytes() == on_disk
    assert not torch.equal(module.state_dict()["backbone.layers.2.weight"], saved["backbone.layers.2.weight"])


def test_refusals_name_the_problem_and_the_fix():
    data = digits()
    with pytest.raises(TechniqueConfigError, match="TENT: .*no batch-norm layer.*Fix: use a backbone with BatchNorm"):
        example_trainer(callbacks=[TENT()]).test(example_module(), datamodule=data, verbose=False)
    with pytest.raises(TechniqueConfigError, match="both it and CAFA adapt the model at test time"):
        example_trainer(callbacks=[TENT(), CAFA()]).test(bn_module(), datamodule=data, verbose=False)
    with pytest.raises(TechniqueConfigError, match="steps=0"):
        TENT(steps=0)
    with pytest.raises(TechniqueConfigError, match="not evaluation runs"):
        TENT(adapt_in=["fit"])


class OwnTestStep(ClassificationModule):
    def test_step(self, batch, batch_idx):
        out = self.forward_step(batch)
        self.on_step_output(out, "test")
        return self.task_loss(out).mean()


def test_a_test_step_that_bypasses_eval_forward_fails_and_leaves_the_model():
    module = OwnTestStep("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,), "norm": "batch"})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TechniqueConfigError, match="none was adapted.*Fix: call self.eval_forward"):
        example_trainer(callbacks=[TENT()]).test(module, datamodule=digits(), verbose=False)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_docstring_examples_run():
    import reglab.callbacks.baselines.tent
    import reglab.technique

    for module in (reglab.technique, reglab.callbacks.baselines.tent):
        assert doctest.testmod(module, verbose=False).failed == 0, module.__name__


def ddp_test_worker(rank: int, port: int, report_dir: str) -> None:
    """One of two DDP processes testing with TENT (keep_adapted): reports whether the adapted
    parameters are identical on both ranks and how far they moved."""
    import json
    import os
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    module = bn_module()
    before = module.state_dict()["backbone.layers.2.weight"].clone()
    trainer = example_trainer(devices=2, strategy="ddp", callbacks=[TENT(lr=0.01, keep_adapted=True)])
    trainer.test(module, datamodule=DigitsDataModule(flatten=True, batch_size=64), verbose=False)
    weight = module.state_dict()["backbone.layers.2.weight"]
    gathered = [torch.zeros_like(weight) for _ in range(2)]
    torch.distributed.all_gather(gathered, weight)
    report = {"same": bool(torch.equal(*gathered)), "moved": float((weight - before).abs().max())}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_ddp_ranks_adapt_alike(tmp_path):
    """Two DDP ranks test on different shards; the averaged gradients keep one adapted model."""
    import json
    import socket


    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start_ranks(ddp_test_worker, port, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(report["same"] and report["moved"] > 0 for report in reports), reports


def test_the_validation_inside_a_fit_measures_the_source_model():
    """Fit-time validation (checkpoint and model selection) never adapts; trainer.validate does."""
    module, data = bn_module(), digits()
    trainer = example_trainer(max_epochs=1, callbacks=[TENT()])
    trainer.fit(module, datamodule=data)
    assert "val/acc" in trainer.callback_metrics and "val/tent/adaptation_loss" not in trainer.callback_metrics
    (validated,) = example_trainer(callbacks=[TENT()]).validate(module, datamodule=data, verbose=False)
    assert "val/tent/adaptation_loss" in validated
