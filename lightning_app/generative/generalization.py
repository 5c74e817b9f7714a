"""Denoisers on disjoint training subsets: memorization → generalization as the subsets grow (paper 61).

Kadkhodaie, Guth, Simoncelli & Mallat (ICLR 2024), "Generalization in diffusion models arises from
geometry-adaptive harmonic representations": two denoisers trained on two *disjoint* subsets of
size N of one image set memorize their own subset when N is small (their samples are their training
images, so the two models disagree) and, once N is large, learn nearly the same denoiser (the same
initial noise gives nearly the same sample, an image of neither subset). The setup follows the
paper's method text (Section 2): the same architecture and training for every N, trained to
convergence; samples drawn deterministically from the same initial noise by both models; the
similarity of two images is their correlation (cosine of the mean-subtracted pixels) and
memorization is the distance of a sample to its nearest image of the model's own training subset.
The official code (LabForComputationalVision, BF-CNN / UNet denoisers on CelebA 80x80) was not read
for this port; what differs, by the scale of this repository: the digits (8x8, 1,078 training
images, so N runs to half of them, not 10^5), diffusers' ``UNet2DModel`` in
:class:`~reglab.tasks.DiffusionModule` (DDPM's noise schedule and noise prediction) instead of the
paper's blind denoiser and its stochastic sampler, and DDIM (eta 0) for the deterministic samples.

*Training budget by N.* Every model gets the same number of optimizer steps (``train_steps``) on
batches drawn with replacement from its subset, whatever N: a small subset is seen thousands of
times (it converges, here to memorization), a large one as often as the budget allows; a budget in
epochs would leave the N = 8 models almost untrained and mistake that for a lack of memorization.

Per N and seed (:func:`generalization_curves`) the measures are:

* ``denoised_similarity`` — the mean correlation of the two models' clean-image estimates
  (:func:`~reglab.tasks.diffusion.predicted_clean`) on the same noisy test images at the noise
  timesteps ``noise_timesteps``, averaged over the timesteps (and per timestep);
* ``sample_similarity`` — the mean correlation of the two models' samples from the same noise;
* ``nearest_ratio`` — the mean nearest-training distance of model A's samples to subset A
  (:func:`~reglab.generative.measures.nearest_training_distance`) over that of held-out test images
  to subset A: near 0 when the samples are copies, about 1 when they are as novel as real images
  (above 1: farther from the digits than real digits are, an undertrained model's blur or noise).

Once per seed, ``untrained_sample_similarity`` is the sample similarity of two *untrained* models
(the seeds of the two models): the floor that similarity from the shared initial noise alone gives,
so a large-N similarity above it is agreement the training produced.

The claim protocol ``denoiser_generalization`` (:class:`DenoiserGeneralizationProtocol`) turns the
curves into per-seed numbers: the gain of each similarity from the smallest to the largest N
(:func:`gain`), the gain of the nearest ratio, and the crossover N where the nearest ratio reaches
``crossover_level`` (:func:`crossover_size`, reported, not judged); it draws the curves and the first
run's samples of both models per N (:func:`pairs_grid`).

Example:
    >>> import torch
    >>> round(float(image_correlation(torch.tensor([[1., 2., 3.]]), torch.tensor([[2., 4., 7.]]))[0]), 3)
    0.993
    >>> round(crossover_size([8, 32, 128], [0.2, 0.6, 1.4], level=1.0), 6)
    64.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reglab.bench.protocols import ClaimError, Protocol, register_protocol
from reglab.generative.sample import GRID_COLUMNS, grid_figure


def image_correlation(a: Tensor, b: Tensor) -> Tensor:
    """``(N,)`` correlation of each pair of images (cosine similarity of the mean-subtracted pixels):
    1 for the same image up to brightness and contrast, about 0 for unrelated ones. Without the
    centring, two images of a dark background would look alike whatever their strokes."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).float()


def gain(curve: Sequence[float]) -> float:
    """The value at the largest N minus that at the smallest (``curve`` ordered by N)."""
    return float(curve[-1] - curve[0])


def crossover_size(sizes: Sequence[int], ratios: Sequence[float], level: float = 1.0) -> float:
    """The subset size where ``ratios`` (ordered by ``sizes``) first reaches ``level``, interpolated
    linearly in log N between the neighbouring sizes; the smallest size when the first ratio is at
    the level already; NaN when no ratio reaches it.

    Example:
        >>> crossover_size([8, 32], [0.1, 0.5])
        nan
    """
    for i, ratio in enumerate(ratios):
        if ratio >= level:
            if i == 0:
                return float(sizes[0])
            low, high = ratios[i - 1], ratio
            fraction = (level - low) / (high - low)
            return float(math.exp(math.log(sizes[i - 1]) + fraction * (math.log(sizes[i]) - math.log(sizes[i - 1]))))
    return float("nan")


def disjoint_subsets(count: int, sizes: Sequence[int], seed: int) -> dict[int, tuple[Tensor, Tensor]]:
    """For each N of ``sizes``, two disjoint index sets of size N into ``count`` images. One seeded
    permutation is cut in two halves and subset N takes the first N of each half, so the subsets are
    nested across N (a larger N adds images, as in the paper's experiments).

    Example:
        >>> a, b = disjoint_subsets(10, [2, 5], seed=0)[5]
        >>> len(set(a.tolist()) | set(b.tolist()))
        10
    """
    if max(sizes) * 2 > count:
        raise ValueError(f"denoiser_generalization: two disjoint subsets of {max(sizes)} need {2 * max(sizes)} "
                         f"images, the training split has {count}. Fix: keep every size at most {count // 2}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    half = count // 2
    return {n: (order[:n], order[half:half + n]) for n in sizes}


def new_denoiser(shape: Sequence[int], seed: int, settings: dict[str, Any]) -> Any:
    """A freshly initialised (seeded) unconditional :class:`~reglab.tasks.DiffusionModule` of the settings' U-Net."""
    import lightning as L

    from reglab.tasks import DiffusionModule

    L.seed_everything(seed, verbose=False)
    return DiffusionModule(input_shape=tuple(shape), conditioning="none", attention=False,
                           block_out_channels=tuple(settings["block_out_channels"]),
                           norm_num_groups=settings["norm_num_groups"], lr=settings["lr"])


def fit_denoiser(images: Tensor, seed: int, settings: dict[str, Any]) -> Any:
    """:func:`new_denoiser` fitted on ``images`` (in [0, 1]) for ``settings["train_steps"]`` optimizer
    steps of batches drawn with replacement (the module docstring: the same budget for every N)."""
    import lightning as L
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    module = new_denoiser(images.shape[1:], seed, settings)
    steps, batch = settings["train_steps"], settings["batch_size"]
    sampler = RandomSampler(range(len(images)), replacement=True, num_samples=steps * batch)
    loader = DataLoader(TensorDataset(images), batch_size=batch, sampler=sampler,
                        collate_fn=lambda rows: {"input": torch.stack([row[0] for row in rows])})
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return module.eval()


@torch.no_grad()
def denoised_estimates(module: Any, images: Tensor, timesteps: Sequence[int], seed: int) -> list[Tensor]:
    """The module's clean-image estimates (in [-1, 1]) of ``images`` noised at each of ``timesteps``,
    the noise seeded (so two modules see the same noisy inputs)."""
    from reglab.tasks.diffusion import predicted_clean

    clean = images * 2 - 1
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    estimates = []
    for step in timesteps:
        t = torch.full((len(clean),), int(step), dtype=torch.long)
        noisy = module.scheduler.add_noise(clean, noise, t)
        estimates.append(predicted_clean(module.scheduler, noisy, module.denoise(noisy, t), t))
    return estimates


def generalization_curves(seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The per-N measures of the module docstring for one seed (the digits' split of that seed, the
    subsets of :func:`disjoint_subsets`); lists ordered by ``settings["sizes"]``; ``pairs`` holds the two
    models' first samples per N (:func:`pairs_grid`)."""
    from reglab.datamodules import DigitsDataModule
    from reglab.generative.measures import nearest_training_distance

    data = DigitsDataModule(seed=seed)
    data.setup("fit")
    data.setup("test")
    train = data.train_dataset.inputs.float()
    test = data.test_dataset.inputs.float()[: settings["test_images"]]
    sizes = sorted(settings["sizes"])
    timesteps = settings["noise_timesteps"]
    curves: dict[str, list[float]] = {"denoised_similarity": [], "sample_similarity": [], "nearest_ratio": [],
                                      **{f"denoised_similarity/t={t}": [] for t in timesteps}}
    pairs: dict[int, list[Tensor]] = {}
    for n, (first, second) in disjoint_subsets(len(train), sizes, seed).items():
        models = [fit_denoiser(train[subset], seed * 1000 + 2 * n + k, settings) for k, subset in enumerate((first, second))]
        estimates = [denoised_estimates(model, test, timesteps, seed) for model in models]
        per_level = [float(image_correlation(a, b).mean()) for a, b in zip(*estimates)]
        for t, value in zip(timesteps, per_level):
            curves[f"denoised_similarity/t={t}"].append(value)
        curves["denoised_similarity"].append(sum(per_level) / len(per_level))
        samples = [_samples(model, seed, settings) for model in models]
        pairs[n] = [images[:GRID_COLUMNS] for images in samples]
        curves["sample_similarity"].append(float(image_correlation(*samples).mean()))
        own = train[first]
        curves["nearest_ratio"].append(float(nearest_training_distance(samples[0], own).mean()
                                             / nearest_training_distance(test, own).mean()))
    untrained = [_samples(new_denoiser(train.shape[1:], seed * 1000 + k, settings), seed, settings) for k in (0, 1)]
    return {"sizes": sizes, "curves": curves, "untrained_sample_similarity": float(image_correlation(*untrained).mean()),
            "pairs": pairs}


def pairs_grid(pairs: dict[int, list[Tensor]]) -> Any:
    """A grid of the two models' first samples from the same noise, per N: a row for model A, one for B."""
    rows = [(f"N={n} {name}", images) for n, models in sorted(pairs.items()) for name, images in zip("AB", models)]
    return grid_figure(torch.cat([images for _, images in rows]), len(rows[0][1]), [name for name, _ in rows])


def _samples(model: Any, seed: int, settings: dict[str, Any]) -> Tensor:
    # the same seed for every model: the same initial noise, and DDIM (eta 0) adds none after it
    return model.sample(num_samples=settings["samples"], sampler="ddim", steps=settings["sample_steps"], seed=seed)


def plot_curves(sizes: Sequence[int], runs: list[dict[str, list[float]]], level: float, path: Path, title: str) -> None:
    """Similarity (denoised estimates, samples) and the nearest-training ratio vs N, mean ± std over
    the seeds' ``runs`` (each ``{measure: curve}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], ("denoised_similarity", "sample_similarity"), "correlation of the two models"),
              (axes[1], ("nearest_ratio",), "nearest-training distance, samples / test images"))
    for ax, measures, label in panels:
        for measure in measures:
            values = np.array([run[measure] for run in runs])
            mean, std = values.mean(0), values.std(0)
            ax.plot(sizes, mean, "o-", label=measure)
            ax.fill_between(sizes, mean - std, mean + std, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training images per model (N)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[1].axhline(level, color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register_protocol("denoiser_generalization")
class DenoiserGeneralizationProtocol(Protocol):
    """One arm (``{}``, or ``{label}``); per seed the curves of :func:`generalization_curves` and the
    metrics ``sample_similarity_gain``, ``denoised_similarity_gain``, ``nearest_ratio_gain`` (largest
    N minus smallest, :func:`gain`), ``crossover_n`` (:func:`crossover_size` of the nearest ratio at
    ``crossover_level``, NaN when not reached), ``untrained_sample_similarity`` and each measure at the
    smallest and largest N. A claim
    file names ``module: reglab.generative.generalization``."""

    defaults = {"sizes": [8, 32, 128, 539], "train_steps": 400, "batch_size": 64, "lr": 1e-3,
                "block_out_channels": [16, 32], "norm_num_groups": 8, "noise_timesteps": [50, 200, 500],
                "samples": 100, "sample_steps": 30, "test_images": 200, "crossover_level": 1.0}

    def check_settings(self) -> None:
        from reglab.datamodules import DigitsDataModule

        s = self.settings
        if len(s["sizes"]) < 2 or min(s["sizes"]) < 1:
            raise ClaimError(f"claim {self.claim_name}: sizes {s['sizes']}. Fix: give at least two subset sizes >= 1.")
        data = DigitsDataModule()
        data.setup("fit")
        if 2 * max(s["sizes"]) > len(data.train_dataset):
            raise ClaimError(f"claim {self.claim_name}: two disjoint subsets of {max(s['sizes'])} need "
                             f"{2 * max(s['sizes'])} images, the digits' training split has {len(data.train_dataset)}. "
                             f"Fix: keep every size at most {len(data.train_dataset) // 2}.")
        if not all(0 <= t < 1000 for t in s["noise_timesteps"]) or not s["noise_timesteps"]:
            raise ClaimError(f"claim {self.claim_name}: noise_timesteps {s['noise_timesteps']}. Fix: give timesteps "
                             "of the 1,000-step DDPM schedule, 0 <= t < 1000.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if set(spec) - {"label"}:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: this protocol's arm takes only a label, got "
                             f"{sorted(spec)}. Fix: change the measurement through the claim's settings.")

    def describe(self) -> list[str]:
        s = self.settings
        return [f"Unconditional DDPM U-Nets (channels {s['block_out_channels']}, no attention), two per N on "
                f"disjoint subsets of the digits' training split, N in {s['sizes']}, each {s['train_steps']} AdamW "
                f"steps of {s['batch_size']} images drawn with replacement (the same budget for every N). Denoised "
                f"estimates compared on {s['test_images']} test images at timesteps {s['noise_timesteps']}; "
                f"{s['samples']} DDIM samples ({s['sample_steps']} steps) from the same noise; similarity = "
                "correlation (centred cosine) of the two models' images.", ""]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        result = generalization_curves(seed, self.settings)
        self.keep_figure(arm, "samples", lambda: pairs_grid(result["pairs"]))
        curves = result["curves"]
        metrics: dict[str, Any] = {f"curve:{name}": values for name, values in curves.items()}
        for name in ("sample_similarity", "denoised_similarity", "nearest_ratio"):
            metrics |= {f"{name}_gain": gain(curves[name]), f"{name}_smallest_n": curves[name][0],
                        f"{name}_largest_n": curves[name][-1]}
        metrics["untrained_sample_similarity"] = result["untrained_sample_similarity"]
        metrics["crossover_n"] = crossover_size(result["sizes"], curves["nearest_ratio"],
                                                self.settings["crossover_level"])
        return metrics

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        sizes = sorted(self.settings["sizes"])
        lines = []
        for arm, seeds in runs.items():
            path = out_dir / f"{claim_name}_{arm}_curves.png"
            curves = [{key.removeprefix("curve:"): value for key, value in run.items() if key.startswith("curve:")}
                      for run in seeds]
            plot_curves(sizes, curves, self.settings["crossover_level"], path,
                        f"{claim_name}: mean ± std over {len(seeds)} seed(s)")
            lines += [f"## Similarity and memorization vs N ({arm})", "", f"![curves]({path.name})", ""]
        return lines + super().figures(runs, out_dir, claim_name)
