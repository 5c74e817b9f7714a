"""Averaged copies of a model's weights: the shared core of EMA, SWA, mean teacher and OGEN.

Two layers:

* :class:`WeightAverage` — an fp32 copy of a module's floating-point state (parameters and
  persistent float buffers) with the few tensor operations every averaging technique needs, all
  ``torch._foreach_*`` calls with Python-float weights, so an update never synchronises with the
  host:

  ======================  =========================================================
  ``lerp_(w)``            ``avg <- avg + w * (live - avg)``   (EMA: ``w = 1 - decay``;
                          running mean of snapshots: ``w = 1 / (n + 1)``)
  ``set_mean_(copies)``   ``avg <- mean of other copies``     (OGEN's window teacher)
  ``swap_in / swap_out``  evaluate the module with the average, then restore it
  ======================  =========================================================

* :class:`WeightAveraging` — the Lightning side shared by the techniques in
  ``reglab.callbacks.averaging``: allocation when fit starts, one update per optimizer step (not per
  micro-batch under gradient accumulation), evaluation with the average, and the checkpoint
  protocol below.

Swapping in without cloning. When the live tensor and the average have the same dtype and device
(fp32 training, also under ``bf16-mixed``, whose weights stay fp32), ``swap_in`` exchanges the
tensors' storage by assigning ``.data`` — O(1) per tensor, no copy, no extra memory; ``swap_out``
assigns it back, so the training weights come back bitwise identical (they were never touched).
Measured by ``reglab bench overhead`` (``docs/results/overhead.md``, CPU, resnet18): swapping in
and out takes 0.7 ms with pointers, 20 ms with the copying swap below and 53 ms with Lightning's
``WeightAveraging`` (a clone and two copies per tensor, each way); the pointer swap's cost is the
Python loop over the tensors, independent of their size. Otherwise (a module trained in bf16/fp16
weights) the average is copied into the live tensors through a preallocated backup buffer, three
``_foreach_copy_`` calls in all. The pointer swap assumes nothing cached the parameters' data
pointers: ``torch.compile`` is fine (its graphs take the parameters as inputs; tested with the
tensors located by owner and attribute, so ``_orig_mod.`` names are covered), CUDA graphs
(``mode="reduce-overhead"``) are not. The copying swap is no way out for the teachers (mean
teacher, OGEN): they swap in inside the training step, and an in-place copy would invalidate the
student's autograd graph. Under FSDP the techniques refuse at setup (``fsdp_unsupported``): FSDP
re-points the parameters at its sharded flat buffers at every forward pass.

Buffers. Float buffers are averaged like parameters (so BatchNorm running statistics of an EMA
describe the same stretch of training as its weights, as in timm's ``ModelEmaV3`` and Lightning's
``EMAWeightAveraging`` defaults); integer buffers (``num_batches_tracked``) are left alone. SWA
replaces averaged BatchNorm statistics by recomputed ones, see
:func:`recompute_batchnorm_statistics`.

Checkpoints of techniques that evaluate their average (EMA, SWA): ``checkpoint["state_dict"]``
holds the averaged weights, so ``Module.load_from_checkpoint(path)`` returns the averaged model,
and the training weights go to ``checkpoint["reglab_training_state_dict"]``, from which a resumed
fit restores them. Lightning restores in this order (2.6): module ``on_load_checkpoint``, module
weights from ``state_dict`` (the average), callbacks' ``on_load_checkpoint`` (here: put the
training weights back), callbacks' ``load_state_dict``. The average is stored once: it is taken
out of the technique's own checkpoint entry at save and put back at load.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> average = WeightAverage(net)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> average.lerp_(0.5)      # halfway to the new weights
    >>> with average.swapped_in():
    ...     evaluated = net.weight.clone()
    >>> bool(torch.all(evaluated < net.weight))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from reglab.technique import Technique

TRAINING_WEIGHTS_KEY = "reglab_training_state_dict"


def ema_decay(num_updates: int, decay: float, warmup: bool) -> float:
    """The EMA decay for update number ``num_updates`` (0 for the first update).

    With ``warmup`` the decay is ``min(decay, (1 + t) / (10 + t))``, the schedule of TensorFlow's
    ``ExponentialMovingAverage(num_updates=t)``: 0.1 at the first update, so the average is not
    dominated by the random initial weights, reaching 0.9 after 80 updates and 0.99 after 890
    (timm's ``ModelEmaV3`` warm-up is another curve, ``1 - (1 + t) ** -(2/3)``). Computed on the
    host from a Python counter: no device sync.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def is_batchnorm_statistic(owner: nn.Module, attribute: str) -> bool:
    """Whether ``owner.<attribute>`` is a BatchNorm running mean or variance."""
    return isinstance(owner, _BatchNorm) and attribute in ("running_mean", "running_var")


def _float_state(
    module: nn.Module, select: Callable[[nn.Module, str], bool]
) -> list[tuple[str, nn.Module, str]]:
    """(state_dict name, owning module, attribute) of every float parameter and persistent float
    buffer that ``select`` keeps; tied tensors appear once, under their first name."""
    entries, seen = [], set()
    for prefix, owner in module.named_modules():
        persistent_buffers = [
            (attr, t) for attr, t in owner._buffers.items() if attr not in owner._non_persistent_buffers_set
        ]
        for attribute, tensor in [*owner._parameters.items(), *persistent_buffers]:
            if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                continue
            if select(owner, attribute):
                seen.add(id(tensor))
                entries.append((f"{prefix}.{attribute}" if prefix else attribute, owner, attribute))
    return entries


class WeightAverage:
    """An fp32 copy of a module's floating-point state, updated with ``torch._foreach_*`` ops.

    It stays bound to the module it was built from; the module's tensors are looked up by owner
    and attribute at every call, because ``module.to(...)`` replaces buffer objects. To give the
    average to another module, load :meth:`module_state` into it.

    Args:
        module: whose state to copy; the copy starts equal to it.
        select: ``(owning module, attribute name) -> bool``, which tensors to include (default all
            float parameters and persistent float buffers).
    """

    def __init__(self, module: nn.Module, select: Callable[[nn.Module, str], bool] = lambda owner, attribute: True):
        entries = _float_state(module, select)
        self.module = module
        self.names = [name for name, _, _ in entries]
        self._locations = [(owner, attribute) for _, owner, attribute in entries]
        self.tensors = [t.detach().float().clone() for t in self.live()]
        self._held: list[Tensor] | None = None  # the live tensors' data while the average is swapped in
        self._backup: list[Tensor] | None = None  # preallocated for the copying swap

    def __len__(self) -> int:
        return len(self.tensors)

    def clone(self) -> WeightAverage:
        """An independent copy with the same tensors (same names, same module)."""
        twin = object.__new__(WeightAverage)
        twin.module, twin.names, twin._locations = self.module, self.names, self._locations
        twin.tensors = [t.clone() for t in self.tensors]
        twin._held, twin._backup = None, None
        return twin

    def live(self) -> list[Tensor]:
        """The module's current tensors that this average mirrors."""
        return [getattr(owner, attribute) for owner, attribute in self._locations]

    def to(self, device: torch.device) -> None:
        self.tensors = [t.to(device) for t in self.tensors]
        self._backup = None

    @torch.no_grad()
    def lerp_(self, weight: float) -> None:
        """``average <- average + weight * (live - average)``."""
        live = [t.detach() for t in self.live()]
        if all(t.dtype == torch.float32 for t in live):
            torch._foreach_lerp_(self.tensors, live, weight)
        else:  # lerp needs equal dtypes; mul/add promote inside the kernel, no fp32 copy of the model
            torch._foreach_mul_(self.tensors, 1.0 - weight)
            torch._foreach_add_(self.tensors, live, alpha=weight)

    @torch.no_grad()
    def copy_from(self) -> None:
        torch._foreach_copy_(self.tensors, [t.detach() for t in self.live()])

    @torch.no_grad()
    def copy_to(self) -> None:
        torch._foreach_copy_([t.detach() for t in self.live()], self.tensors)

    @torch.no_grad()
    def set_mean_(self, copies: list[WeightAverage]) -> None:
        """``average <- (1 / k) * sum of the k copies`` (in the given order, so it is reproducible)."""
        torch._foreach_copy_(self.tensors, copies[0].tensors)
        for other in copies[1:]:
            torch._foreach_add_(self.tensors, other.tensors)
        torch._foreach_div_(self.tensors, float(len(copies)))

    def swap_in(self) -> None:
        """Make the module compute with the average until :meth:`swap_out`."""
        if self._held is not None:
            raise RuntimeError("WeightAverage.swap_in called twice without swap_out")
        live = self.live()
        if all(t.dtype == a.dtype and t.device == a.device for t, a in zip(live, self.tensors)):
            self._held = [t.data for t in live]
            for tensor, average in zip(live, self.tensors):
                tensor.data = average
            return
        with torch.no_grad():
            if self._backup is None:
                self._backup = [torch.empty_like(t) for t in live]
            torch._foreach_copy_(self._backup, [t.detach() for t in live])
            torch._foreach_copy_([t.detach() for t in live], self.tensors)
        self._held = self._backup

    def swap_out(self) -> None:
        """Give the module its own tensors back, bitwise as they were before :meth:`swap_in`."""
        if self._held is None:
            raise RuntimeError("WeightAverage.swap_out called without swap_in")
        live = self.live()
        if self._held is self._backup:
            with torch.no_grad():
                torch._foreach_copy_([t.detach() for t in live], self._backup)
        else:
            for tensor, own in zip(live, self._held):
                tensor.data = own
        self._held = None

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def module_state(self) -> dict[str, Tensor]:
        """The average under every ``module.state_dict()`` name it covers (tied names included),
        in the live dtypes, ready to stand in for the module's weights in a checkpoint."""
        slot_of = {id(t): i for i, t in enumerate(self.live())}
        return {
            name: self.tensors[slot_of[id(t)]].to(t.dtype)
            for name, t in self.module.state_dict(keep_vars=True).items()
            if id(t) in slot_of
        }

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        # The tensors themselves, not clones: Lightning serialises the checkpoint right away, and a
        # clone would double the memory of a model-sized state at every save.
        return {prefix + name: tensor for name, tensor in zip(self.names, self.tensors)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], prefix: str) -> None:
        missing = [prefix + name for name in self.names if prefix + name not in state]
        if missing:
            raise KeyError(f"averaged weights missing from the checkpoint: {missing[:3]}")
        torch._foreach_copy_(self.tensors, [state[prefix + name] for name in self.names])


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module.train(training)`` inside, every submodule's own flag restored after (some may be
    in eval mode on purpose, e.g. a frozen backbone)."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for submodule, training in flags:
            submodule.training = training


@torch.no_grad()
def teacher_logits(module: nn.Module, teacher: WeightAverage, batch: dict[str, Any]) -> Tensor:
    """Logits of ``module.forward_step(batch)`` computed with the teacher's weights (an average of
    ``module``).

    In eval mode: the teacher is a fixed function of its weights (dropout off, BatchNorm on its own
    running statistics), its forward pass changes no buffer and draws no random numbers, so it
    leaves the student's training untouched.
    """
    with teacher.swapped_in(), module_mode(module, training=False):
        return module.forward_step(batch).logits.detach()


@torch.no_grad()
def recompute_batchnorm_statistics(
    module: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]
) -> None:
    """Set every BatchNorm's running statistics to the exact mean and variance over ``batches``.

    What ``torch.optim.swa_utils.update_bn`` does, and what the SWA paper prescribes for the
    averaged weights (whose activations no running statistic has seen): reset the statistics,
    switch to cumulative averaging (``momentum=None``), run ``forward`` on every batch in train
    mode. Momentum, ``num_batches_tracked`` and training flags are restored afterwards, and the
    global RNG is forked, so the pass leaves no trace besides the statistics.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with module_mode(module, training=True), torch.random.fork_rng(devices=devices):
            for batch in batches:
                forward(batch)
    finally:
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)


class WeightAveraging(Technique):
    """Lightning side of a technique that keeps a :class:`WeightAverage` of the module.

    Subclasses implement :meth:`update_average` (called once after every optimizer step) and may
    override :meth:`create_average`, :attr:`has_average`, :meth:`evaluation_weights` and
    :meth:`extra_state` / :meth:`load_extra_state`. With
    ``evaluates_average = True`` (EMA, SWA) the average is what validation sees during fit, what
    the module holds after fit, and what checkpoints store as the model's weights (see the module
    docstring); with ``False`` (mean teacher, OGEN) it only serves the technique, and the
    checkpoint's weights stay the trained ones. Two techniques that evaluate an average cannot be
    stacked.

    State (``state_dict``): ``average.<weight name>`` tensors plus what :meth:`extra_state`
    returns, all tensors in one flat dict, so the harness compares every one after a resume.
    """

    stateful = True
    evaluates_average: ClassVar[bool] = True
    fsdp_unsupported = ("it swaps the averaged weights in by reassigning each parameter's storage, and FSDP "
                        "re-points the parameters at its own sharded buffers at every forward pass")

    def __init__(self) -> None:
        self.average: WeightAverage | None = None
        self._last_optimizer_step = 0
        self._swapped: list[WeightAverage] = []

    # -- what subclasses define -----------------------------------------------------------------
    def create_average(self, pl_module: L.LightningModule) -> WeightAverage:
        return WeightAverage(pl_module)

    def update_average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    @property
    def has_average(self) -> bool:
        """False while the average holds nothing yet (e.g. SWA before its start epoch)."""
        return True

    def evaluation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[WeightAverage]:
        """The copies that together replace the module's weights for evaluation and export."""
        return [self.average]

    def extra_state(self) -> dict[str, Tensor]:
        """State besides the average (counters, snapshots), as flat name -> tensor."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.evaluates_average:
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging) and cb is not self]
        clash = next((other for other in others if other.evaluates_average), None)
        if clash is not None:
            raise self.fail(
                f"both it and {type(clash).__name__} want to evaluate and save their own averaged weights",
                "keep only one of them",
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Allocated here, after every technique's setup (model surgery included), or earlier by
        # on_load_checkpoint when resuming, before the strategy moved the module to its device.
        if self.average is None:
            self.average = self.create_average(pl_module)
        self.average.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_optimizer_step = trainer.global_step  # after a resume: the restored step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps, so accumulated micro-batches do not update the average
        if trainer.global_step > self._last_optimizer_step:
            self._last_optimizer_step = trainer.global_step
            self.update_average(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._evaluating_average(trainer):
            self._swap_in_evaluation_weights(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out_evaluation_weights()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After fit the module is the averaged model, like the checkpoints it wrote.
        if self._evaluating_average(trainer):
            for weights in self.evaluation_weights(trainer, pl_module):
                weights.copy_to()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._evaluating_average(trainer):
            return
        if self._swapped:  # saved from inside validation: the module computes with the average now
            self._swap_out_evaluation_weights()
            checkpoint[TRAINING_WEIGHTS_KEY] = pl_module.state_dict()
            self._swap_in_evaluation_weights(trainer, pl_module)
        else:
            checkpoint[TRAINING_WEIGHTS_KEY] = checkpoint["state_dict"]
        averaged = {}
        for weights in self.evaluation_weights(trainer, pl_module):
            averaged.update(weights.module_state())
        checkpoint["state_dict"] = {**checkpoint[TRAINING_WEIGHTS_KEY], **averaged}
        # Store the average once: fp32 entries are exact in state_dict, so they leave the
        # technique's own entry and on_load_checkpoint puts them back.
        own_state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        for name in self.average.names:
            if name in averaged and averaged[name].dtype == torch.float32:
                own_state.pop("average." + name, None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        callback_states = checkpoint.get("callbacks", {})
        if trainer.state.fn != "fit":
            # Outside fit the technique does nothing: the module has loaded the averaged weights.
            callback_states.pop(self.state_key, None)
            return
        own_state = callback_states.get(self.state_key)
        if self.average is None:
            self.average = self.create_average(pl_module)
        if TRAINING_WEIGHTS_KEY not in checkpoint:
            if own_state is None:  # a checkpoint written without this technique: average from here
                self.average.copy_from()
            return
        pl_module.load_state_dict(checkpoint[TRAINING_WEIGHTS_KEY])
        if own_state is not None:
            for name in self.average.names:
                own_state.setdefault("average." + name, checkpoint["state_dict"][name])

    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {**self.average.state_dict("average."), **self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.average is None:
            raise RuntimeError(f"{type(self).__name__}: its state was loaded outside a fit, before on_load_checkpoint")
        self.average.load_state_dict(state_dict, "average.")
        self.load_extra_state(state_dict)

    def _evaluating_average(self, trainer: L.Trainer) -> bool:
        return self.evaluates_average and self.average is not None and self.has_average and trainer.state.fn == "fit"

    def _swap_in_evaluation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self.evaluation_weights(trainer, pl_module)
        for weights in self._swapped:
            weights.swap_in()

    def _swap_out_evaluation_weights(self) -> None:
        for weights in reversed(self._swapped):
            weights.swap_out()
        self._swapped = []
