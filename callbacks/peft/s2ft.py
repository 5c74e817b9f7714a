"""S²FT — structured sparse fine-tuning (Yang et al., NeurIPS 2024, paper 41).

S²FT picks a few attention heads and FFN channels and trains only the weights that belong to
them, as dense sub-matrices (initialised at zero, added to the frozen weights):

* a head's **value rows** (``v_ratio``): its ``head_dim`` output rows of the value projection
  (``W_v[rows] + S``, S of shape ``k x in``);
* a head's **output columns** (``o_ratio``): its ``head_dim`` input columns of the attention
  output projection (``W_o[:, cols] + S``, S of shape ``out x k``);
* an FFN channel's **up row** (``u_ratio``) or **down column** (``d_ratio``): the row of the first
  FFN layer that produces the channel, the column of the second that reads it.

Gradients and optimizer state therefore exist only for the selected rows and columns. A layer with
columns adds ``S @ x[..., cols]`` to its output; one with rows adds ``x @ S^T`` at the output
positions ``rows``.

Follows the official code (github.com/Infini-AI-Lab/S2FT: ``s2ft/s2.py`` for the layers,
``experiments/train/finetune.py`` and ``utils/s2_utils.py`` for the selection, the LLaMA scripts
for the ratios): units are drawn uniformly at random over all blocks together (the official
``random.sample`` over layer x head and layer x channel indices, so a block may get none), the
counts are ``int(ratio * units)``, biases and everything else stay frozen, the default ratios are
the LLaMA-3 scripts' (``d_ratio = 0.03``, the rest 0; LLaMA-2's add ``o_ratio = 0.052``). Where
this differs:

* **Co-location without permutation.** The official code permutes the coupled rows and columns
  (q/k/v rows and output columns per head; up/gate rows and down columns per channel) so that the
  selection becomes the contiguous slice ``[start:end]``. Here the selection is addressed by index
  (``index_select`` of the input columns, ``index_add`` at the output rows). The function, the
  parameters, their gradients and the optimizer state are the same; what the permutation adds is a
  contiguous slice for its fused kernels (``efficiency/s2ft.py``). Without it no frozen weight is
  reordered, so a pretrained checkpoint, the merged model and any other technique reading the
  weights keep their layout.
* The draw uses a ``torch.Generator`` seeded by ``seed`` (not Python's global ``random``), so a
  reloaded checkpoint redoes the same selection and every DDP rank makes the same one.
* Structures recognised: timm's ``Attention`` (fused ``qkv``, ``proj``) and ``Mlp`` (``fc1``,
  ``fc2``), transformers' BERT layers (``attention.self.value``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``); other layers of such a model (BERT's query, key,
  pooler) stay frozen. In a model without these blocks (an MLP) every targeted ``nn.Linear``'s
  input features are channels of ``d_ratio``, like a down projection's.
  Convolutions are not adapted (the claims run on the ViT and MiniLM).

**Memory.** Trainable are the sub-matrices (``k x in`` or ``out x k`` per layer) and the task
head, so gradients and Adam's two moments cover only those; the frozen layers save no input for a
weight gradient. Saved for backward per adapted layer: the selected input columns (``N x k``) or,
for a row layer, its input. The merged model (:meth:`merge`) has the original layers and no
extra cost.

Method card (what it does, when it helps, what it costs): ``s2ft.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.peft import S2FT
    >>> s2ft = S2FT(o_ratio=0.25, d_ratio=0.25)   # a quarter of the heads' output columns and FFN channels
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.peft_surgery import replace_module

#: what the sub-matrix of a layer covers, per kind of unit: (ratio name, rows or columns)
ROLES = {"value": ("v_ratio", "rows"), "out": ("o_ratio", "cols"), "up": ("u_ratio", "rows"),
         "down": ("d_ratio", "cols")}


class Unit(NamedTuple):
    """One selectable unit: a head or channel of a layer, covering ``indices`` of its rows/columns."""
    layer: str
    role: str
    indices: range


class StructuredSparseLinear(nn.Module):
    """``base_layer`` plus a dense trainable sub-matrix ``s2`` over its rows ``rows`` (``k x in``)
    or its columns ``cols`` (``out x k``), initialised at zero. Offers ``merge()`` /
    ``get_base_layer()`` for :func:`reglab.peft_surgery.merge_adapters`."""

    def __init__(self, base_layer: nn.Linear, index: Tensor, axis: str) -> None:
        super().__init__()
        self.base_layer, self.axis = base_layer, axis
        out_features, in_features = base_layer.weight.shape
        shape = (len(index), in_features) if axis == "rows" else (out_features, len(index))
        self.s2 = nn.Parameter(torch.zeros(shape, device=base_layer.weight.device, dtype=torch.float32))
        self.register_buffer("index", index)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        if self.axis == "cols":
            return y + F.linear(x.index_select(-1, self.index), self.s2.to(x.dtype))
        update = F.linear(x, self.s2.to(x.dtype))
        return y.index_add(-1, self.index, update.to(y.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        if self.axis == "rows":
            weight.index_add_(0, self.index, self.s2.to(weight.dtype))
        else:
            weight.index_add_(1, self.index, self.s2.to(weight.dtype))
        self.merged = True

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


def structure_units(model: nn.Module, layer_names: list[str]) -> dict[str, list[Unit]]:
    """The selectable units of ``model`` per ratio (``v_ratio`` ... ``d_ratio``), in module order,
    among the layers ``layer_names``: the heads and channels of its attention and FFN blocks, or,
    in a model without such blocks, the input features of every layer."""
    targets = set(layer_names)
    units: dict[str, list[Unit]] = defaultdict(list)

    def add(layer: str, role: str, count: int, size: int, offset: int = 0) -> None:
        if layer in targets:
            ratio = ROLES[role][0]
            units[ratio] += [Unit(layer, role, range(offset + i * size, offset + (i + 1) * size)) for i in range(count)]

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        kind = type(module).__name__
        if kind == "Attention" and hasattr(module, "qkv") and hasattr(module, "proj"):  # timm
            heads, dim = module.num_heads, module.proj.in_features
            add(f"{prefix}qkv", "value", heads, dim // heads, offset=2 * dim)
            add(f"{prefix}proj", "out", heads, dim // heads)
        elif kind == "Mlp" and hasattr(module, "fc1") and hasattr(module, "fc2"):  # timm
            add(f"{prefix}fc1", "up", module.fc1.out_features, 1)
            add(f"{prefix}fc2", "down", module.fc2.in_features, 1)
        elif hasattr(module, "attention") and hasattr(module, "intermediate") and hasattr(module, "output"):  # BERT
            attention = module.attention
            heads, size = attention.self.num_attention_heads, attention.self.attention_head_size
            add(f"{prefix}attention.self.value", "value", heads, size)
            add(f"{prefix}attention.output.dense", "out", heads, size)
            add(f"{prefix}intermediate.dense", "up", module.intermediate.dense.out_features, 1)
            add(f"{prefix}output.dense", "down", module.output.dense.in_features, 1)
    if not units:  # no attention or FFN block (an MLP): every layer's inputs are channels
        for name in layer_names:
            layer = model.get_submodule(name)
            units["d_ratio"] += [Unit(name, "down", range(i, i + 1)) for i in range(layer.in_features)]
    return units


class S2FT(ParameterEfficientFineTuning):
    """Train dense sub-matrices of randomly chosen heads and FFN channels (see the module docstring).

    Args:
        v_ratio: share of all heads whose value rows train (official LLaMA scripts: 0).
        o_ratio: share of all heads whose output-projection columns train (LLaMA-2: 0.052, LLaMA-3: 0).
        u_ratio: share of all FFN channels whose up-projection rows train (0).
        d_ratio: share of all FFN channels whose down-projection columns train (LLaMA-2: 0.02, LLaMA-3: 0.03).
        seed: seed of the random choice (the same selection on reload and on every rank).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "s2ft"

    layer_types = (nn.Linear,)

    def __init__(self, v_ratio: float = 0.0, o_ratio: float = 0.0, u_ratio: float = 0.0, d_ratio: float = 0.03,
                 seed: int = 0, target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        ratios = {"v_ratio": v_ratio, "o_ratio": o_ratio, "u_ratio": u_ratio, "d_ratio": d_ratio}
        for key, ratio in ratios.items():
            if not 0 <= ratio <= 1:
                raise ValueError(f"S2FT: {key} must be in [0, 1], got {ratio}")
        if not any(ratios.values()):
            raise ValueError("S2FT: every ratio is 0, so nothing would train. Fix: set d_ratio (official 0.03) "
                             "and/or o_ratio, v_ratio, u_ratio")
        super().__init__(target_modules, pretrained_checkpoint)
        self.v_ratio, self.o_ratio, self.u_ratio, self.d_ratio, self.seed = v_ratio, o_ratio, u_ratio, d_ratio, seed
        #: selected row/column indices per adapted layer
        self.selection: dict[str, list[int]] = {}

    def select(self, units: dict[str, list[Unit]]) -> dict[tuple[str, str], list[int]]:
        """``{(layer, role): sorted indices}``: ``int(ratio * len(units))`` units per ratio, drawn
        uniformly over all blocks together."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen: dict[tuple[str, str], list[int]] = defaultdict(list)
        for ratio_name, _ in ROLES.values():
            pool = units.get(ratio_name, [])
            count = int(getattr(self, ratio_name) * len(pool))
            for position in torch.randperm(len(pool), generator=generator)[:count].sort().values.tolist():
                unit = pool[position]
                chosen[(unit.layer, unit.role)] += list(unit.indices)
        return chosen

    def inject(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> None:
        units = structure_units(module, layer_names)
        chosen = self.select(units)
        if not chosen:
            available = {ratio: len(pool) for ratio, pool in units.items()}
            raise self.fail(f"the ratios select no unit: the model has {available} heads/channels per ratio, and "
                            "int(ratio * count) is 0 for each ratio set", "raise the ratios")
        self.selection = {}
        for (layer_name, role), indices in chosen.items():
            axis = ROLES[role][1]
            base = module.get_submodule(layer_name)
            index = torch.tensor(sorted(indices), dtype=torch.long, device=base.weight.device)
            replace_module(module, layer_name, StructuredSparseLinear(base, index, axis))
            self.selection[layer_name] = index.tolist()
