"""LEVI — layer-wise ensemble of a pretrained model with a small task model (Roh et al., ICML 2024, paper 53).

Fine-tuning all of a pretrained model adapts its features to the fine-tuning data, spurious
parts included, and keeps the pretrained model's own blind spots. LEVI leaves the pretrained
model as it is and trains, from scratch, a small task-specific model beside it; adapting layers
combine intermediate outputs of the pretrained model with the small model's output into the
prediction, so the two complementary "views" can correct each other::

    f = the pretrained backbone (frozen, in eval mode), g = a small task model (random init)
    v_l = pool(f_l(x))  for the chosen layers l of f      (conv maps: global average pool)
    z   = A([v_1, ..., v_L, g(x)])                       (A: Linear - ReLU - Linear)
    loss = task loss of z                                 (cross-entropy, or a technique's)

Only g and A train.

Sources, and what is confirmed vs. assumed. The paper's method section was not available to
us; what we read is its abstract (arXiv 2402.04644) and third-party summaries of the paper
(themoonlight.io reviews in English and Chinese, sciencestack.ai's summary, liner.com's review,
which shows the paper's Figure 3 "LEVI architecture of using a layer-wise ensemble").

* From the abstract: the pretrained model is *adaptively ensembled layer-wise* with a *small
  task-specific model*; training and inference efficiency are preserved.
* From the summaries (consistent with each other, not checked against the paper's text): the
  small model is randomly initialised and *trained from scratch*; the two are connected by
  *adapting layers* whose input *concatenates intermediate outputs* of the pretrained model (and
  the small model's output); the pretrained model is *fixed / frozen* during LEVI's training (a
  pretrained model fine-tuned beforehand may be used instead, the paper's "Remark 5": here, point
  :class:`~reglab.callbacks.fine_tuning.PretrainedWeights` at that checkpoint); one shared loss is
  optimised over the combined intermediate representations; LEVI is compatible with LoRA.
* Assumed here: the adapting layers are one two-layer MLP on the concatenation of all views
  (the summaries leave open whether each layer has its own adapting head with per-layer
  predictions); the small model contributes its penultimate features (not its logits); feature
  maps are reduced by global average pooling (token sequences by their mean); views are not
  normalised before concatenation; which layers to tap is the user's choice (``layers``,
  default: the backbone's output only); the pretrained model's own head is not used.

Method card: ``callbacks/fine_tuning/levi.card.yaml``.

It is a task module, not a technique callback: it *is* a different model (new trainable parts,
a frozen part, a different prediction path at evaluation too), so its checkpoints describe and
reload themselves with ``LEVIModule.load_from_checkpoint``. Its ``forward_step`` returns the
usual :class:`~reglab.mixins.StepOutput` (``features`` = the concatenated views), so loss
techniques (ELR, label smoothing, GCE, ...) stack with it.

Example:
    >>> module = LEVIModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32, 32)},
    ...                     layers=["layers.2", "layers.4"], task_model="mlp", task_model_kwargs={"hidden_sizes": (16,)})
    >>> module(torch.zeros(2, 64)).shape, module.view_dims
    (torch.Size([2, 10]), [32, 32, 16])
    >>> sorted({name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad})
    ['head', 'task_model']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reglab.models import create_backbone
from reglab.tasks.classification import ClassificationModule


def pooled_view(output: Any, layer: str) -> Tensor:
    """One layer's output as an ``(N, D)`` view: feature maps averaged over space, token sequences
    over tokens, anything else flattened."""
    if not isinstance(output, Tensor):
        raise TypeError(f"LEVI: layer {layer!r} returns {type(output).__name__}, not a tensor; tap a layer "
                        "whose output is a tensor")
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output.mean(dim=1)
    return output.flatten(1)


def layer_outputs(model: nn.Module, layers: Sequence[str], x: Tensor) -> list[Any]:
    """The outputs of the named submodules of ``model`` during one forward pass on ``x``.

    The hooks live for this call only, so the model stays an ordinary module (copyable, picklable).
    """
    captured: dict[str, Any] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, output, name=name: captured.__setitem__(name, output))
        for name in layers
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[name] for name in layers]


class LEVIModule(ClassificationModule):
    """Classification by a layer-wise ensemble of a frozen pretrained backbone and a small model.

    Args:
        backbone, num_classes, input_shape, backbone_kwargs, pretrained, lr, weight_decay: as in
            :class:`~reglab.tasks.ClassificationModule`; ``backbone`` is the pretrained
            model (weights from ``pretrained`` or from
            :class:`~reglab.callbacks.fine_tuning.PretrainedWeights`).
        layers: dotted names of the backbone's submodules whose outputs are the pretrained views
            (``"blocks.5"`` is the 6th module of the small CNN's ``blocks``); default: the
            backbone's output only.
        task_model: backbone name of the small task-specific model, trained from scratch.
        task_model_kwargs: its arguments (e.g. ``{"channels": [16, 32]}``).
        adapter_hidden: width of the adapting layers' hidden layer.
    """

    def __init__(
        self,
        backbone: str = "cnn",
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        layers: Sequence[str] | None = None,
        task_model: str = "cnn",
        task_model_kwargs: dict[str, Any] | None = None,
        adapter_hidden: int = 128,
    ) -> None:
        super().__init__(backbone, num_classes, input_shape, backbone_kwargs, pretrained, lr, weight_decay)
        self.layers = list(layers) if layers else [""]  # "" names the backbone itself
        unknown = [name for name in self.layers if name not in dict(self.backbone.named_modules())]
        if unknown:
            raise ValueError(
                f"LEVI: the backbone has no submodule {unknown[0]!r}; layers must be dotted names from "
                f"backbone.named_modules(), e.g. {[n for n, _ in self.backbone.named_modules()][1:6]}"
            )
        self.backbone.requires_grad_(False).eval()
        self.task_model = create_backbone(task_model, self.hparams.input_shape, **(task_model_kwargs or {}))
        self.view_dims = self._view_dims()
        # The pretrained classifier's head is replaced by the adapting layers.
        self.head = nn.Sequential(
            nn.Linear(sum(self.view_dims), adapter_hidden), nn.ReLU(), nn.Linear(adapter_hidden, num_classes)
        )

    @torch.no_grad()
    def _view_dims(self) -> list[int]:
        """Widths of the views, from one forward pass on zeros in eval mode (batch statistics untouched)."""
        was_training = self.task_model.training
        self.task_model.eval()
        views = self.views(torch.zeros(2, *self.hparams.input_shape))
        self.task_model.train(was_training)
        return [view.shape[1] for view in views]

    def train(self, mode: bool = True) -> LEVIModule:
        # Frozen means BatchNorm statistics and dropout stay as pretrained too. (Lightning warns that
        # modules are in eval mode when training starts: these are they, on purpose.)
        super().train(mode)
        self.backbone.eval()
        return self

    def views(self, x: Tensor) -> list[Tensor]:
        """The pretrained model's pooled layer outputs, then the small model's features."""
        pretrained = [pooled_view(out, name) for out, name in zip(layer_outputs(self.backbone, self.layers, x), self.layers)]
        return pretrained + [self.task_model(x)]

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.cat(self.views(x), dim=-1)
        return features, self.head(features)
