"""The ``soup`` claim protocol (model soups, paper 52), registered with ``reglab bench effects``.

Per seed s (shared by every arm of the seed):

1. fit the ingredients: ``ingredient_config`` for every learning rate in ``learning_rates``,
   without and with ``label_smoothing_config`` (a small hyper-parameter sweep from one
   initialization, as in the paper), each with its own ``seed_everything``; the data seed is s;
2. make a greedy and a uniform soup of their last checkpoints with ``reglab soup``, ranked by
   ``val/acc`` on held-out images of the training angles;
3. test every ingredient and both soups at the training angles (``test/acc``, in-distribution)
   and at the unseen ``out_of_distribution_angles`` (``test/acc_ood``).

An arm's spec is ``select``: ``best_by_val`` (the ingredient with the best ``val/acc``: what one
deploys without soups), ``greedy``, ``uniform`` or ``oracle`` (the ingredient with the best test
accuracy: not selectable, a reference). A claim file names ``module: reglab.soup_claims``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from reglab import soups
from reglab.bench.protocols import ClaimError, Protocol, register_protocol
from reglab.cli import ReglabCLI, merge_technique_configs
from reglab.tasks import ClassificationModule

SELECTIONS = ("best_by_val", "greedy", "uniform", "oracle")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@register_protocol("soup")
class SoupProtocol(Protocol):
    defaults = {
        "ingredient_config": "configs/experiment/rotated_digits_soup_ingredient.yaml",
        "label_smoothing_config": "configs/technique/label_smoothing.yaml",
        "learning_rates": [5e-4, 1e-3, 2e-3],
        "label_smoothing": [False, True],
        "in_distribution_angles": [0, 15, 30],
        "out_of_distribution_angles": [60],
        "overrides": [],
    }

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) != {"select"} or spec["select"] not in SELECTIONS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: a soup arm is `select: one of {list(SELECTIONS)}`, "
                             f"got {spec}")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        return _seed_results(type(self), json.dumps(self.settings, sort_keys=True), seed, str(workdir))[spec["select"]]

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Ingredients: `{s['ingredient_config']}` at learning rates {s['learning_rates']} × label smoothing "
                f"{s['label_smoothing']} (`{s['label_smoothing_config']}`); soups by `reglab soup` ranked by val/acc on "
                f"held-out images of the training angles. test/acc at {s['in_distribution_angles']} degrees, "
                f"test/acc_ood at {s['out_of_distribution_angles']}.", ""]

    # -- one seed -------------------------------------------------------------------------------
    def fit_ingredient(self, seed: int, number: int, lr: float, smoothing: bool, workdir: Path) -> Path:
        s = self.settings
        args = ["--config", s["ingredient_config"]] + (["--config", s["label_smoothing_config"]] if smoothing else [])
        args += [f"--seed_everything={100 * seed + number}", f"--data.init_args.seed={seed}", f"--model.init_args.lr={lr}",
                 f"--runs_dir={workdir}", f"--run_name=seed{seed}_ingredient{number}", *QUIET, *s["overrides"]]
        cli = ReglabCLI(args=merge_technique_configs(args), run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return Path(cli.trainer.checkpoint_callback.last_model_path)

    def data_configs(self, seed: int, test_angles: list[int], workdir: Path) -> list[str]:
        """The ingredient's config plus one that points its data at this seed and these test angles."""
        path = workdir / f"data_seed{seed}_test{'_'.join(map(str, test_angles))}.yaml"
        path.write_text(yaml.safe_dump({"data": {"init_args": {"seed": seed, "test_angles": test_angles}}}))
        return [self.settings["ingredient_config"], str(path)]

    def score(self, checkpoint: Path, seed: int, workdir: Path) -> dict[str, float]:
        module = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu")
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        in_dist, out_dist = (soups.datamodule_from_configs(self.data_configs(seed, angles, workdir)) for angles in
                             (self.settings["in_distribution_angles"], self.settings["out_of_distribution_angles"]))
        return {"test/acc": trainer.test(module, datamodule=in_dist, verbose=False)[0]["test/acc"],
                "test/acc_ood": trainer.test(module, datamodule=out_dist, verbose=False)[0]["test/acc"],
                "val/acc": trainer.validate(module, datamodule=in_dist, verbose=False)[0]["val/acc"]}


@functools.cache
def _seed_results(cls: type[SoupProtocol], settings_json: str, seed: int, workdir_name: str) -> dict[str, dict[str, float]]:
    """Every selection's scores for one seed (the ingredients and soups are shared by the arms)."""
    protocol = cls("soup", json.loads(settings_json))
    s, workdir = protocol.settings, Path(tempfile.mkdtemp(dir=workdir_name))
    sweep = [(lr, smoothing) for smoothing in s["label_smoothing"] for lr in s["learning_rates"]]
    ingredients = [protocol.fit_ingredient(seed, k, lr, smoothing, workdir) for k, (lr, smoothing) in enumerate(sweep)]
    made = {}
    for method in ("greedy", "uniform"):
        made[method] = workdir / f"seed{seed}_{method}_soup.ckpt"
        soup_args = ["--checkpoints", *map(str, ingredients), "--method", method, "--out", str(made[method])]
        for path in protocol.data_configs(seed, s["out_of_distribution_angles"], workdir):
            soup_args += ["--config", path]
        soups.main(soup_args)
    scores = [protocol.score(path, seed, workdir) for path in ingredients]
    kept = sum(i["kept"] for i in soups.load_checkpoint(made["greedy"])["soup"]["ingredients"])
    return {
        "best_by_val": max(scores, key=lambda score: score["val/acc"]),
        "oracle": max(scores, key=lambda score: score["test/acc"]),
        "greedy": {**protocol.score(made["greedy"], seed, workdir), "ingredients_kept": kept},
        "uniform": protocol.score(made["uniform"], seed, workdir),
    }
