"""CPE-CLIP — learnable prompts on both towers of CLIP, kept across few-shot class-incremental sessions,
with a session-dependent regularization of their updates (paper 39, D'Alessandro et al., "Multimodal
Parameter-Efficient Few-Shot Class Incremental Learning", ICCV-W 2023; official code
github.com/neuraptic/cpe-clip, ``CoLeLib/models/clip_models.py`` and
``CoLeLib/training/strategies/clip_pe.py``, read for this module).

One set of prompts ``g`` of shape ``(depth, L, text width)`` is shared by the two towers, and both towers
stay frozen:

* **text**: every class prompt is ``[CLS] g_1 ... g_L <class name> . [SEP]`` (the official ``manual_prompt``
  ``"[]."``); the prompt positions ``1..L`` of the text transformer's layer ``i`` input are replaced by
  ``g[i]`` (the official "replace" deep prompting). Layer 0's prompts replace the token embeddings of
  ``L`` placeholder words before the position embeddings are added, as the official code adds position
  embeddings to them (and as CoOp, :class:`reglab.callbacks.baselines.PromptTuning`, builds its context);
* **image**: the official vision prompts are ``prompt_proj(g[i])``, one linear map of the text prompts into
  the ViT's width, appended as tokens to layer ``i``'s sequence ("accumulate"). The tiny CLIP's image tower
  is a CNN, which has no sequence: here layer ``i`` is the ``i``-th convolution, and its input gets the
  channel shift ``mean_l W_i g[i, l] + b_i`` — still the text prompts, linearly projected into the image
  tower at every depth, so the two modalities share one set of parameters. The convolutions' input
  widths differ, so each depth has its own projection ``W_i`` (the official one map serves a ViT of one
  width). This is the adaptation to the tiny model; ``CLIPModule(model="hf...")`` (a real CLIP's ViT) is
  refused rather than prompted differently.

**The regularization** (official ``regularization_method="balance"``, applied in every session after the
base one): the gradients of all prompt parameters are multiplied by ``lambda_t = |C_t| / |C_0 ∪ ... ∪ C_t|``
(the session's new classes over all classes seen so far) before SGD's step, so the prompts that carry the
old classes move less the more classes they already serve. Here the *update* of the prompt parameters is
scaled by ``lambda_t`` (``p <- p_old + lambda_t (p_new - p_old)``, an optimizer step hook), which is the
same trajectory under the official optimizer (SGD with momentum, rebuilt every session: the momentum
buffer is linear in the gradients; a test checks it) and keeps its meaning under Adam/AdamW, which are
invariant to a constant gradient scale — the official gradient scaling would do nothing there.
``regularization=None`` is the official ablation "no_regularization".

Also official: while a session trains, only its own classes' logits are live (``_after_forward`` sets the
earlier sessions' logits to -9999); the task runner evaluates among every class seen so far. The towers run
in eval mode while the prompts train (CLIP has no batch norm or dropout; the tiny CLIP's CNN and MiniLM do).

Defaults: ``L = 2`` prompts (``--L_g 2``) at every layer of both towers (``--deep_g 12``, all of ViT-B/16's;
here ``depth=None``: every layer of the deeper tower, 3 convolutions and 2 text layers), prompts xavier-
initialised and projections PyTorch's default, as the official code. Not taken over: the official SGD
schedule (momentum 0.9, lr warm-up from 0.001 stepped per epoch; the protocol's module trains with
AdamW), the epochs and batch sizes (the protocol's settings).

The prompts are a submodule of the LightningModule (``module.cpe_clip``, in its checkpoint, trained by its
optimizer) whose forward hooks on the towers stay with the module (as Mamba-FSCIL's projector), so the task
runner's evaluation after a fit, and a module loaded from a checkpoint (a restore hook redoes the surgery),
classify with the prompts.

Method card (what it does, when it helps, what it costs): ``cpe_clip.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.continual import CPECLIP
    >>> CPECLIP(prompt_length=2).regularization
    'balance'
    >>> update_scale(session=[6, 7], seen_before=[0, 1, 2, 3, 4, 5])  # 2 new of 8 seen
    0.25
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.technique import Technique

#: the placeholder word whose token positions carry the text prompts of layer 0
PLACEHOLDER = "X"
STATE_KEY = "reglab_cpe_clip"  # the prompts' shapes, in the checkpoint, for the restore hook
REGULARIZATIONS = (None, "balance")


def update_scale(session: Sequence[int], seen_before: Sequence[int]) -> float:
    """The official ``lambda_t``: the session's new classes over every class seen once it is learnt; 1 in the
    base session (nothing seen before)."""
    seen = set(seen_before)
    if not seen:
        return 1.0
    new = set(session) - seen
    return len(new) / len(seen | set(session))


class SessionPrompts(nn.Module):
    """The shared prompts ``g`` ``(depth, length, text_width)`` and their projections into the image tower's
    convolutions (``image_widths``: the input channels of the prompted convolutions)."""

    def __init__(self, depth: int, length: int, text_width: int, image_widths: Sequence[int], placeholder: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(nn.init.xavier_uniform_(torch.empty(depth, length, text_width)))
        self.projections = nn.ModuleList(nn.Linear(text_width, width) for width in image_widths)
        self.placeholder = placeholder
        self._rows: Tensor | None = None  # the prompt rows of the text forward under way

    def arguments(self) -> dict[str, Any]:
        depth, length, width = self.prompts.shape
        return {"depth": depth, "length": length, "text_width": width,
                "image_widths": [p.out_features for p in self.projections], "placeholder": self.placeholder}

    def _replace(self, hidden: Tensor, layer: int) -> Tensor:
        end = 1 + self.prompts.shape[1]
        prompts = self.prompts[layer].to(hidden.dtype).expand_as(hidden[:, 1:end])
        # row by row on the device: captions (no placeholders) pass unchanged, no host sync
        replaced = torch.where(self._rows[:, None, None], prompts, hidden[:, 1:end])
        return torch.cat([hidden[:, :1], replaced, hidden[:, end:]], dim=1)

    def embedding_hook(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Forward hook of the text tower's token embedding: layer 0's prompts over the placeholders."""
        self._rows = (inputs[0][:, 1:1 + self.prompts.shape[1]] == self.placeholder).all(1)
        return self._replace(output, 0)

    def layer_hook(self, layer: int, module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Forward pre-hook of text layer ``layer`` (bound with ``functools.partial``): its prompts replace the
        previous layer's outputs there."""
        if args:
            return (self._replace(args[0], layer), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._replace(kwargs["hidden_states"], layer)}

    def conv_hook(self, layer: int, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Forward pre-hook of convolution ``layer`` (bound with ``functools.partial``): the projected prompts
        shift its input's channels."""
        shift = self.projections[layer](self.prompts[layer]).mean(0)
        return (args[0] + shift.to(args[0].dtype)[None, :, None, None], *args[1:])


def text_layers(clip: nn.Module) -> nn.ModuleList | None:
    """The text transformer's layers (a BERT-style encoder: the tiny CLIP's MiniLM), or ``None``."""
    return getattr(getattr(getattr(clip, "text_encoder", None), "encoder", None), "layer", None)


def image_convolutions(clip: nn.Module) -> list[nn.Conv2d]:
    return [m for m in getattr(clip, "image_encoder", nn.Identity()).modules() if isinstance(m, nn.Conv2d)]


def attach_prompts(module: nn.Module, arguments: dict[str, Any]) -> SessionPrompts:
    """Register ``module.cpe_clip`` and its hooks on ``module.clip``'s towers (which it freezes); returns
    the existing prompts when there are some."""
    prompts = getattr(module, "cpe_clip", None)
    if isinstance(prompts, SessionPrompts):
        return prompts
    module.clip.requires_grad_(False)
    prompts = module.cpe_clip = SessionPrompts(**arguments)
    depth = prompts.prompts.shape[0]
    module.clip.text_encoder.get_input_embeddings().register_forward_hook(prompts.embedding_hook)
    # bound methods and partials of them, not closures: a deep copy of the module then hooks its own prompts
    for i, layer in enumerate(text_layers(module.clip)[1:depth], start=1):
        layer.register_forward_pre_hook(functools.partial(prompts.layer_hook, i), with_kwargs=True)
    for i, conv in enumerate(image_convolutions(module.clip)[:depth]):
        conv.register_forward_pre_hook(functools.partial(prompts.conv_hook, i))
    return prompts


def restore_prompts(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook: a bare module gets its prompts (and their hooks) before the checkpoint's weights load."""
    attach_prompts(module, checkpoint[STATE_KEY])


@functools.cache  # one load per process: every setup (each session's fit) reads it
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    from reglab.models.external import transformers_path

    return AutoTokenizer.from_pretrained(transformers_path(path))


class CPECLIP(Technique):
    """Prompts on both CLIP towers across sessions, their updates scaled by ``lambda_t`` (module docstring).

    Args:
        prompt_length: prompts per layer (the official ``L_g``).
        depth: layers prompted in each tower (the official ``deep_g``); ``None``: every layer of the
            deeper tower (a shallower tower uses the first of them).
        regularization: ``"balance"`` (the official regularizer) or ``None`` (its ablation).
    """

    name = "cpe_clip"

    def __init__(self, prompt_length: int = 2, depth: int | None = None,
                 regularization: str | None = "balance") -> None:
        if prompt_length < 1 or (depth is not None and depth < 1):
            raise self.fail(f"prompt_length={prompt_length}, depth={depth} prompt nothing",
                            "pass prompt_length >= 1 and depth >= 1 (or depth null: every layer)")
        if regularization not in REGULARIZATIONS:
            raise self.fail(f"regularization {regularization!r} is not one of {list(REGULARIZATIONS)}",
                            "pass 'balance' (the paper's) or null (no regularization)")
        self.prompt_length, self.depth, self.regularization = prompt_length, depth, regularization
        #: classes of the sessions finished so far (the task runner's on_task_end adds each session's)
        self.seen_classes: list[int] = []
        self.scale = 1.0
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._handles: list[Any] = []

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        clip = getattr(pl_module, "clip", None)
        layers, convolutions = text_layers(clip), image_convolutions(clip) if clip is not None else []
        if not hasattr(pl_module, "set_class_prompts") or layers is None or not convolutions:
            raise self.fail(f"{type(pl_module).__name__} is not a CLIP with a BERT-style text tower and a "
                            "convolutional image tower (the prompts go into both)",
                            "use reglab.tasks.CLIPModule with model 'tiny' and the cnn image backbone")
        if stage == "fit" and pl_module.hparams.objective != "classification":
            raise self.fail("it learns the prompts of the classes, which only objective='classification' trains",
                            "set the CLIPModule's objective to 'classification'")
        data = trainer.datamodule
        names, tokenizer_path = getattr(data, "class_names", None), getattr(data, "tokenizer", None)
        if names is None or not isinstance(tokenizer_path, str):
            raise self.fail(f"{type(data).__name__} names no `class_names` and `tokenizer`",
                            "use a DataModule that has both (CaptionedDigitsDataModule, or a TaskSequenceDataModule "
                            "over it)")
        tokenizer = _tokenizer(tokenizer_path)
        placeholder = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(PLACEHOLDER))
        depth = self.depth or max(len(layers), len(convolutions))
        attach_prompts(pl_module, {"depth": depth, "length": self.prompt_length,
                                   "text_width": clip.text_encoder.get_input_embeddings().embedding_dim,
                                   "image_widths": [c.in_channels for c in convolutions[:depth]],
                                   "placeholder": placeholder[0]})
        pl_module.set_class_prompts(self.class_prompts(data, tokenizer))

    def class_prompts(self, data: Any, tokenizer: Any) -> dict[str, Tensor]:
        """``(C, 1, max_length)`` tokens of ``X ... X <name>.`` for every class the DataModule names."""
        prefix = " ".join([PLACEHOLDER] * self.prompt_length)
        encoded = tokenizer([f"{prefix} {name}." for name in data.class_names], padding="max_length",
                            max_length=data.max_length, truncation=False, return_tensors="pt")
        if encoded["input_ids"].shape[1] > data.max_length:
            raise self.fail(f"{self.prompt_length} prompts and a class name exceed max_length={data.max_length}",
                            "lower prompt_length or raise the DataModule's max_length")
        return {key: encoded[key].unsqueeze(1) for key in ("input_ids", "attention_mask")}

    # -- the session ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not at setup: a run resumed with ckpt_path has its seen classes only after setup
        data = trainer.datamodule
        tasks = getattr(data, "tasks", None)
        session = list(tasks[data.task]) if tasks is not None else list(range(pl_module.num_classes))
        if tasks is not None:  # official: only the session's classes are live while it trains
            mask = torch.zeros_like(pl_module.active_classes)
            mask[session] = True
            pl_module.active_classes.copy_(mask)
        self.scale = update_scale(session, self.seen_classes) if self.regularization == "balance" else 1.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parameters = [p for p in pl_module.cpe_clip.parameters() if p.requires_grad]
        for optimizer in trainer.optimizers:
            self._handles += [optimizer.register_step_pre_hook(lambda *_: self._save(parameters)),
                              optimizer.register_step_post_hook(lambda *_: self._scale_update())]

    def _save(self, parameters: list[Tensor]) -> None:
        self._saved = [(p, p.detach().clone()) for p in parameters] if self.scale != 1.0 else []

    @torch.no_grad()
    def _scale_update(self) -> None:
        for parameter, before in self._saved:
            parameter.copy_(torch.lerp(before, parameter, self.scale))
        self._saved = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # the frozen towers are fixed functions (CLIP has neither batch norm nor dropout); every batch, since the
        # loops set train mode again after a validation and at a resumed run's start
        pl_module.clip.eval()
        pl_module.log("cpe_clip/update_scale", self.scale, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        session = trainer.datamodule.tasks[task]
        self.seen_classes += [c for c in session if c not in self.seen_classes]

    # -- state ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = pl_module.cpe_clip.arguments()
        add_restore_hook(checkpoint, "reglab.callbacks.continual.cpe_clip:restore_prompts")

    def state_dict(self) -> dict[str, Any]:
        return {"seen_classes": list(self.seen_classes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen_classes = list(state_dict["seen_classes"])

