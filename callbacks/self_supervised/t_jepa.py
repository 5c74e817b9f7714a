"""T-JEPA — augmentation-free self-supervised learning for tabular data
(Thimonier, De Melo Costa, Popineau, Rimmel & Doan, ICLR 2025).

Each feature of a flat sample ``x`` (D,) becomes a token ``w_j x_j + b_j`` (H,), and ``n_reg``
learned *regularization tokens* (``w_r``, no bias, no input) are put in front; a sinusoidal
position code is added. Per batch, a context share and a target share of the D features are
drawn; per sample, ``n_ctx`` features form the context and ``num_targets`` subsets of ``n_trgt``
other features the targets. Then

* the *context encoder* (a transformer over the regularization tokens and the context features)
  encodes the context;
* the *predictor* (a narrower transformer) reads the context tokens plus one mask token per target
  feature (with that feature's position code) and predicts the target features' latents;
* the *target encoder*, an exponential moving average of the context encoder, encodes the whole
  sample without gradient; its tokens at the target features are what is predicted;
* the loss is the mean squared error between prediction and target latents.

The representation for the downstream model is the target encoder's output on the whole sample,
all ``n_reg + D`` tokens flattened (the official ``linear_flatten`` probe input).

Source: the official code (github.com/jose-melo/t-jepa: ``src/encoder.py``, ``src/predictors.py``,
``src/mask.py``, ``src/train.py``, ``src/configs.py``), whose defaults are kept: width 64, 4 encoder
layers, 8 heads, feed-forward 256, dropout 0.1, one regularization token; a 2-layer transformer
predictor of width 64, 4 heads, feed-forward 256, dropout 0.1; context and target shares drawn in
[0.2, 0.4], 4 target subsets per context, no overlap; EMA momentum linear from 0.996 to 1 over the
run's optimizer steps; MSE loss. Where this differs from that code, and why:

* The code's feature indices index the token sequence *with* the regularization token in front, so
  the regularization token is itself sometimes context or target and the last feature never is.
  Here indices are feature indices: the regularization tokens are in every context-encoder input
  and every target-encoder output (what the paper describes), and every feature can be drawn.
* The official target encoder is a ``deepcopy`` left in train mode, so its targets carry dropout
  noise; here it runs in eval mode (deterministic targets, and an exact resume).
* Masks are drawn with torch's global generator (which reglab checkpoints), not numpy's; one context
  per sample (the code's default ``mask_num_encs = 1``).
* The learning rate, its warm-up and the weight-decay schedule are the module's optimizer's: the
  technique changes the loss, not the optimizer.

With ``label_free=True`` (the paper's pretraining) the task loss is replaced by zeros, so the fit
trains only the JEPA; the zeros keep the module's head in the graph (each of its parameters gets a
zero gradient, as DDP expects). With ``False`` the JEPA loss is a term beside the module's own task
loss. Either way the technique takes the task-loss stage, so another technique that replaces the
task loss (focal loss, GCE) is refused at setup beside it.

The context encoder and the predictor are a submodule of the module (``t_jepa``), added at setup, so
the module's optimizer, its checkpoint and DDP's gradient sync cover them; a checkpoint names a
restore hook that adds it to a bare module. The target encoder is the technique's state
(``state_dict``), made from the context encoder at the start of training (after DDP has broadcast
rank 0's weights, so every rank starts from the same copy) and updated once per optimizer step.

Method card: ``t_jepa.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import TJEPA
    >>> t_jepa = TJEPA(hidden_dim=8, num_layers=1, num_heads=2, dim_feedforward=16, predictor_dim=8,
    ...                predictor_layers=1, predictor_heads=2)
    >>> encoder = t_jepa.make_encoder(num_features=5)
    >>> encoder(torch.zeros(3, 5)).shape          # 1 regularization token + 5 feature tokens
    torch.Size([3, 6, 8])
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.mixins import StepOutput
from reglab.technique import Technique

SUBMODULE = "t_jepa"  # the context encoder and predictor's attribute on the module
ARCHITECTURE_KEY = "t_jepa_architecture"  # what the restore hook rebuilds them from


def sinusoidal_positions(length: int, width: int, base: float) -> Tensor:
    """(length, width) sin/cos position code, ``base`` the wavelength scale (the official encoder
    uses 100, its predictor 10000)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(base) / width))
    code = torch.zeros(length, width)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return code


def gather_tokens(tokens: Tensor, positions: Tensor) -> Tensor:
    """``tokens`` (B, T, H) at ``positions`` (B, K) per sample: (B, K, H)."""
    return torch.gather(tokens, 1, positions[..., None].expand(-1, -1, tokens.shape[-1]))


def sample_masks(batch_size: int, num_features: int, context_share: tuple[float, float],
                 target_share: tuple[float, float], num_targets: int,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Feature indices of the context (B, n_ctx) and of ``num_targets`` targets (P, B, n_trgt).

    As the official ``MaskCollator``: per batch, ``n = round(min) + round((round(max) - round(min)) u)``
    features of context and of target (u uniform, redrawn while ``n_ctx + n_trgt > D``); per sample, the
    context is a random subset and each target a random subset of the features the context left out.
    """
    low_c, high_c = (round(num_features * s) for s in context_share)
    low_t, high_t = (round(num_features * s) for s in target_share)
    while True:
        n_context = low_c + round((high_c - low_c) * torch.rand(()).item())
        n_target = low_t + round((high_t - low_t) * torch.rand(()).item())
        if n_context + n_target <= num_features:
            break
    order = torch.rand(batch_size, num_features, device=device).argsort(dim=1)
    context, rest = order[:, :n_context], order[:, n_context:]
    picks = torch.rand(num_targets, batch_size, rest.shape[1], device=device).argsort(dim=2)[..., :n_target]
    targets = torch.gather(rest.expand(num_targets, -1, -1), 2, picks)
    return context, targets


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """The official momentum schedule: linear from ``start`` (before the first update) to ``end``."""
    return start + step * (end - start) / max(total_steps, 1)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter."""
    for kept, new in zip(target.parameters(), online.parameters()):
        kept.mul_(momentum).add_(new.detach(), alpha=1.0 - momentum)


def transformer(width: int, layers: int, heads: int, feedforward: int, dropout: float, eps: float = 1e-5) -> nn.Module:
    """The official ``TabularEncoder``: transformer layers, then dropout, LayerNorm, Linear, dropout, LayerNorm."""
    layer = nn.TransformerEncoderLayer(width, heads, feedforward, dropout, batch_first=True, layer_norm_eps=eps)
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Dropout(dropout),
                         nn.LayerNorm(width, eps=eps), nn.Linear(width, width), nn.Dropout(dropout),
                         nn.LayerNorm(width, eps=eps))


class FeatureEncoder(nn.Module):
    """Regularization tokens + one token per feature (``w_j x_j + b_j``), position code, transformer.

    ``forward(x, context)`` encodes the regularization tokens and the features ``context`` (B, K)
    only; without ``context``, all of them: (B, n_reg + K or D, H).
    """

    def __init__(self, num_features: int, hidden_dim: int, num_layers: int, num_heads: int, dim_feedforward: int,
                 dropout: float, num_reg_tokens: int) -> None:
        super().__init__()
        self.num_reg_tokens = num_reg_tokens
        self.weight = nn.Parameter(torch.empty(num_reg_tokens + num_features, hidden_dim))
        self.bias = nn.Parameter(torch.empty(num_features, hidden_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the official Tokenizer's init
        nn.init.kaiming_uniform_(self.bias, a=math.sqrt(5))
        self.register_buffer("positions", sinusoidal_positions(num_reg_tokens + num_features, hidden_dim, 100.0),
                             persistent=False)
        self.transformer = transformer(hidden_dim, num_layers, num_heads, dim_feedforward, dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        reg = self.weight[: self.num_reg_tokens] + self.positions[: self.num_reg_tokens]
        features = (self.weight[self.num_reg_tokens:] * x[..., None] + self.bias
                    + self.positions[self.num_reg_tokens:])
        if context is not None:
            features = gather_tokens(features, context)
        tokens = torch.cat([reg.expand(len(x), -1, -1), features], dim=1)
        return self.transformer(tokens)


class Predictor(nn.Module):
    """The official ``TransformerPredictor``: context tokens and one mask token per target feature
    (each with the feature's position code) through a transformer, projected back to the encoder width."""

    def __init__(self, num_tokens: int, hidden_dim: int, predictor_dim: int, num_layers: int, num_heads: int,
                 dim_feedforward: int, dropout: float, init_std: float = 0.02) -> None:
        super().__init__()
        self.embed = nn.Linear(hidden_dim, predictor_dim)
        self.register_buffer("positions", sinusoidal_positions(num_tokens, predictor_dim, 10000.0), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.transformer = transformer(predictor_dim, num_layers, num_heads, dim_feedforward, dropout)
        self.norm = nn.LayerNorm(predictor_dim)
        self.project = nn.Linear(predictor_dim, hidden_dim)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)

    def forward(self, context_tokens: Tensor, context_positions: Tensor, target_positions: Tensor) -> Tensor:
        """``context_tokens`` (B, C, H) at token positions (B, C); predictions (P·B, K, H) for the
        token positions ``target_positions`` (P, B, K), target subset by target subset."""
        num_targets, batch, _ = target_positions.shape
        x = self.embed(context_tokens) + self.positions[context_positions]
        queries = self.mask_token + self.positions[target_positions.reshape(num_targets * batch, -1)]
        x = torch.cat([x.repeat(num_targets, 1, 1), queries], dim=1)
        x = self.norm(self.transformer(x))
        return self.project(x[:, context_tokens.shape[1]:])


class JEPA(nn.Module):
    """The trained part: the context encoder and the predictor (``module.t_jepa``)."""

    def __init__(self, num_features: int, **architecture: Any) -> None:
        super().__init__()
        a = architecture
        self.context = FeatureEncoder(num_features, a["hidden_dim"], a["num_layers"], a["num_heads"],
                                      a["dim_feedforward"], a["dropout"], a["num_reg_tokens"])
        self.predictor = Predictor(a["num_reg_tokens"] + num_features, a["hidden_dim"], a["predictor_dim"],
                                   a["predictor_layers"], a["predictor_heads"], a["predictor_feedforward"],
                                   a["predictor_dropout"])


def jepa_loss(jepa: JEPA, target_encoder: nn.Module, x: Tensor, context: Tensor, targets: Tensor) -> Tensor:
    """MSE between the predicted and the target encoder's latents of the features ``targets``
    (P, B, K) from the features ``context`` (B, C) of ``x`` (B, D)."""
    reg = jepa.context.num_reg_tokens
    with torch.no_grad():
        latents = target_encoder(x)
        wanted = torch.cat([gather_tokens(latents, t + reg) for t in targets])
    reg_positions = torch.arange(reg, device=x.device).expand(len(x), -1)
    context_positions = torch.cat([reg_positions, context + reg], dim=1)
    predicted = jepa.predictor(jepa.context(x, context), context_positions, targets + reg)
    return F.mse_loss(predicted.float(), wanted.float())


def restore_jepa(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets ``t_jepa``,
    built as recorded in the checkpoint, before the checkpoint's weights are loaded."""
    if not hasattr(module, SUBMODULE):
        architecture = dict(checkpoint[ARCHITECTURE_KEY])
        module.add_module(SUBMODULE, JEPA(architecture.pop("num_features"), **architecture))


class TJEPA(Technique):
    """T-JEPA pretraining on flat tabular inputs (module docstring).

    Args:
        hidden_dim: token width of the encoders (official: 64).
        num_layers: transformer layers of the encoders (official: 4).
        num_heads: attention heads of the encoders (official: 8).
        dim_feedforward: feed-forward width of the encoders (official: 256).
        dropout: dropout of the encoders (official: 0.1).
        num_reg_tokens: regularization tokens (official: 1).
        predictor_dim, predictor_layers, predictor_heads, predictor_feedforward, predictor_dropout: the
            predictor's width (64), layers (2), heads (4), feed-forward width (256) and dropout (0.1).
        context_share: (min, max) share of the features in the context (official: 0.2, 0.4).
        target_share: (min, max) share of the features in each target (official: 0.2, 0.4).
        num_targets: target subsets per context (official: 4).
        ema: (start, end) momentum of the target encoder (official: 0.996, 1.0).
        ema_steps: optimizer steps over which the momentum goes from start to end; ``None`` = the run's
            (``trainer.estimated_stepping_batches``, the official schedule). A run resumed with a larger
            budget then follows the new budget's schedule from where it is; fix ``ema_steps`` to keep one
            schedule across such resumes.
        weight: factor on the JEPA loss.
        label_free: replace the task loss by zeros (pretraining without labels, the paper's setting).
    """

    name = "t_jepa"
    stateful = True  # the EMA target encoder

    def __init__(self, hidden_dim: int = 64, num_layers: int = 4, num_heads: int = 8, dim_feedforward: int = 256,
                 dropout: float = 0.1, num_reg_tokens: int = 1, predictor_dim: int = 64, predictor_layers: int = 2,
                 predictor_heads: int = 4, predictor_feedforward: int = 256, predictor_dropout: float = 0.1,
                 context_share: tuple[float, float] = (0.2, 0.4), target_share: tuple[float, float] = (0.2, 0.4),
                 num_targets: int = 4, ema: tuple[float, float] = (0.996, 1.0), ema_steps: int | None = None,
                 weight: float = 1.0, label_free: bool = True) -> None:
        if hidden_dim % num_heads or predictor_dim % predictor_heads:
            raise ValueError(f"TJEPA: hidden_dim ({hidden_dim}) and predictor_dim ({predictor_dim}) must be multiples "
                             f"of num_heads ({num_heads}) and predictor_heads ({predictor_heads}).")
        for label, (low, high) in (("context_share", context_share), ("target_share", target_share)):
            if not 0 < low <= high < 1:
                raise ValueError(f"TJEPA: {label} must be (min, max) with 0 < min <= max < 1, got {(low, high)}.")
        if context_share[0] + target_share[0] >= 1:
            raise ValueError("TJEPA: the smallest context and target shares leave no room for both; lower them.")
        if num_reg_tokens < 0 or num_targets < 1 or not 0 <= ema[0] <= ema[1] <= 1 or weight < 0:
            raise ValueError("TJEPA: num_reg_tokens >= 0, num_targets >= 1, 0 <= ema start <= end <= 1 and "
                             f"weight >= 0 are needed, got {num_reg_tokens}, {num_targets}, {ema}, {weight}.")
        self.architecture = dict(
            hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, dim_feedforward=dim_feedforward,
            dropout=dropout, num_reg_tokens=num_reg_tokens, predictor_dim=predictor_dim,
            predictor_layers=predictor_layers, predictor_heads=predictor_heads,
            predictor_feedforward=predictor_feedforward, predictor_dropout=predictor_dropout)
        self.context_share, self.target_share = tuple(context_share), tuple(target_share)
        if ema_steps is not None and ema_steps < 1:
            raise ValueError(f"TJEPA: ema_steps must be >= 1 or None, got {ema_steps}.")
        self.num_targets, self.ema, self.ema_steps = num_targets, tuple(ema), ema_steps
        self.weight, self.label_free = weight, label_free
        self.target_encoder: FeatureEncoder | None = None
        self._pending_state: dict[str, Tensor] | None = None
        self._updates = 0  # optimizer steps the target encoder has followed

    def make_encoder(self, num_features: int) -> FeatureEncoder:
        """A fresh encoder of this technique's architecture for ``num_features`` features."""
        a = self.architecture
        return FeatureEncoder(num_features, a["hidden_dim"], a["num_layers"], a["num_heads"], a["dim_feedforward"],
                              a["dropout"], a["num_reg_tokens"])

    @torch.no_grad()
    def represent(self, x: Tensor) -> Tensor:
        """The downstream representation of flat samples ``x`` (B, D): the target encoder's
        ``n_reg + D`` tokens, flattened (B, (n_reg + D)·H)."""
        if self.target_encoder is None:
            raise RuntimeError("TJEPA.represent: no target encoder yet. Fix: fit a module with the technique first.")
        return self.target_encoder.eval()(x.to(self.target_encoder.weight.device)).flatten(1)

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        shape = getattr(pl_module, "input_shape", None) or getattr(trainer.datamodule, "input_shape", None)
        if shape is None or len(tuple(shape)) != 1:
            raise self.fail(f"it needs flat tabular inputs (input_shape (D,)), got input_shape {shape}",
                            "use a tabular DataModule (TabularDataModule, SyntheticDataModule) or flatten=True")
        num_features = int(tuple(shape)[0])
        low_t = round(num_features * self.target_share[0])
        if round(num_features * self.context_share[0]) < 1 or low_t < 1:
            raise self.fail(f"with {num_features} features the smallest context or target has no feature",
                            "raise context_share / target_share or use more features")
        if not hasattr(pl_module, SUBMODULE):  # a later fit or a restored checkpoint keeps its own
            pl_module.add_module(SUBMODULE, JEPA(num_features, **self.architecture))
        self._num_features = num_features

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after DDP's broadcast of rank 0's weights: every rank copies the same context encoder
        if self.target_encoder is None:
            self.target_encoder = copy.deepcopy(getattr(pl_module, SUBMODULE).context).requires_grad_(False)
        if self._pending_state is not None:
            self.target_encoder.load_state_dict(self._pending_state)
            self._pending_state = None
        self.target_encoder.to(pl_module.device).eval()

    # -- the step ----------------------------------------------------------------------------------
    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        if self.label_free:
            return out.logits.float().sum(dim=1) * 0.0
        return module.task_loss(out)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        x = out.batch["input"].float()
        context, targets = sample_masks(len(x), x.shape[1], self.context_share, self.target_share, self.num_targets,
                                        x.device)
        return {"jepa": self.weight * jepa_loss(getattr(module, SUBMODULE), self.target_encoder, x, context, targets)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: one EMA update per step, none on accumulation micro-batches
        total = self.ema_steps or trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise self.fail("the run has no step budget to spread the EMA momentum over",
                            "set max_epochs or max_steps, or ema_steps")
        while self._updates < trainer.global_step:
            momentum = ema_momentum(self._updates, int(total), *self.ema)
            ema_update(self.target_encoder, getattr(pl_module, SUBMODULE).context, momentum)
            self._updates += 1

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.target_encoder is None:
            return {"updates": self._updates}
        return {"updates": self._updates,
                **{f"target.{k}": v.detach().clone() for k, v in self.target_encoder.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._updates = int(state_dict.get("updates", 0))
        target = {k.removeprefix("target."): v for k, v in state_dict.items() if k.startswith("target.")}
        if target:
            if self.target_encoder is None:
                self._pending_state = target
            else:
                self.target_encoder.load_state_dict(target)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[ARCHITECTURE_KEY] = {"num_features": self._num_features, **self.architecture}
        add_restore_hook(checkpoint, "reglab.callbacks.self_supervised.t_jepa:restore_jepa")
