"""The ``retrieval`` claim protocol: metric learning's open-world split, registered with ``reglab bench effects``;
and ``matched_fit`` (:class:`MatchedFitProtocol`): the ``fit`` protocol with one knob of an arm chosen per seed
on validation, to match another arm (sparse retrieval at equal sparsity).

The scenario is :class:`~reglab.datamodules.OpenWorldDigitsDataModule`: per arm and seed an
:class:`~reglab.tasks.EmbeddingModule` with the arm's metric loss (and miner) is fitted on the
``seen_classes`` (class-balanced batches: ``m_per_class`` samples of each of ``batch_size /
m_per_class`` classes), with the arm's technique(s) attached, for ``epochs`` epochs; the last
weights are measured with Lightning's ``trainer.test`` on every image of the unseen classes, each
querying all the others (:class:`~reglab.metrics.RecallAtK`). Metrics: ``recall_at_<k>`` for each
``k`` of ``recall_ks``, ``map_at_r``, ``mrr`` and ``opis`` (threshold inconsistency across the
classes, :class:`~reglab.metrics.OPIS`), all on the unseen classes.

Where the miniature departs from the benchmarks (Musgrave et al., "A Metric Learning Reality
Check", ECCV 2020): no model selection (the benchmarks pick the best epoch on validation classes;
here the last epoch is reported, so no arm profits from more looks), one small learning rate for
every arm unless an arm sets its own, and the digits (five seen, five unseen classes) stand in for
CUB / Cars / SOP.

An arm is ``{loss, loss_kwargs, miner, miner_kwargs, lr, technique}`` (all optional; the claim's
``loss`` setting, else :class:`~reglab.tasks.EmbeddingModule`'s defaults): ``technique`` one
``{class_path, init_args}`` or a list of them to stack; no technique is the plain metric loss. A
claim file names ``module: reglab.retrieval_claims``; claims with the same ``settings`` share their
arms' runs::

    name: tcm
    claim: "..."
    techniques: [tcm]
    protocol: retrieval
    module: reglab.retrieval_claims
    seeds: 3
    settings: {epochs: 15, batch_size: 40, m_per_class: 8, loss: multi_similarity}
    arms:
      base: {label: multi-similarity}
      tcm: {label: multi-similarity + TCM, technique: {class_path: reglab.callbacks.metric_learning.TCM}}
    checks:
      - {metric: recall_at_1, direction: at_least, arm: tcm, against: base, margin: 0.01}
    smoke: {settings: {epochs: 1, trainer: {limit_train_batches: 2}}}

Settings: ``seen_classes``, ``backbone`` and ``backbone_kwargs``, ``embedding_dim``, ``epochs``,
``batch_size``, ``m_per_class`` (``null``: uniform shuffle), ``lr``, ``loss``, ``recall_ks``,
``data`` (further :class:`~reglab.datamodules.OpenWorldDigitsDataModule` arguments, e.g.
``val_fraction``) and ``trainer`` (further ``L.Trainer`` arguments, e.g. ``precision``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.fit import FitProtocol
from reglab.bench.protocols import ClaimError, Protocol, check_arm_techniques, fit_then_test, register_protocol
from reglab.datamodules import OpenWorldDigitsDataModule
from reglab.tasks import EmbeddingModule

ARM_FIELDS = ("loss", "loss_kwargs", "miner", "miner_kwargs", "lr", "technique")


@register_protocol("retrieval")
class RetrievalProtocol(Protocol):
    """Fit on the seen classes, retrieve among the unseen (module docstring)."""

    defaults = {"seen_classes": [0, 1, 2, 3, 4], "backbone": "cnn", "backbone_kwargs": {}, "embedding_dim": 64,
                "epochs": 10, "batch_size": 40, "m_per_class": 8, "lr": 1e-3, "loss": "multi_similarity",
                "recall_ks": [1, 2, 4, 8], "data": {}, "trainer": {}}

    def check_settings(self) -> None:
        self.data(seed=0)  # the DataModule's own checks: seen classes, a batch the sampler can fill

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(ARM_FIELDS))
        if unknown:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {unknown}. Fix: a retrieval arm "
                             f"takes {list(ARM_FIELDS)} (and `label`).")
        check_arm_techniques(self.claim_name, arm, spec)
        try:  # the module's own checks: a known loss and miner, arguments they take
            self.module(spec, (1, 8, 8))
        except (TypeError, ValueError) as error:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: {error}") from error

    def data(self, seed: int) -> OpenWorldDigitsDataModule:
        s = self.settings
        try:
            return OpenWorldDigitsDataModule(seen_classes=s["seen_classes"], m_per_class=s["m_per_class"],
                                             batch_size=s["batch_size"], seed=seed, **s["data"])
        except (TypeError, ValueError) as error:
            raise ClaimError(f"claim {self.claim_name}: settings do not make the open-world split: {error}") from error

    def module(self, spec: dict[str, Any], input_shape: tuple[int, ...]) -> EmbeddingModule:
        s = self.settings
        options = {key: spec[key] for key in ("loss_kwargs", "miner", "miner_kwargs") if key in spec}
        return EmbeddingModule(s["backbone"], input_shape=input_shape, embedding_dim=s["embedding_dim"],
                               loss=spec.get("loss", s["loss"]), recall_ks=s["recall_ks"], lr=spec.get("lr", s["lr"]),
                               backbone_kwargs=s["backbone_kwargs"], **options)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        data = self.data(seed)
        L.seed_everything(seed, verbose=False)
        module = self.module(spec, data.input_shape)
        # no validation loop: the last epoch is reported (no model selection, module docstring)
        return fit_then_test(module, data, spec, self.settings["epochs"], self.settings["trainer"])

    def describe(self) -> list[str]:
        s = self.settings
        unseen = sorted(set(range(10)) - set(s["seen_classes"]))
        batches = "uniformly shuffled" if s["m_per_class"] is None else f"{s['m_per_class']} per class"
        return [f"Open-world retrieval on the digits (`reglab.retrieval_claims`, protocol `retrieval`): an "
                f"`EmbeddingModule` ({s['backbone']} backbone, {s['embedding_dim']}-d L2-normalised embedding) is "
                f"trained on classes {s['seen_classes']} for {s['epochs']} epochs of batches of {s['batch_size']} "
                f"({batches}), and the last weights are tested on every image of classes {unseen}, "
                "each querying all the others by cosine similarity: `recall_at_k` is the share of queries with a "
                "same-class image among their k nearest, `map_at_r` the mean average precision over each query's "
                "first R neighbours (R its class's other images), `mrr` the mean reciprocal rank of the first "
                "same-class neighbour; `opis` the variance across the unseen classes of the F1 of TPR and TNR at "
                "one cosine threshold, averaged over the thresholds where the overall false accept rate is 1e-3 to "
                "1e-1 (lower: one threshold serves every class alike).", ""]



@register_protocol("matched_fit")
class MatchedFitProtocol(FitProtocol):
    """The ``fit`` protocol with one knob of an arm chosen per seed on validation, to match another arm.

    An arm with ``select: {key, values, metric, at_most}`` is fitted with ``--<key>=<value>`` for each of
    ``values`` in turn (ascending: a knob that lowers ``metric``) until a fit's last validation ``metric``
    is at most the ``at_most`` arm's (same seed); that fit is tested and later values are not tried. If
    none gets there, the last value's fit is tested (and the claim's check on the metric shows it). The
    test split plays no part in the choice. The arm reports, besides what ``trainer.test`` logs, its
    validation ``metric``, ``selected`` (the value) and ``tried`` (how many fits it took); the ``at_most``
    arm runs as in ``fit`` and reports its validation ``metric`` too.

    Written for "ranking metric at equal sparsity" (paper 63): a passage's non-zero weights do not depend
    on the queries, so ``val/doc_nonzeros`` is the sparsity the test sees, measured without the test queries::

        protocol: matched_fit
        module: reglab.retrieval_claims
        settings: {configs: [configs/experiment/text_sparse_retrieval.yaml]}
        arms:
          flops_regularizer: {configs: [configs/technique/flops_regularizer.yaml]}
          inference_free_sparse_retrieval:
            configs: [configs/technique/inference_free_sparse_retrieval.yaml]
            select: {key: techniques.inference_free_sparse_retrieval.init_args.weight, values: [0.1, 0.2, 0.4],
                     metric: val/doc_nonzeros, at_most: flops_regularizer}
    """

    SELECT_FIELDS = ("key", "values", "metric", "at_most")

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        self.arm_specs: dict[str, dict[str, Any]] = {}
        self.fits: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        select = spec.get("select")
        if select is not None:
            where = f"claim {self.claim_name}, arm {arm}: `select`"
            if not isinstance(select, dict) or sorted(select) != sorted(self.SELECT_FIELDS):
                raise ClaimError(f"{where} takes exactly {list(self.SELECT_FIELDS)}, got {select!r}. Fix: e.g. "
                                 "`select: {key: techniques.<id>.init_args.weight, values: [0.1, 0.2], metric: "
                                 "val/doc_nonzeros, at_most: <baseline arm>}`.")
            values = select["values"]
            if not isinstance(values, list) or not values or sorted(values) != values:
                raise ClaimError(f"{where}: values must be a non-empty ascending list, got {values!r}. Fix: sort them.")
            reference = self.arm_specs.get(select["at_most"])
            if reference is None or "select" in reference:
                raise ClaimError(f"{where}: at_most must name an arm listed before this one, without `select`, got "
                                 f"{select['at_most']!r}. Fix: list the baseline arm first and name it.")
        super().check_arm(arm, {key: value for key, value in spec.items() if key != "select"})
        self.arm_specs[arm] = spec

    def fitted(self, spec: dict[str, Any], seed: int, workdir: Path,
               overrides: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, float]]:
        """One fit's test metrics and last validation metrics, run once per (configs, seed, overrides): the
        ``at_most`` arm's fit serves its own row and the cap of the arms matched to it."""
        key = json.dumps([spec.get("configs", []), seed, overrides])
        if key not in self.fits:
            cli, history = self.fit(self.arguments(spec, seed, workdir) + list(overrides))
            validated = {name: float(value) for name, value in cli.trainer.callback_metrics.items()
                         if name.startswith("val/")}
            self.fits[key] = (self.test(cli, history), validated)
        return self.fits[key]

    def validated(self, validation: dict[str, float], metric: str) -> float:
        if metric not in validation:
            raise ClaimError(f"claim {self.claim_name}: the last validation logged no {metric!r} (logged: "
                             f"{sorted(validation)}). Fix: name a logged val/ metric and keep validation on.")
        return validation[metric]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        select = spec.get("select")
        if select is None:
            tested, validation = self.fitted(spec, seed, workdir)
            matched = {s["select"]["metric"] for s in self.arm_specs.values() if (s.get("select") or {}).get("at_most") == arm}
            return {**tested, **{metric: self.validated(validation, metric) for metric in sorted(matched)}}
        metric = select["metric"]
        cap = self.validated(self.fitted(self.arm_specs[select["at_most"]], seed, workdir)[1], metric)
        for tried, value in enumerate(select["values"], 1):
            tested, validation = self.fitted(spec, seed, workdir, (f"--{select['key']}={value}",))
            measured = self.validated(validation, metric)
            print(f"[{self.claim_name}] seed {seed} {arm}: {select['key']}={value}: {metric} {measured:.4g} "
                  f"(at most {cap:.4g} wanted)", flush=True)
            if measured <= cap:
                break
        return {**tested, metric: validation[metric], "selected": float(value), "tried": float(tried)}
