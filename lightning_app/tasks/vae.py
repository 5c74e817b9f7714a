"""Variational autoencoder (Kingma & Welling 2014): an MLP encoder to a diagonal Gaussian, an MLP decoder.

No installed library has a VAE for arbitrary inputs (pythae and pyro are not installed), so the
two MLPs are written here; the distributions, the reparameterised sample and the KL divergence are
``torch.distributions``' (``Normal``, ``rsample``, ``kl_divergence``). The loss per sample is the
negative ELBO with a weight on the KL term (``beta``; 1 is the ELBO, other values the beta-VAE):
``-log p(x | z) + beta KL(q(z | x) || N(0, I))``, the reconstruction term summed over the input's
entries — Bernoulli (binary cross-entropy on logits, for inputs in [0, 1]: the digits, piano rolls) or
Gaussian with unit variance (half the squared error, up to a constant).

With ``prior_components`` K > 0 the prior is a learned Gaussian mixture (the GM-VAE of Music FaderNets,
paper 34, after the official ``gmm_model.py``): component means ``prior_means`` ``(K, latent_dim)``
(Xavier-initialised and trained, as there), every component's log-variance fixed at ``prior_logvar`` (the
official code's sigma = e^-2, log-variance -4), equal weights 1/K. ``q(y | x)`` is the posterior of the
components at the sampled ``z`` (``extras["component_logits"]``: ``log p(z | y) + log 1/K``) and the KL term
is the unsupervised GM-VAE's ``sum_y q(y | x) KL(q(z | x) || p(z | y)) + KL(q(y | x) || 1/K)``
(:func:`mixture_kl`); the official code averages the latent KL over dimensions and the class term over
components, here both are sums, as the KL of the plain VAE. A technique that knows some samples' component
(a label) replaces their term with ``KL(q(z | x) || p(z | y))`` from :meth:`component_kl`.
``sample(labels)`` then draws from the labels' components (uniformly chosen ones without labels), and
``num_classes`` is K, so ``reglab sample`` draws one row per component.

The pieces a latent-regularization technique builds on are in the step output: ``features`` the
posterior means, ``extras["z"]`` the sampled latents, ``extras["mu"]``, ``extras["logvar"]`` and
``extras["reconstruction"]`` / ``extras["kl"]`` (per sample), ``logits`` the decoder's output.

Example:
    >>> module = VAEModule(input_shape=(1, 8, 8), latent_dim=4, hidden_dims=(32,))
    >>> batch = {"input": torch.rand(3, 1, 8, 8), "target": torch.tensor([0, 1, 2])}
    >>> module.task_loss(module.forward_step(batch)).shape
    torch.Size([3])
    >>> module.sample(num_samples=2, seed=0).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import TechniqueConfigError

LIKELIHOODS = ("bernoulli", "gaussian")


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of ``widths`` with a ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def reconstruction_nll(logits: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """``(N,)`` ``-log p(x | z)`` summed over the entries: Bernoulli on logits, or unit-variance Gaussian
    on means (``0.5 (x - mean)^2 + 0.5 log 2 pi`` per entry)."""
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    return (0.5 * (target - logits).square() + 0.5 * math.log(2 * math.pi)).sum(1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``(N,)`` ``KL(N(mu, exp(logvar)) || N(0, I))``, summed over the latent dimensions."""
    posterior = Normal(mu.float(), (0.5 * logvar.float()).exp())
    return kl_divergence(posterior, Normal(torch.zeros_like(posterior.loc), torch.ones_like(posterior.scale))).sum(1)


def diagonal_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """``(N, K)`` ``KL(N(mu_n, exp(logvar_n)) || N(prior_mu_k, exp(prior_logvar_k)))`` summed over dimensions, for
    ``(N, D)`` posteriors and ``(K, D)`` priors."""
    mu, logvar = mu.float().unsqueeze(1), logvar.float().unsqueeze(1)
    prior_mu, prior_logvar = prior_mu.float().unsqueeze(0), prior_logvar.float().unsqueeze(0)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).square()) / prior_logvar.exp() - 1).sum(-1)


def mixture_kl(component_logits: Tensor, component_kl: Tensor) -> Tensor:
    """``(N,)`` the unsupervised GM-VAE KL term, ``sum_y q(y) KL_y + KL(q(y) || uniform)``, for ``(N, K)``
    log-probabilities of the components up to a constant (``component_logits``) and ``(N, K)`` latent KLs."""
    log_q = component_logits.float().log_softmax(-1)
    return (log_q.exp() * (component_kl + log_q + math.log(component_kl.shape[-1]))).sum(-1)


class VAEModule(RegularizedMixin, L.LightningModule):
    """A VAE over inputs of any shape (flattened), trained on the negative ELBO through the step contract.

    The step output: ``logits`` the decoder's output for a sampled ``z`` (logits for Bernoulli, means
    for Gaussian), ``target`` the input, ``labels`` ``None`` (class labels or attributes, which an
    attribute-regularization technique reads, stay in ``out.batch``), ``features`` the posterior
    means; the task loss is ``reconstruction + beta KL`` per sample, and both parts are logged
    (``{stage}/reconstruction``, ``{stage}/kl``). Evaluation draws the posterior sample from a generator seeded by the batch's first index, so ``val/loss`` compares epochs on the same noise.
    ``predict`` returns reconstructions of the batch (the decoder's mean at the posterior mean);
    :meth:`sample` decodes draws from the prior.

    Args:
        input_shape: filled from the DataModule by the ``reglab`` CLI.
        latent_dim: the latent's dimensions.
        hidden_dims: the encoder's hidden widths (the decoder uses them reversed).
        likelihood: ``"bernoulli"`` (inputs in [0, 1]) or ``"gaussian"``.
        beta: the KL term's weight (1: the ELBO).
        prior_components: K > 0: a learned Gaussian-mixture prior of K components (module docstring); 0: N(0, I).
        prior_logvar: the mixture components' fixed log-variance (the official GM-VAE's -4).
        lr, weight_decay: Adam's; a config's ``optimizer:`` replaces it.
    """

    def __init__(self, input_shape: Optional[Sequence[int]] = None, latent_dim: int = 8,
                 hidden_dims: Sequence[int] = (256, 128), likelihood: str = "bernoulli", beta: float = 1.0,
                 prior_components: int = 0, prior_logvar: float = -4.0, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        if input_shape is None:
            raise TechniqueConfigError("VAEModule: input_shape is not set. Fix: pass the inputs' shape, or run through "
                                       "`reglab`, which fills it from a reglab DataModule.")
        if likelihood not in LIKELIHOODS:
            raise TechniqueConfigError(f"VAEModule: likelihood {likelihood!r} is not one of {LIKELIHOODS}. Fix: pick "
                                       "one of them.")
        if prior_components == 1 or prior_components < 0:
            raise TechniqueConfigError(f"VAEModule: prior_components={prior_components}. Fix: 0 (a N(0, I) prior) or at "
                                       "least 2 mixture components.")
        if beta < 0 or latent_dim < 1:
            raise TechniqueConfigError(f"VAEModule: beta={beta}, latent_dim={latent_dim}. Fix: beta >= 0 and at least "
                                       "one latent dimension.")
        self.save_hyperparameters()
        self.input_shape = tuple(int(d) for d in input_shape)
        width = math.prod(self.input_shape)
        self.encoder = mlp([width, *hidden_dims, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *reversed(tuple(hidden_dims)), width])
        if prior_components:
            self.num_classes = prior_components
            self.prior_means = nn.Parameter(nn.init.xavier_uniform_(torch.empty(prior_components, latent_dim)))

    def component_logits(self, z: Tensor) -> Tensor:
        """``(N, K)`` ``log p(z | y) + log 1/K`` of the mixture prior's components (q(y | x)'s logits)."""
        var = math.exp(self.hparams.prior_logvar)
        log_density = -0.5 * ((z.float().unsqueeze(1) - self.prior_means.float()).square() / var
                              + self.hparams.prior_logvar + math.log(2 * math.pi)).sum(-1)
        return log_density - math.log(self.hparams.prior_components)

    def component_kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """``(N, K)`` ``KL(q(z | x) || p(z | y))`` for every mixture component ``y``."""
        return diagonal_kl(mu, logvar, self.prior_means, torch.full_like(self.prior_means, self.hparams.prior_logvar))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's ``(mu, logvar)``, each ``(N, latent_dim)``."""
        mu, logvar = self.encoder(x.flatten(1).float()).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's output (logits or means) in the input's shape."""
        return self.decoder(z).view(len(z), *self.input_shape)

    def mean_output(self, z: Tensor) -> Tensor:
        """The decoded distribution's mean: ``sigmoid(logits)`` for Bernoulli, the means for Gaussian."""
        out = self.decode(z)
        return out.sigmoid() if self.hparams.likelihood == "bernoulli" else out

    forward = mean_output

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        x = batch["input"]
        mu, logvar = self.encode(x)
        if self.training:
            z = Normal(mu, (0.5 * logvar).exp()).rsample()
        else:
            generator = torch.Generator(self.device).manual_seed(int(batch["index"][0]) if "index" in batch else 0)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        output = self.decode(z)
        extras = {"z": z, "mu": mu, "logvar": logvar,
                  "reconstruction": reconstruction_nll(output, x, self.hparams.likelihood)}
        if self.hparams.prior_components:
            extras["component_logits"] = self.component_logits(z)
            extras["kl"] = mixture_kl(extras["component_logits"], self.component_kl(mu, logvar))
        else:
            extras["kl"] = gaussian_kl(mu, logvar)
        # labels=None: the first-step label check would read the (N, C, H, W) output's channels as classes;
        # class labels or attributes stay in out.batch
        return StepOutput(logits=output, target=x, labels=None, features=mu, index=batch.get("index"),
                          batch=batch, extras=extras)

    def task_loss(self, out: StepOutput) -> Tensor:
        return out.extras["reconstruction"] + self.hparams.beta * out.extras["kl"]

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        for part in ("reconstruction", "kl"):
            self.log(f"{stage}/{part}", out.extras[part].mean(), on_step=False, on_epoch=True, batch_size=len(out.target))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.mean_output(self.encode(batch["input"])[0])

    @torch.no_grad()
    def sample(self, labels: Optional[Tensor] = None, num_samples: Optional[int] = None, seed: int = 0) -> Tensor:
        """``num_samples`` (or ``len(labels)``) decoded prior draws, as means, seeded; with a mixture prior from the
        components ``labels`` (uniformly drawn ones without), else ``labels`` only count the draws."""
        count = len(labels) if labels is not None else num_samples
        if count is None:
            raise ValueError("VAEModule.sample: give num_samples.")
        generator = torch.Generator(self.device).manual_seed(seed)
        z = torch.randn((count, self.hparams.latent_dim), generator=generator, device=self.device)
        components = self.hparams.prior_components
        if components:
            if labels is None:
                labels = torch.randint(components, (count,), generator=generator, device=self.device)
            z = self.prior_means[labels.to(self.device)] + math.exp(0.5 * self.hparams.prior_logvar) * z
        return self.mean_output(z)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
