"""A small causal language model: transformers' GPT-2, randomly initialised, on token blocks.

The network is ``GPT2LMHeadModel`` built from a ``GPT2Config`` (no pretrained weights: the tiny
sizes here are trained from scratch, e.g. on :class:`~reglab.datamodules.PydocTopicsDataModule`
in minutes on a CPU). The step contract sees one sample per block: ``logits`` ``(N, T - 1, V)``
for every position but the last, ``target`` the next tokens ``(N, T - 1)``, and the per-sample
task loss is the block's mean next-token cross-entropy, so the batch mean is the usual language
modelling loss and techniques (hyperfitting's near-zero criterion) read it per block.
Validation and test log the loss and torchmetrics' perplexity over all their tokens.

Generation is transformers' ``generate`` (greedy by default, sampling with ``do_sample``), for a
fixed number of new tokens: the end-of-text token is an ordinary token here (a document
boundary), so a generation never stops early and every generation has the same length.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from reglab.mixins import RegularizedMixin, StepOutput


class LanguageModelModule(RegularizedMixin, L.LightningModule):
    """A GPT-2-style causal language model trained from scratch (see the module docstring).

    ``predict`` generates from each block's first ``prompt_length`` tokens and returns
    ``{"prompt", "tokens", "entropy"}``: the prompts, the ``max_new_tokens`` generated tokens and,
    per generated token, the entropy (nats) of the distribution it was chosen from.

    Args:
        vocab_size: the tokenizer's vocabulary size (filled from the DataModule by ``reglab``).
        n_layer, n_embd, n_head, n_positions: the ``GPT2Config`` sizes; ``n_positions`` bounds
            the training blocks and prompt plus generation.
        dropout: GPT-2's residual, embedding and attention dropout.
        lr, weight_decay, betas: AdamW's; weight decay applies to tensors of two or more dimensions
            (weight matrices and embeddings, as nanoGPT), not to biases and layer-norm gains.
        prompt_length, max_new_tokens, do_sample, temperature, top_p: ``predict``'s generation.

    Example:
        >>> module = LanguageModelModule(vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_positions=16,
        ...                              prompt_length=4, max_new_tokens=5)
        >>> tokens, logits = module.generate(torch.randint(0, 64, (2, 4)))
        >>> tokens.shape, logits.shape
        (torch.Size([2, 5]), torch.Size([2, 5, 64]))
    """

    provides = frozenset({"logits", "index"})

    def __init__(self, vocab_size: int | None = None, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                 n_positions: int = 128, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), prompt_length: int = 32, max_new_tokens: int = 96,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> None:
        super().__init__()
        if vocab_size is None:
            raise ValueError("LanguageModelModule needs vocab_size: pass the tokenizer's (e.g. datamodule.vocab_size), "
                             "or run through `reglab`, which fills it from the DataModule.")
        if n_embd % n_head:
            raise ValueError(f"LanguageModelModule: n_embd ({n_embd}) must be a multiple of n_head ({n_head}). "
                             "Fix: e.g. n_embd=128, n_head=4.")
        if prompt_length < 1 or max_new_tokens < 1 or prompt_length + max_new_tokens > n_positions:
            raise ValueError(f"LanguageModelModule: prompt_length ({prompt_length}) + max_new_tokens ({max_new_tokens}) "
                             f"must be positive and fit in n_positions ({n_positions}). Fix: shorten them or raise "
                             "n_positions.")
        self.save_hyperparameters()
        from transformers import GPT2Config, GPT2LMHeadModel

        # no bos / eos: generation runs for a fixed number of tokens (module docstring)
        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.model = GPT2LMHeadModel(config)
        self.val_perplexity, self.test_perplexity = Perplexity(), Perplexity()

    def forward(self, input_ids: Tensor) -> Tensor:
        """``(N, T, V)`` next-token logits of ``(N, T)`` token ids."""
        return self.model(input_ids=input_ids).logits

    # -- the step contract ---------------------------------------------------------------------
    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        ids = batch["input"]
        return StepOutput(logits=self(ids[:, :-1]), target=ids[:, 1:], index=batch.get("index"), batch=batch)

    def task_loss(self, out: StepOutput) -> Tensor:
        """Per block: the mean next-token cross-entropy over its positions (fp32)."""
        return F.cross_entropy(out.logits.float().transpose(1, 2), out.target, reduction="none").mean(1)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        metric = self.val_perplexity if stage == "val" else self.test_perplexity
        metric.update(out.logits.float(), out.target)
        self.log(f"{stage}/ppl", metric, on_epoch=True, prog_bar=stage == "val")

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Tensor, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None) -> tuple[Tensor, Tensor]:
        """``(N, max_new_tokens)`` tokens continuing ``(N, P)`` prompts and the ``(N, max_new_tokens, V)``
        logits each was chosen from (the model's, before any sampling warper); unset arguments are
        the module's. Runs in eval mode (no dropout) and restores the mode after."""
        from transformers import GenerationConfig

        h = self.hparams
        new = max_new_tokens or h.max_new_tokens
        if prompts.shape[1] + new > h.n_positions:
            raise ValueError(f"LanguageModelModule.generate: a prompt of {prompts.shape[1]} tokens plus {new} new ones "
                             f"exceeds n_positions={h.n_positions}. Fix: shorten the prompt or max_new_tokens.")
        sample = h.do_sample if do_sample is None else do_sample
        settings = dict(temperature=temperature or h.temperature, top_p=top_p or h.top_p) if sample else {}
        config = GenerationConfig(max_new_tokens=new, do_sample=sample, top_k=None,
                                  output_logits=True, return_dict_in_generate=True, **settings)
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                         generation_config=config)
        finally:
            self.model.train(was_training)
        return output.sequences[:, prompts.shape[1]:], torch.stack(output.logits, dim=1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        prompts = batch["input"][:, : self.hparams.prompt_length]
        tokens, logits = self.generate(prompts)
        log_p = torch.log_softmax(logits.float(), dim=-1)
        return {"prompt": prompts, "tokens": tokens, "entropy": -(log_p.exp() * log_p).sum(-1)}

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab, shape = getattr(datamodule, "vocab_size", None), getattr(datamodule, "input_shape", None)
        name, data = type(self).__name__, type(datamodule).__name__
        if vocab is not None and vocab > self.hparams.vocab_size:
            raise ValueError(f"{name} was built with vocab_size={self.hparams.vocab_size}, but {data} has "
                             f"vocab_size={vocab}. Fix: leave vocab_size unset in the config (`reglab` fills it in) "
                             "or build the module with datamodule.vocab_size.")
        if shape is not None and shape[-1] > self.hparams.n_positions:
            raise ValueError(f"{name} has n_positions={self.hparams.n_positions}, shorter than {data}'s blocks of "
                             f"{shape[-1]} tokens. Fix: n_positions >= block_size.")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        matrices = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return torch.optim.AdamW([{"params": matrices, "weight_decay": h.weight_decay},
                                  {"params": others, "weight_decay": 0.0}], lr=h.lr, betas=tuple(h.betas))
