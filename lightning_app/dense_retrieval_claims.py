"""The ``dense_soup`` claims protocol: dense retrieval fine-tunes and a soup of them (KaLM-Embedding-V2's
recipe, paper 59), registered with ``reglab bench effects``.

It is the ``fit`` protocol (:mod:`reglab.bench.fit`: the shared ``configs`` plus an arm's, seeded,
then ``trainer.test``) with one more kind of arm. An arm without ``soup`` is one fit, ingredient 0.
An arm with ``soup: uniform`` or ``soup: greedy`` fits ``len(ingredient_overrides)`` ingredients
of its configs — ingredient ``i`` adds ``ingredient_overrides[i]`` (e.g. another learning rate) and
``seed_everything = seed + 1000·i``; ingredient 0 adds nothing, so it *is* the single-fit arm of
the same configs and is fitted once for both — then soups their last checkpoints with
``reglab soup`` (greedy ranks by ``soup_metric`` on the validation split, never the test split)
and tests the soup. A soup arm also reports ``ingredients_kept`` and each ingredient's test
metrics as ``ingredient<i>:<metric>`` (not judged).

A claim file names ``module: reglab.dense_retrieval_claims``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import yaml

from reglab import soups
from reglab.bench.fit import FitProtocol
from reglab.bench.protocols import ClaimError, register_protocol
from reglab.cli import import_class

SOUPS = ("uniform", "greedy")


@register_protocol("dense_soup")
class DenseSoupProtocol(FitProtocol):
    defaults = {**FitProtocol.defaults, "ingredient_overrides": [[], ["--model.init_args.lr=3e-5"]],
                "soup_metric": "val/ndcg@10", "model_class": "reglab.tasks.DenseRetrievalModule"}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        overrides = self.settings["ingredient_overrides"]
        if not (isinstance(overrides, list) and len(overrides) >= 2 and overrides[0] == []
                and all(isinstance(o, list) for o in overrides)):
            raise ClaimError(f"claim {claim_name}: `ingredient_overrides` is a list of two or more lists of CLI"
                             f" arguments, the first empty (ingredient 0 is the arm's own fit), got {overrides!r}."
                             " Fix: write e.g. `[[], [--model.init_args.lr=3e-5]]`.")
        self._ingredients: dict[tuple[tuple[str, ...], int, int], tuple[Path, dict[str, Any]]] = {}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if spec.get("soup", SOUPS[0]) not in SOUPS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: `soup` is one of {list(SOUPS)} (or absent for one"
                             f" fit), got {spec['soup']!r}")
        super().check_arm(arm, {k: v for k, v in spec.items() if k != "soup"})

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        configs = tuple(spec.get("configs", []))
        if "soup" not in spec:
            return self.ingredient(configs, seed, 0, workdir)[1]
        made = [self.ingredient(configs, seed, i, workdir) for i in range(len(self.settings["ingredient_overrides"]))]
        out = workdir / f"{self.claim_name}_{arm}_seed{seed}_soup.ckpt"
        soup_args = ["--checkpoints", *(str(path) for path, _ in made), "--method", spec["soup"], "--out", str(out),
                     "--metric", self.settings["soup_metric"], "--model_class", self.settings["model_class"]]
        for path in self.data_configs(configs, seed, workdir):
            soup_args += ["--config", path]
        soups.main(soup_args)
        checkpoint = soups.load_checkpoint(out)
        kept = sum(ingredient["kept"] for ingredient in checkpoint["soup"]["ingredients"])
        module = import_class(self.settings["model_class"]).load_from_checkpoint(out, map_location="cpu")
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        tested = trainer.test(module, datamodule=soups.datamodule_from_configs(self.data_configs(configs, seed, workdir)),
                              verbose=False)[0]
        alone = {f"ingredient{i}:{key}": value for i, (_, metrics) in enumerate(made)
                 for key, value in metrics.items() if key.startswith("test/")}
        return {**{key: float(value) for key, value in tested.items()}, "ingredients_kept": kept, **alone}

    def ingredient(self, configs: tuple[str, ...], seed: int, number: int, workdir: Path) -> tuple[Path, dict[str, Any]]:
        """Ingredient ``number`` of these configs at ``seed``: its last checkpoint and test metrics (fitted once)."""
        key = (configs, seed, number)
        if key not in self._ingredients:
            args = self.arguments({"configs": list(configs)}, seed, workdir) + [
                "--trainer.enable_checkpointing=true", f"--seed_everything={seed + 1000 * number}",
                f"--run_name={self.claim_name}_fit{len(self._ingredients)}",
                *self.settings["ingredient_overrides"][number]]
            cli, metrics = self.fit_and_test(args)
            self._ingredients[key] = Path(cli.trainer.checkpoint_callback.last_model_path), metrics
        return self._ingredients[key]

    def data_configs(self, configs: tuple[str, ...], seed: int, workdir: Path) -> list[str]:
        """The configs whose ``data:`` the runs used, plus one that sets this seed's data seed and the overrides'."""
        path = workdir / f"{self.claim_name}_data_seed{seed}.yaml"
        data = {"seed": seed}
        for override in self.settings["overrides"]:
            name, _, value = override.removeprefix("--data.init_args.").partition("=")
            if override.startswith("--data.init_args."):
                data[name] = yaml.safe_load(value)
        path.write_text(yaml.safe_dump({"data": {"init_args": data}}))
        return [*self.settings["configs"], *configs, str(path)]
