"""The ``tabular_ncd`` claim protocol: novel class discovery on tabular rows, with the number of
novel classes estimated and the model's hyperparameters tuned on hidden known classes.

Per arm and seed, a :class:`~reglab.datamodules.DiscoveryDataModule` in NCD mode (the claim's
``data``, the arm's ``data`` over it, the seed as its split seed), and one of two kinds of arm:

* **clustering on the rows** (``features: raw``): the pool's standardized rows clustered as they are
  by ``clustering`` (``kmeans``, ``ncd_kmeans``, ``ncd_spectral``) into the true number of novel
  classes or (``estimate_num_novel: true``) as many as the silhouette finds: the k-means baseline and
  the NCD-adapted clusterings without a model;
* **a trained model** (``technique``: :class:`~reglab.callbacks.category_discovery.TabularNCD`): a
  :class:`~reglab.tasks.DiscoveryModule` fitted ``epochs`` epochs with it and tested. With ``tune``
  (``{init argument: [values]}``) the technique's arguments are first chosen without novel labels:
  the known classes are cut into ``folds`` folds
  (:func:`~reglab.discovery.tabular.hidden_class_folds`); for each candidate and fold a model is
  fitted on a split whose known classes are the other folds and whose unlabelled pool holds the
  hidden fold's classes beside the real novel ones (the paper's split), scored by its clustering
  accuracy on the hidden classes' rows alone (no novel label is read), and the candidate of the best mean
  (:func:`~reglab.discovery.tabular.select_on_hidden_classes`) is fitted on the real split.

Metrics, the same for every arm: ``pool_acc_new`` (Hungarian accuracy on the pool's novel classes),
``num_novel`` (the cluster count used) and ``num_novel_error`` (its distance to the true count);
tuned arms add ``tuned_<argument>``. The module's own head is not scored (PBN never trains its
novel-class outputs).

    name: tabular_ncd
    protocol: tabular_ncd
    module: reglab.discovery.tabular_protocol
    settings: {data: {source: digits, flatten: true, known_classes: [0, 1, 2, 3, 4]}, epochs: 30}
    arms:
      kmeans: {features: raw, clustering: kmeans, estimate_num_novel: true}
      pbn:
        technique: {class_path: reglab.callbacks.category_discovery.TabularNCD}
        tune: {w: [0.2, 0.5, 0.8]}
    checks:
      - {metric: pool_acc_new, direction: higher, arm: pbn, against: kmeans}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import ClaimError, fit_then_test, register_protocol
from reglab.datamodules import DiscoveryDataModule

from .protocols import DiscoveryProtocol
from .tabular import CLUSTERINGS, discovery_scores, hidden_class_folds, select_on_hidden_classes

RAW_FIELDS = ("data", "features", "clustering", "estimate_num_novel")
MODEL_FIELDS = ("data", "technique", "tune", "epochs", "backbone_kwargs")
PREFIX = "tabular_ncd/"


@register_protocol("tabular_ncd")
class TabularNCDProtocol(DiscoveryProtocol):
    """Cluster the rows, or fit TabularNCD (tuned on hidden known classes), and score the pool (module docstring)."""

    defaults = {"data": {"source": "digits", "flatten": True, "known_classes": [0, 1, 2, 3, 4], "mode": "ncd"},
                "backbone": "mlp", "backbone_kwargs": {"hidden_sizes": [48, 32], "norm": "batch"}, "epochs": 30,
                "batch_size": 256, "lr": 1e-3, "module": {}, "trainer": {}, "folds": 2, "k_max": 30}

    def check_settings(self) -> None:
        if self.settings["data"].get("mode", "ncd") != "ncd":
            raise ClaimError(f"claim {self.claim_name}: protocol tabular_ncd is novel class discovery. Fix: data "
                             "mode ncd (or leave it out).")
        super().check_settings()

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        raw = spec.get("features") == "raw"
        fields = RAW_FIELDS if raw else MODEL_FIELDS
        unknown = sorted(set(spec) - set(fields) - {"label"})
        if unknown or (not raw and "technique" not in spec):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: an arm is either `features: raw` with "
                             f"{list(RAW_FIELDS[2:])}, or a `technique` (TabularNCD) with {list(MODEL_FIELDS[2:])}"
                             f"{f'; unknown field(s) {unknown}' if unknown else ''}. Fix: use those fields.")
        if raw and spec.get("clustering", "kmeans") not in CLUSTERINGS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: clustering {spec['clustering']!r}. Fix: one of "
                             f"{list(CLUSTERINGS)}.")
        data = self.data(spec, seed=0)
        if spec.get("tune"):
            try:
                hidden_class_folds(data.known_classes, self.settings["folds"])
            except ValueError as error:
                raise ClaimError(f"claim {self.claim_name}, arm {arm}: {error}") from error
        if not raw:
            super().check_arm(arm, {"technique": spec["technique"]})

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        if spec.get("features") == "raw":
            return self.cluster_rows(spec, seed)
        if not spec.get("tune"):
            return self.fit(spec, {}, seed)
        data = self.data(spec, seed)

        def score(candidate: dict[str, Any], kept: list[int], hidden: list[int]) -> float:
            # the hidden classes join the real novel ones in the pool and are scored alone (the paper's split)
            classes = {"known_classes": kept, "novel_classes": hidden + data.novel_classes}
            return self.fit(spec, {**candidate, "scored_classes": list(range(len(hidden)))}, seed, classes)["pool_acc_new"]

        best, _ = select_on_hidden_classes(spec["tune"], hidden_class_folds(data.known_classes, self.settings["folds"], seed),
                                           score)
        return {**self.fit(spec, best, seed), **{f"tuned_{name}": float(value) for name, value in best.items()}}

    def cluster_rows(self, spec: dict[str, Any], seed: int) -> dict[str, float]:
        """The pool's standardized rows clustered as they are (a `features: raw` arm)."""
        data = self.data(spec, seed)
        data.setup("fit")
        pool, train = data.pool_dataset, data.train_dataset
        labelled, known = train.extras["labelled"], data.num_known_classes
        return discovery_scores(pool.inputs.flatten(1).double().numpy(), train.inputs[labelled].flatten(1).double().numpy(),
                                train.targets[labelled].numpy(), (pool.extras["true_target"] - known).numpy(),
                                data.num_classes - known, spec.get("clustering", "kmeans"),
                                spec.get("estimate_num_novel", False), k_max=self.settings["k_max"], seed=seed)

    def fit(self, spec: dict[str, Any], arguments: dict[str, Any], seed: int,
            classes: dict[str, list[int]] | None = None) -> dict[str, float]:
        """Fit the module with the arm's TabularNCD (``arguments`` over its init args) on the split,
        or on ``classes`` (a hidden-class fold); the technique's test scores."""
        data = self.data({**spec, "data": {**spec.get("data", {}), **(classes or {})}}, seed)
        L.seed_everything(seed, verbose=False)
        module = self.module(spec, data)
        technique = spec["technique"]
        init_args = {"k_max": self.settings["k_max"], "seed": seed, **technique.get("init_args", {}), **arguments}
        logged = fit_then_test(module, data, {"technique": {**technique, "init_args": init_args}},
                               spec.get("epochs", self.settings["epochs"]), self.settings["trainer"])
        return {name.removeprefix(PREFIX): value for name, value in logged.items() if name.startswith(PREFIX)}

    def data(self, spec: dict[str, Any], seed: int) -> DiscoveryDataModule:
        return super().data({**spec, "data": {"mode": "ncd", **spec.get("data", {})}}, seed)

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Novel class discovery on tabular rows (`reglab.discovery.tabular_protocol`, protocol `tabular_ncd`): "
                f"each arm's `DiscoveryDataModule` in NCD mode (claim data {s['data']}, an arm's `data` over it; the seed "
                "splits the data) holds every training row of the known classes, labelled, and an unlabelled pool of the "
                "novel classes' training rows. Clustering arms cluster the pool's rows as they are (scikit-learn's k-means, "
                "NCD k-means seeded away from the known classes' centroids, or NCD spectral clustering). Model arms fit a "
                f"`DiscoveryModule` ({s['backbone']} {s['backbone_kwargs']}, Adam {s['lr']}, batches of {s['batch_size']}, "
                f"{s['epochs']} epochs) with TabularNCD (PBN: known-class cross-entropy and reconstruction) and cluster the "
                "pool in its latent space; a tuned arm first picks its arguments by "
                f"{s['folds']}-fold cross-validation over the known classes (each fold's classes hidden in the pool beside the "
                "real novel ones, the score on the hidden classes' rows alone). The number of novel classes is the truth or, where the arm "
                f"says so, the silhouette's choice in 2..{s['k_max']}. Scored: Hungarian accuracy on the pool's novel "
                "classes (`pool_acc_new`), the cluster count used (`num_novel`) and its distance to the true count "
                "(`num_novel_error`).", ""]
