"""Saliency grids for a trained classifier (``reglab saliency``) and the ``saliency`` claims protocol.

The maths is :mod:`reglab.callbacks.analysis.saliency` (gradient, Grad-CAM and NormGrad at named
layers, their combination, the paper's class correlation). Here:

* :func:`draw_grid` — one row per image: the image, then for every explanation its map for the
  highest-scoring class beside its map for the lowest-scoring class (a class-sensitive method
  draws two different maps);
* ``reglab saliency --ckpt last.ckpt --out saliency/`` (:func:`main`) — a grid for the test
  digits of a :class:`~reglab.tasks.ClassificationModule` checkpoint (what ``reglab fit`` on the
  digits writes), with the gradient at the input and NormGrad / Grad-CAM at each block and
  combined over the blocks; it refuses to overwrite a grid;
* the ``saliency`` protocol — per seed a small CNN is trained on the digits once (shared by the
  arms); an arm is ``{method, layers}`` and measures ``class_correlation`` (the mean over
  ``num_images`` test digits of the Pearson correlation between the maps of the highest- and the
  lowest-scoring class; lower: more class sensitive), ``undefined_share`` (images whose map is
  constant for one of the two classes, left out of the mean) and the model's ``test_accuracy``::

    name: normgrad
    protocol: saliency
    module: reglab.analysis.saliency
    settings: {epochs: 10, num_images: 300}
    arms:
      gradient: {method: gradient, layers: [input]}
      normgrad: {method: normgrad, layers: [backbone.blocks.8]}
    checks:
      - {metric: class_correlation, direction: lower, arm: normgrad, against: gradient}

Settings: ``backbone`` and ``backbone_kwargs`` (:class:`~reglab.tasks.ClassificationModule`'s),
``epochs``, ``batch_size``, ``lr``, ``num_images``, ``grid_images`` (rows of the figure, drawn for
the first seed's model) and ``trainer`` (further ``L.Trainer`` arguments).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.bench.protocols import ClaimError, Protocol, register_protocol
from reglab.callbacks.analysis.saliency import INPUT, METHODS, block_names, class_correlation, explain
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule

#: the digits as the protocol and the command show them to a model
DIGITS_SHAPE = (1, 8, 8)


def _flat(module: nn.Module) -> bool:
    return tuple(module.hparams.get("input_shape") or ()) == (64,)


def first_test_digits(module: nn.Module, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` test digits (seed-0 split) in the shape ``module`` takes, and their labels."""
    data = DigitsDataModule(flatten=_flat(module))
    data.setup("test")
    return data.test_dataset.inputs[:count], data.test_dataset.targets[:count]


def default_explanations(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """The gradient at the input, then NormGrad and Grad-CAM at every block and NormGrad combined over them."""
    blocks = block_names(model)
    explanations = {"gradient\ninput": ("gradient", [INPUT])}
    for block in blocks:
        explanations[f"NormGrad\n{block}"] = ("normgrad", [block])
        explanations[f"Grad-CAM\n{block}"] = ("gradcam", [block])
    if len(blocks) > 1:
        explanations["NormGrad\ncombined"] = ("normgrad", blocks)
    return explanations


def draw_grid(model: nn.Module, inputs: Tensor, labels: Tensor, explanations: dict[str, tuple[str, Sequence[str]]],
              path: Path, overwrite: bool = False) -> Path:
    """Write the saliency grid of ``inputs`` (see the module docstring) to ``path`` (a PNG)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"saliency: {path} exists and is kept. Fix: give another --out folder or move it.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    size = DIGITS_SHAPE[1:] if inputs.dim() == 2 else tuple(inputs.shape[-2:])
    with torch.no_grad():
        logits = model(inputs)
    top, bottom = logits.argmax(1), logits.argmin(1)
    columns = [("image", None)] + [(f"{label}\n{which}", (method, layers, classes))
                                   for label, (method, layers) in explanations.items()
                                   for which, classes in (("top class", top), ("bottom class", bottom))]
    maps = {title: explain(model, inputs, spec[2], spec[0], spec[1], size) for title, spec in columns if spec}
    images = inputs.float().view(len(inputs), -1, *size).mean(1)
    fig, axes = plt.subplots(len(inputs), len(columns), figsize=(1.5 * len(columns), 1.5 * len(inputs) + 1.0), squeeze=False)
    for row in range(len(inputs)):
        for col, (title, spec) in enumerate(columns):
            ax = axes[row, col]
            if spec is None:
                ax.imshow(images[row].cpu(), cmap="gray")
                ax.set_ylabel(f"label {int(labels[row])}", fontsize=7)
            else:
                ax.imshow(maps[title][row].cpu(), cmap="jet", vmin=0, vmax=1)
                ax.text(0.02, 0.98, str(int(spec[2][row])), transform=ax.transAxes, fontsize=6, va="top",
                        color="white")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """``reglab saliency``: draw a saliency grid for a trained digits classifier checkpoint."""
    parser = argparse.ArgumentParser(prog="reglab saliency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a ClassificationModule checkpoint trained on the digits")
    parser.add_argument("--out", default="saliency", help="folder for the grid (default: ./saliency)")
    parser.add_argument("--num-images", type=int, default=8, help="rows of the grid: the first test digits")
    parser.add_argument("--method", action="append", choices=sorted(METHODS),
                        help="explain with this method at --layer (repeat for several; default: the gradient at the "
                             "input, NormGrad and Grad-CAM at every block, NormGrad combined over the blocks)")
    parser.add_argument("--layer", action="append", help="a layer (a name from named_modules(), or 'input'); "
                                                         "several are combined into one map")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt} does not exist. Fix: give the path of a `reglab fit` checkpoint.")
    model = ClassificationModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    if tuple(model.hparams["input_shape"]) not in (DIGITS_SHAPE, (64,)):
        parser.error(f"the checkpoint's model takes inputs of shape {tuple(model.hparams['input_shape'])}; "
                     "reglab saliency draws the digits (1x8x8 or flat 64). Fix: use a checkpoint trained on the digits, "
                     "or call reglab.analysis.saliency.draw_grid with your own images.")
    if args.method:
        layers = args.layer or [INPUT]
        explanations = {f"{method}\n{'+'.join(layers)}": (method, layers) for method in args.method}
    else:
        explanations = default_explanations(model)
        if args.layer:
            explanations = {k: v for k, v in explanations.items() if v[1] == [INPUT]}
            explanations.update({f"{m}\n{'+'.join(args.layer)}": (m, args.layer) for m in ("normgrad", "gradcam")})
    path = Path(args.out) / f"{Path(args.ckpt).stem}_saliency.png"
    if path.exists():
        parser.error(f"{path} exists and is kept. Fix: give another --out folder, or move the old grid away.")
    inputs, labels = first_test_digits(model, args.num_images)
    draw_grid(model, inputs, labels, explanations, path)
    print(f"reglab saliency: wrote {path}")


@functools.cache
def _trained(settings_json: str, seed: int) -> ClassificationModule:
    """The digits classifier of one seed, shared by every arm and claim with these settings."""
    settings = json.loads(settings_json)
    L.seed_everything(seed, verbose=False)
    model = ClassificationModule(settings["backbone"], num_classes=10, input_shape=DIGITS_SHAPE,
                                 backbone_kwargs=settings["backbone_kwargs"], lr=settings["lr"])
    trainer = L.Trainer(**{"max_epochs": settings["epochs"], "accelerator": "cpu", "devices": 1, "logger": False,
                           "enable_checkpointing": False, "enable_progress_bar": False,
                           "enable_model_summary": False, "num_sanity_val_steps": 0, **settings["trainer"]})
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=settings["batch_size"], seed=seed))
    return model.eval()


@register_protocol("saliency")
class SaliencyProtocol(Protocol):
    """Class correlation of saliency methods on a digits CNN (see the module docstring)."""

    defaults = {"backbone": "cnn", "backbone_kwargs": {}, "epochs": 10, "batch_size": 64, "lr": 3e-3,
                "num_images": 300, "grid_images": 6, "trainer": {}}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        #: arm -> (method, layers), kept from check_arm for the figure
        self.explanations: dict[str, tuple[str, list[str]]] = {}

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) - {"method", "layers"} or spec.get("method") not in METHODS or not spec.get("layers"):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: an arm is {{method: one of {sorted(METHODS)}, "
                             f"layers: [names]}}, got {spec!r}. Fix: name the method and the layers it reads.")
        self.explanations[arm] = (spec["method"], list(spec["layers"]))

    def model(self, seed: int) -> ClassificationModule:
        return _trained(json.dumps(self.settings, sort_keys=True), seed)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        model = self.model(seed)
        inputs, labels = first_test_digits(model, self.settings["num_images"])
        with torch.no_grad():
            accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
        correlation = class_correlation(model, inputs, spec["method"], spec["layers"])
        return {"class_correlation": correlation.nanmean().item(),
                "undefined_share": correlation.isnan().float().mean().item(), "test_accuracy": accuracy}

    def describe(self) -> list[str]:
        s = self.settings
        return [f"A `{s['backbone']}` ClassificationModule trained {s['epochs']} epochs (Adam, lr {s['lr']}, batch "
                f"{s['batch_size']}) on the 8x8 digits per seed; each arm's maps of the first {s['num_images']} test "
                "digits for their highest- and lowest-scoring class, resized to 8x8; `class_correlation` is the mean "
                "Pearson correlation between the two (lower: more class sensitive)."]

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        model = self.model(0)  # seed 0 ran (the harness's seeds count from 0), so this is its cached model
        inputs, labels = first_test_digits(model, self.settings["grid_images"])
        name = f"{claim_name}_grid.png"
        # the results page is written again with its figures each time the claim runs
        draw_grid(model, inputs, labels, {arm: self.explanations[arm] for arm in runs}, out_dir / name, overwrite=True)
        return ["## Saliency maps (seed 0's model)", "",
                "Each row a test digit; per arm its map for the highest- and the lowest-scoring class (the class "
                "in the corner).", "", f"![saliency grid]({name})", ""]
