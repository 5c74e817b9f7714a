"""Effect benchmark of model soups (paper 52): is a greedy soup at least as good as the best ingredient?

``reglab bench effects`` compares two arms that are one fit each; a soup needs several fits and
then a soup, so this script runs the claim itself and writes the same kind of report. Per seed s:

1. fit the ingredients: ``configs/experiment/rotated_digits_soup_ingredient.yaml`` (the CNN
   pretrained on upright digits, fine-tuned on digits rotated by 0/15/30 degrees) for every
   learning rate in ``LEARNING_RATES`` without and with ``configs/technique/label_smoothing.yaml``
   (a small hyper-parameter sweep from one initialization, as in the paper), each with its own
   ``seed_everything``; the data seed is s;
2. make a greedy and a uniform soup of their last checkpoints with ``reglab soup``, ranked by
   ``val/acc`` on held-out images of the training angles;
3. test every ingredient and both soups on held-out test images at the training angles
   (in-distribution, the claim's metric) and at the unseen 60 degrees (out-of-distribution).

The baseline is the ingredient with the best ``val/acc``: what one deploys without soups. The
paper's claim is "at least as good", so the verdict is the effect harness's non-inferiority rule
(:func:`reglab.bench.effects.verdict` with ``direction: at_least``): the mean paired
difference (soup minus baseline, same seed) minus two standard errors must be above −``MARGIN``.
``MARGIN`` = 0.005 accuracy, fixed before the measurement: about 2 of the ~450 in-distribution
test images, a quarter of the best ingredient's error rate (~0.02), so a pass rules out a soup
that loses a relevant share of the accuracy left to gain.

Usage (from the repository root)::

    python benchmarks/soup_claim.py --seeds 3 --out docs/results
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml

from reglab import soups
from reglab.bench.effects import Check, Claim, mean_std, verdict
from reglab.cli import ReglabCLI, merge_technique_configs
from reglab.tasks import ClassificationModule

INGREDIENT_CONFIG = "configs/experiment/rotated_digits_soup_ingredient.yaml"
LABEL_SMOOTHING_CONFIG = "configs/technique/label_smoothing.yaml"
LEARNING_RATES = (5e-4, 1e-3, 2e-3)
IN_DISTRIBUTION_ANGLES = [0, 15, 30]
OUT_OF_DISTRIBUTION_ANGLES = [60]
MARGIN = 0.005
CLAIM = Claim(
    name="soup",
    claim="digits pretrained upright, 6 fine-tunes on digits rotated by 0/15/30 degrees (3 learning rates x "
    "label smoothing off/on): test accuracy at the training angles of the greedy soup at least that of the "
    "ingredient with the best validation accuracy (paper 52)",
    configs=[INGREDIENT_CONFIG],
    checks=[Check("test/acc", "at_least", MARGIN)],
)
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@dataclass
class Scores:
    val: float
    test_id: float
    test_ood: float


def fit_ingredient(seed: int, number: int, lr: float, smoothing: bool, workdir: Path) -> Path:
    args = ["--config", INGREDIENT_CONFIG] + (["--config", LABEL_SMOOTHING_CONFIG] if smoothing else [])
    args += [f"--seed_everything={100 * seed + number}", f"--data.init_args.seed={seed}", f"--model.init_args.lr={lr}",
             f"--runs_dir={workdir}", f"--run_name=seed{seed}_ingredient{number}", *QUIET]
    cli = ReglabCLI(args=merge_technique_configs(args), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def data_override(seed: int, test_angles: list[int], workdir: Path) -> str:
    """A config file that points the ingredient's data at this seed and these test angles."""
    path = workdir / f"data_seed{seed}_test{'_'.join(map(str, test_angles))}.yaml"
    path.write_text(yaml.safe_dump({"data": {"init_args": {"seed": seed, "test_angles": test_angles}}}))
    return str(path)


def score(checkpoint: Path, seed: int, workdir: Path) -> Scores:
    module = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    in_distribution, out_of_distribution = (
        soups.datamodule_from_configs([INGREDIENT_CONFIG, data_override(seed, angles, workdir)])
        for angles in (IN_DISTRIBUTION_ANGLES, OUT_OF_DISTRIBUTION_ANGLES)
    )
    return Scores(
        val=trainer.validate(module, datamodule=in_distribution, verbose=False)[0]["val/acc"],
        test_id=trainer.test(module, datamodule=in_distribution, verbose=False)[0]["test/acc"],
        test_ood=trainer.test(module, datamodule=out_of_distribution, verbose=False)[0]["test/acc"],
    )


def recorded_table(soup_checkpoint: Path, labels: dict[str, str]) -> tuple[str, int]:
    """The soup's own record (as `reglab soup` wrote it), with readable ingredient names; and how many were kept."""
    record = soups.load_checkpoint(soup_checkpoint)["soup"]
    ingredients = [soups.Ingredient(**{**i, "name": labels[i["name"]]}) for i in record["ingredients"]]
    table = soups.soup_table(soups.Soup(record["method"], {}, ingredients, record["value"]), record["metric"])
    return table, sum(i.kept for i in ingredients)


def run_seed(seed: int, workdir: Path) -> dict:
    sweep = [(lr, smoothing) for smoothing in (False, True) for lr in LEARNING_RATES]
    ingredients = [fit_ingredient(seed, k, lr, smoothing, workdir) for k, (lr, smoothing) in enumerate(sweep)]
    labels = {str(path): f"lr {lr:g}{', label smoothing 0.1' if smoothing else ''}"
              for path, (lr, smoothing) in zip(ingredients, sweep)}
    soup_data = [INGREDIENT_CONFIG, data_override(seed, OUT_OF_DISTRIBUTION_ANGLES, workdir)]
    made = {}
    for method in ("greedy", "uniform"):
        made[method] = workdir / f"seed{seed}_{method}_soup.ckpt"
        soup_args = ["--checkpoints", *map(str, ingredients), "--method", method, "--out", str(made[method])]
        for path in soup_data:
            soup_args += ["--config", path]
        soups.main(soup_args)
    scores = {path: score(path, seed, workdir) for path in ingredients}
    best_by_val = max(ingredients, key=lambda path: scores[path].val)
    greedy_table, greedy_kept = recorded_table(made["greedy"], labels)
    return {
        "best": scores[best_by_val],
        "oracle_id": max(s.test_id for s in scores.values()),
        "greedy": score(made["greedy"], seed, workdir),
        "greedy_kept": greedy_kept,
        "greedy_table": greedy_table,
        "uniform": score(made["uniform"], seed, workdir),
        "ingredients": {labels[str(p)]: scores[p] for p in ingredients},
    }


def report(results: list[dict], command: str) -> str:
    arms = {"best ingredient (by val/acc)": "best", "greedy soup": "greedy", "uniform soup": "uniform"}
    lines = [f"# Effect: {CLAIM.name}", "", f"Claim: {CLAIM.claim}", "", f"Produced by: `{command}`", "",
             f"Ingredient recipe: `{INGREDIENT_CONFIG}`, learning rates {list(LEARNING_RATES)} x label smoothing "
             f"off/on (`{LABEL_SMOOTHING_CONFIG}`); soups by `reglab soup` ranked by val/acc.", "",
             f"| model | test/acc at {IN_DISTRIBUTION_ANGLES} degrees (mean ± std, {len(results)} seeds) | per seed "
             f"| test/acc at {OUT_OF_DISTRIBUTION_ANGLES} degrees | per seed |", "|---|---|---|---|---|"]
    for label, key in arms.items():
        ids, oods = [r[key].test_id for r in results], [r[key].test_ood for r in results]
        lines.append(f"| {label} | {mean_std(ids)} | {', '.join(f'{v:.4f}' for v in ids)} | {mean_std(oods)} | "
                     f"{', '.join(f'{v:.4f}' for v in oods)} |")
    oracle = [r["oracle_id"] for r in results]
    lines.append(f"| best ingredient on test (oracle, not selectable) | {mean_std(oracle)} | "
                 f"{', '.join(f'{v:.4f}' for v in oracle)} | | |")
    best_id, greedy_id = [r["best"].test_id for r in results], [r["greedy"].test_id for r in results]
    check = CLAIM.checks[0]
    judged = verdict(check, best_id, greedy_id)
    at_least = sum(g >= b for g, b in zip(greedy_id, best_id))
    ood = verdict(check, [r["best"].test_ood for r in results], [r["greedy"].test_ood for r in results])
    lines += ["", f"Paired difference (greedy soup − best ingredient, same seed), test/acc at the training angles: "
              f"{judged.difference:+.4f} (standard error {judged.stderr:.4f}); greedy soup ≥ best ingredient in "
              f"{at_least} of {len(results)} seeds. Verdict: **{judged.outcome}** (rule: {check.rule}). "
              f"At the unseen angle (not part of the claim): {ood.difference:+.4f} (standard error {ood.stderr:.4f}).", ""]
    for seed, result in enumerate(results):
        lines += [f"## Seed {seed}", "", f"Greedy soup, {result['greedy_kept']} of {len(result['ingredients'])} "
                  "ingredients kept, as `reglab soup` recorded it (val/acc on held-out images of the training angles):",
                  "", result["greedy_table"], "",
                  "| ingredient | val/acc | test/acc (training angles) | test/acc (unseen angle) |", "|---|---|---|---|"]
        for label, s in result["ingredients"].items():
            lines.append(f"| {label} | {s.val:.4f} | {s.test_id:.4f} | {s.test_ood:.4f} |")
        for label, key in (("greedy soup", "greedy"), ("uniform soup", "uniform")):
            s = result[key]
            lines.append(f"| **{label}** | {s.val:.4f} | {s.test_id:.4f} | {s.test_ood:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    command = "python benchmarks/soup_claim.py " + " ".join(shlex.quote(a) for a in argv)
    with tempfile.TemporaryDirectory(prefix="reglab-soup-") as workdir:
        results = []
        for seed in range(args.seeds):
            results.append(run_seed(seed, Path(workdir)))
            print(f"[soup] seed {seed}: best ingredient {results[-1]['best'].test_id:.4f}, "
                  f"greedy soup {results[-1]['greedy'].test_id:.4f}, uniform soup {results[-1]['uniform'].test_id:.4f}",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soup.md").write_text(report(results, command))
    print(f"[soup] -> {args.out / 'soup.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
