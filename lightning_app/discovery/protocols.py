"""The ``discovery`` claim protocol: category discovery's arms through ``reglab bench effects``.

Per arm and seed: a :class:`~reglab.datamodules.DiscoveryDataModule` (the claim's ``data``
settings, the arm's ``data`` over them, the seed as its split seed) and a
:class:`~reglab.tasks.DiscoveryModule` (the arm's ``module`` arguments: SimGCD's loss by default,
``{sup_weight: 1.0, assign: kmeans}`` for the k-means baseline) with the arm's technique(s)
attached, fitted for ``epochs`` epochs without validation, and the last weights tested with
Lightning's ``trainer.test``. Metrics (Hungarian clustering accuracy,
:class:`~reglab.metrics.ClusteringAccuracy`, one assignment over all classes): ``pool_acc_all``,
``pool_acc_old``, ``pool_acc_new`` on the unlabelled training pool (the transductive score GCD and
SimGCD report) and ``acc_all``, ``acc_old``, ``acc_new`` on the held-out test split. No model
selection: the last epoch is reported, as SimGCD's code reports its last epoch.

An arm is ``{module, data, backbone, backbone_kwargs, epochs, pretrain_epochs, technique}`` (all
optional), so one claim can hold arms on two scenarios (the digits images and a tabular set).
``pretrain_epochs`` (a setting or an arm's, default 0) first trains the module on the labelled
samples only (``sup_weight: 1.0``: SimGCD's supervised terms), without the arm's techniques, and
starts the arm's fit from those weights: the known-class model that NCD methods such as Cr-KD
start from and distil (both arms of a claim get the same one)::

    name: simgcd
    protocol: discovery
    module: reglab.discovery.protocols
    settings: {epochs: 10, data: {source: digits, known_classes: [0, 1, 2, 3, 4]}}
    arms:
      feature_kmeans: {label: k-means, module: {sup_weight: 1.0, assign: kmeans}}
      simgcd: {label: SimGCD}
    checks:
      - {metric: pool_acc_new, direction: higher, arm: simgcd, against: feature_kmeans}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import (ClaimError, Protocol, arm_techniques, check_arm_techniques, fit_then_test, instantiate,
                                    register_protocol)
from reglab.datamodules import DiscoveryDataModule
from reglab.tasks import DiscoveryModule

ARM_FIELDS = ("module", "data", "backbone", "backbone_kwargs", "epochs", "pretrain_epochs", "technique")


@register_protocol("discovery")
class DiscoveryProtocol(Protocol):
    """Fit on labelled known classes and the unlabelled pool, score the clusters (module docstring)."""

    defaults = {"data": {"source": "digits", "known_classes": [0, 1, 2, 3, 4], "mode": "gcd"}, "backbone": "cnn",
                "backbone_kwargs": {}, "epochs": 10, "pretrain_epochs": 0, "batch_size": 64, "lr": 1e-3, "module": {}, "trainer": {}}

    def check_settings(self) -> None:
        self.data({}, seed=0)  # the DataModule's own checks: classes, fractions, mode

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(ARM_FIELDS))
        if unknown:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {unknown}. Fix: a discovery arm "
                             f"takes {list(ARM_FIELDS)} (and `label`).")
        check_arm_techniques(self.claim_name, arm, spec)
        data = self.data(spec, seed=0)
        try:  # the module's own checks: weights, temperatures, assignment
            self.module(spec, data)
        except (TypeError, ValueError) as error:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: {error}") from error

    def data(self, spec: dict[str, Any], seed: int) -> DiscoveryDataModule:
        options = {**self.settings["data"], **spec.get("data", {})}
        try:
            return DiscoveryDataModule(batch_size=self.settings["batch_size"], seed=seed, **options)
        except (TypeError, ValueError) as error:
            raise ClaimError(f"claim {self.claim_name}: the data settings do not make a discovery split: {error}") from error

    def module(self, spec: dict[str, Any], data: DiscoveryDataModule) -> DiscoveryModule:
        s = self.settings
        options = {"lr": s["lr"], **s["module"], **spec.get("module", {})}
        return DiscoveryModule(spec.get("backbone", s["backbone"]), input_shape=data.input_shape,
                               num_classes=data.num_classes, num_known_classes=data.num_known_classes,
                               backbone_kwargs=spec.get("backbone_kwargs", s["backbone_kwargs"]), **options)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        data = self.data(spec, seed)
        L.seed_everything(seed, verbose=False)
        module = self.module(spec, data)
        pretrain_epochs = spec.get("pretrain_epochs", self.settings["pretrain_epochs"])
        if pretrain_epochs:
            known = self.module({**spec, "module": {**spec.get("module", {}), "sup_weight": 1.0}}, data)
            # the known-class model's own test scores are not reported (its fit has no technique: spec {})
            fit_then_test(known, data, {}, pretrain_epochs, self.settings["trainer"])
            module.load_state_dict(known.state_dict())
        # no validation loop: the last epoch is reported (no model selection, module docstring)
        return fit_then_test(module, data, spec, spec.get("epochs", self.settings["epochs"]), self.settings["trainer"])

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Category discovery (`reglab.discovery.protocols`, protocol `discovery`): each arm's "
                f"`DiscoveryDataModule` (claim data {s['data']}, an arm's `data` over it; the seed splits the data) "
                "holds labelled samples of the known classes and an unlabelled pool (GCD: the known classes' "
                "unlabelled rest and every novel-class training sample; NCD: novel classes only). A "
                f"`DiscoveryModule` ({s['backbone']} backbone unless the arm names another; the arm's `module` "
                f"arguments) trains for {s['epochs']} epochs of batches of {s['batch_size']} (labelled and unlabelled "
                "samples in equal shares, two augmented views each)"
                + (f", starting from {s['pretrain_epochs']} epochs on the labelled samples only (SimGCD's supervised "
                   "terms: the known-class model)" if s["pretrain_epochs"] else "")
                + ", and the last weights are scored by Hungarian "
                "clustering accuracy (one assignment of clusters to classes over all classes, then accuracy on all "
                "samples, on those of old and of new classes): `pool_acc_*` on the unlabelled pool, `acc_*` on the "
                "held-out test split. The k-means arm trains on the labelled samples only and clusters the "
                "L2-normalized backbone features of the pool with scikit-learn's KMeans.", ""]
