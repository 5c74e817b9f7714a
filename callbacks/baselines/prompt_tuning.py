"""Prompt tuning with learned context tokens — CoOp (Zhou et al., "Learning to Prompt for Vision-Language
Models", IJCV 2022), on :class:`reglab.tasks.CLIPModule`.

Each class's prompt is ``[CLS] v_1 ... v_M <class name> . [SEP]``: the ``M`` context vectors
``v_m`` live in the text tower's token-embedding space, are shared by all classes (CoOp's unified
context, class token at the end) and are the only parameters that train; both towers stay
frozen. As CoOp's code builds it, the prompt is tokenized with ``M`` placeholder words ``"X"``
and the token embeddings at those positions are replaced by the context before the text
transformer adds its position embeddings (here a forward hook on the tower's input embedding
layer, so any text tower of the module works: TinyCLIP's MiniLM and transformers' CLIPModel).
The context is initialised from the embeddings of ``ctx_init`` (CoOp's ``"a photo of a"``
initialisation; here the pretraining prompt "a photo of the digit"), so at step 0 the tuned
prompt is a hand-written one. Classes come from the DataModule's ``class_names`` at every
``setup``, so the same learned context classifies classes never tuned on (base-to-novel).
Written by hand (neither peft nor transformers has CoOp); follows the paper's method text and the
construction of CoOp's official code (KaiyangZhou/CoOp) as recalled, not re-read for this module.

Method card (what it does, when it helps, what it costs): ``prompt_tuning.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import PromptTuning
    >>> coop = PromptTuning(ctx_init="a photo of the digit")   # 5 context tokens
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.technique import Technique

#: the placeholder word whose token positions carry the context (CoOp's prompt prefix)
PLACEHOLDER = "X"


class PromptTuning(Technique):
    """CoOp: learn ``M`` shared context vectors in front of each class name (module docstring).

    Args:
        ctx_init: words whose token embeddings initialise the context; their token count is ``M``.
        n_ctx: with ``ctx_init`` empty, ``M`` randomly initialised vectors (CoOp's N(0, 0.02)).
    """

    name = "prompt_tuning"

    def __init__(self, ctx_init: str = "a photo of the digit", n_ctx: int = 4) -> None:
        if not ctx_init and n_ctx < 1:
            raise self.fail(f"n_ctx={n_ctx} gives no context to learn", "pass n_ctx >= 1 or a ctx_init")
        self.ctx_init, self.n_ctx = ctx_init, n_ctx
        self._hook: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "clip") or not hasattr(pl_module, "set_class_prompts"):
            raise self.fail(f"{type(pl_module).__name__} has no image-text towers",
                            "use it on reglab.tasks.CLIPModule")
        if stage == "fit" and pl_module.hparams.objective != "classification":
            raise self.fail("it learns the prompts of the classes, which only objective='classification' trains",
                            "set the CLIPModule's objective to 'classification'")
        datamodule = trainer.datamodule
        names = getattr(datamodule, "class_names", None)
        tokenizer_path = getattr(datamodule, "tokenizer", None)
        if names is None or not isinstance(tokenizer_path, str):
            raise self.fail(f"{type(datamodule).__name__} names no `class_names` and `tokenizer`",
                            "use a DataModule that has both (CaptionedDigitsDataModule)")
        tokenizer = _tokenizer(tokenizer_path)
        placeholder = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(PLACEHOLDER))
        if len(placeholder) != 1:
            raise self.fail(f"the tokenizer splits the placeholder {PLACEHOLDER!r}", "use a word-piece tokenizer")
        embedding = pl_module.clip.text_encoder.get_input_embeddings()
        if not hasattr(pl_module, "prompt_context"):
            pl_module.requires_grad_(False)
            pl_module.prompt_context = nn.Parameter(self._initial_context(tokenizer, embedding))
        pl_module.set_class_prompts(self.context_prompts(pl_module, datamodule, names))
        if self._hook is not None:
            self._hook.remove()
        self._hook = embedding.register_forward_hook(_context_hook(pl_module, placeholder[0]))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # the frozen towers are fixed functions, as CLIP's are in CoOp: CLIP has neither batch norm nor
        # dropout, the tiny CLIP's CNN and MiniLM have both, and in train mode they would move the image
        # tower's running statistics and drop tokens of the prompts while the context trains. Every batch,
        # since the loops set train mode again after a validation and at a resumed run's start
        pl_module.clip.eval()

    def context_prompts(self, pl_module: L.LightningModule, datamodule: Any, names: Any) -> dict[str, Tensor]:
        """``(len(names), 1, max_length)`` tokens of the prompts ``X ... X <name>.`` that the learned context
        fills (after :meth:`setup` made the context); a subclass prompts other class names the same way."""
        n_ctx = len(pl_module.prompt_context)
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        encoded = _tokenizer(datamodule.tokenizer)([f"{prefix} {name}." for name in names], padding="max_length",
                                                   max_length=datamodule.max_length, truncation=False,
                                                   return_tensors="pt")
        if encoded["input_ids"].shape[1] > datamodule.max_length:
            raise self.fail(f"a prompt of {n_ctx} context tokens and a class name exceeds max_length="
                            f"{datamodule.max_length}", "shorten ctx_init or raise the DataModule's max_length")
        return {key: encoded[key].unsqueeze(1) for key in ("input_ids", "attention_mask")}

    def _initial_context(self, tokenizer: Any, embedding: nn.Embedding) -> Tensor:
        if not self.ctx_init:
            return torch.randn(self.n_ctx, embedding.embedding_dim) * 0.02
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(self.ctx_init)))
        return embedding.weight[ids].detach().clone()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


@functools.cache  # one load per process: every setup (each fit and evaluation) reads it
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    from reglab.models.external import transformers_path

    return AutoTokenizer.from_pretrained(transformers_path(path))


def _context_hook(module: nn.Module, placeholder: int) -> Any:
    """Replace the token embeddings at positions ``1..M`` of rows that hold the placeholder there."""

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        context = module.prompt_context
        end = 1 + len(context)
        rows = (inputs[0][:, 1:end] == placeholder).all(1)
        # chosen row by row on the device: no host sync on which rows are prompts, every forward
        prompts = torch.where(rows[:, None, None], context.to(output.dtype).expand_as(output[:, 1:end]), output[:, 1:end])
        return torch.cat([output[:, :1], prompts, output[:, end:]], dim=1)

    return hook
