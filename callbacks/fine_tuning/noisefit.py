"""NoiseFiT — noise-augmented fine-tuning with SNR-selected layers (Khadangi et al., 2025, paper 62).

Fine-tuning (every parameter trains, from ``pretrained_checkpoint`` when given) where, at each
step, the batch also runs twice with adaptive Gaussian noise added to the outputs of a few layers,
and the loss ties the noisy predictions to the clean one. This follows the official first-version
trainer (``NoiseFiT_v1_manual_snr.py`` of github.com/akhadangi/NoiseFiT, the paper's method;
its defaults):

* **Layer choice by signal-to-noise ratio**, once, on the first training batch, in eval mode:
  for every candidate layer with clean output ``h``, ``SNR = mean|h| / mean|h~ - h|``, where
  ``h~`` is ``h`` with the adaptive noise below at ``base_std = noise_std * std(h)``, averaged over
  ``snr_passes = 10`` draws. The ``num_layers = 3`` layers of largest SNR (``snr="largest"``;
  ``"lowest"`` the other end) get noise from then on. The official code ranks a decoder's
  transformer blocks; here the candidates are the ``nn.Linear`` / ``nn.Conv2d`` layers outside the
  task head (the CNN's convolutions, the ViT's projections, MiniLM's query / key / value / dense),
  narrowed by ``target_modules``. Under DDP rank 0's choice is broadcast.
* **Adaptive noise** on a selected layer's output ``h`` (per token / position, over the feature
  dimension: the last one, the channels of a convolution), official ``adaptive_noise_injection``:

      m = median(h), MAD = median|h - m|  (at least 1e-6 ||h||),   w = exp(-beta |h - m| / MAD)
      f = min(exp(var(h) / mean over tokens of var(h)), 5)
      h~ = h + eps * base_std * MAD * w * f,    eps ~ N(0, 1),   beta = 0.1

  with ``base_std = noise_std^2 * std(h)`` during training: the official hook multiplies by
  ``noise_std`` twice (``noise_std * std(h)``, then ``* noise_std`` again), kept as it is.
* **Hybrid loss**, official ``compute_loss``, over the clean logits ``z`` and two noisy passes
  ``z1``, ``z2``:

      L = alpha * CE(z, y) + (1 - alpha) * [KL(softmax(z / T) || softmax(z1)) + KL(.. || softmax(z2))] / 2
          + lam * KL(softmax(z2) || softmax(z1)),        alpha = 0.5, T = 1, lam = 0.1

  (gradients flow through the clean targets too, as in the official code). The step contract's
  task loss becomes ``alpha * CE`` (this technique replaces it), the other two are its loss terms
  ``soft_ce`` and ``consistency``. Two extra forward passes per step; a batch-norm layer updates
  its running statistics in each of them.

The paper fine-tunes LLMs with LoRA; here NoiseFiT goes on top of full fine-tuning (stacking it on
a PEFT technique's surgery also works: it only hooks layer outputs). Written by hand: no library
has it.

Method card (what it does, when it helps, what it costs): ``noisefit.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.fine_tuning import NoiseFiT
    >>> noisefit = NoiseFiT(noise_std=0.1, num_layers=3, alpha=0.5, lam=0.1)
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.checkpoints import copy_pretrained_weights, load_state_dict_file
from reglab.mixins import StepOutput
from reglab.technique import Technique

EPSILON = 1e-6
#: module-name parts of a task head (``ClassificationModule.head``, transformers' ``classifier`` /
#: ``score``): its output is the logits, which NoiseFiT never perturbs
HEAD_NAMES = frozenset({"head", "classifier", "score"})


def feature_dim(output: Tensor) -> int:
    """The feature dimension of a layer's output: channels of ``(N, C, H, W)``, else the last."""
    return 1 if output.dim() == 4 else -1


def adaptive_noise(h: Tensor, base_std: Tensor | float, beta: float = 0.1) -> Tensor:
    """``h`` plus the official adaptive Gaussian noise (see the module docstring), in ``h``'s dtype."""
    dim, x = feature_dim(h), h.float()
    variance = x.var(dim, keepdim=True)
    factor = torch.exp(variance / (variance.mean() + EPSILON)).clamp(max=5.0)
    median = x.median(dim, keepdim=True).values
    deviation = (x - median).abs()
    mad = deviation.median(dim, keepdim=True).values.clamp_min(EPSILON * x.norm(dim=dim, keepdim=True))
    weight = torch.exp(-beta * deviation / (mad + EPSILON))
    return (x + torch.randn_like(x) * (base_std * mad * weight * factor)).to(h.dtype)


def kl_rows(log_q: Tensor, p: Tensor) -> Tensor:
    """``mean_n KL(p_n || q_n)`` from log-probabilities ``log_q`` and probabilities ``p``."""
    return F.kl_div(log_q, p, reduction="none").sum(-1).mean()


class NoiseFiT(Technique):
    """SNR-selected layers, adaptive noise and the hybrid loss (see the module docstring).

    Args:
        noise_std: base noise scale (official 0.1).
        num_layers: how many layers get noise (official 3).
        snr: ``"largest"`` or ``"lowest"``: which end of the SNR ranking (official largest).
        alpha: weight of the clean cross-entropy; ``1 - alpha`` that of the soft cross-entropy (official 0.5).
        lam: weight of the consistency term (official 0.1).
        temperature: of the clean soft targets (official 1).
        beta: sensitivity of the noise weighting to a feature's deviation from the median (official 0.1).
        snr_passes: noisy draws per layer for the SNR (official 10).
        target_modules: regexes over module names narrowing the candidate layers (``None`` = all).
        pretrained_checkpoint: a Lightning checkpoint or state dict of the same module to start
            from (every entry is loaded; the claims harness passes it).
    """

    name = "noisefit"
    stateful = True  # the chosen layers: every rank and a resumed run keep the same ones
    layer_types = (nn.Linear, nn.Conv2d)

    def __init__(self, noise_std: float = 0.1, num_layers: int = 3, snr: str = "largest", alpha: float = 0.5,
                 lam: float = 0.1, temperature: float = 1.0, beta: float = 0.1, snr_passes: int = 10,
                 target_modules: list[str] | None = None, pretrained_checkpoint: str | None = None) -> None:
        if snr not in ("largest", "lowest"):
            raise ValueError(f"NoiseFiT: snr must be 'largest' or 'lowest', got {snr!r}")
        if noise_std < 0 or num_layers < 1 or not 0 <= alpha <= 1 or lam < 0 or temperature <= 0 or snr_passes < 1:
            raise ValueError("NoiseFiT: need noise_std >= 0, num_layers >= 1, 0 <= alpha <= 1, lam >= 0, "
                             f"temperature > 0 and snr_passes >= 1, got {noise_std}, {num_layers}, {alpha}, {lam}, "
                             f"{temperature} and {snr_passes}")
        self.noise_std, self.num_layers, self.snr, self.alpha, self.lam = noise_std, num_layers, snr, alpha, lam
        self.temperature, self.beta, self.snr_passes = temperature, beta, snr_passes
        self.target_modules, self.pretrained_checkpoint = target_modules, pretrained_checkpoint
        self.candidates: list[str] = []
        #: ``{"trainable": ..., "total": ...}`` parameters of the module, at setup (what the claims report)
        self.parameter_counts: dict[str, int] = {}
        #: 1 for each of ``candidates`` that gets noise, 0 otherwise (empty until the first training batch)
        self.selected = torch.zeros(0, dtype=torch.long)
        self._inject = False
        self._hooks: list[Any] = []

    # -- set-up ---------------------------------------------------------------------------------
    def candidate_layers(self, module: nn.Module) -> list[str]:
        names = [name for name, layer in module.named_modules()
                 if isinstance(layer, self.layer_types) and not HEAD_NAMES & set(name.split("."))]
        if self.target_modules is not None:
            names = [name for name in names if any(re.search(p, name) for p in self.target_modules)]
        if not names:
            raise self.fail(
                f"no nn.Linear / nn.Conv2d layer outside the task head matches target_modules={self.target_modules}",
                "give target_modules regexes that match layer names of the module, or leave it unset")
        return names

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.pretrained_checkpoint and not getattr(pl_module, "_reglab_noisefit_started", False):
            # once per module: a later fit of the same model continues from where it is
            state = load_state_dict_file(self.pretrained_checkpoint)
            try:
                copy_pretrained_weights(pl_module, state, sorted({key.split(".")[0] for key in pl_module.state_dict()}))
            except ValueError as error:
                raise self.fail(f"pretrained_checkpoint {self.pretrained_checkpoint}: {error}",
                                "pretrain the same architecture and number of classes") from None
            pl_module._reglab_noisefit_started = True
        self.candidates = self.candidate_layers(pl_module)
        parameters = list(pl_module.parameters())
        self.parameter_counts = {"trainable": sum(p.numel() for p in parameters if p.requires_grad),
                                 "total": sum(p.numel() for p in parameters)}

    def layer_snr(self, module: L.LightningModule, batch: dict[str, Any]) -> Tensor:
        """The SNR of every candidate layer's output on ``batch`` (eval mode, no gradient)."""
        outputs: dict[int, Tensor] = {}
        hooks = [module.get_submodule(name).register_forward_hook(
            lambda _m, _i, output, i=i: outputs.__setitem__(i, output.detach()))
            for i, name in enumerate(self.candidates)]
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                module.forward_step(batch)
                snr = torch.zeros(len(self.candidates))
                for i, h in outputs.items():
                    base_std = self.noise_std * h.float().std()
                    difference = torch.stack([(adaptive_noise(h, base_std, self.beta) - h).float().abs().mean()
                                              for _ in range(self.snr_passes)]).mean()
                    snr[i] = float(h.float().abs().mean() / (difference + EPSILON))
        finally:
            module.train(was_training)
            for hook in hooks:
                hook.remove()
        return snr

    def select_layers(self, trainer: L.Trainer, module: L.LightningModule, batch: dict[str, Any]) -> None:
        snr = self.layer_snr(module, batch)
        k = min(self.num_layers, len(self.candidates))
        selected = torch.zeros(len(self.candidates), dtype=torch.long)
        selected[torch.topk(snr, k, largest=self.snr == "largest").indices] = 1
        self.selected = trainer.strategy.broadcast(selected, src=0).cpu()

    def noise_hook(self, _module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
        if not self._inject:
            return None
        return adaptive_noise(output, self.noise_std ** 2 * output.detach().float().std(), self.beta)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._hooks:
            return
        if len(self.selected) == 0:  # a resumed run has its choice from the checkpoint
            self.select_layers(trainer, pl_module, batch)
        self._hooks = [pl_module.get_submodule(name).register_forward_hook(self.noise_hook)
                       for name in self.selected_layers]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers that get noise."""
        return [name for name, chosen in zip(self.candidates, self.selected.tolist()) if chosen]

    # -- the hybrid loss ------------------------------------------------------------------------
    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return self.alpha * module.task_loss(out)

    def noisy_logits(self, module: L.LightningModule, batch: dict[str, Any]) -> Tensor:
        self._inject = True
        try:
            return module.forward_step(batch).logits.float()
        finally:
            self._inject = False

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        first, second = self.noisy_logits(module, out.batch), self.noisy_logits(module, out.batch)
        clean = F.softmax(out.logits.float() / self.temperature, dim=-1)
        soft_ce = (kl_rows(F.log_softmax(first, -1), clean) + kl_rows(F.log_softmax(second, -1), clean)) / 2
        consistency = kl_rows(F.log_softmax(first, -1), F.softmax(second, -1))
        return {"soft_ce": (1 - self.alpha) * soft_ce, "consistency": self.lam * consistency}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"selected": self.selected.clone(), "candidates": list(self.candidates)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.candidates and state_dict["candidates"] != self.candidates:
            raise self.fail("the checkpoint chose its noised layers among other layers than this module has",
                            "resume with the same model and target_modules")
        self.selected = state_dict["selected"].cpu().long()
