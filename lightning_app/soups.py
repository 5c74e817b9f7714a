"""Model soups — averaging the weights of fine-tuned models (Wortsman et al., ICML 2022, paper 52).

Models fine-tuned from one pretrained initialization with different hyper-parameters often lie
in one low-error basin, so the average of their weights is a model at least as good as each,
at the cost of one model at inference::

    uniform soup:  theta = (1 / K) * sum_k theta_k
    greedy soup:   sort the ingredients by held-out metric, best first; soup = [theta_(1)]
                   for i = 2..K:  if metric(mean(soup + [theta_(i)])) >= metric(mean(soup)):
                                      soup = soup + [theta_(i)]
                   theta = mean(soup)

The greedy rule accepts ties (``>=``) as in the paper's recipe; the official code
(github.com/mlfoundations/model-soups, ``main.py``) accepts only strict improvements (``>``).
They differ only when the held-out metric is exactly equal. Because the soup starts with the
best ingredient and never lowers the held-out metric, a greedy soup is never worse than the
best single ingredient *on the held-out data it was built on*; whether that carries over to
test data is the paper's empirical claim.

What is averaged: every floating-point entry of the state dict, parameters and buffers alike
(BatchNorm's running mean and variance included: an approximation, since the soup's own
activation statistics differ; the paper's CLIP / ViT models have no BatchNorm). Integer and
boolean entries (BatchNorm's ``num_batches_tracked``) are counters, not weights: they are taken
from the soup's first ingredient, unchanged. Ingredients must have the same entries with the
same shapes and dtypes; otherwise the error names the first entry that differs.

Method card: ``callbacks/fine_tuning/soup.card.yaml``.

The command writes the soup as a Lightning checkpoint (the best ingredient's hyper-parameters,
the soup's weights, no optimizer or loop state, the record under ``"soup"``) and the record as
a markdown table next to it::

    reglab soup --checkpoints a.ckpt b.ckpt c.ckpt --method greedy \
        --config configs/experiment/rotated_digits_soup_ingredient.yaml --out soup.ckpt

``--out`` and the report (``--report``, default ``--out`` with ``.md``) must be new files: the
command never overwrites a file, least of all an ingredient, and says so before loading anything.
``--config`` takes the configs the ingredients were trained with (their ``data:`` section gives
the validation split); ``--metric`` / ``--mode`` choose what greedy ranks by (``val/acc``, max).
:func:`average_state_dicts`, :func:`uniform_soup` and :func:`greedy_soup` are the pure functions
underneath.

Example:
    >>> import torch
    >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
    >>> average_state_dicts([a, b])["w"]
    tensor([1., 3.])
    >>> soup = greedy_soup([a, b], evaluate=lambda sd: -float(sd["w"].sum()), names=["a", "b"])
    >>> [(i.name, i.kept) for i in soup.ingredients]
    [('a', True), ('b', False)]
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor

from reglab.checkpoints import StateDict, first_mismatch
from reglab.cli import deep_merge, import_class


class SoupIngredientError(ValueError):
    """Ingredients that cannot be averaged (different entries, shapes or dtypes)."""


def ingredient_names(state_dicts: Sequence[StateDict], names: Sequence[str] | None) -> list[str]:
    """``names`` checked against the ingredients, or ``ingredient 0``, ``ingredient 1``, ..."""
    names = list(names) if names is not None else [f"ingredient {i}" for i in range(len(state_dicts))]
    if len(names) != len(state_dicts):
        raise ValueError(f"{len(state_dicts)} ingredients but {len(names)} names")
    return names


def check_ingredients(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise :class:`SoupIngredientError` unless all state dicts have the same entries, shapes, dtypes."""
    if not state_dicts:
        raise SoupIngredientError("a soup needs at least one ingredient")
    names = ingredient_names(state_dicts, names)
    for name, state in zip(names[1:], state_dicts[1:]):
        mismatch = first_mismatch(state_dicts[0], state, names=(names[0], name))
        if mismatch:
            raise SoupIngredientError(f"cannot average {name} with {names[0]}: {mismatch}")


def is_averaged(tensor: Tensor) -> bool:
    """Weights and float buffers are averaged; integer and boolean entries (counters) are not."""
    return tensor.is_floating_point() or tensor.is_complex()


def average_state_dicts(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The entry-wise mean of the state dicts (integer entries: the first one's); checked first.

    Means are accumulated in at least fp32 and stored in each entry's own dtype.
    """
    check_ingredients(state_dicts, names)
    averaged = {}
    for key, first in state_dicts[0].items():
        if not is_averaged(first):
            averaged[key] = first.clone()
            continue
        total = first.to(torch.promote_types(first.dtype, torch.float32), copy=True)
        for state in state_dicts[1:]:
            total += state[key].to(device=total.device, dtype=total.dtype)
        averaged[key] = (total / len(state_dicts)).to(first.dtype)
    return averaged


@dataclass
class Ingredient:
    """One ingredient's part in a soup (one row of the soup's table).

    Attributes:
        name: how the ingredient is shown (its checkpoint path in ``reglab soup``).
        metric: its own held-out metric, or ``None`` when nothing was evaluated.
        kept: whether it is in the soup.
        soup_metric_with_it: held-out metric of the soup tried with it (greedy soups only).
        soup_metric_after: held-out metric of the soup after this ingredient's turn.
    """

    name: str
    metric: float | None = None
    kept: bool = True
    soup_metric_with_it: float | None = None
    soup_metric_after: float | None = None


@dataclass
class Soup:
    """A soup's weights and how it was made."""

    method: str
    state_dict: dict[str, Tensor]
    ingredients: list[Ingredient] = field(default_factory=list)
    metric: float | None = None

    @property
    def kept(self) -> list[str]:
        return [i.name for i in self.ingredients if i.kept]


Evaluate = Callable[[StateDict], float]


def uniform_soup(
    state_dicts: Sequence[StateDict], evaluate: Evaluate | None = None, names: Sequence[str] | None = None
) -> Soup:
    """Average all ingredients; with ``evaluate``, also record each one's and the soup's metric."""
    names = ingredient_names(state_dicts, names)
    averaged = average_state_dicts(state_dicts, names)
    if evaluate is None:
        return Soup("uniform", averaged, [Ingredient(name) for name in names])
    soup_metric = evaluate(averaged)
    ingredients = [Ingredient(name, metric=evaluate(state)) for name, state in zip(names, state_dicts)]
    ingredients[-1].soup_metric_after = soup_metric
    return Soup("uniform", averaged, ingredients, soup_metric)


def greedy_soup(
    state_dicts: Sequence[StateDict],
    evaluate: Evaluate,
    names: Sequence[str] | None = None,
    higher_is_better: bool = True,
) -> Soup:
    """The paper's greedy soup (see the module docstring).

    Args:
        state_dicts: the ingredients (fine-tuned from one initialization).
        evaluate: held-out metric of a state dict (e.g. validation accuracy).
        names: how to show the ingredients in the record.
        higher_is_better: ``False`` for metrics to minimise (a loss).

    Ingredients with equal metrics keep their given order (the sort is stable).
    """
    names = ingredient_names(state_dicts, names)
    check_ingredients(state_dicts, names)
    sign = 1.0 if higher_is_better else -1.0
    metrics = [evaluate(state) for state in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -sign * metrics[i])
    best = order[0]
    kept = [best]
    soup_state, soup_metric = dict(state_dicts[best]), metrics[best]
    ingredients = [Ingredient(names[best], metrics[best], True, metrics[best], metrics[best])]
    for i in order[1:]:
        candidate = average_state_dicts([state_dicts[k] for k in kept + [i]])
        candidate_metric = evaluate(candidate)
        accept = sign * candidate_metric >= sign * soup_metric
        if accept:
            kept.append(i)
            soup_state, soup_metric = candidate, candidate_metric
        ingredients.append(Ingredient(names[i], metrics[i], accept, candidate_metric, soup_metric))
    return Soup("greedy", {k: v.clone() for k, v in soup_state.items()}, ingredients, soup_metric)


def soup_table(soup: Soup, metric_name: str) -> str:
    """The soup's record as a markdown table: what went in, in the order it was considered."""
    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    lines = [
        f"| ingredient | {metric_name} alone | kept | soup {metric_name} with it | soup {metric_name} after |",
        "|---|---|---|---|---|",
    ]
    for ingredient in soup.ingredients:
        lines.append(
            f"| {ingredient.name} | {fmt(ingredient.metric)} | {'yes' if ingredient.kept else 'no'} | "
            f"{fmt(ingredient.soup_metric_with_it)} | {fmt(ingredient.soup_metric_after)} |"
        )
    return "\n".join(lines)


# -- checkpoints ---------------------------------------------------------------------------------

# What a checkpoint needs to rebuild its module (load_from_checkpoint); the rest is training state
# (optimizer, loops, callbacks' state, RNG) that belongs to one ingredient's run, not to the soup.
MODEL_KEYS = (
    "pytorch-lightning_version",
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hparams_type",
)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_ingredient(path: Path) -> dict[str, Any]:
    """An ingredient's checkpoint, or a message naming the file and what is wrong with it."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise SystemExit(f"reglab soup: cannot read the checkpoint {path} ({type(error).__name__}: {error}). "
                         "Fix: pass Lightning checkpoints written by `reglab fit` (<run>/checkpoints/*.ckpt)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SystemExit(f"reglab soup: {path} holds no `state_dict`, so it is not a Lightning checkpoint. "
                         "Fix: pass checkpoints written by `reglab fit` (<run>/checkpoints/*.ckpt)")
    return checkpoint


def refuse_unsafe_paths(checkpoints: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Exit with a message unless there are two or more distinct, existing ingredients and no output
    file exists yet: a soup never overwrites a file, least of all one of its ingredients (also when
    it is named by another spelling of its path or through a symbolic link)."""
    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        raise SystemExit(f"reglab soup: no checkpoint at {', '.join(missing)}. Fix: check the path(s); "
                         "`reglab fit` writes <runs_dir>/<run_name>/version_<k>/checkpoints/last.ckpt")
    for i, path in enumerate(checkpoints):
        for earlier in checkpoints[:i]:
            if os.path.samefile(path, earlier):
                raise SystemExit(f"reglab soup: {path} and {earlier} are the same checkpoint. "
                                 "Fix: pass each ingredient once")
    if len(checkpoints) < 2:
        raise SystemExit(f"reglab soup: one checkpoint ({checkpoints[0]}) is no soup: its average is itself. "
                         "Fix: pass two or more checkpoints fine-tuned from the same pretrained weights")
    for out in outputs:
        ingredient = next((path for path in checkpoints if out.exists() and os.path.samefile(out, path)), None)
        if ingredient is not None:
            raise SystemExit(f"reglab soup: the output {out} is the ingredient {ingredient}; writing it would "
                             "destroy that checkpoint. Fix: choose another --out / --report")
        if out.exists():
            raise SystemExit(f"reglab soup: {out} already exists and a soup never overwrites a file. "
                             "Fix: choose another --out / --report, or move the old file away yourself")


def soup_checkpoint(template: Mapping[str, Any], soup: Soup, metric_name: str | None) -> dict[str, Any]:
    """A Lightning checkpoint of the soup: the template's model description, the soup's weights,
    and the record of how it was made (under ``"soup"``)."""
    checkpoint = {key: template[key] for key in MODEL_KEYS if key in template}
    checkpoint["state_dict"] = soup.state_dict
    checkpoint["soup"] = {"method": soup.method, "metric": metric_name, "value": soup.metric,
                          "ingredients": [asdict(i) for i in soup.ingredients]}
    return checkpoint


# -- the `reglab soup` command ---------------------------------------------------------------------


def datamodule_from_configs(paths: Sequence[str]) -> L.LightningDataModule:
    """The DataModule of the ``data:`` sections of reglab config files (later files override)."""
    data: dict[str, Any] = {}
    for path in paths:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("data")
        if isinstance(section, dict):
            data = deep_merge(data, section)
    if not data:
        raise SystemExit(f"reglab soup: none of {list(paths)} has a `data:` section; pass the config the "
                         "ingredients were trained with")
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    return parser.instantiate(parser.parse_object({"data": data})).data


def held_out_evaluator(module: L.LightningModule, datamodule: L.LightningDataModule, metric: str) -> Evaluate:
    """``state_dict -> metric`` on the validation split, computed with a quiet Lightning Trainer."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, devices=1)

    def evaluate(state_dict: StateDict) -> float:
        module.load_state_dict(state_dict)
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        if not results or metric not in results[0]:
            raise SystemExit(f"reglab soup: validation logged no {metric!r}; it logged "
                             f"{sorted(results[0]) if results else []} (choose one with --metric)")
        return float(results[0][metric])

    return evaluate


def main(argv: list[str]) -> None:
    """``reglab soup``: average fine-tuned checkpoints into one checkpoint, and record how."""
    parser = argparse.ArgumentParser(
        prog="reglab soup",
        description="Average checkpoints fine-tuned from one initialization (model soups, paper 52). "
        "Writes a checkpoint loadable with <module class>.load_from_checkpoint and a markdown table.",
    )
    parser.add_argument("--checkpoints", nargs="+", type=Path, required=True, help="the ingredients' checkpoints")
    parser.add_argument("--method", choices=("uniform", "greedy"), default="greedy")
    parser.add_argument("--config", action="append", default=[],
                        help="config file(s) whose `data:` section gives the held-out (validation) split; "
                        "required for greedy, optional for uniform (then metrics are reported)")
    parser.add_argument("--metric", default="val/acc", help="held-out metric logged in validation")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="whether higher or lower is better")
    parser.add_argument("--model_class", default="reglab.tasks.ClassificationModule",
                        help="LightningModule class of the ingredients")
    parser.add_argument("--out", type=Path, required=True,
                        help="where to write the soup's checkpoint (a new file: an existing one is never overwritten)")
    parser.add_argument("--report", type=Path, help="markdown table of the ingredients (default: --out with .md)")
    args = parser.parse_args(argv)
    if args.method == "greedy" and not args.config:
        parser.error("--method greedy needs --config (the data whose validation split ranks the ingredients)")

    report = args.report or args.out.with_suffix(".md")
    refuse_unsafe_paths(args.checkpoints, [args.out, report])

    names = [str(path) for path in args.checkpoints]
    checkpoints = [load_ingredient(path) for path in args.checkpoints]
    state_dicts = [checkpoint["state_dict"] for checkpoint in checkpoints]
    try:
        check_ingredients(state_dicts, names)
    except SoupIngredientError as error:
        raise SystemExit(f"reglab soup: {error}") from None

    evaluate = None
    if args.config:
        module = import_class(args.model_class).load_from_checkpoint(args.checkpoints[0], map_location="cpu")
        evaluate = held_out_evaluator(module, datamodule_from_configs(args.config), args.metric)
    if args.method == "greedy":
        soup = greedy_soup(state_dicts, evaluate, names, higher_is_better=args.mode == "max")
    else:
        soup = uniform_soup(state_dicts, evaluate, names)

    template = checkpoints[names.index(soup.kept[0])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    # "x": a file that appeared since the check above is not overwritten either
    with open(args.out, "xb") as file:
        torch.save(soup_checkpoint(template, soup, args.metric if evaluate else None), file)
    command = "reglab soup " + " ".join(shlex.quote(a) for a in argv)
    summary = f"{args.method} soup of {len(names)} checkpoints, {len(soup.kept)} kept"
    if soup.metric is not None:
        summary += f"; soup {args.metric} = {soup.metric:.4f}"
    with open(report, "x") as file:
        file.write(f"# Soup: {args.out}\n\nProduced by: `{command}`\n\n{summary}.\n\n"
                   f"{soup_table(soup, args.metric)}\n")
    print(f"{summary}\n{soup_table(soup, args.metric)}\nwrote {args.out} and {report}")
