"""The VAE task module: the negative ELBO's two terms by hand, the step output, seeded sampling and
reconstruction, the set-up errors and `reglab sample` on a VAE checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from reglab import registry
from reglab.generative.sample import main as sample_main
from reglab.tasks import VAEModule
from reglab.tasks.vae import gaussian_kl, reconstruction_nll
from reglab.technique import TechniqueConfigError


def test_the_kl_term_by_hand():
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (s^2 + m^2 - 1 - log s^2) per dimension
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    expected = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (4 + 0 - 1 - math.log(4.0))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.tensor([expected]))


def test_the_reconstruction_terms_by_hand():
    logits, target = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[1.0, 0.0]])
    # Bernoulli: -log sigmoid(0) - log(1 - sigmoid(log 3)) = log 2 + log 4
    torch.testing.assert_close(reconstruction_nll(logits, target, "bernoulli"), torch.tensor([math.log(8.0)]))
    means = torch.tensor([[1.0, 2.0]])
    gaussian = 0.5 * (0 + 4) + math.log(2 * math.pi)
    torch.testing.assert_close(reconstruction_nll(means, target, "gaussian"), torch.tensor([gaussian]))


def test_the_loss_is_reconstruction_plus_beta_kl_and_evaluation_is_seeded(one_thread):
    torch.manual_seed(0)
    module = VAEModule(input_shape=(1, 8, 8), latent_dim=3, hidden_dims=(16,), beta=0.5)
    batch = {"input": torch.rand(5, 1, 8, 8), "target": torch.arange(5), "index": torch.arange(5)}
    out = module.forward_step(batch)
    assert out.logits.shape == (5, 1, 8, 8) and out.features.shape == (5, 3) and out.labels is None
    torch.testing.assert_close(module.task_loss(out), out.extras["reconstruction"] + 0.5 * out.extras["kl"])
    torch.testing.assert_close(out.extras["kl"], gaussian_kl(out.extras["mu"], out.extras["logvar"]))
    module.eval()
    first, second = (module.task_loss(module.forward_step(batch)) for _ in range(2))
    torch.testing.assert_close(first, second)
    a = module.sample(num_samples=4, seed=1)
    assert torch.equal(a, module.sample(num_samples=4, seed=1)) and not torch.equal(a, module.sample(num_samples=4, seed=2))
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(module.predict_step(batch, 0), module.decode(module.encode(batch["input"])[0]).sigmoid())


def test_set_up_errors_name_the_fix():
    with pytest.raises(TechniqueConfigError, match="input_shape"):
        VAEModule()
    with pytest.raises(TechniqueConfigError, match="likelihood"):
        VAEModule(input_shape=(64,), likelihood="poisson")


def test_the_sample_command_draws_an_unconditional_grid(one_thread, tmp_path):
    module = VAEModule(input_shape=(1, 8, 8), latent_dim=3, hidden_dims=(16,))
    trainer = registry.example_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=registry.example_data(batch_size=64, data="diffusion"))
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    out = tmp_path / "samples"
    sample_main(["--ckpt", str(tmp_path / "vae.ckpt"), "--model-class", "reglab.tasks.VAEModule", "--out", str(out),
                 "--num-samples", "9"])
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (9, 1, 8, 8) and saved["labels"] is None and (out / "grid.png").is_file()
