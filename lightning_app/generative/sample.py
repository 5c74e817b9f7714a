"""``reglab sample``: a grid of samples from a trained generative checkpoint, and their measures.

::

    reglab sample --ckpt runs/digits_diffusion/version_0/checkpoints/last.ckpt --out samples/ --measures

loads the checkpoint (:class:`~reglab.tasks.DiffusionModule` by default, ``--model-class`` for any
module with ``sample(labels, num_samples, seed)``: :class:`~reglab.tasks.VAEModule`,
:class:`~reglab.tasks.AutoregressiveImageModule`; ``--steps``,
``--sampler`` and ``--guidance`` go to a module whose ``sample`` takes them), samples
``--per-class`` images of every class (a conditional model: one row per class) or ``--num-samples``
(an unconditional one), seeded, and writes into ``--out``, which must not exist or be empty (nothing
is overwritten):

* ``grid.png`` — the samples, rows labelled with their class;
* ``samples.pt`` — the samples (``(N, C, H, W)`` in [0, 1]), their labels and the sampling settings;
* ``midi/sample_<i>.mid`` (``--midi``, for a model of piano rolls ``(1, pitches, steps)``: the MusicDataModule
  VAE) — each sample as MIDI (:func:`reglab.generative.midi.roll_to_midi`, row 0 the note ``--lowest-pitch``),
  its cells drawn from the decoded probabilities with the sampling seed (rounding at 0.5 leaves an MLP
  decoder's bars near empty);
* ``measures.json`` (``--measures``) — :func:`reglab.generative.measures.sample_quality` of
  ``--measure-per-class`` samples per class against the digits' test split (the Fréchet distance
  in the features of the in-repo digits classifier, not Inception's; its accuracy on the samples;
  the distance to the nearest training image), the classifier fitted once from
  ``--classifier-config`` and cached under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

#: the classes of the digits that the measures compare samples against
DIGIT_CLASSES = 10
#: the columns of a claim's sample grid (samples of a class, a prompt or a model; ten for an unconditional model)
GRID_COLUMNS = 8


def class_labels(module: nn.Module, per_class: int) -> Optional[Tensor]:
    """``per_class`` copies of every class index, class by class; ``None`` for an unconditional module."""
    classes = getattr(module, "num_classes", 0)
    return torch.arange(classes).repeat_interleave(per_class) if classes else None


def row_names(module: nn.Module) -> list[str]:
    """The class names of a conditional module's grid rows (its ``class_names``, else the indices)."""
    names = module.hparams.get("class_names") if hasattr(module, "hparams") else None
    return list(names) if names else [str(i) for i in range(module.num_classes)]


def grid_figure(samples: Tensor, columns: int, rows: Sequence[str] | None = None, title: str = "") -> Any:
    """``samples`` (``(N, C, H, W)`` in [0, 1]) as a matplotlib Figure: a grid of ``columns`` images a row,
    each row named by ``rows`` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    pad = 1
    grid = make_grid(samples.float().cpu(), nrow=columns, padding=pad, pad_value=1.0)
    height = samples.shape[-2] + pad
    count = -(-len(samples) // columns)
    fig, ax = plt.subplots(figsize=(0.5 * columns + 1.2, 0.5 * count + 0.6))
    # make_grid gives three channels (a grey image repeated): drawn as RGB
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    if rows:
        ax.set_yticks([pad + height * i + (height - pad) / 2 for i in range(len(rows))], list(rows), fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def save_grid(samples: Tensor, path: Path, columns: int, rows: Sequence[str] | None = None, title: str = "") -> Path:
    """:func:`grid_figure` written as a PNG to ``path``; refuses an existing ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"reglab sample: {path} exists and is kept. Fix: give another --out folder.")
    fig = grid_figure(samples, columns, rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_samples(module: nn.Module, per_class: int, settings: dict[str, Any],
                 num_samples: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``per_class`` samples of every class, class by class, and their labels (a conditional module), or
    ``num_samples`` and ``None`` (an unconditional one); ``settings`` go to ``module.sample``."""
    labels = class_labels(module, per_class)
    return module.sample(labels, num_samples=num_samples if labels is None else None, **settings), labels


def claim_grid(samples: Tensor, labels: Optional[Tensor], module: nn.Module, per_class: int) -> Any:
    """The grid figure of a claim's measured samples: the first :data:`GRID_COLUMNS` of every class, a row
    each (``samples`` class by class, ``per_class`` each), or as many rows of ten (unconditional)."""
    if labels is None:
        return grid_figure(samples[:DIGIT_CLASSES * GRID_COLUMNS], DIGIT_CLASSES)
    keep = min(GRID_COLUMNS, per_class)
    first = torch.cat([torch.arange(c * per_class, c * per_class + keep) for c in range(module.num_classes)])
    return grid_figure(samples[first], keep, row_names(module))


def measure(samples: Tensor, labels: Optional[Tensor], data_seed: int, classifier_config: str,
            cache_dir: str) -> dict[str, Any]:
    """:func:`~reglab.generative.measures.sample_quality` of ``samples`` against the digits' test split."""
    from reglab.datamodules import DigitsDataModule
    from reglab.generative.measures import digits_classifier, sample_quality

    data = DigitsDataModule(seed=data_seed)
    data.setup("fit")
    data.setup("test")
    classifier = digits_classifier(classifier_config, cache_dir)
    test = data.test_dataset
    result = sample_quality(samples.cpu(), labels, classifier, data.train_dataset.inputs, test.inputs, test.targets)
    return {**result, "samples": len(samples), "classifier_config": classifier_config, "data_seed": data_seed}


def main(argv: list[str] | None = None) -> None:
    """``reglab sample`` (module docstring)."""
    parser = argparse.ArgumentParser(prog="reglab sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint of a generative module (`reglab fit` writes one)")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for grid.png, samples.pt, measures.json")
    parser.add_argument("--model-class", default="reglab.tasks.DiffusionModule", help="the checkpoint's module class")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in the grid (conditional models)")
    parser.add_argument("--num-samples", type=int, default=64, help="samples in the grid (unconditional models)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the module's sample_steps)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the module's sampler")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the module's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--midi", action="store_true", help="also write every sample as a MIDI file (piano-roll models)")
    parser.add_argument("--lowest-pitch", type=int, default=60, help="the MIDI note of a roll's first row (--midi)")
    parser.add_argument("--measures", action="store_true", help="also write measures.json (fits the in-repo "
                        "digits classifier once if it is not cached)")
    parser.add_argument("--measure-per-class", type=int, default=50, help="samples per class for --measures")
    parser.add_argument("--data-seed", type=int, default=0, help="split seed of the digits the model was fitted on")
    parser.add_argument("--classifier-config", default="configs/experiment/clean_digits.yaml",
                        help="`reglab fit` config of the digits classifier of --measures")
    parser.add_argument("--cache-dir", default="runs/pretrained", help="where the fitted classifier is cached")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} exists and is not an empty folder; it is kept. Fix: give a new --out folder.")
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt} does not exist. Fix: give the path of a `reglab fit` checkpoint.")
    from reglab.cli import import_class

    module = import_class(args.model_class).load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    # only what was given: a module without a sampler (a VAE) takes just the seed
    given = {"steps": args.steps, "sampler": args.sampler, "guidance_scale": args.guidance, "seed": args.seed}
    settings = {key: value for key, value in given.items() if value is not None}
    samples, labels = draw_samples(module, args.per_class, settings, args.num_samples)
    out.mkdir(parents=True, exist_ok=True)
    rows = row_names(module) if labels is not None else None
    columns = args.per_class if labels is not None else int(args.num_samples ** 0.5) or 1
    used = {k: v for k, v in {**dict(module.hparams), **settings}.items()
            if k in ("sampler", "sample_steps", "steps", "guidance_scale", "seed")}
    save_grid(samples, out / "grid.png", columns, rows, title=f"{Path(args.ckpt).name}: {used}")
    torch.save({"samples": samples.cpu(), "labels": labels, "settings": settings, "checkpoint": str(args.ckpt)},
               out / "samples.pt")
    print(f"reglab sample: wrote {out / 'grid.png'} and {out / 'samples.pt'}")
    if args.midi:
        from reglab.generative.midi import roll_to_midi

        rolls = torch.bernoulli(samples.float().cpu().clamp(0, 1), generator=torch.Generator().manual_seed(args.seed))
        for i, roll in enumerate(rolls):
            roll_to_midi(roll, out / "midi" / f"sample_{i}.mid", lowest_pitch=args.lowest_pitch)
        print(f"reglab sample: wrote {len(rolls)} MIDI files under {out / 'midi'}")
    if args.measures:
        # unconditional: as many samples as a conditional model's ten digit classes would give
        drawn, drawn_labels = draw_samples(module, args.measure_per_class, settings,
                                           DIGIT_CLASSES * args.measure_per_class)
        result = measure(drawn, drawn_labels, args.data_seed, args.classifier_config, args.cache_dir)
        (out / "measures.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"reglab sample: wrote {out / 'measures.json'}: " + json.dumps(result))
