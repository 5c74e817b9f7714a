"""The ``domains`` claim protocol: DomainBed's leave-one-domain-out sweep, registered with ``reglab bench effects``.

The scenario is :class:`~reglab.datamodules.DomainDigitsDataModule` (the digits as five domains:
upright, rotated, coloured, noisy, inverted). Per arm and seed, every domain ``d`` of
``held_out`` (default: each of ``domains`` in turn) is held out once: for every learning rate of
the arm's grid a :class:`~reglab.tasks.ClassificationModule` is fitted on the other domains (with
the arm's technique(s)), then measured with Lightning's ``trainer.test`` — so a technique that
adapts at test time takes part in every number — on each training domain's ``out`` part, the
held-out domain's ``out`` part and its ``in`` part. The learning rate is chosen two ways, as in
DomainBed's ``model_selection.py``:

* training-domain validation (``IIDAccuracySelectionMethod``, DomainBed's default): the rate with
  the best mean accuracy over the training domains' ``out`` parts;
* oracle (``OracleSelectionMethod``, test-domain validation): the rate with the best accuracy on
  the held-out domain's ``out`` part.

Metrics, for every held-out domain ``d``: ``<d>`` (held-out ``in``-part accuracy at the rate
training-domain validation chose), ``oracle/<d>`` (at the rate the oracle chose), ``lr/<d>``
(the rate training-domain validation chose); and ``average`` / ``oracle/average`` over the
held-out domains. Each evaluation starts from the fitted weights (restored before every
``trainer.test``), so one test run's adaptation never leaks into the next.

Where the miniature departs from DomainBed: the search is over a learning-rate grid shared by the
arms (DomainBed draws 20 random hyper-parameter sets per algorithm, its own distribution each);
selection is among the final models only (DomainBed's training-domain validation also picks the
best of the checkpoints taken every ``checkpoint_freq`` steps; its oracle takes the last one, as
here); training runs whole epochs over domain-balanced batches drawn without replacement
(DomainBed draws every domain's minibatch with replacement for a fixed number of steps).

An arm is ``{technique, lr, lr_grid}`` (all optional): ``technique`` one ``{class_path,
init_args}`` or a list of them to stack; no technique is ERM (the plain module). The grid is the
arm's ``lr_grid``, else its ``lr`` alone, else the claim's ``lr_grid``, else the claim's ``lr``.
A claim file names ``module: reglab.domain_claims``; claims that use the same ``settings`` share
their arms' runs (ERM runs once for all of them)::

    name: coral
    claim: "..."
    techniques: [coral]
    protocol: domains
    module: reglab.domain_claims
    seeds: 3
    settings: {domains: [upright, rotated, coloured, noisy, inverted], backbone: cnn, epochs: 10, batch_size: 60,
               lr_grid: [0.001, 0.003]}
    arms:
      erm: {label: ERM}
      coral: {label: CORAL, technique: {class_path: reglab.callbacks.baselines.CORAL}}
    checks:
      - {metric: average, direction: higher, arm: coral, against: erm}
    smoke: {settings: {held_out: [coloured], epochs: 1, lr_grid: [0.001], trainer: {limit_train_batches: 2}}}

Settings: ``domains``, ``held_out`` (``null``: each domain in turn), ``backbone`` and
``backbone_kwargs``, ``epochs``, ``batch_size`` (a multiple of the training domains), ``lr``,
``lr_grid``, ``data`` (further :class:`~reglab.datamodules.DomainDigitsDataModule` arguments:
``rotation``, ``colour_correlation``, ``noise_std``, ``holdout_fraction``) and ``trainer``
(further ``L.Trainer`` arguments, e.g. ``precision``).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.effects import mean_std
from reglab.bench.protocols import (ClaimError, Protocol, arm_techniques, check_arm_techniques, instantiate,
                                     register_protocol)
from reglab.datamodules import DOMAINS, DomainDigitsDataModule
from reglab.tasks import ClassificationModule

ARM_FIELDS = ("technique", "lr", "lr_grid")


@dataclass(frozen=True)
class HeldOutFit:
    """One fit with one domain held out, at one learning rate, measured on every part selection reads."""

    lr: float
    training_domain_val: float  #: mean accuracy over the training domains' ``out`` parts
    held_out_val: float  #: accuracy on the held-out domain's ``out`` part (the oracle's validation)
    held_out_test: float  #: accuracy on the held-out domain's ``in`` part (what is reported)


def select(domain: str, fits: list[HeldOutFit]) -> dict[str, float]:
    """The metrics of held-out ``domain`` from its fits (one per learning rate): the test accuracy
    of the fit with the best training-domain validation (``<domain>``, and its rate ``lr/<domain>``)
    and of the fit with the best held-out validation (``oracle/<domain>``). Ties go to the
    earlier rate of the grid."""
    chosen = max(fits, key=lambda fit: fit.training_domain_val)
    oracle = max(fits, key=lambda fit: fit.held_out_val)
    return {domain: chosen.held_out_test, f"oracle/{domain}": oracle.held_out_test, f"lr/{domain}": chosen.lr}


@register_protocol("domains")
class DomainsProtocol(Protocol):
    """Leave-one-domain-out on :class:`~reglab.datamodules.DomainDigitsDataModule` (module docstring)."""

    defaults = {"domains": list(DOMAINS), "held_out": None, "backbone": "cnn", "backbone_kwargs": {}, "epochs": 10,
                "batch_size": 60, "lr": 1e-3, "lr_grid": None, "data": {}, "trainer": {}}

    def check_settings(self) -> None:
        s = self.settings
        if len(set(self.held_out_domains())) != len(self.held_out_domains()):
            raise ClaimError(f"claim {self.claim_name}: held_out {s['held_out']} repeats a domain. Fix: list each once.")
        for domain in self.held_out_domains():
            try:  # the DataModule's own checks: known domains, a batch size every split divides
                DomainDigitsDataModule(domains=s["domains"], held_out=[domain], batch_size=s["batch_size"], **s["data"])
            except (TypeError, ValueError) as error:
                raise ClaimError(f"claim {self.claim_name}: settings do not make the scenario holding out {domain!r}: "
                                 f"{error}") from error
        self.check_grid("the claim's", s["lr_grid"])

    def check_grid(self, whose: str, grid: Any) -> None:
        if grid is not None and (not isinstance(grid, list) or not grid or
                                 not all(isinstance(lr, (int, float)) and lr > 0 for lr in grid)):
            raise ClaimError(f"claim {self.claim_name}: {whose} lr_grid must be a non-empty list of positive learning "
                             f"rates, got {grid!r}. Fix: write e.g. `lr_grid: [0.001, 0.003]`.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(ARM_FIELDS))
        if unknown:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {unknown}. Fix: a domains arm "
                             f"takes {list(ARM_FIELDS)} (and `label`).")
        self.check_grid(f"arm {arm}'s", spec.get("lr_grid"))
        check_arm_techniques(self.claim_name, arm, spec)

    def held_out_domains(self) -> list[str]:
        held_out = self.settings["held_out"]
        return list(self.settings["domains"] if held_out is None else held_out)

    def grid(self, spec: dict[str, Any]) -> list[float]:
        if spec.get("lr_grid"):
            return spec["lr_grid"]
        if "lr" in spec:
            return [spec["lr"]]
        return self.settings["lr_grid"] or [self.settings["lr"]]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        for domain in self.held_out_domains():
            metrics.update(select(domain, [self.fit(spec, domain, lr, seed) for lr in self.grid(spec)]))
        held_out = self.held_out_domains()
        metrics["average"] = statistics.fmean(metrics[d] for d in held_out)
        metrics["oracle/average"] = statistics.fmean(metrics[f"oracle/{d}"] for d in held_out)
        return metrics

    def fit(self, spec: dict[str, Any], held_out: str, lr: float, seed: int) -> HeldOutFit:
        """Train with ``held_out`` held out at ``lr``, then test on every part selection reads."""
        s = self.settings
        data = DomainDigitsDataModule(domains=s["domains"], held_out=[held_out], batch_size=s["batch_size"], seed=seed,
                                      **s["data"])
        L.seed_everything(seed, verbose=False)
        module = ClassificationModule(s["backbone"], num_classes=data.num_classes, input_shape=data.input_shape,
                                      backbone_kwargs=s["backbone_kwargs"], lr=lr)
        # no validation loop during fit: selection reads its own test runs after it
        trainer = L.Trainer(**{"max_epochs": s["epochs"], "accelerator": "auto", "devices": 1, "logger": False,
                               "enable_checkpointing": False, "enable_progress_bar": False,
                               "enable_model_summary": False, "limit_val_batches": 0, **s["trainer"]},
                            callbacks=[instantiate(technique) for technique in arm_techniques(spec)])
        trainer.fit(module, datamodule=data)
        fitted = copy.deepcopy(module.state_dict())

        def accuracy(domain: str, part: str) -> float:
            module.load_state_dict(fitted)
            (logged,) = trainer.test(module, datamodule=data.evaluation_view(domain, part), verbose=False)
            return logged["test/acc"]

        return HeldOutFit(lr=lr, training_domain_val=statistics.fmean(accuracy(d, "out") for d in data.train_domains),
                          held_out_val=accuracy(held_out, "out"), held_out_test=accuracy(held_out, "in"))

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Leave-one-domain-out on `DomainDigitsDataModule` (`reglab.domain_claims`, protocol `domains`): domains "
                f"{s['domains']}, each of {self.held_out_domains()} held out in turn, {s['backbone']} backbone, "
                f"{s['epochs']} epochs of domain-balanced batches of {s['batch_size']}. Per held-out domain `d`: `d` is "
                "its test accuracy (the domain's `in` part) at the learning rate chosen by training-domain validation "
                "(mean accuracy on the training domains' `out` parts, DomainBed's default), `oracle/d` at the rate "
                "chosen on the held-out domain's `out` part (DomainBed's test-domain validation), `lr/d` the rate "
                "training-domain validation chose; `average` / `oracle/average` over the held-out domains. Every "
                "accuracy is measured by `trainer.test`, so test-time adaptation takes part.", ""]

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        """The leave-one-domain-out tables: rows arms, columns the held-out domains and their average
        (mean ± std over seeds), for each selection."""
        domains = self.held_out_domains()
        lines = []
        for title, prefix in (("training-domain validation", ""), ("oracle, test-domain validation", "oracle/")):
            lines += [f"## Leave-one-domain-out accuracy ({title})", "",
                      "| arm | " + " | ".join(domains) + " | average |", "|---|" + "---|" * (len(domains) + 1)]
            for arm, seeds in runs.items():
                cells = [mean_std([run[prefix + d] for run in seeds]) for d in (*domains, "average")]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
            lines.append("")
        return lines

