"""The ``tabular_probe`` claim protocol (self-supervised pretraining on tabular data), registered with
``reglab bench effects``.

Per arm and seed s: the tabular set ``data`` (a ``reglab.datamodules`` class path and its init args,
with ``seed: s``) is split and standardized; the arm's representation of every split is computed; a
linear probe (scikit-learn's ``LogisticRegression``, ``probe_c``, on the representation standardized
with training statistics) is fitted on the training split and scored on the test split
(``test/acc``) and the validation split (``val/acc``). An arm's spec is ``representation``:

* ``raw``: the input features as they are (the ``raw_features`` baseline);
* ``technique``: the representation of a self-supervised technique (``technique: {class_path,
  init_args}``, with a ``represent(x)`` method, e.g. ``reglab.callbacks.TJEPA``), pretrained by a
  ``reglab`` fit of an MLP ``ClassificationModule`` on the training split for ``epochs`` epochs
  (``lr``, ``batch_size``; ``seed_everything(s)``); a label-free technique never sees the labels.

A claim file names ``module: reglab.ssl_claims``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from reglab.bench.protocols import ClaimError, Protocol, instantiate, register_protocol
from reglab.tasks import ClassificationModule

REPRESENTATIONS = ("raw", "technique")


@register_protocol("tabular_probe")
class TabularProbeProtocol(Protocol):
    defaults = {
        "data": {"class_path": "reglab.datamodules.TabularDataModule", "init_args": {"name": "wine"}},
        "epochs": 100,
        "lr": 1e-4,
        "batch_size": 64,
        "limit_train_batches": 1.0,
        "probe_c": 1.0,
        "probe_max_iter": 2000,
    }

    def check_settings(self) -> None:
        if not isinstance(self.settings["data"], dict) or "class_path" not in self.settings["data"]:
            raise ClaimError(f"claim {self.claim_name}: `data` is {{class_path, init_args}}, got {self.settings['data']}")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if spec.get("representation") not in REPRESENTATIONS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: `representation` is one of {list(REPRESENTATIONS)}, "
                             f"got {spec.get('representation')!r}")
        expected = {"representation", "technique"} if spec["representation"] == "technique" else {"representation"}
        if set(spec) != expected:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a {spec['representation']} arm has exactly the "
                             f"fields {sorted(expected)}, got {sorted(spec)}")

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Data `{s['data']['class_path']}` {s['data'].get('init_args', {})}; pretraining {s['epochs']} epochs "
                f"(lr {s['lr']}, batch {s['batch_size']}) of an MLP module with the technique; linear probe: "
                f"LogisticRegression(C={s['probe_c']}) on standardized representations, test/acc on the test split.", ""]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        data_spec = {**s["data"], "init_args": {**s["data"].get("init_args", {}), "seed": seed,
                                                 "batch_size": s["batch_size"]}}
        data = instantiate(data_spec)
        data.setup("fit")
        data.setup("test")
        splits = {name: getattr(data, f"{name}_dataset") for name in ("train", "val", "test")}
        if spec["representation"] == "raw":
            represent = _identity
        else:
            represent = self.pretrain(instantiate(spec["technique"]), data, seed, workdir).represent
        features = {name: represent(split.inputs).cpu().numpy() for name, split in splits.items()}
        scaler = StandardScaler().fit(features["train"])
        probe = LogisticRegression(C=s["probe_c"], max_iter=s["probe_max_iter"])
        probe.fit(scaler.transform(features["train"]), splits["train"].targets.numpy())
        return {f"{name}/acc": float(probe.score(scaler.transform(features[name]), splits[name].targets.numpy()))
                for name in ("val", "test")} | {"representation_dim": features["train"].shape[1]}

    def pretrain(self, technique: Any, data: Any, seed: int, workdir: Path) -> Any:
        """Fit an MLP module with ``technique`` on ``data``'s training split; the fitted technique."""
        s = self.settings
        L.seed_everything(seed, verbose=False)
        module = ClassificationModule("mlp", num_classes=data.num_classes, input_shape=data.input_shape, lr=s["lr"])
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=s["epochs"], callbacks=[technique],
                            limit_train_batches=s["limit_train_batches"], limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(workdir))
        trainer.fit(module, datamodule=data)
        return technique


def _identity(inputs: torch.Tensor) -> torch.Tensor:
    return inputs
