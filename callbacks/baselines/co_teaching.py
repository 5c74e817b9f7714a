"""Co-teaching (Han et al., NeurIPS 2018) — two networks train each other on small-loss samples.

Networks fit clean labels before noisy ones, so a sample with a small loss is probably clean. Two
networks see every batch; each keeps the ``1 - R(T)`` fraction of the batch with its smallest
losses, and its *peer* is trained on them (the exchange keeps one network's selection errors from
reinforcing themselves). The forget rate ``R(T)`` ramps up linearly over the first epochs:

    keep      = int((1 - R(T)) * N)
    S_1, S_2  = the keep smallest-loss samples of net 1, net 2 (losses detached)
    loss      = mean_{i in S_2} CE_1(i) + mean_{i in S_1} CE_2(i)

Defaults follow the official code (github.com/bhanML/Co-teaching, ``loss.py`` and ``main.py``):
forget_rate = the noise rate (here the DataModule's ``label_noise.rate`` when not given),
num_gradual = 10, exponent = 1, and its ``rate_schedule = linspace(0, forget_rate**exponent,
num_gradual)`` then forget_rate. Its training loop starts at epoch 1 (epoch 0 evaluates the
untrained networks), so the trainer's epoch ``e`` uses ``rate_schedule[e + 1]``; the rate is
read from the trainer's epoch, so a resumed run follows the same schedule. Where we differ:

* The paper's schedule is ``tau * min(T^c / T_k, 1)``; the code raises the *rate* to the exponent
  instead. We follow the code (identical for the default exponent 1).
* The code divides each network's mean loss once more by ``keep`` (a scale of its loss only; under
  its Adam optimizer this changes nearly nothing). We use the plain means, as the paper.
* The code trains the networks with two Adam optimizers; here both are parameters of one module
  and one optimizer: the two losses share no parameters, so each network gets exactly its own
  gradient (the module's optimizer settings apply to both).
* Ties in the loss ranking are broken by position (a stable sort), the code's ``np.argsort`` by
  whatever order its quicksort leaves.
* ``selection="eval"`` ranks the samples by a no-gradient pass of both networks in evaluation
  mode instead, as the Nested-Co-teaching code (``co_teaching_resnet/train.py``) does for the
  compressed networks; the default ``"train"`` is the official Co-teaching code's ranking.

Design (the step contract): the peer network is part of the LightningModule, so the optimizer,
checkpoints, DDP and devices see it. In ``setup`` (before optimizers exist and before a
checkpoint is restored) the technique deep-copies the module's children that hold trainable
parameters into ``module.co_teaching_peer`` and re-initialises the copies (``reset_parameters``;
two identical networks would select the same samples forever, and the official code builds two
independently initialised networks). The peer runs through the *module's own* input path: the
module's ``forward_step`` with the peer's tensors substituted for the module's
(``torch.func.functional_call``). So whatever layers the module has when the step runs — also a
parameter-free layer that another technique inserts after the peer was copied, such as
``compressing_features``' compression before the head — the peer runs them too, in either config
order. A technique that adds *parameters* after the copy (they would be shared by both networks)
is refused at fit start. Net 1 is the module itself: validation and test report net 1 only (the
official code reports both networks' test accuracy). Under DDP each rank selects within its own
part of the batch, as the official single-GPU code does per batch. A checkpoint records a restore
hook, so ``ClassificationModule.load_from_checkpoint`` rebuilds the peer before loading.

Method card (what it does, when it helps, what it costs): ``co_teaching.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import CoTeaching
    >>> [round(forget_rate_at(e, 0.4, num_gradual=10, exponent=1.0), 3) for e in (0, 4, 8, 20)]
    [0.044, 0.222, 0.4, 0.4]
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.mixins import StepOutput
from reglab.step import forward_step_with
from reglab.technique import Technique

PEER = "co_teaching_peer"  # the peer's attribute on the module: its checkpoint keys start with it
SELECTIONS = ("train", "eval")


def forget_rate_at(epoch: int, forget_rate: float, num_gradual: int, exponent: float) -> float:
    """The official ``rate_schedule[epoch + 1]`` for the trainer's (0-based) ``epoch``."""
    step = epoch + 1
    if step >= num_gradual:
        return forget_rate
    return step / (num_gradual - 1) * forget_rate**exponent


def small_loss_mask(losses: Tensor, keep: int) -> Tensor:
    """A float mask of the ``keep`` samples with the smallest ``losses`` (ties: lower position first)."""
    order = torch.argsort(losses.detach(), stable=True)
    mask = torch.zeros_like(losses, dtype=torch.float32)
    return mask.index_fill_(0, order[:keep], 1.0)


def co_teaching_loss(net_losses: Tensor, peer_losses: Tensor, forget_rate: float,
                     ranking: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample losses whose mean is ``mean_{S_peer} net + mean_{S_net} peer``; also both masks.

    ``keep = int((1 - forget_rate) * N)`` as the official code, at least 1. Each network picks by
    its own losses, or by ``ranking`` (net's, peer's) when given (e.g. from an evaluation-mode pass)."""
    size = net_losses.shape[0]
    keep = max(1, int((1.0 - forget_rate) * size))
    rank_net, rank_peer = ranking if ranking is not None else (net_losses, peer_losses)
    by_net, by_peer = small_loss_mask(rank_net, keep), small_loss_mask(rank_peer, keep)
    per_sample = (net_losses.float() * by_peer + peer_losses.float() * by_net) * (size / keep)
    return per_sample, by_net, by_peer


def add_peer(module: nn.Module, reset: bool = True) -> nn.ModuleDict:
    """Register ``module.co_teaching_peer``: deep copies of the children holding trainable
    parameters, re-initialised if ``reset`` (submodules whose own parameters all train and that
    have ``reset_parameters``; frozen ones keep the copied weights). Returns the existing peer if
    the module has one (a later fit of the same model, or a restored checkpoint)."""
    if hasattr(module, PEER):
        return getattr(module, PEER)
    children = {name: child for name, child in module.named_children()
                if any(p.requires_grad for p in child.parameters())}
    peer = copy.deepcopy(nn.ModuleDict(children))  # one deepcopy: weights tied across children stay tied
    if reset:
        for layer in peer.modules():
            own = list(layer.parameters(recurse=False))
            if own and all(p.requires_grad for p in own) and callable(getattr(layer, "reset_parameters", None)):
                layer.reset_parameters()
    module.add_module(PEER, peer)
    return peer


def restore_peer(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets its peer
    before the checkpoint's weights (which include the peer's) are loaded."""
    add_peer(module, reset=False)


class CoTeaching(Technique):
    """Co-teaching as the task loss, with the peer network owned by the module (module docstring).

    Args:
        forget_rate: the final share of each batch a network drops; ``None`` takes the
            DataModule's ``label_noise.rate`` (the official code's default: the noise rate).
        num_gradual: epochs of the linear ramp of the forget rate (the paper's T_k).
        exponent: the code's exponent of the ramp's end rate (the paper's c).
        selection: which losses rank the samples: ``"train"``, those of the training forward pass
            (the official Co-teaching code); ``"eval"``, those of one more pass of both networks in
            evaluation mode without gradients (the Nested-Co-teaching code, where that pass uses
            the compression's validation-chosen truncation instead of a random one).

    Logs ``train/co_teaching/forget_rate`` and, when batches carry ``clean_target``,
    ``train/co_teaching/label_precision`` (the share of clean labels among the samples net 1
    selects for its peer: the official code's "pure ratio").
    """

    name = "co_teaching"
    fsdp_unsupported = ("the peer network runs the module's layers with its own whole weights "
                        "(torch.func.functional_call), which FSDP's sharded parameters cannot stand in for")

    def __init__(self, forget_rate: float | None = None, num_gradual: int = 10, exponent: float = 1.0,
                 selection: str = "train") -> None:
        if forget_rate is not None and not 0.0 <= forget_rate < 1.0:
            raise ValueError(f"CoTeaching: forget_rate must be in [0, 1), got {forget_rate}")
        if num_gradual < 1:
            raise ValueError(f"CoTeaching: num_gradual must be >= 1, got {num_gradual}")
        if exponent <= 0:
            raise ValueError(f"CoTeaching: exponent must be > 0, got {exponent}")
        if selection not in SELECTIONS:
            raise ValueError(f"CoTeaching: selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        self.forget_rate, self.num_gradual, self.exponent = forget_rate, num_gradual, exponent
        self._final_rate = forget_rate or 0.0  # forget_rate, or the data's noise rate (setup)
        self._stand_ins: dict[int, Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # every stage: a checkpoint of this run holds the peer's weights, also for `reglab test`
        peer = add_peer(pl_module)
        self._stand_ins = self._pair_parameters(pl_module, peer)
        if stage == "fit" and self.forget_rate is None:
            noise = getattr(trainer.datamodule, "label_noise", None)
            if getattr(noise, "rate", None) is None:
                raise self.fail(
                    "forget_rate is unset and the DataModule declares no label_noise rate to take it from",
                    "pass forget_rate (the expected share of wrong labels, e.g. 0.2)",
                )
            self._final_rate = float(noise.rate)

    def _pair_parameters(self, module: nn.Module, peer: nn.ModuleDict) -> dict[int, Tensor]:
        """id(module parameter) -> the peer's parameter in its place (paired in order per child,
        which a parameter-free wrapper inserted later does not change)."""
        pairs: dict[int, Tensor] = {}
        for name, copied in peer.items():
            own, theirs = list(getattr(module, name).parameters()), list(copied.parameters())
            if len(own) != len(theirs) or any(a.shape != b.shape for a, b in zip(own, theirs)):
                raise self.fail(
                    f"the module's `{name}` no longer has the parameters its peer copy was made from",
                    "build a new model and CoTeaching for this fit",
                )
            pairs.update({id(a): b for a, b in zip(own, theirs)})
        return pairs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peer_ids = {id(p) for p in getattr(pl_module, PEER).parameters()}
        shared = [name for name, p in pl_module.named_parameters()
                  if p.requires_grad and id(p) not in self._stand_ins and id(p) not in peer_ids]
        if shared:
            raise self.fail(
                f"parameters were added to the model after its peer network was copied ({', '.join(shared[:3])}"
                f"{', ...' if len(shared) > 3 else ''}), so both networks would share them",
                "list co_teaching after the technique that adds them in the config",
            )

    def peer_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """Names in ``module`` -> the peer's tensors: its parameters, and its buffers where the
        module has a buffer of the same name (batch-norm statistics)."""
        names = {name: self._stand_ins[id(p)]
                 for name, p in module.named_parameters(remove_duplicate=False) if id(p) in self._stand_ins}
        buffers = dict(module.named_buffers(remove_duplicate=False))
        for key, buffer in getattr(module, PEER).named_buffers(remove_duplicate=False):
            if key in buffers and buffers[key].shape == buffer.shape:
                names[key] = buffer
        return names

    def peer_logits(self, out: StepOutput, module: nn.Module) -> Tensor:
        """The peer's logits on the step's batch, through the module's own ``forward_step``."""
        return forward_step_with(module, out.batch, self.peer_tensors(module)).logits

    def evaluation_losses(self, out: StepOutput, module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """Both networks' losses on the step's batch in evaluation mode, without gradients (every
        submodule's train/eval flag is put back afterwards)."""
        modes = [(layer, layer.training) for layer in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                net = StepOutput(logits=module.forward_step(out.batch).logits, target=out.target, batch=out.batch)
                peer = StepOutput(logits=self.peer_logits(out, module), target=out.target, batch=out.batch)
                return module.task_loss(net), module.task_loss(peer)
        finally:
            for layer, training in modes:
                layer.training = training

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        peer_out = StepOutput(logits=self.peer_logits(out, module), target=out.target, batch=out.batch)
        rate = forget_rate_at(module.current_epoch, self._final_rate, self.num_gradual, self.exponent)
        ranking = self.evaluation_losses(out, module) if self.selection == "eval" else None
        per_sample, by_net, _ = co_teaching_loss(module.task_loss(out), module.task_loss(peer_out), rate, ranking)
        if getattr(module, "_trainer", None) is not None:
            size = out.logits.shape[0]
            module.log("train/co_teaching/forget_rate", rate, on_step=False, on_epoch=True, batch_size=size)
            clean = out.batch.get("clean_target")
            if clean is not None and out.labels is not None:
                precision = ((out.labels == clean).float() * by_net).sum() / by_net.sum()
                module.log("train/co_teaching/label_precision", precision, on_step=False, on_epoch=True, batch_size=size)
        return per_sample

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        add_restore_hook(checkpoint, "reglab.callbacks.baselines.co_teaching:restore_peer")
