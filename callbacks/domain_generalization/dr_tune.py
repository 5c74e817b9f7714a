"""DR-Tune — distribution regularization with semantic calibration (Zhou, Chen & Huang, ICCV 2023).

Fine-tuning every parameter, the task head is also trained to classify the *pretrained* feature
distribution: the frozen pretrained model's features of recent training images, held in a queue
with their labels and the fine-tuned model's features of the same images. Since the two feature
spaces drift apart during fine-tuning (semantic drift), the pretrained features are calibrated
before the head sees them (semantic calibration), without gradient:

1. both queues are L2-normalised; the pretrained one is rotated onto the fine-tuned one by the
   orthogonal Procrustes (Kabsch) rotation of the centred queues, then moved onto its mean
   (:func:`rotation_alignment`, the global rotation);
2. for every class, the pretrained features are translated so that their mean lands on the
   fine-tuned class centre, a softmax-weighted mean of the fine-tuned features by their cosine
   with the head's weight row of the class (the class-level translation);
3. the result is L2-normalised and scaled to the batch's mean fine-tuned feature norm.

    loss = task loss + weight * CE(head(calibrated queue), queue labels)

The term's gradient reaches the head only (the calibrated features are constants), so the encoder
is free to adapt while the head is kept from over-fitting the few target samples.

Source: the official code (github.com/weeknan/DR-Tune, ``model.py`` / ``worker.py``), whose defaults
are kept: queue of K = 2048, plain cross-entropy, the class-centre weighting above. Where this
differs from it, and why:

* The official loss is one cross-entropy over the batch and the queue concatenated, i.e.
  ``(B CE_batch + K CE_queue) / (B + K)``. Here it is ``CE_batch + (K / B) CE_queue`` (``weight=None``:
  the filled queue length over the batch size), the same gradient direction for every parameter,
  larger by ``(B + K) / B`` — which Adam ignores and SGD's learning rate absorbs — so the term can
  be a loss term beside any other technique's task loss.
* The official code rotates only on every 10th batch of an epoch and uses unrotated features on
  the other nine ("rotation is time-consuming": an SVD of 2048 x 2048 there); ``rotation_every``
  (default 1, the paper's method on every step) sets this, 10 reproduces the code.
* The official code fills the queue before training with ~K training images through the
  pretrained encoder (both queues with the pretrained features). Here the queue fills from the
  training steps (after each step, with that batch's features): no extra pass over the data and
  no need to reach the dataset; until the first step has run the term is 0.
* Under DDP every rank enqueues the features of all ranks (gathered), so the queues are the same
  on every rank (the official code keeps one queue per GPU).
* The official code trains the head at 33 times the backbone's learning rate (SGD, ``lr: [0.01,
  0.33]``); the optimizer is the module's here (one rate unless its config sets parameter groups).

The pretrained model is the ``pretrained_checkpoint`` (loaded into the module at setup, as the PEFT
techniques and L2-SP do, so the ``finetune`` claims protocol passes it the same way) or else the
module's weights when the fit starts; a copy of its tensors is kept as state (so a resumed run keeps
the original pretrained model) and run through the module's own ``forward_step`` in eval mode
(``torch.func.functional_call``), so no second network object exists.

Method card: ``dr_tune.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import DRTune
    >>> dr_tune = DRTune(queue_size=2048, pretrained_checkpoint=None)   # the weights at fit start
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.anchors import flatten_state, tensors_on, unflatten_state
from reglab.callbacks.domain_generalization._pretrained import linear_head, load_pretrained, parameter_counts
from reglab.mixins import StepOutput
from reglab.step import ForwardStep
from reglab.technique import Technique


def rotation_alignment(source: Tensor, target: Tensor) -> Tensor:
    """The rows of ``source`` (N, D) rotated onto ``target`` (N, D): the proper rotation R
    minimising ``||R (s_i - s̄) - (t_i - t̄)||²`` (Kabsch, the determinant fixed to +1), then moved
    onto the target's mean: ``R (s_i - s̄) + t̄``."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    centred = source - source_mean
    u, _, vh = torch.linalg.svd(centred.T @ (target - target_mean))
    v = vh.T.clone()
    v[:, -1] *= torch.sign(torch.linalg.det(v @ u.T))
    return centred @ (v @ u.T).T + target_mean


def semantic_calibration(pretrained: Tensor, fine_tuned: Tensor, labels: Tensor, prototypes: Tensor, scale: Tensor,
                         rotate: bool = True) -> Tensor:
    """The pretrained queue (N, D) calibrated onto the fine-tuned one (module docstring, steps 1-3):
    ``prototypes`` (C, D) are the head's weight rows, ``scale`` the norm of the result's rows."""
    calibrated, reference = F.normalize(pretrained, dim=1), F.normalize(fine_tuned, dim=1)
    if rotate:
        calibrated = rotation_alignment(calibrated, reference)
    directions = F.normalize(prototypes, dim=1)
    for cls in labels.unique().tolist():
        members = labels == cls
        weights = torch.softmax(reference[members] @ directions[cls], dim=0)
        centre = (weights[:, None] * reference[members]).sum(0)
        calibrated[members] += centre - calibrated[members].mean(0)
    return F.normalize(calibrated, dim=1) * scale


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(layer, layer.training) for layer in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for layer, training in modes:
            layer.training = training


class DRTune(Technique):
    """Distribution regularization with semantic calibration (see the module docstring).

    Args:
        queue_size: K, the number of recent training images whose pretrained and fine-tuned
            features (and labels) are kept (official: 2048). A queue longer than the training set
            holds images several times over, their fine-tuned features of different ages: keep it
            at most the training-set size on small data.
        weight: weight of the queue's cross-entropy; ``None`` = filled queue length / batch size,
            the official code's weighting (module docstring).
        rotation_every: rotate the pretrained queue on every n-th step (1: every step).
        pretrained_checkpoint: Lightning checkpoint (or state dict) of the same module to start
            from and to regularize towards; ``None`` = the module's weights when the fit starts.
    """

    name = "dr_tune"
    stateful = True
    needs = frozenset({"features"})
    fsdp_unsupported = ("it runs the pretrained model with its whole weights (torch.func.functional_call), which "
                        "FSDP's sharded parameters cannot stand in for")

    def __init__(self, queue_size: int = 2048, weight: float | None = None, rotation_every: int = 1,
                 pretrained_checkpoint: str | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"DRTune: queue_size must be >= 1, got {queue_size}")
        if weight is not None and weight < 0:
            raise ValueError(f"DRTune: weight must be >= 0 or None, got {weight}")
        if rotation_every < 1:
            raise ValueError(f"DRTune: rotation_every must be >= 1, got {rotation_every}")
        self.queue_size, self.weight, self.rotation_every = queue_size, weight, rotation_every
        self.pretrained_checkpoint = pretrained_checkpoint
        self.pretrained: dict[str, Tensor] = {}
        self.queue: dict[str, Tensor] = {}  # pretrained, fine_tuned (K, D) fp32; labels (K,); position, filled ()
        self.parameter_counts: dict[str, int] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        linear_head(self, pl_module, "it trains the head on the pretrained features and weighs class centres by the "
                                     "head's weight rows")
        # a later fit of the same model continues: the pretrained model is taken once
        if self.pretrained_checkpoint and not self.pretrained:
            load_pretrained(self, pl_module, self.pretrained_checkpoint)
        self.parameter_counts = parameter_counts(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after DDP has broadcast rank 0's weights and after a resume restored the snapshot
        if not self.pretrained:
            self.pretrained = {name: t.detach().clone() for name, t in pl_module.state_dict().items()}

    @torch.no_grad()
    def pretrained_features(self, module: nn.Module, batch: dict[str, Any]) -> Tensor:
        """The frozen pretrained model's features of ``batch`` (eval mode, fp32)."""
        device = next(module.parameters()).device
        self.pretrained = tensors_on(self.pretrained, device)
        tensors = {f"module.{name}": t for name, t in self.pretrained.items()}
        with _eval_mode(module):
            return torch.func.functional_call(ForwardStep(module), tensors, (batch,)).features.float()

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        filled = int(self.queue["filled"]) if self.queue else 0
        if filled == 0:
            return {"distribution": out.features.new_zeros(())}
        queue = self.queue = tensors_on(self.queue, out.features.device)
        with torch.no_grad(), torch.autocast(out.features.device.type, enabled=False):
            calibrated = semantic_calibration(
                queue["pretrained"][:filled], queue["fine_tuned"][:filled], queue["labels"][:filled],
                module.head.weight.float(), out.features.float().norm(dim=1).mean(),
                rotate=module.global_step % self.rotation_every == 0)
        loss = F.cross_entropy(module.head(calibrated).float(), queue["labels"][:filled])
        weight = filled / len(out.features) if self.weight is None else self.weight
        return {"distribution": weight * loss}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        out: StepOutput = outputs["step_output"]
        self.enqueue(self.pretrained_features(pl_module, out.batch), out.features.float(), out.labels, pl_module)

    @torch.no_grad()
    def enqueue(self, pretrained: Tensor, fine_tuned: Tensor, labels: Tensor, module: L.LightningModule) -> None:
        """Write a batch into the ring of the K most recent images (every rank's batch under DDP)."""
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            pretrained, fine_tuned, labels = (module.all_gather(t).flatten(0, 1) for t in (pretrained, fine_tuned, labels))
        if not self.queue:
            size, width = self.queue_size, fine_tuned.shape[1]
            self.queue = {"pretrained": fine_tuned.new_zeros(size, width), "fine_tuned": fine_tuned.new_zeros(size, width),
                          "labels": labels.new_zeros(size), "position": labels.new_zeros(()), "filled": labels.new_zeros(())}
        queue = self.queue = tensors_on(self.queue, fine_tuned.device)
        keep = min(len(labels), self.queue_size)  # a batch longer than the queue: its last K images
        slots = (queue["position"] + torch.arange(keep, device=labels.device)) % self.queue_size
        for key, values in (("pretrained", pretrained), ("fine_tuned", fine_tuned), ("labels", labels)):
            queue[key][slots] = values[-keep:].to(queue[key].dtype)
        queue["position"] = (queue["position"] + keep) % self.queue_size
        queue["filled"] = (queue["filled"] + keep).clamp_max(self.queue_size)

    def state_dict(self) -> dict[str, Any]:
        return {**flatten_state("pretrained", self.pretrained), **flatten_state("queue", self.queue)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pretrained = unflatten_state("pretrained", state_dict)
        self.queue = unflatten_state("queue", state_dict)
