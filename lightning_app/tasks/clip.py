"""Contrastive image–text pretraining (CLIP) and zero-shot classification by text prompts.

The module trains an image tower and a text tower (:mod:`reglab.models.clip`: the embedded
:class:`~reglab.models.clip.TinyCLIP` or transformers' ``CLIPModel``) with CLIP's symmetric
InfoNCE over a batch of image–caption pairs, at a learned temperature. Its evaluation is zero-shot
classification: each class is the mean of the normalised text embeddings of its prompts
("a photo of the digit seven.", ... — CLIP's prompt ensembling), and an image's logits are its
scaled cosine similarities to the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from reglab.checkpoints import pretrained_checkpoint_for, pretrained_checkpoint_of
from reglab.metrics import GroupAccuracy
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models.clip import create_clip
from reglab.step import cross_entropy_per_sample
from reglab.tasks.classification import check_module_fits_data

OBJECTIVES = ("contrastive", "classification")


class CLIPModule(RegularizedMixin, L.LightningModule):
    """A CLIP-style model: contrastive pretraining on image–caption pairs, zero-shot classification.

    Training (``objective="contrastive"``): the step's ``logits`` are the ``(N, N)`` scaled
    similarities of the batch's images (rows) to its captions (columns, ``batch["caption"]``) and
    ``target`` is ``arange(N)``; the per-sample task loss is the mean of sample ``i``'s
    image-to-text (row) and text-to-image (column) cross-entropies, so its batch mean is CLIP's
    symmetric InfoNCE. ``labels`` stay the class labels. ``objective="classification"`` instead
    trains on ``(N, C)`` zero-shot logits against the class prompts with cross-entropy (the
    prompt-based fine-tuning that CoOp-style methods start from).

    Validation, test and predict are zero-shot: ``logits`` are ``(N, C)`` scaled cosine
    similarities to the class embeddings (each class the normalised mean of its prompts'
    normalised text embeddings), computed once per evaluation epoch and passed along as the step's
    ``extras["class_embeddings"]`` (what a technique scores other image features against). ``val/acc`` and ``test/acc``
    are top-1 accuracy, ``test/acc_<domain>`` per domain when batches carry ``domain`` and the
    DataModule names its ``domain_names``; ``predict`` returns class probabilities. ``features``
    are the normalised image embeddings.

    The prompts are the ``class_prompts`` of the DataModule of each fit / test / predict (a
    :class:`~reglab.datamodules.text.Tokens` of ``(C, T, L)`` tensors,
    :class:`~reglab.datamodules.CaptionedDigitsDataModule` has them), unless
    :meth:`set_class_prompts` gave others. They are data, not weights: checkpoints do not hold them.

    Under DDP the contrastive loss contrasts each rank's own batch (open_clip's ``local_loss``
    without gathering features), so negatives per image are the per-rank batch size.

    Args:
        model: ``"tiny"`` (:class:`~reglab.models.clip.TinyCLIP`), ``"hf:<path>"`` (pretrained
            transformers ``CLIPModel`` weights) or ``"hf"`` (a random ``CLIPModel`` from
            ``model_kwargs={"config": {...}}``).
        num_classes, input_shape: filled from the DataModule by the ``reglab`` CLI.
        model_kwargs: passed to :func:`reglab.models.clip.create_clip`.
        objective: ``"contrastive"`` or ``"classification"``.
        lr: AdamW's learning rate; ``text_lr`` that of the text transformer (default ``lr``), which
            starts from pretrained weights and wants a smaller rate.
        weight_decay: AdamW's, on weight matrices only (open_clip exempts gains, biases and the
            temperature).

    Example:
        >>> module = CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), model_kwargs={"embed_dim": 16})
        >>> from reglab.datamodules.text import Tokens
        >>> prompts = Tokens(input_ids=torch.randint(1000, 2000, (10, 2, 6)), attention_mask=torch.ones(10, 2, 6))
        >>> module.set_class_prompts(prompts)
        >>> module.eval()(torch.zeros(4, 3, 8, 8)).shape
        torch.Size([4, 10])
    """

    provides = frozenset({"logits", "features", "index"})

    def __init__(
        self,
        model: str = "tiny",
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        objective: str = "contrastive",
        lr: float = 1e-3,
        text_lr: float | None = None,
        weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes is None or input_shape is None:
            raise ValueError("CLIPModule needs num_classes and input_shape: pass them (e.g. datamodule.num_classes / "
                             "datamodule.input_shape), or run through `reglab`, which fills them from the DataModule.")
        if objective not in OBJECTIVES:
            raise ValueError(f"CLIPModule: objective {objective!r} is not one of {list(OBJECTIVES)}. Fix: pick one.")
        self.save_hyperparameters()
        self.clip = create_clip(model, input_shape, **(model_kwargs or {}))
        self.num_classes = num_classes
        self.class_prompts: dict[str, Tensor] | None = None
        self._prompts_given = False
        self._class_embeddings: Tensor | None = None
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.domain_names: tuple[str, ...] = ()
        self.test_domain_acc = GroupAccuracy(0)
        # Class-incremental sessions (reglab.continual): logits of classes outside this mask are -inf, as
        # ClassificationModule's. All True outside a task sequence; not saved, the task runner sets it per task.
        self.register_buffer("active_classes", torch.ones(num_classes, dtype=torch.bool), persistent=False)

    # -- prompts -------------------------------------------------------------------------------
    def set_class_prompts(self, prompts: dict[str, Tensor]) -> None:
        """Use ``prompts`` (``input_ids`` / ``attention_mask`` of shape ``(C, T, L)``, ``T`` prompts
        per class, or ``(C, L)``) as the zero-shot classes, instead of the DataModule's."""
        self._use_class_prompts(prompts)
        self._prompts_given = True

    def _use_class_prompts(self, prompts: dict[str, Tensor]) -> None:
        ids = prompts["input_ids"]
        if ids.dim() == 2:
            prompts = {key: value.unsqueeze(1) for key, value in prompts.items()}
        if prompts["input_ids"].dim() != 3 or len(ids) != self.num_classes:
            raise ValueError(f"CLIPModule: class prompts of shape {tuple(ids.shape)} do not give {self.num_classes} "
                             "classes. Fix: pass (num_classes, prompts per class, length) token tensors.")
        if int(ids.max()) >= self.clip.vocab_size:
            raise ValueError(f"CLIPModule: the class prompts hold token id {int(ids.max())}, outside the text tower's "
                             f"vocabulary of {self.clip.vocab_size}. Fix: tokenize with the text tower's tokenizer.")
        self.class_prompts = {key: prompts[key] for key in ("input_ids", "attention_mask")}
        self._class_embeddings = None

    def take_class_prompts(self, datamodule: Any) -> None:
        """Use ``datamodule``'s ``class_prompts`` unless :meth:`set_class_prompts` gave others; each fit / test
        calls it at setup, and the task runner before its first test (which runs before any trainer exists)."""
        prompts = getattr(datamodule, "class_prompts", None)
        if prompts is not None and not self._prompts_given:
            self._use_class_prompts(prompts)
        elif self.class_prompts is None:
            self.class_embeddings()  # raises, naming the fix

    def class_embeddings(self) -> Tensor:
        """``(C, D)``: per class, the normalised mean of its prompts' normalised text embeddings."""
        if self.class_prompts is None:
            raise ValueError("CLIPModule: no class prompts for zero-shot classification. Fix: use a DataModule with "
                             "`class_prompts` (CaptionedDigitsDataModule) or call set_class_prompts(tokens).")
        classes, per_class, length = self.class_prompts["input_ids"].shape
        flat = {key: value.reshape(classes * per_class, length).to(self.device)
                for key, value in self.class_prompts.items()}
        text = self.text_features(flat).view(classes, per_class, -1)
        return F.normalize(text.mean(1), dim=-1)

    # -- embeddings ----------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def scored_class_embeddings(self) -> Tensor:
        """The ``(C, D)`` class embeddings the logits are scored against: embedded afresh at every
        training step on them (the prompts train), else once per evaluation epoch."""
        if self.training and self.hparams.objective == "classification":
            return self.class_embeddings()
        if self._class_embeddings is None:
            with torch.no_grad():
                self._class_embeddings = self.class_embeddings()
        return self._class_embeddings

    def zero_shot_logits(self, image_features: Tensor, classes: Tensor | None = None) -> Tensor:
        classes = self.scored_class_embeddings() if classes is None else classes
        return self.clip.logit_scale() * image_features @ classes.T.to(image_features.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Zero-shot ``(N, C)`` logits of ``images``."""
        return self.zero_shot_logits(self.image_features(images))

    # -- the step contract ---------------------------------------------------------------------
    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        image = self.image_features(batch["input"])
        if self.training and self.hparams.objective == "contrastive":
            text = self.text_features(batch["caption"])
            logits = self.clip.logit_scale() * image @ text.T
            return StepOutput(logits=logits, target=torch.arange(len(image), device=image.device),
                              labels=batch["target"], features=image, index=batch.get("index"), batch=batch,
                              extras={"text_features": text})
        classes = self.scored_class_embeddings()
        logits = self.zero_shot_logits(image, classes)
        if not self.active_classes.all():
            logits = logits.masked_fill(~self.active_classes, float("-inf"))
        return StepOutput(logits=logits, target=batch["target"], features=image, index=batch.get("index"), batch=batch,
                          extras={"class_embeddings": classes})

    def task_loss(self, out: StepOutput) -> Tensor:
        if "text_features" not in out.extras:
            return cross_entropy_per_sample(out.logits, out.target)
        # image i against all captions (row i), caption i against all images (column i)
        columns_target = out.target if out.target.dim() == 1 else out.target.T
        rows = cross_entropy_per_sample(out.logits, out.target)
        return (rows + cross_entropy_per_sample(out.logits.T, columns_target)) / 2

    # -- set-up and metrics --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_module_fits_data(self, self.num_classes, self.hparams.input_shape)
        datamodule = self.trainer.datamodule
        self.take_class_prompts(datamodule)
        keys = getattr(datamodule, "batch_keys", None)
        if stage == "fit" and self.hparams.objective == "contrastive" and keys is not None and "caption" not in keys:
            raise ValueError(f"CLIPModule: contrastive training needs a `caption` in every batch, and "
                             f"{type(datamodule).__name__}'s batches have {sorted(keys)}. Fix: use "
                             "CaptionedDigitsDataModule, or objective='classification' (trains against the class "
                             "prompts).")
        names = tuple(getattr(datamodule, "domain_names", ()) or ())
        if names != self.domain_names:
            self.domain_names = names
            self.test_domain_acc = GroupAccuracy(len(names)).to(self.device)

    def _forget_class_embeddings(self) -> None:
        # the text tower moves while training: evaluation epochs embed the prompts afresh, and so does an
        # evaluation outside Lightning's loops after a fit (the task runner's accuracy matrix)
        self._class_embeddings = None

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _forget_class_embeddings
    on_train_epoch_end = _forget_class_embeddings

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        predicted = out.logits.detach().argmax(1)
        (self.val_acc if stage == "val" else self.test_acc).update(predicted, out.labels)
        if stage == "test" and self.domain_names and "domain" in out.batch:
            self.test_domain_acc.update(predicted, out.labels, out.batch["domain"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc.compute())
        self.val_acc.reset()

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()
        if self.domain_names:
            # one synced compute on every rank; a domain the test split lacks (nan) is not logged
            values = self.test_domain_acc.compute().reshape(-1)  # torchmetrics squeezes a single domain's
            for name, value in zip(self.domain_names, values):
                if not value.isnan():
                    self.log(f"test/acc_{name}", value)
            self.test_domain_acc.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        text = {id(p) for p in self.clip.text_encoder.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                # open_clip's rule: no decay on gains, biases and the temperature
                decays = parameter.ndim >= 2 and "logit_scale" not in name
                groups.setdefault((id(parameter) in text, decays), []).append(parameter)
        text_lr = self.hparams.lr if self.hparams.text_lr is None else self.hparams.text_lr
        return torch.optim.AdamW(
            [{"params": params, "lr": text_lr if is_text else self.hparams.lr,
              "weight_decay": self.hparams.weight_decay if decays else 0.0}
             for (is_text, decays), params in groups.items()]
        )

    @classmethod
    def from_pretraining(cls, config: str | Path, cache_dir: str | Path = "runs/pretrained") -> CLIPModule:
        """The module a ``reglab fit`` of ``config`` (e.g. ``configs/experiment/tiny_clip_pretrain.yaml``)
        ends with: fitted once in a subprocess and cached by the config's content, as pretrained
        backbones are (:func:`reglab.checkpoints.pretrained_checkpoint_for`)."""
        return cls.load_from_checkpoint(pretrained_checkpoint_for(config, cache_dir), map_location="cpu")


def seed_pretraining(config: str | Path, seed: int, epochs: int, domains: Sequence[str] | None = None,
                     trainer: dict[str, Any] | None = None, cache_dir: str | Path = "runs/pretrained") -> Path:
    """The checkpoint of a protocol's per-seed pretraining: ``config`` (a ``reglab fit`` config of a
    CLIPModule on a CaptionedDigitsDataModule) with ``seed`` as its seed and split seed (so no test image
    of the seed is seen in pretraining), ``epochs`` epochs and, unless ``None``, only ``domains``;
    ``trainer`` overrides its trainer. Fitted once and cached by the derived config's content
    (:func:`reglab.checkpoints.pretrained_checkpoint_of`), so every protocol asking the same gets one fit."""
    import yaml

    source = Path(config)
    derived = yaml.safe_load(source.read_text())
    derived["seed_everything"] = seed
    derived["data"]["init_args"].update(seed=seed, split_seed=seed)
    if domains is not None:
        derived["data"]["init_args"]["domains"] = list(domains)
    derived["trainer"] = {**derived.get("trainer", {}), "max_epochs": epochs, **(trainer or {})}
    return pretrained_checkpoint_of(derived, f"{source.stem}-seed{seed}", cache_dir)
