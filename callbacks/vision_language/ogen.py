"""OGEN's class-conditional feature generator (Zang et al., "Overcoming the Pitfalls of Vision-Language
Model Finetuning for OOD Generalization", ICLR 2024, paper 01): CoOp's learned context, regularised by
image features synthesised for classes never trained on, from their names.

Follows the official code (github.com/apple/ml-ogen, ``trainers/ogen.py``, ``configs/trainers/OGEN``),
read for this module. OGEN is CoOp plus a feature generator ``G`` that trains with the context: here a
technique stacked with :class:`~reglab.callbacks.baselines.PromptTuning` (CoOp: the context, prompts
and frozen towers), whose public ``context_prompts`` it calls for the unseen classes' prompts (found
among the trainer's callbacks: the families do not import each other). ``G(Q, K, V) = normalize(FFN(Q) + MHA(Q, K, V))``: queries are the text features of the
classes whose image features are wanted, keys and values the text and image features of classes whose
image features are known (one attention layer of 4 heads, dropout 0.1, and a 2-layer ReLU MLP of the
embedding width). For a training image ``x`` of base class ``y`` with normalised image feature ``f``
(``w``: the base classes' text features with the learned context, ``w'`` those of the unseen classes'
names, ``k = 3``, ``N(y)`` the ``k`` base classes whose mean image features are nearest ``y``'s):

    known      = mean[N(y)] + u * std[N(y)],   u ~ U(0, 1)^D, one draw per step (the class statistics
                 of the frozen image tower's normalised features over the training split)
    f_y        = G(w_y, w_N(y), known)             f_N = G(w_N(y), w_y, f)   (base text as Q/K detached)
    U(y)       = the k unseen classes whose text is nearest w_y;   f_U = G(w'_U(y), w_y, f)
    loss       = 0.25 CE(s f w^T, y) + D [MSE(f_y, f) + MSE(f_N, known)]
                 + 0.25 CE(s f_y w^T, y) + 0.25/k CE(s f_N w^T, N(y)) + 0.5/k CE(s f_U w'^T, U(y))

with ``s`` the logit scale and ``D`` the embedding width (the official ``* 512`` is ViT-B/16's width).
The first 20 % of the epochs train the two reconstruction terms only (the official warm-up: no
classification term, so only ``G`` moves). The synthesised unseen features are classified among the
unseen classes by their context prompts, which is what regularises the context towards classes never
seen (the official code trains ``G`` and the context jointly with one SGD optimiser; here the module's
own optimiser trains both). Evaluation is CoOp's (the generator is used in training only).

Where this departs from the official code, and why:

* the weights are the official ones divided by the classification term's 0.25, because reglab's task
  loss keeps weight 1 (Adam-type optimisers are invariant to the overall scale);
* the class statistics are computed at the start of fitting from the training split (the official
  code loads precomputed ``features_mean_base.pth`` / ``features_std_base.pth`` files, whose
  computation is not released; normalised features are assumed, as ``G``'s outputs are normalised);
* the image features in the terms are detached (the official image tower is frozen; with a tuned
  image tower, e.g. LoRA beside it, the generator's targets do not pull the tower);
* the official code re-draws ``known`` for the reconstruction target after the warm-up; ``f_N`` does
  not depend on the draw, so one draw per step gives the same distribution;
* ``k`` is at most the number of other base classes and of unseen classes.

The adaptive self-distillation of the paper is :class:`~reglab.callbacks.averaging.OGENSelfDistillation`
(stack the two for the whole method; the official code computes no distillation loss).

Method card (what it does, when it helps, what it costs): ``ogen.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.vision_language import OGEN
    >>> from reglab.callbacks.baselines import PromptTuning
    >>> techniques = [PromptTuning(ctx_init="a photo of the digit"), OGEN(k=3)]   # CoOp, then OGEN
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.technique import Technique, dataset_features, schedule_epochs


class FeatureGenerator(nn.Module):
    """``G(Q, K, V) = normalize(FFN(Q) + MHA(Q, K, V))`` (the official ``feature_generator``), and the
    base classes' image-feature statistics it is trained from (buffers: in the checkpoint)."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("std", torch.zeros(num_classes, dim))
        self.register_buffer("ready", torch.tensor(False))

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """``(B, q, D)`` queries over ``(B, k, D)`` keys and values: ``(B * q, D)`` unit features."""
        attended, _ = self.attention(queries, keys, values, need_weights=False)
        return F.normalize(self.ffn(queries) + attended, dim=-1).flatten(0, 1)


def nearest_classes(means: Tensor, k: int) -> Tensor:
    """``(C, k)``: for each class the ``k`` other classes of highest cosine between mean features."""
    similarity = means @ means.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices


class OGEN(Technique):
    """CoOp's context trained with OGEN's synthesised features of unseen classes (module docstring);
    stacked with the prompt learner (:class:`~reglab.callbacks.baselines.PromptTuning`).

    Args:
        k: neighbouring base classes and unseen classes per image (official 3).
        warmup_fraction: share of the epochs that train the reconstruction terms only (official 0.2).
        unseen_class_names: the names of the classes to synthesise; the DataModule's ``unseen_class_names``
            when not given (the base-to-novel protocol's base data names the novel classes; for a model
            tuned on every class, names of none, e.g. ``[ten, eleven, twelve]``).
        prompt_learner: the prompt learner OGEN owns and sets up itself (e.g. a
            :class:`~reglab.callbacks.baselines.PromptTuning`), so OGEN alone is the whole method; when not
            given, the one stacked beside it among the trainer's callbacks.
        heads, dropout: the generator's attention (official 4, 0.1).
        total_epochs: the epochs the warm-up is a share of; the trainer's ``max_epochs`` when not given.
    """

    name = "ogen"
    needs = frozenset({"features"})

    def __init__(self, k: int = 3, warmup_fraction: float = 0.2, unseen_class_names: Sequence[str] | None = None,
                 prompt_learner: Technique | None = None, heads: int = 4, dropout: float = 0.1,
                 total_epochs: int | None = None) -> None:
        if k < 1 or not 0.0 <= warmup_fraction < 1.0:
            raise self.fail(f"k={k} and warmup_fraction={warmup_fraction}", "use k >= 1 and 0 <= warmup_fraction < 1")
        self.k, self.warmup_fraction, self.heads, self.dropout = k, warmup_fraction, heads, dropout
        self.total_epochs = total_epochs
        self.unseen_class_names = None if unseen_class_names is None else tuple(unseen_class_names)
        if prompt_learner is not None and not callable(getattr(prompt_learner, "context_prompts", None)):
            raise self.fail(f"prompt_learner {type(prompt_learner).__name__} has no context_prompts",
                            "pass a reglab.callbacks.baselines.PromptTuning")
        self.prompt_learner = prompt_learner
        self.unseen_prompts: dict[str, Tensor] | None = None
        self.warming_up = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.prompt_learner is not None:  # owned: set up at every stage, as the trainer would
            self.prompt_learner.setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        learners = [self.prompt_learner] if self.prompt_learner is not None else [
            c for c in trainer.callbacks if callable(getattr(c, "context_prompts", None))]
        if not learners:
            raise self.fail("it trains a learned prompt context, and no prompt learner is among the techniques",
                            "stack it with reglab.callbacks.baselines.PromptTuning, or pass one as prompt_learner")
        if not hasattr(pl_module, "prompt_context"):
            # the learner's setup is repeatable (each fit and test sets it up again); run first, it freezes
            # the towers before the generator is added, whatever the techniques' order
            learners[0].setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        unseen = self.unseen_class_names or tuple(getattr(datamodule, "unseen_class_names", ()) or ())
        if not unseen:
            raise self.fail(f"neither it nor {type(datamodule).__name__} names `unseen_class_names` (the classes "
                            "whose image features it synthesises from their names)",
                            "pass unseen_class_names, or fit on a DataModule that names the classes left out of "
                            "training (the base-to-novel protocol's base data does)")
        if len(datamodule.class_names) < 2:
            raise self.fail("it needs at least two base classes (a class's neighbours stand in for it)",
                            "train on two or more classes")
        self.unseen_prompts = learners[0].context_prompts(pl_module, datamodule, unseen)
        if not hasattr(pl_module, "ogen_generator"):
            pl_module.ogen_generator = FeatureGenerator(pl_module.clip.embed_dim, len(datamodule.class_names),
                                                        self.heads, self.dropout)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        generator = pl_module.ogen_generator
        if not bool(generator.ready):  # a resumed run has them from its checkpoint
            features, labels = dataset_features(pl_module, trainer.datamodule.train_dataset)
            for c in range(len(generator.mean)):
                members = features[labels == c]
                if len(members) == 0:
                    raise self.fail(f"base class {c} has no training image", "give every class at least one shot")
                generator.mean[c] = members.mean(0)
                generator.std[c] = members.std(0, unbiased=False)
            generator.ready.fill_(True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.prompt_learner is not None:  # owned: its hooks are OGEN's to call
            self.prompt_learner.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = schedule_epochs(self, trainer, self.total_epochs)
        self.warming_up = trainer.current_epoch < int(epochs * self.warmup_fraction)

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        """The module's cross-entropy, switched off in the warm-up (the official warm-up loss has none).
        Detached there, not multiplied by zero: the context then gets no gradient at all, so the optimiser
        skips it (a zero gradient would still apply AdamW's weight decay to it)."""
        loss = module.task_loss(out)
        return loss.detach() * 0.0 if self.warming_up else loss

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        generator = module.ogen_generator
        labels, image = out.batch["target"], out.features.detach()
        base = module.class_embeddings()
        fixed = base.detach()
        k = min(self.k, len(base) - 1)
        neighbours = nearest_classes(generator.mean, k)[labels]  # (B, k)
        noise = torch.rand(1, image.shape[1], device=image.device, dtype=image.dtype)
        known = generator.mean[neighbours] + noise * generator.std[neighbours]  # (B, k, D)
        of_label = generator(fixed[labels, None], fixed[neighbours], known)  # (B, D)
        of_neighbours = generator(fixed[neighbours], fixed[labels, None], image[:, None])  # (B * k, D)
        width = image.shape[1]
        terms = {"reconstruction": 4 * width * (F.mse_loss(of_label, image)
                                                + F.mse_loss(of_neighbours, known.flatten(0, 1)))}
        if self.warming_up:
            return terms
        scale = module.clip.logit_scale()
        unseen = self.unseen_embeddings(module)
        k_unseen = min(self.k, len(unseen))
        unseen_labels = (fixed[labels] @ unseen.detach().T).topk(k_unseen, dim=1).indices  # (B, k')
        of_unseen = generator(unseen[unseen_labels], fixed[labels, None], image[:, None])  # (B * k', D)
        terms["synthesised_base"] = F.cross_entropy(scale * of_label @ base.T, labels)
        terms["synthesised_neighbours"] = F.cross_entropy(scale * of_neighbours @ base.T, neighbours.flatten()) / k
        terms["synthesised_unseen"] = 2 * F.cross_entropy(scale * of_unseen @ unseen.T, unseen_labels.flatten()) / k_unseen
        return terms

    def unseen_embeddings(self, module: L.LightningModule) -> Tensor:
        """``(C', D)`` normalised text features of the unseen classes' context prompts (with gradient)."""
        tokens = {key: value[:, 0].to(module.device) for key, value in self.unseen_prompts.items()}
        return module.text_features(tokens)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.prompt_learner is not None:
            self.prompt_learner.teardown(trainer, pl_module, stage)
