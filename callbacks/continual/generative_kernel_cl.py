"""Generative kernel continual learning (Derakhshani, Zhen, Shao & Snoek 2021, arXiv 2112.13410,
paper 09): kernel continual learning whose per-task support set is *generated*, not stored.

Kernel continual learning (:mod:`.kernel_continual_learning`) classifies a task's queries by kernel
ridge regression on that task's stored coreset. Here a class-conditional generator of inputs stands
in for the coreset: for task t, ``support_per_class`` samples of each of the task's classes are drawn
and passed through the current backbone, and the same closed-form classifier is fitted on them

    x ~ p(x | y),  y in classes(t)       scores = scale * K(h(x_q), h(X_gen)) (K_gen + ridge I)^-1 Y_gen

in training (fresh draws every optimizer step) and at evaluation (one fixed draw per task). The
memory carried from task to task is the generator alone, counted in bytes by the runner.

The generator: one Gaussian per class with a shared low-rank covariance,

    p(x | y) = N(mu_y, W W^T + sigma^2 I),      W: (d, rank)

fitted in closed form as probabilistic PCA (Tipping & Bishop 1999) of the within-class residuals
``x - mu_y``: with ``lambda_1 >= ... >= lambda_d`` and ``U`` the eigenvalues and vectors of their
covariance, ``sigma^2 = mean(lambda_{rank+1..d})`` and ``W = U_rank (Lambda_rank - sigma^2 I)^(1/2)``.
When task t's classes arrive, their means are set from the task's data and the *shared* ``W`` and
``sigma^2`` are refitted on the new residuals together with residuals generated from the generator
as it was (as many per earlier class as the new task has per class): generative replay on the
generator only, as the paper's "we replay only on the generative model", so the classifier and the
backbone see no replayed data. The backbone is trained, as in kernel continual learning, through the
kernel classifier's cross-entropy, plus the paper's supervised contrastive regularization
(Khosla et al. 2020, ``reglab.nn.contrastive``) over the batch's and the generated support's features
(``contrastive_weight`` times it; temperature ``contrastive_temperature``), which pulls the features
of the generated samples to those of real ones of their class.

The paper has no released code (the authors' kernel continual learning repository,
github.com/mmderakhshani/KCL, holds an unfinished ``main_kernel_vae.py`` whose generator training is
an empty function, with a Gaussian-mixture VAE beside it). The paper's generator is a conditional
VAE with class-conditional learnable Gaussian priors, trained by the ELBO with replay of its own
samples. This implementation keeps that structure — a shared linear-Gaussian decoder, a learnt
Gaussian per class, replay on the generator only — and fits it in closed form: the optimum of a
VAE whose decoder is linear and whose likelihood is Gaussian is probabilistic PCA (Lucas et al.
2019, "Don't blame the ELBO"), so no encoder has to be stored or trained by SGD, and the memory is
``num_classes x d + d x rank + 1`` numbers. The supervised contrast is applied to the backbone's
features (the kernel's input), where the paper applies it to make the generated samples
discriminative for the kernel; its weight and temperature are not given in the abstract and are
this implementation's (0.1, and SupCon's 0.07).

State (in checkpoints): the generator (class means, shared basis, noise variance) and which task
each class belongs to. Every draw is seeded by ``(seed, task, step)``: a resumed run draws the same
samples, and every DDP rank (which fits the generator on the whole task's training set) the same.

Method card (what it does, when it helps, what it costs): ``generative_kernel_cl.card.yaml``.

Example:
    >>> from reglab.callbacks import GenerativeKernelCL
    >>> gkcl = GenerativeKernelCL(support_per_class=20, rank=8)   # reglab fit-tasks, scenario task
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.continual.kernel_continual_learning import KernelContinualLearning, seeded
from reglab.nn.contrastive import mean_positive_log_prob
from reglab.step import StepOutput

EVALUATION_DRAW, REPLAY_DRAW = -1, -2  # the "step" numbers of the fixed evaluation draw and of replay


def class_means(inputs: Tensor, targets: Tensor, classes: Tensor) -> Tensor:
    """``(len(classes), d)``: the mean input of each class.

    Example:
        >>> class_means(torch.tensor([[0.], [2.], [5.]]), torch.tensor([1, 1, 0]), torch.tensor([0, 1]))
        tensor([[5.],
                [1.]])
    """
    return torch.stack([inputs[targets == cls].mean(0) for cls in classes.tolist()])


def fit_ppca(residuals: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Probabilistic PCA of zero-mean ``residuals`` (n, d): the basis ``W`` (d, rank) and the noise
    variance ``sigma^2`` of ``N(0, W W^T + sigma^2 I)`` at the maximum of the likelihood.

    Example:
        >>> basis, noise = fit_ppca(torch.tensor([[2., 0.], [-2., 0.], [0., 1.], [0., -1.]]), rank=1)
        >>> basis.abs().flatten().tolist(), float(noise)   # covariance diag(2, 0.5): sqrt(2 - 0.5), 0.5
        ([1.2247449159622192, 0.0], 0.5)
    """
    covariance = residuals.T.double() @ residuals.double() / len(residuals)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    noise = eigenvalues[rank:].mean() if rank < len(eigenvalues) else eigenvalues.new_zeros(())
    basis = eigenvectors[:, :rank] * (eigenvalues[:rank] - noise).clamp_min(0).sqrt()
    return basis.float(), noise.float()


def sample_residuals(basis: Tensor, noise: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of ``W z + sigma eps``, ``z ~ N(0, I_rank)``, ``eps ~ N(0, I_d)``."""
    latent = torch.randn(count, basis.shape[1], generator=generator)
    return latent @ basis.T + noise.sqrt() * torch.randn(count, basis.shape[0], generator=generator)


def supervised_contrast(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """SupCon (Khosla et al. 2020) over one set of labelled rows: for each anchor, the mean over the
    other rows of its class of ``log softmax`` of the cosine similarities over all other rows."""
    not_self = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    positives = not_self & (labels[:, None] == labels[None, :])
    has_positive = positives.any(1)
    log_prob = mean_positive_log_prob(features, positives, not_self, temperature)
    return -(log_prob * has_positive).sum() / has_positive.sum().clamp_min(1)


class GenerativeKernelCL(KernelContinualLearning):
    """Kernel continual learning with a generated support set instead of a stored coreset (see the
    module docstring).

    Args:
        support_per_class: generated support samples per class of a task.
        rank: rank of the generator's shared covariance basis.
        contrastive_weight: weight of the supervised contrastive term (0: off).
        contrastive_temperature: its temperature.
        kernel, ridge, scale, num_random_features, bandwidth, seed: as :class:`KernelContinualLearning`.
    """

    name = "generative_kernel_cl"

    needs = frozenset()

    def __init__(self, support_per_class: int = 20, rank: int = 8, contrastive_weight: float = 0.1,
                 contrastive_temperature: float = 0.07, kernel: str = "linear", ridge: float = 0.1,
                 scale: float = 1.0, num_random_features: int = 1024, bandwidth: float | None = None,
                 seed: int = 0) -> None:
        super().__init__(core_size=1, kernel=kernel, ridge=ridge, scale=scale,
                         num_random_features=num_random_features, bandwidth=bandwidth, seed=seed)
        if support_per_class < 2 or rank < 1 or contrastive_weight < 0 or contrastive_temperature <= 0:
            raise ValueError(f"GenerativeKernelCL: support_per_class must be at least 2, rank at least 1, "
                             f"contrastive_weight >= 0 and contrastive_temperature > 0; got {support_per_class}, "
                             f"{rank}, {contrastive_weight}, {contrastive_temperature}")
        self.support_per_class, self.rank = support_per_class, rank
        self.arguments = {"support_per_class": support_per_class, "rank": rank, "contrastive_weight": contrastive_weight,
                          "contrastive_temperature": contrastive_temperature,
                          **{k: v for k, v in self.arguments.items() if k != "core_size"}}
        self.contrastive_weight, self.contrastive_temperature = contrastive_weight, contrastive_temperature
        self.generator: dict[str, Tensor] = {}  # means (C, d), basis (d, rank), noise ()
        self.input_shape: tuple[int, ...] = ()

    # -- the generator takes the coreset's place ----------------------------------------------------
    def remember_task(self, data: dict[str, Tensor], classes: Tensor, task: int) -> None:
        """Fit the new classes' means, refit the shared covariance with replay of the earlier classes."""
        inputs, targets = data["input"].float().flatten(1), data["target"].long()
        self.input_shape = tuple(data["input"].shape[1:])
        means = self.generator.get("means", inputs.new_zeros(len(self.class_task), inputs.shape[1]))
        means[classes] = class_means(inputs, targets, classes)
        residuals = inputs - means[targets]
        earlier = ((self.class_task > 0) & (self.class_task != task + 1)).sum()
        if "basis" in self.generator and earlier:
            per_class = -(-len(inputs) // len(classes))
            replayed = sample_residuals(self.generator["basis"], self.generator["noise"], int(earlier) * per_class,
                                        seeded(self.seed, task, REPLAY_DRAW))
            residuals = torch.cat([residuals, replayed])
        basis, noise = fit_ppca(residuals, min(self.rank, inputs.shape[1]))
        self.generator = {"means": means, "basis": basis, "noise": noise}

    def support(self, task: int, module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """``support_per_class`` generated samples of each of the task's classes: fresh per optimizer
        step in training, one fixed draw per task at evaluation."""
        classes = (self.class_task == task + 1).nonzero().flatten()
        targets = classes.repeat_interleave(self.support_per_class)
        trainer = getattr(module, "_trainer", None)
        step = trainer.global_step if module.training and trainer is not None else EVALUATION_DRAW
        residuals = sample_residuals(self.generator["basis"], self.generator["noise"], len(targets),
                                     seeded(self.seed, task, step))
        inputs = self.generator["means"][targets] + residuals
        return inputs.reshape(len(targets), *self.input_shape), targets

    # -- the supervised contrastive regularization ---------------------------------------------------
    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if not self.contrastive_weight or not self.generator:
            return {}
        inputs, targets = self.support(self.task, module)
        support_features = module.backbone(inputs.to(out.features.device, out.features.dtype))
        features = torch.cat([out.features, support_features])
        labels = torch.cat([out.labels, targets.to(out.labels.device)])
        return {"supcon": self.contrastive_weight * supervised_contrast(features, labels, self.contrastive_temperature)}

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in super().state_dict().items() if key != "set_aside"}
        return {**state, **{f"generator.{k}": v.clone() for k, v in self.generator.items()},
                "input_shape": list(self.input_shape)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "set_aside": torch.empty(0, dtype=torch.long)})
        self.generator = {key[len("generator."):]: value.clone() for key, value in state_dict.items() if key.startswith("generator.")}
        self.input_shape = tuple(state_dict["input_shape"])
