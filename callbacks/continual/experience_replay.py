"""Experience replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic Memories
in Continual Learning"; reservoir sampling: Vitter 1985), a rehearsal baseline of the continual family.

A buffer of at most ``buffer_size`` past training samples is kept across tasks. Every training
batch B is extended with a replay batch M drawn uniformly (with replacement) from the buffer,
and the loss is the usual one over the concatenation:

    loss = mean_{(x, y) in B ∪ M} CE(f(x), y)

After drawing, the batch's samples enter the buffer by reservoir sampling: the n-th sample seen
(n counted from 0 over the whole run) takes a free slot while there is one, else replaces slot j,
j ~ U{0..n}, when j < buffer_size — so the buffer is a uniform sample of everything seen, over
all tasks, without knowing task boundaries. The replay batch has the size of the incoming batch
by default, as in Chaudhry et al.

State (in checkpoints): the buffer (every per-sample tensor of the batch — input, target, index,
task, ...) and the count of samples seen; the random draws come from generators seeded by
``seed`` and that count, so a resumed run replays exactly the same samples. Under DDP every rank
gathers the batches of all ranks before the reservoir update, so all ranks hold the *same*
buffer (the reservoir of the union of the shards; Lightning saves rank 0's copy, which is then
right for every rank), while each rank draws its own replay batch (the generator is also seeded
by the rank). Gathering needs the same batch size on every rank, which the sharded sampler's
padding gives.

Method card (what it does, when it helps, what it costs): ``experience_replay.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import ExperienceReplay
    >>> replay = ExperienceReplay(buffer_size=200)    # with `reglab fit-tasks` (reglab.continual)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.continual.anchors import flatten_state, unflatten_state
from reglab.technique import Technique

RESERVOIR_STREAM, REPLAY_STREAM = 0, 1


def reservoir_slots(seen: int, count: int, buffer_size: int, generator: torch.Generator) -> dict[int, int]:
    """Where each of ``count`` new samples goes when ``seen`` samples came before them:
    ``{slot: position in the batch}``, a later sample winning a slot drawn twice.

    Example:
        >>> reservoir_slots(seen=0, count=3, buffer_size=5, generator=torch.Generator().manual_seed(0))
        {0: 0, 1: 1, 2: 2}
    """
    slots: dict[int, int] = {}
    for position in range(count):
        n = seen + position
        slot = n if n < buffer_size else int(torch.randint(0, n + 1, (1,), generator=generator))
        if slot < buffer_size:
            slots[slot] = position
    return slots


class ExperienceReplay(Technique):
    """Mixes a replay batch from a reservoir buffer of past samples into every training batch.

    Args:
        buffer_size: the most samples kept (over all tasks).
        replay_batch_size: samples replayed per step (``None``: as many as the incoming batch).
        seed: seed of the reservoir and replay draws.
    """

    name = "experience_replay"

    stateful = True

    def __init__(self, buffer_size: int = 200, replay_batch_size: int | None = None, seed: int = 0) -> None:
        if buffer_size < 1:
            raise ValueError(f"ExperienceReplay: buffer_size must be at least 1, got {buffer_size}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"ExperienceReplay: replay_batch_size must be at least 1 or None, got {replay_batch_size}")
        self.buffer_size, self.replay_batch_size, self.seed = buffer_size, replay_batch_size, seed
        self.buffer: dict[str, Tensor] = {}
        self.seen = 0

    @property
    def filled(self) -> int:
        return min(self.seen, self.buffer_size)

    def _generator(self, stream: int, rank: int = 0) -> torch.Generator:
        # Only integers: their hash does not depend on PYTHONHASHSEED.
        return torch.Generator().manual_seed(hash((self.seed, stream, self.seen, rank)) & (2**63 - 1))

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        if getattr(trainer.datamodule, "scenario", "class") == "task":
            raise self.fail(
                "task-incremental training masks every class outside the current task, so replayed "
                "samples of earlier tasks would get an infinite loss",
                "use scenario='class' (one head over all seen classes) with experience replay",
            )

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        size = len(batch["target"])
        samples = {key: value for key, value in batch.items() if isinstance(value, Tensor) and value.shape[:1] == (size,)}
        if self.buffer and samples.keys() != self.buffer.keys():
            raise self.fail(
                f"the batch's per-sample keys {sorted(samples)} differ from the buffer's {sorted(self.buffer)}",
                "keep the same DataModule (and batch keys) across the tasks of one run",
            )
        trainer = getattr(module, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        mixed = dict(batch)
        if self.filled:
            drawn = self.replay_positions(samples, self.replay_batch_size or size, module, rank)
            for key, value in samples.items():
                mixed[key] = torch.cat([value, self.buffer[key][drawn.to(self.buffer[key].device)].to(value.device)])
        if trainer is not None and trainer.world_size > 1:
            samples = {key: module.all_gather(value).flatten(0, 1) for key, value in samples.items()}
        self._store(samples)
        return mixed

    def replay_positions(self, samples: dict[str, Tensor], count: int, module: L.LightningModule, rank: int) -> Tensor:
        """Which ``count`` buffer slots to replay with this step's ``samples``: uniform, with
        replacement (a subclass may choose by the samples and the model)."""
        return torch.randint(0, self.filled, (count,), generator=self._generator(REPLAY_STREAM, rank))

    def _store(self, samples: dict[str, Tensor]) -> None:
        """Reservoir update with the (gathered) samples of one step."""
        count = len(next(iter(samples.values())))
        slots = reservoir_slots(self.seen, count, self.buffer_size, self._generator(RESERVOIR_STREAM))
        if not self.buffer:
            self.buffer = {key: value.new_zeros((self.buffer_size, *value.shape[1:])) for key, value in samples.items()}
        if slots:
            where, which = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
            for key, value in samples.items():
                stored = self.buffer[key].to(value.device)
                stored[where.to(value.device)] = value.detach()[which.to(value.device)]
                self.buffer[key] = stored
        self.seen += count

    def state_dict(self) -> dict[str, Any]:
        return {**flatten_state("buffer", self.buffer), "seen": torch.tensor(self.seen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer = unflatten_state("buffer", state_dict)
        self.seen = int(state_dict["seen"])
