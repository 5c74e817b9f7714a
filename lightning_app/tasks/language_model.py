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
``reglab generate`` (:func:`main`) writes a checkpoint's continuations of test prompts as text,
with their repetition, distinct-n and entropy.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
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


def main(argv: list[str] | None = None) -> None:
    """``reglab generate``: a checkpoint's continuations of the first test blocks, as text, and their measures.

    Rebuilds the DataModule of the training config (``--config``: its ``data`` section, so the
    same split and tokenizer), continues the first ``prompt_length`` tokens of the first
    ``--prompts`` test blocks and writes ``<out>/generations.md`` (prompt, then ``▶`` and the
    continuation) and ``<out>/generations.json`` (``rep_4``, ``distinct_1``, ``distinct_2``,
    ``entropy``). An existing output file is never overwritten.

    Example (shell)::

        reglab generate --ckpt runs/pydoc_lm/version_0/checkpoints/last.ckpt \\
            --config configs/experiment/pydoc_lm.yaml --out generations/
    """
    from reglab.metrics import DistinctN, NgramRepetition, PredictiveEntropy

    parser = argparse.ArgumentParser(prog="reglab generate", description=main.__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a LanguageModelModule checkpoint")
    parser.add_argument("--config", required=True, help="the `reglab fit` config it was trained with (its data)")
    parser.add_argument("--out", required=True, help="folder for generations.md and generations.json")
    parser.add_argument("--prompts", type=int, default=8, help="test blocks to continue")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the module's")
    parser.add_argument("--sample", action="store_true", help="sample (the module's temperature / top_p), not greedy")
    args = parser.parse_args(argv)
    out = Path(args.out)
    written = [out / "generations.md", out / "generations.json"]
    if any(path.exists() for path in written):
        raise SystemExit(f"reglab generate: {out} already holds generations. Fix: give a new --out folder.")
    import yaml

    spec = yaml.safe_load(Path(args.config).read_text())["data"]
    module_name, _, name = spec["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), name)(**spec.get("init_args", {}))
    data.setup("predict")
    module = LanguageModelModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    prompts = data.test_dataset.inputs[: args.prompts, : module.hparams.prompt_length]
    tokens, logits = module.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    measures = {"rep_4": NgramRepetition(4), "distinct_1": DistinctN(1), "distinct_2": DistinctN(2),
                "entropy": PredictiveEntropy()}
    for key, measure in measures.items():
        measure.update(logits if key == "entropy" else tokens)
    values = {key: float(measure.compute()) for key, measure in measures.items()}
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Continuations of {len(prompts)} test prompts ({'sampled' if args.sample else 'greedy'})", ""]
    for prompt, continuation in zip(prompts, tokens):
        lines += ["```text", f"{data.decode(prompt)} ▶ {data.decode(continuation)}", "```", ""]
    written[0].write_text("\n".join(lines))
    written[1].write_text(json.dumps({"checkpoint": str(args.ckpt), **values}, indent=2) + "\n")
    print(f"wrote {written[0]} and {written[1]}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
