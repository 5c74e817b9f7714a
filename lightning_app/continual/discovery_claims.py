"""The ``continual_discovery`` claim protocol: continual generalized category discovery (Happy, paper 02)
through the task-sequence runner.

It lives with the runner (the continual family's app module), not with the discovery protocols: it
needs the runner and the discovery task and data, which are core, and a family's app module may not
import another family's. The techniques it judges (SimGCD, Happy) are named by the claim file only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import (ClaimError, Protocol, arm_techniques, check_arm_techniques, instantiate,
                                    register_protocol)
from reglab.continual.claims import QUIET
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import ContinualDiscoveryDataModule, DiscoveryDataModule
from reglab.tasks import ContinualDiscoveryModule


@register_protocol("continual_discovery")
class ContinualDiscoveryProtocol(Protocol):
    """Continual GCD through :mod:`reglab.continual`'s task-sequence runner: per arm and seed a
    :class:`~reglab.datamodules.ContinualDiscoveryDataModule` (stage 0 labelled known classes, then
    ``num_stages`` unlabelled pools of old and new classes; the seed splits the data) and a
    :class:`~reglab.tasks.ContinualDiscoveryModule` with the arm's technique(s), ``epochs`` per
    stage. The runner's accuracy matrix (row t: after stage t; column j: the Hungarian accuracy on
    stage j's test classes, one assignment over all classes seen) gives ``old_acc`` (the known
    classes after the last stage), ``new_acc`` (the mean over the later stages' classes after the
    last stage), ``old_forgetting`` (the known classes' accuracy after stage 0 minus after the last),
    and the runner's ``average_accuracy`` and ``forgetting``.

    An arm is ``{technique}`` (optional, ``label``); the baseline arm (none) is SimGCD run stage by stage.
    """

    defaults = {"data": {"source": "digits", "known_classes": [0, 1, 2, 3], "labelled_fraction": 0.8, "flatten": True},
                "num_stages": 3, "new_share": 0.8, "backbone": "mlp", "backbone_kwargs": {}, "epochs": 5,
                "batch_size": 64, "lr": 1e-3, "module": {}, "trainer": {}}

    def check_settings(self) -> None:
        self.data(seed=0)

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - {"technique"})
        if unknown:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: unknown field(s) {unknown}. Fix: a continual "
                             "discovery arm takes `technique` (and `label`).")
        check_arm_techniques(self.claim_name, arm, spec)

    def data(self, seed: int) -> ContinualDiscoveryDataModule:
        s = self.settings
        try:
            base = DiscoveryDataModule(batch_size=s["batch_size"], seed=seed, mode="gcd", **s["data"])
            return ContinualDiscoveryDataModule(base, num_stages=s["num_stages"], new_share=s["new_share"])
        except (TypeError, ValueError) as error:
            raise ClaimError(f"claim {self.claim_name}: the data settings do not make continual stages: {error}") from error

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        data = self.data(seed)
        L.seed_everything(seed, verbose=False)
        module = ContinualDiscoveryModule(s["backbone"], input_shape=data.input_shape, num_classes=data.num_classes,
                                          num_known_classes=data.num_known_classes, backbone_kwargs=s["backbone_kwargs"],
                                          **{"lr": s["lr"], **s["module"]})
        techniques = [instantiate(t) for t in arm_techniques(spec)]
        trainer = {**QUIET, "max_epochs": s["epochs"], **s["trainer"]}
        runner = TaskSequenceRunner(module, data, techniques, trainer, run_dir=tempfile.mkdtemp(dir=workdir), log=False)
        matrix = runner.run()
        scores = runner.scores()
        last = matrix[-1]
        return {"old_acc": float(last[0]), "new_acc": float(last[1:].mean()),
                "old_forgetting": float(matrix[0, 0] - last[0]),
                "average_accuracy": scores["average_accuracy"], "forgetting": scores["forgetting"]}

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Continual GCD (`reglab.continual.discovery_claims`, protocol `continual_discovery`): "
                f"`ContinualDiscoveryDataModule` over {s['data']} with {s['num_stages']} unlabelled stages after the "
                f"labelled stage 0 (a new class puts {s['new_share']} of its training samples in its own stage, the "
                "rest in later ones; the known classes' unlabelled samples spread over all stages; no samples kept "
                f"between stages), a `ContinualDiscoveryModule` ({s['backbone']}) fitted {s['epochs']} epochs per stage "
                "by `reglab.continual.TaskSequenceRunner`; after each stage every stage's test classes are scored by "
                "Hungarian clustering accuracy (one assignment over the classes seen). `old_acc` / `new_acc`: known / "
                "later classes after the last stage; `old_forgetting`: known-class accuracy after stage 0 minus after "
                "the last.", ""]
