"""MMRL — Multi-Modal Representation Learning (Guo & Gu, CVPR 2025, paper 20) on :class:`reglab.tasks.CLIPModule`:
a shared, modality-agnostic representation space whose tokens, projected into both towers, join the higher
layers of the text and image encoders, with the class and text features held towards the frozen model's
zero-shot features and a decoupled inference for base and new classes.

Follows the official code (github.com/yunncheng/MMRL: ``trainers/mmrl.py``, ``clip/model_mmrl.py``,
``configs/trainers/MMRL/vit_b16.yaml``), read for this module. ``R`` is ``n`` learnable tokens of width
``d`` (N(0, 0.02)); each layer ``l`` of the upper layers of a tower has its own linear map ``P_l`` of ``R``
into that tower's width (the official per-layer copies of one initial ``Linear``). At the first such layer
the ``n`` tokens ``P_l R`` are inserted right after the first token ([CLS]); at every later one they
replace the tokens the layer before produced (deep tokens), and they leave the sequence after the last
layer, so a tower's own read-out (the text's mean pool, the image's class token) is unchanged in form. The
towers and their projections stay frozen; ``R``, the ``P_l`` and a new image projection ``W_r`` train. With
``t_c`` the normalised class text features (the prompts run with the tokens), ``f_c`` the image's class
feature (frozen projection) and ``f_r = W_r mean(image outputs at the tokens)`` its representation feature
(both normalised), ``s`` the logit scale and ``t_0``, ``f_0`` the frozen model's features (no tokens):

    logits_c = s f_c t_c^T        logits_r = s f_r t_c^T
    loss     = a CE(logits_c, y) + (1 - a) CE(logits_r, y)
               + lambda (1 - cos(f_c, f_0)) + lambda mean_classes (1 - cos(t_c, t_0))

Inference is decoupled: on the classes it was tuned on (the base classes) ``a logits_c + (1 - a) logits_r``;
on any other classes ``logits_c`` alone, the class features that keep more of the pretrained knowledge.
Which applies is decided per evaluation run by the DataModule's ``class_names`` (the official code reads it
from the config: ``SUBSAMPLE_CLASSES == "base"``). Official defaults kept: ``n = 5``, ``a = 0.7``,
``lambda = 1`` (the config's; its per-dataset values run from 0.01 to 7), ``W_r`` drawn N(0, 1/width).

Where this adapts the official code to the tiny CLIP, and why:

* **which layers**: the official tokens join ViT-B/16's layers 6-12 of 12, the upper 7/12; here the upper
  ``round(7/12 * depth)`` layers of each transformer (at least one): the top layer of the tiny CLIP's
  2-layer MiniLM, the upper 2 of the 4-block ``vit`` image tower;
* **the width of the space**: the official ``d = 512`` is ViT-B/16 CLIP's joint-embedding width; here the
  model's (64 for the claims' tiny CLIP);
* **the text read-out** is MiniLM's mean pool over the prompt's own tokens (the official one reads the EOT
  token, shifted past the inserted tokens): the tokens act on the class text features through attention only,
  as in the official code;
* **a CNN image tower** (the ``cnn`` of the claims' tiny CLIP) has no tokens and no attention. There the
  image side is one read-out at the top: the tokens, mapped into the feature map's channels, attend over the
  last feature map's positions (parameter-free scaled dot-product attention, plus the residual), and their
  mean is ``f_r``'s input. The CNN's class feature is then the frozen one, so the image regularisation term
  is identically zero and is not computed; on the ``vit`` tower the tokens run through its blocks as in the
  official ViT and the term is computed;
* the logit scale is the model's learned one (the official code uses CLIP's 100, its learned value), and the
  class prompts are the DataModule's (an ensemble of templates; the official one template per dataset);
* transformers' ``CLIPModel`` (``model: hf``) is not supported: its towers read out differently; refused at
  set-up.

Written by hand (no library has it). Runs on ``objective: classification``, as CoOp; other techniques may
stack (the towers are frozen at the first set-up, so a tower-tuning technique goes after it in the config).

Method card (what it does, when it helps, what it costs): ``mmrl.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.vision_language import MMRL
    >>> mmrl = MMRL(n_tokens=5, alpha=0.7, reg_weight=1.0)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.step import cross_entropy_per_sample
from reglab.technique import Technique

#: the share of a transformer's layers, counted from the top, that take the tokens (official: 7 of ViT-B/16's 12)
UPPER_LAYERS = 7 / 12


def upper_layer_count(depth: int, share: float) -> int:
    """How many of ``depth`` layers, from the top, take the tokens: ``round(share * depth)``, at least one."""
    return max(1, min(depth, round(share * depth)))


def with_token_positions(mask: Any, n: int, length: int) -> Any:
    """An attention mask over ``length`` positions, widened for ``n`` tokens inserted after position 0: the
    tokens' columns (and rows, for a ``(..., queries, keys)`` mask of three or more dimensions; a 2-d one is
    ``(batch, keys)``) copy position 0's, the first token's, which every query may attend, so the mask's
    format (boolean or additive) does not matter."""
    if not isinstance(mask, Tensor) or mask.dim() < 2 or mask.shape[-1] != length:
        return mask
    first = mask[..., :1]
    mask = torch.cat([first, first.expand(*mask.shape[:-1], n), mask[..., 1:]], dim=-1)
    if mask.dim() >= 3 and mask.shape[-2] == length:
        row = mask[..., :1, :]
        mask = torch.cat([row, row.expand(*mask.shape[:-2], n, mask.shape[-1]), mask[..., 1:, :]], dim=-2)
    return mask


def attention_readout(queries: Tensor, feature_map: Tensor) -> Tensor:
    """``(B, C)``: the mean over the ``(n, C)`` queries of ``q + softmax(q K^T / sqrt(C)) K``, ``K`` the ``(B, C, H, W)``
    feature map's positions (the tokens' read-out of a CNN tower, which has no attention of its own)."""
    keys = feature_map.flatten(2).transpose(1, 2)
    queries = queries.to(keys.dtype).expand(len(keys), -1, -1)
    return (queries + F.scaled_dot_product_attention(queries, keys, keys)).mean(1)


class RepresentationSpace(nn.Module):
    """The shared tokens ``R``, one linear map per tower layer that takes them, and the image projection ``W_r``."""

    def __init__(self, n_tokens: int, dim: int, text_width: int, text_layers: int, image_width: int,
                 image_layers: int, embed_dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        # the official maps of a tower start as copies of one initial Linear (_get_clones)
        self.to_text = nn.ModuleList(_clones(nn.Linear(dim, text_width), text_layers))
        self.to_image = nn.ModuleList(_clones(nn.Linear(dim, image_width), image_layers))
        self.image_projection = nn.Linear(image_width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=image_width ** -0.5)
        self.register_buffer("zero_shot_text", torch.zeros(0, embed_dim))

    def mapped(self, tower: str, layer: int) -> Tensor:
        """``(n, width)``: the tokens in ``tower``'s width at its ``layer``-th token-taking layer."""
        return (self.to_text if tower == "text" else self.to_image)[layer](self.tokens)


def _clones(module: nn.Module, count: int) -> list[nn.Module]:
    return [copy.deepcopy(module) for _ in range(count)]


def _layers(module: nn.Module, names: Sequence[str]) -> nn.ModuleList | nn.Sequential | None:
    """The first of ``names`` that is a list of layers in ``module`` (BERT's ``encoder.layer``, timm's ``blocks``)."""
    for name in names:
        try:
            found = module.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)):
            return found
    return None


class MMRL(Technique):
    """MMRL's representation tokens, feature regularisation and decoupled inference (module docstring).

    Args:
        n_tokens: representation tokens (official 5).
        alpha: the class features' share of the loss and of the base classes' logits (official 0.7).
        reg_weight: ``lambda``, the weight of each regularisation towards the zero-shot features (official 1.0).
        dim: width of the representation space; the model's joint-embedding width when not given.
        upper_layers: share of each transformer's layers, from the top, that take the tokens (official 7/12).
        decoupled: score classes other than the tuned ones by the class features only (the paper's
            inference); ``False`` fuses both logits on every class.
    """

    name = "mmrl"

    def __init__(self, n_tokens: int = 5, alpha: float = 0.7, reg_weight: float = 1.0, dim: int | None = None,
                 upper_layers: float = UPPER_LAYERS, decoupled: bool = True) -> None:
        if n_tokens < 1 or not 0.0 <= alpha <= 1.0 or reg_weight < 0 or not 0.0 < upper_layers <= 1.0:
            raise self.fail(f"n_tokens={n_tokens}, alpha={alpha}, reg_weight={reg_weight}, upper_layers={upper_layers}",
                            "use n_tokens >= 1, 0 <= alpha <= 1, reg_weight >= 0 and 0 < upper_layers <= 1")
        if dim is not None and dim < 1:
            raise self.fail(f"dim={dim}", "use a positive width, or leave it unset for the model's embedding width")
        self.n_tokens, self.alpha, self.reg_weight, self.dim = n_tokens, alpha, reg_weight, dim
        self.upper_layers, self.decoupled = upper_layers, decoupled
        self.base_classes: tuple[str, ...] = ()
        self.fused = False
        self._hooks: list[Any] = []
        self._inserting = True
        self._image_tokens = False  # the image tower runs the tokens through its blocks (vit), not a read-out (cnn)
        self._image_rep: Tensor | None = None

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        clip = getattr(pl_module, "clip", None)
        if clip is None or not hasattr(pl_module, "set_class_prompts"):
            raise self.fail(f"{type(pl_module).__name__} has no image-text towers", "use it on reglab.tasks.CLIPModule")
        image_encoder = getattr(clip, "image_encoder", None)
        text_layers = _layers(clip.text_encoder, ("encoder.layer", "encoder.layers"))
        if image_encoder is None or text_layers is None:
            raise self.fail(f"{type(clip).__name__}'s towers are not ones it can insert tokens into",
                            "use the tiny CLIP (CLIPModule model 'tiny')")
        if stage == "fit" and pl_module.hparams.objective != "classification":
            raise self.fail("it trains against the class prompts, which only objective='classification' does",
                            "set the CLIPModule's objective to 'classification'")
        blocks, norm = _layers(image_encoder, ("blocks",)), getattr(image_encoder, "norm", None)
        pools = [m for m in image_encoder.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        self._image_tokens = blocks is not None and isinstance(norm, nn.Module)
        if not self._image_tokens and not pools:
            raise self.fail(f"the image tower {type(image_encoder).__name__} has neither transformer blocks (`blocks`, "
                            "`norm`) nor a global average pool over a feature map",
                            "use the tiny CLIP's 'vit' or 'cnn' image backbone")
        text_depth = upper_layer_count(len(text_layers), self.upper_layers)
        image_depth = upper_layer_count(len(blocks), self.upper_layers) if self._image_tokens else 1
        if not hasattr(pl_module, "mmrl"):
            pl_module.requires_grad_(False)  # both towers and their projections stay frozen
            pl_module.mmrl = RepresentationSpace(
                self.n_tokens, self.dim or clip.embed_dim, clip.text_encoder.config.hidden_size, text_depth,
                image_encoder.embed_dim if self._image_tokens else image_encoder.feature_dim, image_depth,
                clip.embed_dim).to(pl_module.device)
        names = tuple(getattr(trainer.datamodule, "class_names", None) or ())
        if stage == "fit":
            self.base_classes = names
            # this fit's classes, embedded at its start; set-up runs before a checkpoint is restored, so a
            # resumed run gets its own back
            pl_module.mmrl.zero_shot_text = torch.zeros(pl_module.num_classes, clip.embed_dim, device=pl_module.device)
        # decoupled inference: the tuned (base) classes get both features, any other classes the class features
        self.fused = not self.decoupled or (bool(names) and names == self.base_classes)
        self._remove_hooks()
        learner = pl_module.mmrl
        self._hooks = [layer.register_forward_pre_hook(self._insert_hook(learner, "text", j), with_kwargs=True)
                       for j, layer in enumerate(list(text_layers)[-text_depth:])]
        self._hooks.append(text_layers[-1].register_forward_hook(self._strip_hook(capture=None)))
        if self._image_tokens:
            self._hooks += [block.register_forward_pre_hook(self._insert_hook(learner, "image", j), with_kwargs=True)
                            for j, block in enumerate(list(blocks)[-image_depth:])]
            self._hooks.append(norm.register_forward_hook(self._strip_hook(capture=learner)))
        else:
            self._hooks.append(pools[-1].register_forward_pre_hook(self._readout_hook(learner)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        learner = pl_module.mmrl
        if not learner.zero_shot_text.abs().sum() > 0:  # unit features, so zeros mean not yet embedded
            pl_module.clip.eval()  # the frozen towers, without dropout, as every step runs them
            with torch.no_grad(), self.zero_shot():
                learner.zero_shot_text.copy_(pl_module.class_embeddings())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # the frozen towers are fixed functions (CoOp's reason, reglab.callbacks.baselines.PromptTuning): no batch-norm
        # statistics move, no dropout; every batch, since the loops set train mode again
        pl_module.clip.eval()

    @contextlib.contextmanager
    def zero_shot(self) -> Iterator[None]:
        """The frozen model inside: the towers run without the tokens."""
        self._inserting = False
        try:
            yield
        finally:
            self._inserting = True

    # -- the hooks -----------------------------------------------------------------------------
    def _insert_hook(self, learner: RepresentationSpace, tower: str, j: int) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._inserting:
                return None
            hidden, *rest = args
            tokens = learner.mapped(tower, j).to(hidden.dtype)
            n = len(tokens)
            kept = hidden[:, 1:] if j == 0 else hidden[:, 1 + n:]  # later layers replace the layer before's tokens
            length = 1 + kept.shape[1]
            hidden = torch.cat([hidden[:, :1], tokens.expand(len(hidden), -1, -1), kept], dim=1)
            # the layer is handed the tower's mask of the prompt's own positions (BERT passes it positionally)
            rest = [with_token_positions(rest[0], n, length), *rest[1:]] if rest else rest
            kwargs = {key: with_token_positions(value, n, length) if "mask" in key else value
                      for key, value in kwargs.items()}
            return (hidden, *rest), kwargs
        return hook

    def _strip_hook(self, capture: RepresentationSpace | None) -> Any:
        """After a tower's last layer (text) or final norm (vit): the tokens leave the sequence; the image
        tower's outputs at the tokens give the representation feature ``W_r mean(...)``."""
        def hook(layer: nn.Module, args: Any, output: Any) -> Any:
            if not self._inserting:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            n = self.n_tokens
            if capture is not None:
                self._image_rep = capture.image_projection(hidden[:, 1:1 + n].mean(1))
            stripped = torch.cat([hidden[:, :1], hidden[:, 1 + n:]], dim=1)
            return (stripped, *output[1:]) if isinstance(output, tuple) else stripped
        return hook

    def _readout_hook(self, learner: RepresentationSpace) -> Any:
        def hook(pool: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self._inserting:
                self._image_rep = learner.image_projection(attention_readout(learner.mapped("image", 0), args[0]))
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- the step ------------------------------------------------------------------------------
    def transform_outputs(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        out.extras["mmrl_logits"] = self.representation_logits(out, module)
        return out

    def representation_logits(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        """``s f_r t_c^T``: the image representation features of the step's forward pass against its classes."""
        if self._image_rep is None:
            raise self.fail("the image tower ran without its representation tokens", "attach it before the step runs")
        image, self._image_rep = F.normalize(self._image_rep, dim=-1), None
        classes = out.extras["class_embeddings"]
        return module.clip.logit_scale() * image @ classes.T.to(image.dtype)

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return (self.alpha * cross_entropy_per_sample(out.logits, out.target)
                + (1 - self.alpha) * cross_entropy_per_sample(out.extras["mmrl_logits"], out.target))

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        text = out.extras["class_embeddings"]
        zero_shot_text = module.mmrl.zero_shot_text.to(text.dtype)
        terms = {"text_regularization": self.reg_weight * (1 - F.cosine_similarity(text, zero_shot_text, dim=-1)).mean()}
        if self._image_tokens:  # a CNN tower's class feature never sees the tokens: its term is identically zero
            with torch.no_grad(), self.zero_shot():
                frozen = module.image_features(out.batch["input"])
            terms["image_regularization"] = self.reg_weight * (
                1 - F.cosine_similarity(out.features, frozen.to(out.features.dtype), dim=-1)).mean()
        return terms

    def transform_predictions(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        """Decoupled inference: ``a logits_c + (1 - a) logits_r`` on the tuned classes, ``logits_c`` on others."""
        rep = self.representation_logits(out, module)  # consumed either way: the next forward makes its own
        if self.fused:
            out.logits = self.alpha * out.logits + (1 - self.alpha) * rep.to(out.logits.dtype)
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base_classes": list(self.base_classes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_classes = tuple(state_dict["base_classes"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
