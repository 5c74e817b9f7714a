"""Autoregressive image generation over grey-level tokens: next-frequency (NFIG) or single-scale raster.

The networks are :mod:`reglab.models.autoregressive`'s: ``model="nfig"`` (:class:`~reglab.models.autoregressive.NFIG`,
stages of increasing scale and frequency, one network evaluation a stage) or ``model="pixel_ar"``
(:class:`~reglab.models.autoregressive.PixelAR`, the quantised pixels in raster order,
``block_size`` a step). Both are the same block-causal transformer of the same size; the task
loss is the mean token cross-entropy per image, so a technique adds terms to it as to a
classifier's. Validation and test log the loss and ``{stage}/network_evaluations``, the forward
passes one sample costs (what "quality per sampling step" compares).

Example:
    >>> module = AutoregressiveImageModule(input_shape=(1, 8, 8), num_classes=10, model="nfig", d_model=16,
    ...                                    n_layers=1, n_heads=2)
    >>> batch = {"input": torch.rand(4, 1, 8, 8), "target": torch.tensor([0, 1, 2, 3])}
    >>> module.task_loss(module.forward_step(batch)).shape
    torch.Size([4])
    >>> module.sample(torch.tensor([3, 7]), seed=0).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models.autoregressive import NFIG, PixelAR
from reglab.technique import TechniqueConfigError

MODELS = ("nfig", "pixel_ar")


class AutoregressiveImageModule(RegularizedMixin, L.LightningModule):
    """A class-conditional autoregressive model of one-channel square images in [0, 1].

    The step output: ``logits`` ``(N, T, V)`` the tokens' logits, ``target`` the ``(N, T)`` tokens of
    the batch's images, ``labels`` ``None`` (the class labels are conditions, in ``out.batch``).
    ``predict`` samples one image per sample of the batch, of its class, seeded by ``sample_seed`` and
    the batch's first index.

    Args:
        input_shape, num_classes: filled from the DataModule by the ``reglab`` CLI (``(1, S, S)``).
        model: ``"nfig"`` (next-frequency stages ``scales``) or ``"pixel_ar"`` (raster, ``block_size``
            tokens a step).
        levels: grey levels of the tokens.
        scales: NFIG's stage scales (increasing, each dividing the next, the last the image size).
        block_size: PixelAR's tokens per step (1: next-pixel).
        d_model, n_layers, n_heads, dropout: the transformer's.
        temperature: of :meth:`sample`'s softmax.
        sample_seed: seed of ``predict``'s samples.
        lr, weight_decay: AdamW's; a config's ``optimizer:`` replaces it.
    """

    def __init__(self, input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 model: str = "nfig", levels: int = 5, scales: Sequence[int] = (1, 2, 4, 8), block_size: int = 1,
                 d_model: int = 64, n_layers: int = 3, n_heads: int = 4, dropout: float = 0.0,
                 temperature: float = 1.0, sample_seed: int = 0, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self._check_arguments(input_shape, num_classes, model, levels, temperature)
        self.save_hyperparameters()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        size = self.input_shape[1]
        common = dict(image_size=size, num_classes=num_classes, levels=levels, d_model=d_model, n_layers=n_layers,
                      n_heads=n_heads, dropout=dropout)
        try:
            self.net = NFIG(scales=scales, **common) if model == "nfig" else PixelAR(block_size=block_size, **common)
        except ValueError as error:
            raise TechniqueConfigError(f"AutoregressiveImageModule: {error}") from error

    @staticmethod
    def _check_arguments(input_shape, num_classes, model, levels, temperature) -> None:
        def fail(problem: str, fix: str) -> TechniqueConfigError:
            return TechniqueConfigError(f"AutoregressiveImageModule: {problem}. Fix: {fix}.")

        if input_shape is None or len(input_shape) != 3 or input_shape[0] != 1 or input_shape[1] != input_shape[2]:
            raise fail(f"input_shape is {input_shape!r}, not (1, size, size)",
                       "use square one-channel images (the digits), or run through `reglab`, which fills it")
        if not num_classes:
            raise fail("num_classes is not set", "pass it, or run through `reglab`, which fills it from the DataModule")
        if model not in MODELS:
            raise fail(f"model {model!r} is not one of {MODELS}", "pick one of them")
        if levels < 2:
            raise fail(f"levels={levels}", "use at least two grey levels")
        if temperature <= 0:
            raise fail(f"temperature={temperature}", "sample at a positive temperature (1: the model's distribution)")

    @property
    def network_evaluations(self) -> int:
        """Forward passes one sampling run costs."""
        return self.net.network_evaluations

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        return self.net(tokens, labels)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        tokens = self.net.tokens(batch["input"])
        return StepOutput(logits=self.net(tokens, batch["target"]), target=tokens, labels=None,
                          index=batch.get("index"), batch=batch)

    def task_loss(self, out: StepOutput) -> Tensor:
        """Per image: the mean token cross-entropy (nats, fp32)."""
        return F.cross_entropy(out.logits.float().transpose(1, 2), out.target, reduction="none").mean(1)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage != "train":
            self.log(f"{stage}/network_evaluations", float(self.network_evaluations), on_epoch=True,
                     batch_size=len(out.target))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        first = int(batch["index"][0]) if "index" in batch else batch_idx
        return self.sample(batch["target"], seed=self.hparams.sample_seed + first)

    @torch.no_grad()
    def sample(self, labels: Optional[Tensor] = None, num_samples: Optional[int] = None, seed: int = 0,
               temperature: Optional[float] = None) -> Tensor:
        """``(N, 1, S, S)`` samples in [0, 1], one per class index of ``labels``, seeded (``num_samples``
        draws random classes when ``labels`` is ``None``: the model is class-conditional)."""
        generator = torch.Generator(self.device).manual_seed(seed)
        if labels is None:
            if num_samples is None:
                raise ValueError("AutoregressiveImageModule.sample: give the class labels to sample, or num_samples.")
            labels = torch.randint(0, self.num_classes, (num_samples,), generator=generator, device=self.device)
        was_training = self.training
        self.eval()
        try:
            return self.net.sample(labels.to(self.device), generator=generator,
                                   temperature=temperature or self.hparams.temperature)
        finally:
            self.train(was_training)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
