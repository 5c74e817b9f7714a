"""Mamba-FSCIL — a dual selective state-space projector for few-shot class-incremental learning
(paper 57, "Mamba-FSCIL: Dynamic Adaptation with Selective State Space Model for Few-Shot
Class-Incremental Learning"; official code github.com/xiaojieli0903/Mamba-FSCIL,
``mmfscil/models/mamba_ffn_neck.py`` (``MambaNeck``), ``mmfscil/models/classifier.py`` (the
losses), ``mmfscil/apis/fscil.py`` (the incremental sessions), ``configs/cifar/*``).

Between the backbone and the classifier sits a projector. In the base session it is one
*selective SSM branch* plus the identity::

    tokens = MLP(f) + pos                  (L = side x side tokens; MLP: Linear, LayerNorm, LeakyReLU(0.1), Linear)
    x, z   = in_proj(tokens)               (Mamba block, expand 1, no out_proj)
    x      = SiLU(causal depthwise conv1d(x))
    dt, B, C = x_proj(x);  delta = dt_proj(dt)
    y      = selective_scan(x, delta, A = -exp(A_log), B, C, D, gate z, softplus)   (reglab.kernels)
    branch(f) = mean over tokens of the 4 scans (row-major, reversed, column-major, reversed)
    out    = branch_base(f) + f

In every incremental session a second, *new* branch is added and only it trains: the base branch
and the backbone are frozen and cut from the graph (the official ``detach_residual``), and the new
branch starts at zero (its gate rows of ``in_proj`` are zero-initialised, so ``silu(z) = 0``)::

    out = branch_base(f).detach() + f.detach() + branch_new(f)

Its input-dependent parameters are steered by the *class-sensitive scan losses* on every sample
of the session's batch (few shots of the new classes plus replayed class means, below), with
``Z`` the new branch's gate summed over the 4 scans and ``dt``, ``B``, ``C`` its row-major scan's::

    suppress_base  =  w_supp       * ||Z[base]||_F  / numel(Z[base])     (leave base features alone)
    suppress_novel = -w_supp_novel * ||Z[novel]||_F / numel(Z[novel])    (act on novel ones)
    separate_p     =  w_sep * mean |I - S_p|,  S_p = cosine matrix of [mean p over base, mean p over novel]
                      for p in (dt, B, C)  (means over samples and tokens: the official param_avg_dim 0-1-3)

"base" is a label of the base session, "novel" any later one. Defaults as the official CIFAR
config and code: ``d_state = 256`` (``dt_rank = d_state``), ``side = 2`` (``feat_size``), ``w_supp
= 100``, ``w_supp_novel = 1e-5``, ``w_sep = 1e-3`` (``loss_weight_sep_new``; the base-session
``loss_weight_sep`` is 0), Mamba's initialisation (``A = 1..N``, ``D = 1``, ``dt`` in [1e-3, 1e-1]).

Replay, as the official sessions (``mean_neck_feat = True``): a session trains on its shots plus
one mean backbone feature per earlier class (every base class, every earlier novel class), kept by
this technique (``memory``, computed at each task's end). Here the memory rows join every step:
their cross-entropy is the ``replay`` term, summed over the rows and divided by the batch size, so
each memory row weighs as one more sample of the batch.

``dual=False`` is the *static projector* (the claim's baseline): the same projector trained in
the base session and frozen afterwards, no new branch, the same replay and classifier training.

Where this follows the paper's method rather than the code, or differs from both:

* The official projector reads a 2x2 backbone feature map (ResNet-12) and its MLP is per
  position (1x1 convolutions). reglab's MLP backbones give a flat feature vector, so the MLP maps
  the vector to ``side**2`` tokens (its last layer is ``Linear(mid, side**2 * D)``); the four scans
  are over those tokens arranged in a ``side x side`` grid.
* The official classifier is a fixed simplex-ETF head trained with the dot-regression loss
  (NC-FSCIL's). Here the classifier is the module's head (a cosine classifier with temperature 16
  in the claim, as TEEN's), trained in every session in both arms; at a session's start the new
  classes' rows are set to the mean projected feature of their shots (weight imprinting), so the
  head starts where a prototype classifier would.
* The official sessions run 200 SGD steps (lr 0.25, batch 8) on one cached feature set; here a
  session is a ``reglab fit-tasks`` fit with the module's optimizer and the run's epochs.
* The official all-reduces the base/novel counts across GPUs before deciding to add a term; here
  each term is masked on the device (a term whose group is absent is 0), no collective and no
  host sync.

Design: the projector is a submodule of the module, ``module.mamba_fscil``, added at ``setup``
(before the optimizers and the checkpoint restore, as DRM's heads), and a forward pre-hook on
``module.head`` hands the head the projected features, so every forward (training, evaluation,
``module(x)``) projects, the step's ``features`` stay the backbone's (the replay memory and the new
branch read those), and the head keeps its type and checkpoint keys. Both branches exist from the
start, so checkpoint shapes never change; which one trains follows the technique's state (the base
classes are known once the base session ended). A checkpoint names a restore hook, so
``load_from_checkpoint`` redoes the surgery. The scans run through
:func:`reglab.kernels.selective_scan` (the Triton kernel on a GPU under ``torch.no_grad``,
the differentiable reference in training).

Method card (what it does, when it helps, what it costs): ``mamba_fscil.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> projector = DualSelectiveProjector(features=8, d_state=4)
    >>> projector(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    >>> separation(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), base=torch.tensor([True, False]))  # orthogonal means
    tensor(0.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.kernels import selective_scan
from reglab.technique import Technique, dataset_features

STATE_KEY = "reglab_mamba_fscil"  # the projector's arguments, in the checkpoint, for the restore hook


@dataclass
class ScanParameters:
    """A branch's input-dependent scan parameters: ``gate`` ``(N, D, L)`` (summed over the 4
    scans), ``dt`` ``(N, rank, L)``, ``B``, ``C`` ``(N, d_state, L)`` of the row-major scan."""

    gate: Tensor
    dt: Tensor
    B: Tensor
    C: Tensor


class SelectiveSSMBranch(nn.Module):
    """One branch: MLP to ``side**2`` tokens, positional embedding, a Mamba block without output
    projection (``mamba_simple.Mamba(expand=1, use_out_proj=False)``), four scan orders, mean over
    tokens. ``zero_gate``: the gate rows of ``in_proj`` start at zero (the official new branch)."""

    def __init__(self, features: int, d_state: int, side: int, zero_gate: bool = False, d_conv: int = 4) -> None:
        super().__init__()
        self.side, self.tokens, self.rank = side, side * side, d_state
        mid = 2 * features  # the official mid_channels default
        self.mlp = nn.Sequential(nn.Linear(features, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.1),
                                 nn.Linear(mid, self.tokens * features, bias=False))
        self.pos_embed = nn.Parameter(torch.randn(1, self.tokens, features) * 0.02)  # trunc_normal(std .02) there
        self.in_proj = nn.Linear(features, 2 * features, bias=False)
        self.conv1d = nn.Conv1d(features, features, d_conv, groups=features, padding=d_conv - 1)
        self.x_proj = nn.Linear(features, self.rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.rank, features)
        # Mamba's initialisation: dt_proj preserves variance, softplus(bias) log-uniform in [1e-3, 1e-1]
        nn.init.uniform_(self.dt_proj.weight, -self.rank**-0.5, self.rank**-0.5)
        dt = torch.exp(torch.rand(features) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(features, 1))
        self.D = nn.Parameter(torch.ones(features))
        if zero_gate:
            with torch.no_grad():
                self.in_proj.weight[features:].zero_()

    def orders(self, device: torch.device) -> list[Tensor]:
        """Token permutations of the four scans: row-major, its reverse, column-major, its reverse."""
        rows = torch.arange(self.tokens, device=device)
        columns = rows.view(self.side, self.side).t().reshape(-1)
        return [rows, rows.flip(0), columns, columns.flip(0)]

    def forward(self, features: Tensor) -> tuple[Tensor, ScanParameters]:
        n = features.shape[0]
        tokens = self.mlp(features).view(n, self.tokens, -1) + self.pos_embed
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (N, D, L) each
        pooled, first = 0.0, None
        for order in self.orders(features.device):
            u = F.silu(self.conv1d(x[:, :, order])[..., : self.tokens])
            dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [self.rank, self.rank, self.rank], dim=-1)
            dt, B, C = (t.transpose(1, 2) for t in (dt, B, C))
            delta = torch.einsum("dr,nrl->ndl", self.dt_proj.weight.to(dt.dtype), dt)
            y = selective_scan(u, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z[:, :, order],
                               delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            pooled = pooled + y.mean(-1)  # the mean over tokens does not depend on their order
            if first is None:
                first = (dt, B, C)
        # the official sums the four scans' gates mapped back to token order; z is per token, so 4 z
        return pooled, ScanParameters(4 * z, *first)


class DualSelectiveProjector(nn.Module):
    """The base branch, the new branch and the identity (module docstring). ``incremental``
    (set by :class:`MambaFSCIL`, not saved: it follows the technique's state): whether the
    sessions' form is used; ``dual=False`` keeps the base form always (the static projector)."""

    def __init__(self, features: int, d_state: int = 256, side: int = 2, dual: bool = True) -> None:
        super().__init__()
        self.dual, self.incremental = dual, False
        self.base = SelectiveSSMBranch(features, d_state, side)
        self.new = SelectiveSSMBranch(features, d_state, side, zero_gate=True)

    def forward(self, features: Tensor) -> Tensor:
        return self.project(features)[0]

    def feed_head(self, head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Forward pre-hook of the module's head: the head classifies the projected features."""
        return (self(args[0]), *args[1:])

    def project(self, features: Tensor) -> tuple[Tensor, ScanParameters | None]:
        """The projected features and the new branch's scan parameters (``None`` when it is off)."""
        base, _ = self.base(features)
        if not (self.dual and self.incremental):
            return base + features, None
        new, scan = self.new(features.detach())
        return base.detach() + features.detach() + new, scan


def attach_projector(module: nn.Module, arguments: dict[str, Any]) -> DualSelectiveProjector:
    """Register ``module.mamba_fscil`` (the projector) and a forward pre-hook that hands
    ``module.head`` the projected features; returns the existing projector when there is one."""
    projector = getattr(module, "mamba_fscil", None)
    if not isinstance(projector, DualSelectiveProjector):
        projector = module.mamba_fscil = DualSelectiveProjector(**arguments)
        module.head.register_forward_pre_hook(projector.feed_head)
    return projector


def restore_projector(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook: a bare module gets its projector before the checkpoint's weights load."""
    arguments = dict(checkpoint[STATE_KEY])
    incremental = arguments.pop("incremental")
    attach_projector(module, arguments).incremental = incremental


def suppression(gate: Tensor, rows: Tensor) -> Tensor:
    """``||gate[rows]||_F / numel(gate[rows])`` (0 when no row is selected), masked on the device."""
    mask = rows.to(torch.float32).view(-1, *([1] * (gate.dim() - 1)))
    count = rows.sum() * gate[0].numel()
    # vector_norm's gradient at 0 is 0 (a new branch's gate starts at exactly 0), sqrt's is not finite
    return torch.linalg.vector_norm(gate.float() * mask) / count.clamp_min(1)


def separation(parameters: Tensor, base: Tensor) -> Tensor:
    """``mean |I - S|`` for ``S`` the 2x2 cosine matrix of the base rows' and the novel rows' mean
    of ``parameters`` ``(N, k, ...)`` (over rows and every dimension after the second: the
    official ``param_avg_dim`` 0-1-3); 0 unless both groups have rows."""
    parameters = parameters.float().flatten(2) if parameters.dim() > 2 else parameters.float().unsqueeze(-1)
    groups = torch.stack([base, ~base]).to(parameters.dtype)  # (2, N)
    sums = torch.einsum("gn,nkl->gk", groups, parameters)
    counts = groups.sum(1) * parameters.shape[-1]
    means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
    confusion = (torch.eye(2, device=means.device) - means @ means.T).abs().mean()
    return torch.where((counts > 0).all(), confusion, torch.zeros_like(confusion))


class MambaFSCIL(Technique):
    """Mamba-FSCIL's dual selective SSM projector with its class-sensitive scan losses (module
    docstring).

    Args:
        dual: ``True``: Mamba-FSCIL; ``False``: the static projector (no new branch in sessions).
        d_state: the SSM state size N (also ``dt``'s rank, the official ``d_rank`` default).
        side: tokens per side of the scanned grid (``side**2`` tokens; the official ``feat_size``).
        suppress_weight, suppress_novel_weight, separate_weight: ``w_supp``, ``w_supp_novel``,
            ``w_sep`` (official ``loss_weight_supp``, ``loss_weight_supp_novel``, ``loss_weight_sep_new``).

    Works on a module with a ``head`` (whose ``weight`` rows are the classes, for imprinting) fed
    by a backbone declaring ``feature_dim`` (``ClassificationModule``); the sessions come from a
    task sequence (``reglab fit-tasks`` with ``TaskSequenceDataModule(first_task_classes=...,
    shots=...)``). A plain fit is a base session, unless the technique already holds base classes
    (then it is an incremental session on the fit's data). Logs ``train/mamba_fscil/<term>``.
    """

    name = "mamba_fscil"
    needs = frozenset({"features"})
    stateful = True
    fsdp_unsupported = "its projector feeds the head through a hook, and it writes whole weight rows when it imprints new classes"

    def __init__(self, dual: bool = True, d_state: int = 256, side: int = 2, suppress_weight: float = 100.0,
                 suppress_novel_weight: float = 1e-5, separate_weight: float = 1e-3) -> None:
        if d_state < 1 or side < 1:
            raise self.fail(f"d_state and side must be >= 1, got {d_state} and {side}",
                            "pass d_state >= 1 (official 256) and side >= 1 (official 2: 4 tokens)")
        if min(suppress_weight, suppress_novel_weight, separate_weight) < 0:
            raise self.fail("the loss weights must be >= 0", "pass non-negative weights (0 turns a term off)")
        self.dual, self.d_state, self.side = dual, d_state, side
        self.suppress_weight, self.suppress_novel_weight, self.separate_weight = (
            suppress_weight, suppress_novel_weight, separate_weight)
        self.base_classes: list[int] = []
        self.memory_features: Tensor | None = None  # (M, D): one mean backbone feature per earlier class
        self.memory_labels: Tensor | None = None

    @property
    def incremental(self) -> bool:
        return bool(self.base_classes)

    # -- surgery and which parts train ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        head = getattr(pl_module, "head", None)
        features = getattr(getattr(pl_module, "backbone", None), "feature_dim", None)
        if not isinstance(head, nn.Module) or features is None:
            raise self.fail(f"{type(pl_module).__name__} has no `head` module fed by a backbone with `feature_dim`, "
                            "so there is no place for the projector",
                            "use a ClassificationModule whose backbone has a separate head (not an `hf:` model)")
        attach_projector(pl_module, self.arguments(int(features)))
        self._set_trainable(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed with ckpt_path loads the technique's state after setup: follow it here.
        self._set_trainable(pl_module)
        data = trainer.datamodule
        if self.incremental and getattr(data, "tasks", None) is not None and data.task > 0:
            self._imprint(pl_module, data)

    def _set_trainable(self, module: L.LightningModule) -> None:
        """Base session: the base branch trains, the new one is off. Sessions: the backbone and the
        base branch are frozen, the new branch trains when ``dual``; the classifier trains always."""
        projector = module.mamba_fscil
        projector.incremental = self.incremental
        projector.new.requires_grad_(self.dual and self.incremental)
        if self.incremental:
            projector.base.requires_grad_(False)
            module.backbone.requires_grad_(False)

    @torch.no_grad()
    def _imprint(self, module: L.LightningModule, data: Any) -> None:
        """The new classes' classifier rows := the mean projected feature of their shots."""
        classes = list(data.tasks[data.task])
        features, labels = dataset_features(module, data.train_dataset)
        projected = module.mamba_fscil(features)  # no dropout or batch norm inside: no eval mode needed
        weight = getattr(module.head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != projected.shape[1]:
            raise self.fail(f"it sets the new classes' rows of the classifier, but {type(module.head).__name__} "
                            "has no (classes, features) `weight`", "use a linear or cosine head (ClassificationModule)")
        means = torch.stack([projected[labels == c].mean(0) for c in classes])
        weight[classes] = means.to(weight.dtype)

    # -- the losses ---------------------------------------------------------------------------------
    def loss_terms(self, out, module: L.LightningModule) -> dict[str, Tensor]:
        if not self.incremental:
            return {}
        batch_rows = out.features.shape[0]
        memory = self.memory_features.to(out.features.device, out.features.dtype)
        memory_labels = self.memory_labels.to(out.labels.device)
        logits = module.head(memory).float()  # the head's hook projects the memory rows
        active = getattr(module, "active_classes", None)
        if active is not None:
            logits = logits.masked_fill(~active, float("-inf"))
        terms = {"replay": F.cross_entropy(logits, memory_labels, reduction="sum") / batch_rows}
        if self.dual:
            # the new branch's scan parameters on the batch and the memory rows (a second pass of
            # that branch over the batch: the step's forward returns logits only)
            _, scan = module.mamba_fscil.new(torch.cat([out.features, memory]).detach())
            labels = torch.cat([out.labels, memory_labels])
            base = torch.isin(labels, torch.tensor(self.base_classes, device=labels.device))
            terms["suppress_base"] = self.suppress_weight * suppression(scan.gate, base)
            terms["suppress_novel"] = -self.suppress_novel_weight * suppression(scan.gate, ~base)
            for key, value in (("dt", scan.dt), ("B", scan.B), ("C", scan.C)):
                terms[f"separate_{key}"] = self.separate_weight * separation(value, base=base)
        return terms

    # -- task boundaries: the base classes and the replay memory ---------------------------------------
    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        tasks = getattr(trainer.datamodule, "tasks", None)
        if tasks is None:
            raise self.fail(f"its task hooks need the sessions' classes, but {type(trainer.datamodule).__name__} has "
                            "no `tasks`", "run it in a task sequence (reglab.datamodules.TaskSequenceDataModule)")
        if task == 0:
            self.base_classes = list(tasks[0])
        features, labels = dataset_features(pl_module, trainer.datamodule.train_dataset)
        classes = list(tasks[task])
        means = torch.stack([features[labels == c].mean(0) for c in classes]).cpu()
        new_labels = torch.tensor(classes)
        if self.memory_features is None:
            self.memory_features, self.memory_labels = means, new_labels
        else:
            self.memory_features = torch.cat([self.memory_features, means])
            self.memory_labels = torch.cat([self.memory_labels, new_labels])

    def arguments(self, features: int) -> dict[str, Any]:
        return {"features": features, "d_state": self.d_state, "side": self.side, "dual": self.dual}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        features = pl_module.mamba_fscil.base.in_proj.in_features
        checkpoint[STATE_KEY] = {**self.arguments(features), "incremental": self.incremental}
        add_restore_hook(checkpoint, "reglab.callbacks.continual.mamba_fscil:restore_projector")

    def state_dict(self) -> dict[str, Any]:
        return {"base_classes": list(self.base_classes), "memory_features": self.memory_features,
                "memory_labels": self.memory_labels}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_classes = list(state_dict["base_classes"])
        self.memory_features, self.memory_labels = state_dict["memory_features"], state_dict["memory_labels"]
