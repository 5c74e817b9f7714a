"""Model surgery for parameter-efficient fine-tuning: pick layers, freeze, count, merge, reload.

The pieces every technique of :mod:`reglab.callbacks.peft` is built from, usable on any ``nn.Module``:

* :func:`select_layers` — names of the layers to adapt, by regex over module names, never the
  task head (:func:`is_task_head`);
* :func:`freeze_all_except` — ``requires_grad`` off for every parameter a rule does not keep.
  Surgery runs at ``setup``, before optimizers and DDP exist, so flipping ``requires_grad`` is
  safe there; anything that changes *during* a run must mask gradients instead (DDP has already
  bucketed the trainable parameters by then);
* :func:`count_parameters`, :func:`merge_adapters` (peft's LoRA layers and
  :class:`~reglab.nn.core_adapter.CoreAdapter` alike);
* :func:`load_pretrained` — the weights the fine-tuning starts from (a Lightning checkpoint or a
  plain state dict);
* :func:`trainable_state` — a checkpoint's ``state_dict`` without the frozen parameters (small
  checkpoints; the frozen ones are rebuilt from the pretrained weights), and
  :func:`restore_surgery` — what lets ``Module.load_from_checkpoint`` rebuild a working module
  from such a checkpoint (``RegularizedMixin.on_load_checkpoint`` calls it).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

#: A module named like this (any part of its dotted name) is the task head: it always trains and
#: is never adapted. ``head`` is ClassificationModule's, ``classifier`` / ``score`` transformers'.
TASK_HEAD_NAMES = frozenset({"head", "classifier", "score"})
#: Where a surgery technique leaves its recipe in a checkpoint, for :func:`restore_surgery`.
RECIPE_KEY = "reglab_peft"
#: Attribute a surgery technique sets on the module it changed (one per module).
OPERATED_BY = "_reglab_peft_technique"


def is_task_head(name: str) -> bool:
    """Whether the module or parameter ``name`` belongs to the task head."""
    return any(part in TASK_HEAD_NAMES for part in name.split("."))


def attention_output_projections(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` layers of every ``nn.MultiheadAttention`` in ``model``.

    The attention reads ``out_proj.weight`` and ``out_proj.bias`` directly and never calls
    ``out_proj.forward``, so an adapter that wraps the layer is never used and never trains.
    """
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
    }


def select_layers(model: nn.Module, patterns: Sequence[str] | None, layer_types: tuple[type, ...]) -> list[str]:
    """Names of the modules of ``layer_types`` to adapt.

    Args:
        model: the module to search (names are relative to it).
        patterns: regular expressions searched in each module's dotted name (``"qkv"``,
            ``r"blocks\\.\\d+\\.mlp"``, ``"^backbone\\."``); ``None`` = every layer of those types.
        layer_types: the layer classes the technique can adapt.

    Never selected: the task head, and the ``out_proj`` of an ``nn.MultiheadAttention``
    (:func:`attention_output_projections`); where ``layer_types`` has ``nn.MultiheadAttention``
    (peft adapts its input and output projections together), a pattern that matches its
    ``out_proj`` selects the attention itself. Raises ``ValueError`` naming every pattern that
    matches no layer, and the layers it could have matched.
    """
    skipped = attention_output_projections(model)
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, layer_types) and name and not is_task_head(name) and name not in skipped
    ]

    def matches(pattern: str, name: str) -> bool:
        names = (name, f"{name}.out_proj") if isinstance(model.get_submodule(name), nn.MultiheadAttention) else (name,)
        return any(re.search(pattern, n) for n in names)

    if patterns is None:
        chosen = candidates
    else:
        unmatched = [p for p in patterns if not any(matches(p, name) for name in candidates)]
        if unmatched:
            kinds = ", ".join(t.__name__ for t in layer_types)
            unusable = sorted(n for n in skipped if any(re.search(p, n) for p in unmatched))
            raise ValueError(
                f"the target_modules patterns {unmatched} match no {kinds} layer of {type(model).__name__}"
                + (f" (they match only {unusable}, the output projections nn.MultiheadAttention reads by "
                   "weight, which an adapter cannot wrap)" if unusable else "")
                + f"; the layers they could match are {name_listing(candidates)}"
            )
        chosen = [name for name in candidates if any(matches(p, name) for p in patterns)]
    if not chosen:
        kinds = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(
            f"{type(model).__name__} has no {kinds} layer outside the task head; its modules are "
            f"{name_listing([name for name, _ in model.named_modules() if name])}"
        )
    left_out = sorted(
        name for name in skipped
        if isinstance(model.get_submodule(name), layer_types) and not is_task_head(name)
        and nn.MultiheadAttention not in layer_types and (patterns is None or any(re.search(p, name) for p in patterns))
    )
    if left_out:
        rank_zero_info(
            f"Not adapted: {name_listing(left_out)} — nn.MultiheadAttention reads these output projections "
            "by weight, so an adapter there would never train"
        )
    return chosen


def name_listing(names: Sequence[str], limit: int = 30) -> str:
    """``names`` as a list for a message, cut after ``limit``."""
    return f"{list(names[:limit])}{f' and {len(names) - limit} more' if len(names) > limit else ''}"


def peft_targets(layer_names: Sequence[str]) -> str:
    """peft's ``target_modules`` for exactly ``layer_names``: a regex peft full-matches against
    module names (a list would also match every module whose name merely ends in one of them)."""
    return "|".join(re.escape(name) for name in layer_names)


def inject_peft(config: Any, model: nn.Module) -> Any:
    """Apply peft's tuner for ``config`` (any non-prompt peft config with ``target_modules``) to
    ``model`` in place: the layers peft builds replace the targeted ones. Returns the tuner (for
    methods with per-step work, such as AdaLoRA's ``update_and_allocate``).

    This is what ``peft.inject_adapter_in_model`` does, through the tuner class directly, which
    also serves the methods whose state is shared across layers (VeRA's random projections,
    VB-LoRA's vector bank) that ``inject_adapter_in_model`` refuses: their layers hold the shared
    tensors as registered submodules, so the model's ``state_dict``, ``.to()`` and DDP see them.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    # peft takes a `_device_mesh` attribute for a transformers tensor-parallel model and reads its
    # `config`; Lightning's ModelParallelStrategy sets one (a data-parallel mesh) on the module
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        model._device_mesh = None
    try:
        return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](model, config, adapter_name="default")
    finally:
        if mesh is not None:
            model._device_mesh = mesh


def trainable_without_gradient(model: nn.Module) -> list[str]:
    """Names of the parameters that train (``requires_grad``) but hold no gradient: after a
    backward pass, the ones the forward pass never used."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing; its presence turns PyTorch's fast path off."""


def keep_adapters_in_eval(model: nn.Module, adapted: Callable[[nn.Parameter], bool]) -> int:
    """Turn off the inference fast path of every ``nn.TransformerEncoderLayer`` that holds an
    adapter (``adapted(parameter)``); returns how many.

    In eval mode without gradients that layer calls one fused kernel with ``linear1.weight``,
    ``self_attn.in_proj_weight``, ... read directly, which skips every adapter inside it: the
    model would train with its adapters and predict without them. A forward hook is one of the
    conditions under which PyTorch keeps the ordinary path; the encoder around such layers must
    then not hand them nested tensors (its padding-mask fast path), which only the fused kernel takes.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)
              and any(adapted(p) for p in m.parameters())]
    for layer in layers:
        layer.register_forward_pre_hook(_no_fast_path)
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(layer in layers for layer in encoder.layers):
            encoder.use_nested_tensor = False
    return len(layers)


def freeze_all_except(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> None:
    """Set ``requires_grad`` to ``keep(name, parameter)`` for every parameter (setup time only)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(keep(name, parameter))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}`` (shared parameters counted once)."""
    parameters = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "total": sum(p.numel() for p in parameters),
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter (peft LoRA layer or CoreAdapter) into its base layer and put the base
    layer back in its place; returns how many were merged. The model then has its original
    architecture and no extra cost per step."""
    adapters = [
        name for name, module in model.named_modules()
        if callable(getattr(module, "merge", None)) and callable(getattr(module, "get_base_layer", None))
    ]
    # peft's attention adapter merges and unloads its inner out_proj adapter itself
    attention = [name for name in adapters
                 if callable(getattr(model.get_submodule(name), "unload_and_optionally_merge_module", None))]
    for name in attention:
        replace_module(model, name, model.get_submodule(name).unload_and_optionally_merge_module(
            merge=True, safe_merge=False, adapter_names=None))
    rest = [name for name in adapters if not any(name.startswith(f"{outer}.") or name == outer for outer in attention)]
    # innermost first, so that a name stays valid while its parents are still wrappers
    for name in sorted(rest, key=lambda n: n.count("."), reverse=True):
        adapter = model.get_submodule(name)
        adapter.merge()
        replace_module(model, name, adapter.get_base_layer())
    return len(attention) + len(rest)


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load the weights fine-tuning starts from: a Lightning checkpoint (its ``state_dict``) or a
    plain state dict. Every key must fit ``model`` (same backbone, same head size)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the pretrained checkpoint {path} does not fit {type(model).__name__}: build the module "
            f"with the backbone and number of classes it was pretrained with ({error})"
        ) from error


def frozen_parameter_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the frozen parameters of ``model``; buffers (BatchNorm statistics,
    factors that cannot be recomputed) stay, so a resumed run is exact."""
    frozen = frozen_parameter_names(model)
    return {key: value for key, value in state_dict.items() if key not in frozen}


def technique_recipe(technique: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a technique whose arguments are stored as same-named
    attributes (the convention of :mod:`reglab.callbacks.peft`)."""
    import inspect

    names = [n for n in inspect.signature(type(technique)).parameters if n not in ("args", "kwargs")]
    return {
        "class_path": f"{type(technique).__module__}.{type(technique).__qualname__}",
        "init_args": {name: getattr(technique, name) for name in names},
    }


def technique_from_recipe(recipe: dict[str, Any]) -> Any:
    """The technique a :func:`technique_recipe` describes, built anew."""
    module_path, _, class_name = recipe["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_path), class_name)(**recipe["init_args"])


def restore_surgery(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Make ``module`` ready to load ``checkpoint`` when a surgery technique wrote it.

    Called from the module's ``on_load_checkpoint``, which Lightning runs before it loads the
    weights, both in ``Module.load_from_checkpoint(path)`` and when a run resumes. Outside a run no
    technique has operated on the module yet, so the one the checkpoint records is rebuilt and
    redoes its surgery (loading the pretrained weights, injecting the adapters). Then the frozen
    parameters a small checkpoint leaves out are filled in from the module, so that the strict
    load ``load_from_checkpoint`` does by default finds every key. Checkpoints without a recipe
    are left as they are.
    """
    recipe = checkpoint.get(RECIPE_KEY)
    if recipe is None:
        return
    if getattr(module, OPERATED_BY, None) is None:
        technique_from_recipe(recipe).prepare(module)
    state, current = checkpoint["state_dict"], module.state_dict()
    for name in frozen_parameter_names(module):
        state.setdefault(name, current[name])
