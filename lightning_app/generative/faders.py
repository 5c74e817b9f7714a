"""How well a VAE's latent dimensions work as faders of measured attributes (Music FaderNets, paper 34), and
the ``attribute_control`` claims protocol.

:func:`fader_measures` reads a fitted VAE (``encode``, ``mean_output``) against a split's rolls and their
measured ``attributes`` (:class:`reglab.datamodules.MusicDataModule`):

* ``rho_<attribute>`` — the Spearman rank correlation (torchmetrics) of the fader dimension's posterior
  mean with the attribute: does the dimension move monotonically with it (the paper's claim);
* ``slide_rho_<attribute>`` — sliding the fader from the 5th to the 95th percentile of its posterior means
  (``slide_steps`` values) with the other dimensions of ``slide_bases`` test samples' posterior means kept,
  decoding (a Bernoulli draw of every cell, the same uniform draws along a slide: :func:`slides`; rounding at
  0.5 would leave the MLP decoder's bars empty, whose cells are each unlikely where the exact onsets and
  pitches of a bar are not recoverable from a few dimensions) and measuring the attribute again: the Spearman correlation of fader
  value and measured attribute, averaged over the bases (0 where the attribute does not change);
  ``slide_change_<attribute>`` the measured attribute at the top minus at the bottom of the slide;
* ``*_mean`` the means over attributes; ``arousal_accuracy`` (a mixture-prior VAE) the accuracy of
  ``argmax q(y | x)`` at the posterior mean against the high-level class.

Which dimension is an attribute's fader: ``"tied"`` (attribute ``k`` on dimension ``k``, or the
``attribute_dims`` given: what FaderNets trains), or ``"best"``, the dimension whose posterior means
correlate most with the attribute in absolute value, its sign making the correlation positive — chosen on
the very split it is measured on, which favours the plain VAE it is meant for; ``tied_rho_<attribute>`` is
reported either way.

The protocol is the ``fit`` protocol (:mod:`reglab.bench.fit`) with an arm key ``faders`` (``tied`` or
``best``) that picks the fader dimensions, measured on the test split after the test run. The first seed of
each arm also leaves, beside the results page, a figure of the slides and one MIDI file per attribute: the
decoded slide of the first base, bar after bar from the bottom of the fader to the top::

    protocol: attribute_control
    module: reglab.generative.faders
    settings: {configs: [configs/experiment/music_vae.yaml]}
    arms:
      plain_vae: {faders: best}
      fadernets: {configs: [configs/technique/fadernets.yaml], faders: tied}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.functional import spearman_corrcoef

from reglab.bench.fit import FitProtocol
from reglab.bench.protocols import ClaimError, register_protocol
from reglab.datamodules.music import ATTRIBUTES, attributes as measured_attributes

FADERS = ("tied", "best")


def rank_correlations(latents: Tensor, values: Tensor) -> Tensor:
    """``(D, A)`` Spearman correlations of every latent column with every attribute column (0 for a constant one)."""
    latents, values = latents.double(), values.double()
    pairs = [spearman_corrcoef(latents[:, d], values[:, a]) for d in range(latents.shape[1]) for a in range(values.shape[1])]
    return torch.stack(pairs).nan_to_num(0.0).view(latents.shape[1], values.shape[1]).float()


def fader_choice(correlations: Tensor, faders: str, attribute_dims: Optional[Sequence[int]] = None
                 ) -> tuple[list[int], list[float]]:
    """Each attribute's fader dimension and the sign that makes it rise with the attribute (module docstring)."""
    if faders == "tied":
        dims = list(attribute_dims) if attribute_dims is not None else list(range(correlations.shape[1]))
        return dims, [1.0] * len(dims)
    best = correlations.abs().argmax(0)
    return best.tolist(), [1.0 if correlations[d, a] >= 0 else -1.0 for a, d in enumerate(best.tolist())]


@torch.no_grad()
def slides(module: nn.Module, means: Tensor, dim: int, values: Tensor, seed: int = 0) -> Tensor:
    """``(len(values), N, P, T)`` rolls decoded from ``(N, D)`` ``means`` with dimension ``dim`` set to each of
    ``values``: Bernoulli draws of the decoder's cells from one seeded uniform per cell and base, the same for every
    value (common random numbers), so that what changes along a slide is the decoder's output, not the noise."""
    z = means.unsqueeze(0).repeat(len(values), 1, 1)
    z[:, :, dim] = values.to(z).unsqueeze(1)
    probabilities = module.mean_output(z.flatten(0, 1)).float()
    probabilities = probabilities.view(len(values), len(means), *probabilities.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(probabilities.shape[1:], generator=generator).to(probabilities.device)
    return (uniform < probabilities).float()


@torch.no_grad()
def fader_measures(module: nn.Module, inputs: Tensor, values: Tensor, targets: Optional[Tensor] = None,
                   faders: str = "tied", attribute_dims: Optional[Sequence[int]] = None, slide_steps: int = 9,
                   slide_bases: int = 32, names: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """The measures of the module docstring for ``inputs`` with measured ``values`` (``(N, A)``) and high-level
    ``targets``."""
    module.eval()
    device = next(module.parameters()).device
    means = module.encode(inputs.to(device))[0].float()
    correlations = rank_correlations(means.cpu(), values.cpu())
    dims, signs = fader_choice(correlations, faders, attribute_dims)
    result: dict[str, float] = {}
    bases = means[:slide_bases]
    for a, (name, dim, sign) in enumerate(zip(names, dims, signs)):
        result[f"rho_{name}"] = sign * float(correlations[dim, a])
        result[f"tied_rho_{name}"] = float(correlations[(attribute_dims or range(len(names)))[a], a])
        low, high = torch.quantile(means[:, dim], torch.tensor([0.05, 0.95], device=device))
        grid = torch.linspace(float(low), float(high), slide_steps, device=device)
        slid = measured_attributes(slides(module, bases, dim, grid))[..., a].cpu()  # (steps, bases)
        ordered = sign * grid.cpu().double().unsqueeze(1).expand_as(slid)
        result[f"slide_rho_{name}"] = float(spearman_corrcoef(ordered, slid.double()).nan_to_num(0.0).mean())
        result[f"slide_change_{name}"] = float((slid[-1] - slid[0]).mean() * sign)
    for prefix in ("rho", "tied_rho", "slide_rho", "slide_change"):
        result[f"{prefix}_mean"] = sum(result[f"{prefix}_{name}"] for name in names) / len(names)
    if targets is not None and getattr(module, "hparams", {}).get("prior_components"):
        guess = module.component_logits(means).argmax(1).cpu()
        result["arousal_accuracy"] = float((guess == targets.cpu()).float().mean())
    return result


def slide_figure(module: nn.Module, inputs: Tensor, dims: Sequence[int], signs: Sequence[float],
                 slide_steps: int = 9, names: Sequence[str] = ATTRIBUTES) -> tuple[Any, list[Tensor]]:
    """A figure of each fader's slide of the first input over the 5th-95th percentile of all ``inputs``'
    posterior means (the decoded rolls side by side, the attribute's low end first) and each slide as one
    ``(P, steps · T)`` roll, for the MIDI files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        module.eval()
        device = next(module.parameters()).device
        means = module.encode(inputs.to(device))[0].float()
    fig, axes = plt.subplots(len(dims), 1, figsize=(10, 1.6 * len(dims)), squeeze=False)
    joined = []
    for ax, name, dim, sign in zip(axes[:, 0], names, dims, signs):
        low, high = torch.quantile(means[:, dim], torch.tensor([0.05, 0.95], device=device)).tolist()
        grid = torch.linspace(low, high, slide_steps, device=device)
        grid = grid if sign > 0 else grid.flip(0)  # from the attribute's low end to its high end
        rolls = slides(module, means[:1], dim, grid)[:, 0].cpu()  # (steps, P, T)
        joined.append(torch.cat(list(rolls), dim=-1))
        ax.imshow(joined[-1].numpy(), origin="lower", aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_title(f"fader of {name} (dimension {dim}): low to high, one bar each", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig, joined


@register_protocol("attribute_control")
class AttributeControlProtocol(FitProtocol):
    defaults = {**FitProtocol.defaults, "attribute_dims": None, "slide_steps": 9, "slide_bases": 32}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        super().__init__(claim_name, settings)
        self.midi: dict[str, list[Tensor]] = {}  # arm -> the first seed's slides, one roll per attribute

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        faders = spec.get("faders", "tied")
        if faders not in FADERS:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: faders {faders!r}. Fix: one of {list(FADERS)}.")
        super().check_arm(arm, {key: value for key, value in spec.items() if key != "faders"})

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        cli, metrics = self.fit_and_test(self.arguments(spec, seed, workdir))
        test = cli.datamodule.test_dataset
        faders = spec.get("faders", "tied")
        measures = fader_measures(cli.model, test.inputs, test.extras["attributes"], test.targets, faders,
                                  self.settings["attribute_dims"], self.settings["slide_steps"],
                                  self.settings["slide_bases"])
        if arm not in self.midi:
            means = cli.model.encode(test.inputs.to(cli.model.device))[0].detach().float().cpu()
            dims, signs = fader_choice(rank_correlations(means, test.extras["attributes"]), faders,
                                       self.settings["attribute_dims"])
            figure, self.midi[arm] = slide_figure(cli.model, test.inputs, dims, signs, self.settings["slide_steps"])
            self.keep_figure(arm, "slides", lambda: figure)
        return {**metrics, **measures}

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        from reglab.generative.midi import roll_to_midi

        lines = super().figures(runs, out_dir, claim_name)
        written = []
        for arm, rolls in self.midi.items():
            for name, roll in zip(ATTRIBUTES, rolls):
                path = out_dir / f"{claim_name}_{arm}_slide_{name}.mid"
                if not path.exists():
                    written.append(roll_to_midi(roll, path).name)
        if written:
            lines += ["MIDI of the slides (first seed, the first test bar, fader low to high):", "",
                      *[f"- [{name}]({name})" for name in written], ""]
        return lines
