"""Music FaderNets (paper 34): the piano-roll attributes and arousal against hand-computed rolls, the generator
and DataModule, the mixture prior's terms and the fader loss by hand, the technique's loss in the step
contract, its set-up errors, the MIDI round trip and the fader measures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reglab.callbacks.generative import FaderNets
from reglab.callbacks.generative.fadernets import attribute_regularization
from reglab.datamodules.music import (MusicDataModule, arousal, attributes, generate_rolls, note_density, onsets,
                                      pitch_range, rhythm_complexity)
from reglab.generative.faders import fader_choice, fader_measures, rank_correlations, slide_figure
from reglab.generative.midi import midi_notes, roll_notes, roll_to_midi
from reglab.tasks import VAEModule
from reglab.tasks.vae import diagonal_kl, gaussian_kl, mixture_kl
from reglab.technique import TechniqueConfigError


def hand_roll() -> torch.Tensor:
    """4 pitches x 8 steps: row 0 at steps 0-1 and 6-7, row 2 at step 3, row 3 at steps 4-5."""
    roll = torch.zeros(4, 8)
    roll[0, 0:2] = roll[2, 3] = roll[3, 4:6] = roll[0, 6:8] = 1
    return roll


def test_attributes_of_a_hand_written_roll():
    roll = hand_roll()
    assert onsets(roll).nonzero().tolist() == [[0, 0], [0, 6], [2, 3], [3, 4]]
    # 4 onsets in 8 steps; onset steps 0, 3, 4, 6 of which 3 and 6 are off the beat; rows 0..3 of 0..3 sound
    assert float(note_density(roll)) == 0.5
    assert float(rhythm_complexity(roll)) == 0.5
    assert float(pitch_range(roll)) == 1.0
    silent, one_note = torch.zeros(4, 8), torch.zeros(4, 8)
    one_note[1, 1:4] = 1  # one run: one onset, off the beat, one pitch
    torch.testing.assert_close(attributes(torch.stack([silent, one_note])),
                               torch.tensor([[0.0, 0.0, 0.0], [1 / 8, 1.0, 0.0]]))


def test_arousal_is_high_when_density_and_syncopation_are():
    values = torch.tensor([[0.5, 0.5, 1.0], [0.1, 0.2, 1.0], [0.25, 0.5, 0.0]])
    # (0.5/0.5 + 0.5)/2 = 0.75; (0.2 + 0.2)/2 = 0.2; (0.5 + 0.5)/2 = 0.5 is not above one half
    assert arousal(values, max_density=0.5).tolist() == [1, 0, 0]


def test_the_generator_is_seeded_monophonic_and_its_notes_are_what_is_measured():
    rolls = generate_rolls(50, pitches=12, steps=16, min_notes=2, max_notes=6, seed=3)
    assert torch.equal(rolls, generate_rolls(50, 12, 16, 2, 6, seed=3))
    assert not torch.equal(rolls, generate_rolls(50, 12, 16, 2, 6, seed=4))
    assert rolls.shape == (50, 1, 12, 16) and int(rolls.sum(2).max()) == 1  # at most one pitch a step
    counts = onsets(rolls[:, 0]).sum((1, 2))
    assert int(counts.min()) >= 2 and int(counts.max()) <= 6


def test_the_datamodule_batches_carry_measured_attributes_and_arousal():
    data = MusicDataModule(num_samples=120, pitches=12, steps=16, max_notes=6, batch_size=16, seed=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input"].shape == (16, 1, 12, 16) and "attributes" in data.batch_keys
    torch.testing.assert_close(batch["attributes"], attributes(batch["input"][:, 0]))
    assert torch.equal(batch["target"], arousal(batch["attributes"], 6 / 16))
    with pytest.raises(ValueError, match="max_notes"):
        MusicDataModule(steps=16, max_notes=20)


def test_the_mixture_prior_terms_by_hand():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # a N(0, I) component gives the plain KL; a component at (1, 0) with variance 4 by the formula
    standard = diagonal_kl(mu, logvar, torch.zeros(1, 2), torch.zeros(1, 2))
    torch.testing.assert_close(standard, gaussian_kl(mu, logvar).unsqueeze(1))
    shifted = diagonal_kl(mu, logvar, torch.tensor([[1.0, 0.0]]), torch.full((1, 2), math.log(4.0)))
    expected = 0.5 * (math.log(4) - 0 + 1 / 4 - 1) + 0.0
    torch.testing.assert_close(shifted, torch.tensor([[expected]]))
    # equal component posteriors: the class term vanishes, the latent term is the average KL
    kls = torch.tensor([[2.0, 4.0]])
    torch.testing.assert_close(mixture_kl(torch.zeros(1, 2), kls), torch.tensor([3.0]))
    # q = (1, 0) in the limit: KL_0 + log 2
    torch.testing.assert_close(mixture_kl(torch.tensor([[0.0, -1e4]]), kls), torch.tensor([2.0 + math.log(2)]))

    module = VAEModule(input_shape=(3,), latent_dim=1, hidden_dims=(4,), prior_components=2, prior_logvar=0.0)
    with torch.no_grad():
        module.prior_means.copy_(torch.tensor([[0.0], [1.0]]))
    # log N(0.5; m, 1) - log 2 for m = 0, 1
    value = -0.5 * (0.25 + math.log(2 * math.pi)) - math.log(2)
    torch.testing.assert_close(module.component_logits(torch.tensor([[0.5]])), torch.tensor([[value, value]]))
    draws = module.sample(labels=torch.tensor([0, 1]), seed=0)
    assert draws.shape == (2, 3) and module.num_classes == 2


def test_the_fader_loss_by_hand():
    z, a = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])
    # pairs (0, 1) and (1, 0): (tanh(-1) + 1)^2 and (tanh(1) - 1)^2; the diagonal adds 0
    expected = 2 * (1 - math.tanh(1.0)) ** 2 / 4
    torch.testing.assert_close(attribute_regularization(z, a), torch.tensor(expected))
    torch.testing.assert_close(attribute_regularization(z, a, delta=2.0), torch.tensor(2 * (1 - math.tanh(2.0)) ** 2 / 4))
    # ties give sign 0: the pair is pushed together
    torch.testing.assert_close(attribute_regularization(z, torch.zeros(2)), torch.tensor(2 * math.tanh(1.0) ** 2 / 4))


def test_labelled_samples_train_on_their_component_and_the_classifier():
    torch.manual_seed(0)
    module = VAEModule(input_shape=(1, 4, 8), latent_dim=3, hidden_dims=(8,), beta=0.5, prior_components=2)
    batch = {"input": torch.rand(4, 1, 4, 8).round(), "target": torch.tensor([1, 0, 0, 1]), "index": torch.arange(4),
             "attributes": torch.rand(4, 2)}
    out = module.forward_step(batch)
    faders = FaderNets(attribute_dims=[2, 0], regularization_weight=3.0, classification_weight=2.0,
                       labelled_fraction=0.5)
    assert faders.labelled(batch["index"]).tolist() == [True, False, True, False]
    component = module.component_kl(out.extras["mu"], out.extras["logvar"])
    kl = torch.stack([component[0, 1], out.extras["kl"][1], component[2, 0], out.extras["kl"][3]])
    torch.testing.assert_close(faders.task_loss(out, module), out.extras["reconstruction"] + 0.5 * kl)
    terms = faders.loss_terms(out, module)
    z = out.extras["z"]
    torch.testing.assert_close(terms["ar_0"], 3.0 * attribute_regularization(z[:, 2], batch["attributes"][:, 0]))
    torch.testing.assert_close(terms["ar_1"], 3.0 * attribute_regularization(z[:, 0], batch["attributes"][:, 1]))
    logits = out.extras["component_logits"][[0, 2]]
    torch.testing.assert_close(terms["classification"],
                               2.0 * torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])))
    assert "classification" not in FaderNets(labelled_fraction=0.0).loss_terms(out, module)
    with pytest.raises(TechniqueConfigError, match="attribute_dims"):
        FaderNets(attribute_dims=[0]).loss_terms(out, module)


def test_set_up_errors_name_the_fix():
    from reglab import registry

    trainer = registry.example_trainer(max_steps=1)
    plain = VAEModule(input_shape=(1, 24, 32), latent_dim=4, hidden_dims=(8,))
    with pytest.raises(TechniqueConfigError, match="prior_components"):
        FaderNets().setup(trainer, plain, "fit")
    mixture = VAEModule(input_shape=(1, 24, 32), latent_dim=4, hidden_dims=(8,), prior_components=2)
    with pytest.raises(TechniqueConfigError, match="latent_dim"):
        FaderNets(attribute_dims=[0, 5]).setup(trainer, mixture, "fit")
    with pytest.raises(TechniqueConfigError, match="labelled_fraction"):
        FaderNets(labelled_fraction=2.0)
    with pytest.raises(TechniqueConfigError, match="repeat"):
        FaderNets(attribute_dims=[1, 1])


def test_a_roll_round_trips_through_midi(tmp_path):
    roll = hand_roll()
    path = roll_to_midi(roll.unsqueeze(0), tmp_path / "bar.mid", lowest_pitch=60, step_seconds=0.25)
    notes = [(n.pitch, round(float(n.start), 6), round(float(n.end), 6)) for n in midi_notes(path)]
    assert notes == [(60, 0.0, 0.5), (62, 0.75, 1.0), (63, 1.0, 1.5), (60, 1.5, 2.0)]
    assert roll_notes(roll) == [(0, 0, 2), (2, 3, 1), (3, 4, 2), (0, 6, 2)]
    with pytest.raises(FileExistsError, match="kept"):
        roll_to_midi(roll, path)


class CountingFader(nn.Module):
    """A stand-in VAE: the latent is the input's first two numbers; the decoded bar sounds row 0 at every
    other step below ``z_0 · steps`` (certain cells, so the Bernoulli draws are exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return x[:, :2], torch.zeros_like(x[:, :2])

    def mean_output(self, z):
        steps = torch.arange(16).float()
        cells = ((steps < z[:, :1] * 16) & (steps % 2 == 0)).float()
        return torch.nn.functional.pad(cells[:, None, None, :], (0, 0, 0, 3))


def test_fader_measures_pick_and_slide_the_faders():
    latents = torch.tensor([[0.1, 3.0, 0.0], [0.4, 2.0, 1.0], [0.2, 1.0, 0.0], [0.9, 0.0, 1.0]])
    values = torch.stack([latents[:, 0] * 2, -latents[:, 1]], 1)
    correlations = rank_correlations(latents, values)
    # ranks: column 0 (1, 3, 2, 4), column 1 (4, 3, 2, 1); the attributes (1, 3, 2, 4) and (1, 2, 3, 4);
    # 1 - 6 sum d^2 / (n (n^2 - 1)) with sum d^2 = 2 or 18
    torch.testing.assert_close(correlations[:2], torch.tensor([[1.0, 0.8], [-0.8, -1.0]]))
    assert correlations[2].abs().max() < 1  # the third column has ties only
    assert fader_choice(correlations, "best") == ([0, 1], [1.0, -1.0])
    assert fader_choice(-correlations, "best") == ([0, 1], [-1.0, 1.0])
    assert fader_choice(correlations, "tied", [2, 0]) == ([2, 0], [1.0, 1.0])

    inputs = torch.tensor([[0.1, 0.0], [0.5, 1.0], [0.9, 0.5], [0.3, 0.2]])
    bars = torch.stack([CountingFader().mean_output(inputs[i:i + 1])[0, 0] for i in range(4)])
    measured = attributes(bars)
    result = fader_measures(CountingFader(), inputs, measured, faders="tied", slide_steps=5, slide_bases=2,
                            names=("note_density", "rhythm_complexity"))
    assert result["rho_note_density"] == pytest.approx(1.0)
    # sliding z_0 from its 5th to 95th percentile adds notes on the beat and off it alike
    assert result["slide_rho_note_density"] == pytest.approx(1.0) and result["slide_change_note_density"] > 0
    assert "arousal_accuracy" not in result
    # the figure's slide of the first bar spans the fader's range over all inputs: more notes bar after bar
    figure, (joined,) = slide_figure(CountingFader(), inputs, [0], [1.0], slide_steps=5, names=("note_density",))
    bars = joined.view(4, 5, 16).permute(1, 0, 2)
    assert joined.shape == (4, 80) and note_density(bars).tolist() == sorted(note_density(bars).tolist())
    assert float(note_density(bars[-1])) > float(note_density(bars[0]))
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_a_fitted_gm_vae_samples_one_row_per_component_as_midi(one_thread, tmp_path):
    from reglab import registry
    from reglab.generative.sample import main as sample_main

    module = VAEModule(input_shape=(1, 12, 16), latent_dim=3, hidden_dims=(8,), prior_components=2)
    trainer = registry.example_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path,
                                       callbacks=[FaderNets(labelled_fraction=0.5)])
    trainer.fit(module, datamodule=MusicDataModule(num_samples=120, pitches=12, steps=16, max_notes=6, batch_size=16))
    trainer.save_checkpoint(tmp_path / "fadernets.ckpt")
    out = tmp_path / "samples"
    sample_main(["--ckpt", str(tmp_path / "fadernets.ckpt"), "--model-class", "reglab.tasks.VAEModule", "--out",
                 str(out), "--per-class", "2", "--midi", "--lowest-pitch", "48"])
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["labels"].tolist() == [0, 0, 1, 1] and saved["samples"].shape == (4, 1, 12, 16)
    files = sorted((out / "midi").glob("*.mid"))
    assert len(files) == 4 and all(48 <= note.pitch < 60 for path in files for note in midi_notes(path))


@pytest.mark.parametrize("name", ["reglab.datamodules.music", "reglab.callbacks.generative.fadernets",
                                  "reglab.generative.midi", "reglab.tasks.vae"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(name), verbose=False).failed == 0
