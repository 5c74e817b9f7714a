"""Claim protocol of hyperfitting (paper 64, fine-tuning family), registered with ``reglab bench effects``.

``hyperfitting``: per seed the small causal language model of ``pretrain_config``
(:class:`~reglab.tasks.LanguageModelModule` on :class:`~reglab.datamodules.PydocTopicsDataModule`)
is pretrained once, with the seed as its ``seed_everything`` and data seed and ``pretrain_epochs``
epochs, fitted in a subprocess and cached by the derived config's content
(:func:`reglab.checkpoints.pretrained_checkpoint_for`). Each arm starts from that checkpoint,
fine-tunes it (or not) on ``train_blocks`` training blocks drawn with the seed, and generates
greedily ``new_tokens`` tokens from the first ``prompt_length`` tokens of each of the first
``prompts`` test blocks (documents no training block comes from). Metrics, on the generations:

* ``rep_<n>`` — :class:`~reglab.metrics.NgramRepetition`, the share of repeated n-grams per
  generation (``repetition_n``, Welleck et al.'s seq-rep-4 by default), averaged;
* ``distinct_1``, ``distinct_2`` — :class:`~reglab.metrics.DistinctN` over all generations;
* ``entropy`` — :class:`~reglab.metrics.PredictiveEntropy` of the distributions the greedy tokens
  were chosen from;
* ``copied_8`` — the share of generated 8-grams that occur in the arm's small training set (the
  paper asks whether hyperfitted models recite their training sequences; the pretrained arm's
  value is the baseline rate on the same set);

and ``val_ppl`` (perplexity on the validation documents), ``train_loss`` (the mean loss on the
arm's small set after its fit, in eval mode) and ``epochs`` (epochs trained). An arm's
``epochs`` (default the claim's ``max_epochs``; 0 = the pretrained model as it is) bounds its fit;
its ``technique`` (e.g. :class:`~reglab.callbacks.fine_tuning.Hyperfitting`) may end it earlier.
Every fine-tune is full-parameter AdamW at ``lr`` (constant, ``weight_decay``) on batches of
``batch_size``. The results page shows the first seed's first continuations per arm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor

from reglab.bench.protocols import ClaimError, Protocol, arm_techniques, check_arm_techniques, instantiate, register_protocol
from reglab.checkpoints import pretrained_checkpoint_of
from reglab.datamodules import PydocTopicsDataModule
from reglab.metrics import DistinctN, NgramRepetition, PredictiveEntropy
from reglab.metrics.generation import ngrams
from reglab.tasks import LanguageModelModule

TRAINER = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
#: continuations per arm shown on the results page (first seed)
SHOWN_SAMPLES = 2
#: n of the n-grams checked against the small training set (``copied_<n>``)
COPY_N = 8
#: prompts generated from at once (bounds the (prompts, new tokens, vocabulary) logits in memory)
GENERATION_BATCH = 64


@register_protocol("hyperfitting")
class HyperfittingProtocol(Protocol):
    """Pretrain once per seed, fine-tune (or not) on a few blocks, measure greedy generations (module docstring)."""

    defaults = {"pretrain_config": "configs/experiment/pydoc_lm.yaml", "pretrain_epochs": 4, "pretrain_trainer": {},
                "cache_dir": "runs/pretrained", "train_blocks": 32, "batch_size": 8, "lr": 3e-3,
                "weight_decay": 0.01, "max_epochs": 60, "prompts": 64, "prompt_length": 32, "new_tokens": 96,
                "repetition_n": 4, "trainer": {}}

    def check_settings(self) -> None:
        s = self.settings
        if not Path(s["pretrain_config"]).is_file():
            raise ClaimError(f"claim {self.claim_name}: pretrain_config {s['pretrain_config']} is not a file. Fix: give "
                             "a `reglab fit` config of a LanguageModelModule on PydocTopicsDataModule "
                             "(configs/experiment/pydoc_lm.yaml).")
        for key in ("train_blocks", "batch_size", "prompts", "prompt_length", "new_tokens", "repetition_n"):
            if not isinstance(s[key], int) or s[key] < 1:
                raise ClaimError(f"claim {self.claim_name}: {key}={s[key]!r} must be an integer >= 1.")
        if s["new_tokens"] < max(COPY_N, s["repetition_n"]):
            raise ClaimError(f"claim {self.claim_name}: new_tokens={s['new_tokens']} leaves no {s['repetition_n']}- or "
                             f"{COPY_N}-grams to count. Fix: new_tokens >= {max(COPY_N, s['repetition_n'])}.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - {"technique", "epochs"})
        epochs = spec.get("epochs", self.settings["max_epochs"])
        if unknown or not isinstance(epochs, int) or epochs < 0:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: fields {unknown} / epochs {epochs!r}. Fix: an arm of "
                             "protocol hyperfitting takes `technique` and `epochs` (an integer >= 0; 0 = no fine-tune).")
        if epochs == 0 and arm_techniques(spec):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: epochs 0 trains nothing, so its technique would "
                             "do nothing. Fix: give the arm epochs > 0 or no technique.")
        check_arm_techniques(self.claim_name, arm, spec)

    def pretraining(self, seed: int) -> dict[str, Any]:
        """The pretraining config for ``seed``: the source config with the seed and the epochs set."""
        s = self.settings
        config = yaml.safe_load(Path(s["pretrain_config"]).read_text())
        config["seed_everything"] = seed
        config["data"]["init_args"]["seed"] = seed
        config["trainer"] = {**config.get("trainer", {}), "max_epochs": s["pretrain_epochs"], **s["pretrain_trainer"]}
        return config

    def pretrained(self, seed: int) -> Path:
        """The seed's pretrained checkpoint, fitted once and cached (a derived config named by its content)."""
        s = self.settings
        return pretrained_checkpoint_of(self.pretraining(seed), f"{Path(s['pretrain_config']).stem}-seed{seed}", s["cache_dir"])

    def data(self, seed: int) -> PydocTopicsDataModule:
        """The pretraining's data (same split, so the same tokenizer), cut to the arm's small training set."""
        s = self.settings
        init_args = {**self.pretraining(seed)["data"]["init_args"], "max_train_blocks": s["train_blocks"],
                     "batch_size": s["batch_size"]}
        data = PydocTopicsDataModule(**init_args)
        data.setup("fit")
        return data

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        data = self.data(seed)
        module = LanguageModelModule.load_from_checkpoint(self.pretrained(seed), map_location="cpu", lr=s["lr"],
                                                          weight_decay=s["weight_decay"])
        epochs = spec.get("epochs", s["max_epochs"])
        trained = 0
        if epochs:
            L.seed_everything(seed, verbose=False)
            trainer = L.Trainer(**{**TRAINER, "max_epochs": epochs, "limit_val_batches": 0, **s["trainer"]},
                                callbacks=[instantiate(t) for t in arm_techniques(spec)])
            trainer.fit(module, datamodule=data)
            trained = trainer.current_epoch
        module.eval()
        metrics = self.generation_metrics(module, data)
        (validated,) = L.Trainer(**{**TRAINER, **s["trainer"]}).validate(module, datamodule=data, verbose=False)
        return {**metrics, "val_ppl": validated["val/ppl"], "train_loss": self.train_loss(module, data),
                "epochs": float(trained)}

    def generation_metrics(self, module: LanguageModelModule, data: PydocTopicsDataModule) -> dict[str, Any]:
        s = self.settings
        prompts = data.test_dataset.inputs[: s["prompts"], : s["prompt_length"]]
        n = s["repetition_n"]
        measures = {f"rep_{n}": NgramRepetition(n), "distinct_1": DistinctN(1), "distinct_2": DistinctN(2)}
        entropy = PredictiveEntropy()
        samples, tokens_of = [], []
        for batch in prompts.split(GENERATION_BATCH):
            tokens, logits = module.generate(batch.to(module.device), max_new_tokens=s["new_tokens"], do_sample=False)
            tokens_of.append(tokens.cpu())
            for measure in measures.values():
                measure.update(tokens.cpu())
            entropy.update(logits)
            samples += [(data.decode(p), data.decode(t)) for p, t in zip(batch[:SHOWN_SAMPLES - len(samples)], tokens)]
        values = {name: float(measure.compute()) for name, measure in measures.items()}
        return {**values, "entropy": float(entropy.compute()), f"copied_{COPY_N}": self.copied(tokens_of, data),
                "samples": [list(pair) for pair in samples]}

    @staticmethod
    def copied(generations: list[Tensor], data: PydocTopicsDataModule) -> float:
        """The share of generated ``COPY_N``-grams that occur in the small training set (the paper's
        question whether hyperfitted models just recite what they were fitted on)."""
        seen = {tuple(gram) for gram in ngrams(data.train_dataset.inputs, COPY_N).reshape(-1, COPY_N).tolist()}
        grams = torch.cat([ngrams(tokens, COPY_N).reshape(-1, COPY_N) for tokens in generations]).tolist()
        return sum(tuple(gram) in seen for gram in grams) / len(grams)

    @staticmethod
    @torch.no_grad()
    def train_loss(module: LanguageModelModule, data: PydocTopicsDataModule) -> float:
        """The mean per-block loss on the (small) training set, in eval mode."""
        blocks = data.train_dataset.inputs.to(module.device)
        return float(module.task_loss(module.forward_step({"input": blocks})).mean())

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Hyperfitting (`reglab.language_model_claims`, protocol `hyperfitting`): the language model of "
                f"`{s['pretrain_config']}` pretrained per seed for {s['pretrain_epochs']} epochs on the pydoc topics' "
                f"training documents; each arm fine-tunes it on {s['train_blocks']} of its training blocks (drawn with "
                f"the seed; AdamW lr {s['lr']}, weight decay {s['weight_decay']}, batches of {s['batch_size']}, at most "
                f"the arm's epochs) or not, then continues the first {s['prompt_length']} tokens of {s['prompts']} "
                f"test blocks greedily for {s['new_tokens']} tokens. `rep_{s['repetition_n']}`: share of repeated "
                f"{s['repetition_n']}-grams per continuation; `distinct_1` / `distinct_2`: distinct uni- / bigrams over "
                "all continuations; `entropy`: mean entropy (nats) of the distributions the greedy tokens came from; "
                "`copied_8`: share of generated 8-grams found in the small set; `val_ppl`: validation perplexity; `train_loss`: loss on the arm's small set after its fit.", ""]

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        lines = ["## Greedy continuations (first seed; the prompt, then ` ▶ ` and the continuation)", ""]
        for arm, arm_runs in runs.items():
            for prompt, continuation in arm_runs[0].get("samples", []):
                lines += [f"**{arm}**:", "", "```text", f"{prompt} ▶ {continuation}", "```", ""]
        return lines
