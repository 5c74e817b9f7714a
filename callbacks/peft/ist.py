"""IST — importance-aware sparse tuning of LoRA layers (Yao et al., EMNLP 2024 Findings, paper 68).

"Layer-wise Importance Matters: Less Memory for Better Performance in Parameter-efficient
Fine-tuning of Large Language Models". LoRA adapters (peft's) sit in every targeted layer; the
adapted layers are grouped into *units* (a Transformer block; a layer of its own where no numbered
block holds it, see :func:`layer_unit`). Each optimizer step only ``n_update`` of the ``n`` units
train: the others' adapters are frozen for that step (no gradient, no optimizer update), so that
step needs no gradient, no activations for the adapters' backward and (for units never chosen yet)
no optimizer state for them. Which units train is sampled without replacement with probabilities
proportional to ``sigmoid(-s_i)``, where ``s`` is a per-unit score learned by a REINFORCE-style
update every ``update_interval`` steps:

    for k = 1..K:  suppress a set S_k of n_suppress units, sampled ∝ sigmoid(s_i)
                   (their LoRA scaling times ``suppression_factor``), loss L_k on a batch (eval mode)
    R_k = exp(-L_k) - mean_j exp(-L_j)
    s_i += rl_lr * sum_{k: i in S_k} R_k * p_i (1 - p_i),        p_i = sigmoid(s_i)

So ``s_i`` is high when turning unit ``i`` down does not hurt (a *less* important unit): such
units are suppressed more often in the scoring and updated less often in training. This follows
the official code (github.com/antgroup/importance-aware-sparse-tuning-IST-paper, ``ist.py``,
``ISTCallback``) and its defaults: K = ``rl_step`` = 3 distinct suppression sets, ``rl_lr`` = 10,
``response_suppression_factor`` = 0.25, scores updated every 10 steps (not at step 0),
``n_update`` = int(0.25 n), ``n_suppress`` = int(0.5 n), scores start at 0, the update counts
only the suppressed units (the official ``else`` branch for the others is commented out).
Where this differs, and why:

* the score batch is the step's own training batch, before the step (official: one more batch
  drawn from a second shuffled loader over the training set, of size 16) — the same distribution
  without a second loader; under DDP each rank's K losses are averaged over the ranks, so every
  rank keeps the same scores;
* sampling uses a generator seeded from ``seed`` and the step (official: the global RNG), so every
  DDP rank picks the same units and a resumed run picks what the uninterrupted one did;
* ``n_update`` and ``n_suppress`` are at least 1, and when fewer than K distinct suppression sets
  exist (a small model) the distinct ones are used (the official loop would never end);
* units are found by name here (official: a table of LLM classes to their ``layers`` attribute);
  every adapted layer belongs to one unit, also those outside the blocks (the ViT's patch
  embedding), which the official code would keep training at every step.

Freezing is done with ``requires_grad`` when the run has one process, or DDP with
``find_unused_parameters``; under plain DDP (whose reducer expects a gradient for every parameter
that required one when it was built) the frozen units' gradients are computed, all-reduced and
then dropped before the optimizer step instead: the same updates, without the memory saving.

Method card (what it does, when it helps, what it costs): ``ist.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import IST
    >>> ist = IST(r=8, update_ratio=0.25)       # 1 in 4 Transformer blocks' adapters per step
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from reglab.callbacks.peft.lora import LoRA
from reglab.callbacks.peft.soma import block_of


def layer_unit(layer_name: str) -> str:
    """The unit an adapted layer belongs to: its block (the first numbered module on its path:
    ``backbone.blocks.0`` for ``backbone.blocks.0.attn.qkv``, ``...encoder.layer.3`` for BERT's
    ``...encoder.layer.3.attention.self.query``), or the layer itself outside numbered blocks
    (``backbone.patch_embed.proj``)."""
    return block_of(layer_name) or layer_name


def score_update(scores: Tensor, suppressed: list[Tensor], losses: Tensor, rl_lr: float) -> Tensor:
    """The official REINFORCE step: ``s_i + rl_lr * sum_{k: i in S_k} (R_k - mean R) p_i (1 - p_i)``
    with ``R_k = exp(-L_k)`` and ``p = sigmoid(s)`` taken before the update."""
    rewards = torch.exp(-losses.double())
    rewards = rewards - rewards.mean()
    p = scores.double().sigmoid()
    step = torch.zeros_like(p)
    for chosen, reward in zip(suppressed, rewards):
        step[chosen] += reward
    return (scores.double() + rl_lr * step * p * (1 - p)).to(scores.dtype)


def sample_units(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct unit indices drawn ∝ ``weights``, sorted."""
    return torch.multinomial(weights, count, replacement=False, generator=generator).sort().values


class IST(LoRA):
    """LoRA whose units train sparsely, chosen by learned importance (see the module docstring).

    Args:
        r, lora_alpha, lora_dropout: the LoRA adapters (peft's ``LoraConfig``).
        update_ratio: share of the units that train each step (official 0.25).
        suppress_ratio: share of the units suppressed in each scoring pass (official 0.5).
        suppression_factor: the suppressed units' LoRA scaling is multiplied by this (official 0.25).
        update_interval: optimizer steps between score updates (official 10).
        rl_steps: K, the scoring passes per update (official 3).
        rl_lr: step size of the score update (official 10).
        seed: seed of the unit sampling; ``None`` = Lightning's global seed (``seed_everything``), else 0.
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "ist"
    stateful = True
    fsdp_unsupported = "it switches which adapters train at every step, which FSDP's flattened parameters cannot follow"

    #: units are groups of peft LoRA layers whose scaling it changes; peft's attention layer holds
    #: an inner out_proj adapter, which would make the unit of a layer ambiguous
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0, update_ratio: float = 0.25,
                 suppress_ratio: float = 0.5, suppression_factor: float = 0.25, update_interval: int = 10,
                 rl_steps: int = 3, rl_lr: float = 10.0, seed: int | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if not (0 < update_ratio <= 1 and 0 < suppress_ratio <= 1):
            raise ValueError(f"IST: update_ratio and suppress_ratio must be in (0, 1], got {update_ratio} and {suppress_ratio}")
        if update_interval < 1 or rl_steps < 1 or suppression_factor < 0:
            raise ValueError(f"IST: update_interval and rl_steps must be >= 1 and suppression_factor >= 0, got "
                             f"{update_interval}, {rl_steps} and {suppression_factor}")
        super().__init__(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                         pretrained_checkpoint=pretrained_checkpoint)
        self.update_ratio, self.suppress_ratio, self.suppression_factor = update_ratio, suppress_ratio, suppression_factor
        self.update_interval, self.rl_steps, self.rl_lr, self.seed = update_interval, rl_steps, rl_lr, seed
        self.units: list[str] = []
        self.unit_layers: list[list[nn.Module]] = []
        self.unit_parameters: list[list[nn.Parameter]] = []
        #: s_i per unit (high = suppressing it costs little) and how many steps each unit trained
        self.importance: Tensor | None = None
        self.update_counts: Tensor | None = None
        self.active: Tensor = torch.zeros(0, dtype=torch.long)
        self._selected_at = -1
        self._freezes = True

    # -- surgery ---------------------------------------------------------------------------------
    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        super().inject(module, layer_names, trainer)
        grouped: dict[str, list[str]] = {}
        for name in layer_names:
            grouped.setdefault(layer_unit(name), []).append(name)
        self.units = list(grouped)
        self.unit_layers = [[module.get_submodule(name) for name in names] for names in grouped.values()]
        self.unit_parameters = [[p for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
                                for layers in self.unit_layers]
        if self.importance is None:
            self.importance = torch.zeros(len(self.units))
            self.update_counts = torch.zeros(len(self.units), dtype=torch.long)
        elif len(self.importance) != len(self.units):
            raise self.fail(f"its state holds scores of {len(self.importance)} units, the module has {len(self.units)} "
                            f"({self.units})", "resume with the model and target_modules the state was trained with")
        if len(self.units) < 2:
            rank_zero_info(f"IST: one unit ({self.units}); it trains at every step, there is nothing to choose")

    @property
    def n_update(self) -> int:
        return max(1, int(len(self.units) * self.update_ratio))

    @property
    def n_suppress(self) -> int:
        return max(1, int(len(self.units) * self.suppress_ratio))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.seed is None:
            self.seed = int(trainer.strategy.broadcast(int(os.environ.get("PL_GLOBAL_SEED", 0))))
        # DDP's reducer waits for a gradient of every parameter that required one when it was built
        self._freezes = trainer.world_size == 1 or bool(
            getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False))
        if not self._freezes:
            rank_zero_info("IST: under DDP without find_unused_parameters the frozen units' gradients are "
                           "computed and dropped (same updates, no memory saving); use "
                           "strategy=ddp_find_unused_parameters_true for the saving")

    # -- each step ---------------------------------------------------------------------------------
    def _generator(self, step: int, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed((int(self.seed) * 1_000_003 + 2 * step + purpose) % 2**63)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._selected_at:  # a later micro-batch of the same optimizer step
            return
        self._selected_at = step
        if step > 0 and step % self.update_interval == 0 and len(self.units) > 1:
            self.update_importance(trainer, pl_module, batch, step)
        self.active = sample_units((-self.importance).sigmoid(), self.n_update, self._generator(step, 1))
        self.update_counts[self.active] += 1
        if self._freezes:
            chosen = set(self.active.tolist())
            for index, parameters in enumerate(self.unit_parameters):
                for parameter in parameters:
                    parameter.requires_grad_(index in chosen)

    @torch.no_grad()
    def update_importance(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        """K scoring passes with different suppressed sets, then :func:`score_update`."""
        generator, weights = self._generator(step, 0), self.importance.sigmoid()
        wanted = min(self.rl_steps, math.comb(len(self.units), self.n_suppress))
        suppressed: list[Tensor] = []
        while len(suppressed) < wanted:
            chosen = sample_units(weights, self.n_suppress, generator)
            if not any(torch.equal(chosen, other) for other in suppressed):
                suppressed.append(chosen)
        training = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            losses = torch.stack([self._suppressed_loss(pl_module, batch, chosen) for chosen in suppressed])
        finally:
            for m, mode in training.items():
                m.training = mode
        losses = trainer.strategy.reduce(losses, reduce_op="mean").cpu()
        self.importance = score_update(self.importance, suppressed, losses, self.rl_lr)

    def _suppressed_loss(self, pl_module: L.LightningModule, batch: Any, chosen: Tensor) -> Tensor:
        layers = [layer for index in chosen.tolist() for layer in self.unit_layers[index]]
        saved = [dict(layer.scaling) for layer in layers]
        for layer in layers:
            layer.scale_layer(self.suppression_factor)
        try:
            return pl_module.task_loss(pl_module.forward_step(batch)).float().mean()
        finally:
            for layer, scaling in zip(layers, saved):
                layer.scaling.update(scaling)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._freezes:
            return
        chosen = set(self.active.tolist())
        for index, parameters in enumerate(self.unit_parameters):
            if index not in chosen:
                for parameter in parameters:
                    parameter.grad = None  # no update, no momentum step, no weight decay: frozen

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the module leaves the fit as the surgery made it: every adapter trainable
        for parameters in self.unit_parameters:
            for parameter in parameters:
                parameter.requires_grad_(True)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.importance is None:
            return {}
        return {"importance": self.importance.clone(), "update_counts": self.update_counts.clone(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.importance is not None and len(state_dict["importance"]) != len(self.importance):
            raise self.fail(f"the checkpoint holds scores of {len(state_dict['importance'])} units, the module has "
                            f"{len(self.importance)} ({self.units})",
                            "resume with the model and target_modules the checkpoint was trained with")
        self.importance = state_dict["importance"].clone().cpu()
        self.update_counts = state_dict["update_counts"].clone().cpu()
        self.seed = state_dict["seed"]
