"""DiffoRA — differentiable module-wise placement of LoRA at a fixed budget (Jiang, Wang & Yuan, 2025, paper 28).

"DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix
Adaptation" (arXiv 2502.08905). Not every module needs an adapter: a *Differential Adaptation
Matrix* (DAM) says which modules get LoRA. The binary DAM is relaxed to continuous values,
learned by gradient descent, then discretized; the LoRA weights trained while searching are kept
for the modules that stay ("weight sharing"), and fine-tuning continues with them. Here:

* every candidate layer gets a peft LoRA adapter of rank ``r`` and a DAM entry ``alpha_i`` (a
  scalar parameter, 0 at the start); its update is gated,
  ``W_i x + g_i * (lora_alpha / r) * B_i A_i x`` with ``g_i = m_i * sigmoid(alpha_i)``, where the
  mask ``m_i`` is 1 while searching (DARTS's relaxation of a choice between "LoRA" and "nothing":
  a softmax over two options is the sigmoid of their difference);
* the search is the first ``search_fraction`` of the run's optimizer steps (or ``search_steps``);
  ``alpha`` trains with the adapters, by the module's optimizer on the training batches
  (first-order, single-level);
* then the modules are taken by ``alpha`` from the largest while their adapters fit the budget
  (:func:`select_within_budget`): the parameters LoRA of rank ``budget_rank`` would have on every
  candidate layer — ``r = 8`` with ``budget_rank = 4`` keeps about half of the adapters, at twice
  LoRA's rank, for at most LoRA r=4's parameters. The dropped modules' mask becomes 0; ``alpha``
  and the dropped adapters stop training (their gradients are dropped before each optimizer step);
  the kept modules go on with their searched weights and gate.

No official code was found (searched by title and method names); this follows the paper's
abstract and the DARTS recipe its description names (continuous relaxation, discretization, weight
sharing). What is this class's own choice, not the paper's: the sigmoid gate per module, the
joint (single-level) update of ``alpha``, the budget in parameters and the greedy fill, the search
length (a quarter of the run), ``alpha`` starting at 0. ``peft`` has the LoRA layers and the
merge; the gate, the search and the selection are written here (peft has no module selection).

The masks are buffers and ``alpha`` a parameter of each adapted layer, so checkpoints carry the
selection: a resumed run and ``load_from_checkpoint`` see the same modules; :meth:`merge` and
:meth:`save_pretrained` fold each gate into its ``B`` first. ``parameter_counts["trainable"]`` is
what trains after the search (the kept adapters and the head).

Method card (what it does, when it helps, what it costs): ``diffora.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import DiffoRA
    >>> diffora = DiffoRA(r=8, budget_rank=4)   # about half the layers at rank 8: LoRA r=4's budget
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from reglab.callbacks.peft.lora import LoRA
from reglab.peft_surgery import count_parameters, merge_adapters

#: names of the DAM entry (parameter) and of the selection mask (buffer) on each adapted layer
ALPHA, MASK = "diffora_alpha", "diffora_mask"


def gate(layer: nn.Module) -> Tensor:
    """``m * sigmoid(alpha)`` of an adapted layer."""
    return getattr(layer, MASK) * torch.sigmoid(getattr(layer, ALPHA))


def _gated(layer: nn.Module, lora_b: nn.Module, args: Any, output: Tensor) -> Tensor:
    return output * gate(layer).to(output.dtype)


def select_within_budget(scores: list[float], costs: list[int], budget: float) -> list[int]:
    """Indices taken by score, largest first (ties: the earlier index), skipping any whose cost no
    longer fits in ``budget``; the best one alone when none fits. Sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept, spent = [], 0
    for index in order:
        if spent + costs[index] <= budget:
            kept.append(index)
            spent += costs[index]
    return sorted(kept or order[:1])


def gated_layers(module: nn.Module) -> list[nn.Module]:
    return [layer for layer in module.modules() if hasattr(layer, ALPHA)]


@torch.no_grad()
def fold_gates(module: nn.Module) -> None:
    """Scale each adapted layer's ``B`` by its gate and set the gate to 1 (``alpha`` = +inf, mask 1):
    the layers compute the same, and peft's merge and export see the gated update."""
    for layer in gated_layers(module):
        layer.lora_B["default"].weight.mul_(gate(layer).to(layer.lora_B["default"].weight.dtype))
        getattr(layer, ALPHA).fill_(float("inf"))
        getattr(layer, MASK).fill_(1.0)


class DiffoRA(LoRA):
    """LoRA on the modules a differentiable search chose, at a parameter budget (see the module docstring).

    Args:
        r, lora_alpha, lora_dropout: the adapters (peft's ``LoraConfig``): rank while searching and after.
        budget_rank: the budget is the parameter count of LoRA with this rank on every candidate
            layer; ``None`` = ``r / 2`` (about half of the layers keep their adapter).
        search_fraction: share of the run's optimizer steps (``trainer.estimated_stepping_batches``)
            spent searching.
        search_steps: the search length in optimizer steps (overrides ``search_fraction``); set it
            when a run is resumed with a different step budget, which would move a fractional end.
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "diffora"
    fsdp_unsupported = "its gates read each adapted layer's DAM entry directly, and FSDP may hold only this rank's shard of it"

    #: the gate scales one LoRA ``B`` per layer; peft's attention layer has two (in and out projections)
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0, budget_rank: float | None = None,
                 search_fraction: float = 0.25, search_steps: int | None = None,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        budget_rank = r / 2 if budget_rank is None else budget_rank
        if not 0 < budget_rank <= r:
            raise ValueError(f"DiffoRA: budget_rank must be in (0, r = {r}], got {budget_rank}")
        if not 0 < search_fraction < 1 or (search_steps is not None and search_steps < 1):
            raise ValueError(f"DiffoRA: search_fraction must be in (0, 1) and search_steps >= 1, got "
                             f"{search_fraction} and {search_steps}")
        super().__init__(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                         pretrained_checkpoint=pretrained_checkpoint)
        self.budget_rank, self.search_fraction, self.search_steps = budget_rank, search_fraction, search_steps
        self.layer_names: list[str] = []
        self.kept: list[str] = []
        self._search_end = 1
        self._discretized = False

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        super().inject(module, layer_names, trainer)
        self.layer_names = list(layer_names)
        for name in layer_names:
            layer = module.get_submodule(name)
            weight = layer.lora_B["default"].weight
            layer.register_parameter(ALPHA, nn.Parameter(torch.zeros((), device=weight.device)))
            layer.register_buffer(MASK, torch.ones((), device=weight.device))
            layer.lora_B["default"].register_forward_hook(functools.partial(_gated, layer))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            total = trainer.estimated_stepping_batches
            self._search_end = self.search_steps or max(1, int(self.search_fraction * total))
            self._discretized = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # alpha no longer trains after the search, so a resumed run redoes the same selection
        if not self._discretized and trainer.global_step >= self._search_end:
            self.discretize(pl_module)

    @torch.no_grad()
    def discretize(self, module: nn.Module) -> list[str]:
        """Keep the adapters the DAM ranks first within the budget; returns their layer names."""
        layers = [module.get_submodule(name) for name in self.layer_names]
        costs = [sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n) for layer in layers]
        scores = [float(getattr(layer, ALPHA)) for layer in layers]
        kept = set(select_within_budget(scores, costs, sum(costs) * self.budget_rank / self.r))
        for index, layer in enumerate(layers):
            getattr(layer, MASK).fill_(float(index in kept))
        self.kept = [self.layer_names[i] for i in sorted(kept)]
        dropped = sum(cost for i, cost in enumerate(costs) if i not in kept)
        counts = count_parameters(module)  # as the surgery left it: DiffoRA never turns requires_grad off
        self.parameter_counts = {**counts, "trainable": counts["trainable"] - dropped - len(layers)}
        self._discretized = True
        rank_zero_info(f"DiffoRA: kept {len(kept)} of {len(layers)} adapters "
                       f"({sum(costs[i] for i in kept):,} of {sum(costs):,} adapter parameters): {self.kept}")
        return self.kept

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if not self._discretized:
            return
        for layer in gated_layers(pl_module):
            getattr(layer, ALPHA).grad = None  # no update, no momentum step, no weight decay
            if not getattr(layer, MASK):
                for name, parameter in layer.named_parameters():
                    if "lora_" in name:
                        parameter.grad = None

    def merge(self, module: nn.Module) -> int:
        fold_gates(module)
        return merge_adapters(module)

    def save_pretrained(self, module: nn.Module, directory: str | Path, root: str = "") -> None:
        """:meth:`LoRA.save_pretrained` of a copy whose gates are folded into ``B`` (a dropped
        module's adapter is exported as zero)."""
        folded = copy.deepcopy(module)
        fold_gates(folded)
        super().save_pretrained(folded, directory, root)
