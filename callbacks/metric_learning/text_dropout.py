"""Text dropout: modality dropout of the free-text input of a multi-input retrieval model (McKee et
al., "Language-Guided Music Recommendation for Video via Prompt Analogies", CVPR 2023).

ViML queries music with a video and a free-text description fused into one embedding. Trained on
both inputs, the fused query leans on the text, the easier signal, and the video encoder is left
under-trained (the two co-adapt), so retrieval from the video alone is poor. Text dropout removes
the text of a random share of the training queries, so those queries must be answered from the
video alone:

    for each training query i:  drop_i ~ Bernoulli(p);  text_i <- empty text  if drop_i

The rest of the training step is unchanged (the retrieval loss over the fused queries). The paper
reports it as critical to the model's performance.

Source: the paper's method text (there is no official code; the full text could not be fetched in
this session, so the mechanism follows the paper's abstract and figure caption: text dropped at
random per training example "to prevent co-adaptation of the video and text representations").
The drop probability is an init arg (default 0.5, ours, not the paper's). How a query without text
is represented belongs to the model: the technique calls ``module.without_text(batch, rows)``,
which :class:`reglab.tasks.MultiInputRetrievalModule` answers with the empty hint (``[CLS] [SEP]``,
what a user who types nothing sends), the same input its evaluation of ``no_text_recall@k`` uses.
The draws come from the global torch RNG, which the step contract checkpoints, so resume is exact;
the technique keeps no state.

Method card (what it does, when it helps, what it costs): ``text_dropout.card.yaml``.

Example:
    >>> from reglab.callbacks.metric_learning import TextDropout
    >>> TextDropout(p=0.5).name
    'text_dropout'
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from reglab.technique import Technique


class TextDropout(Technique):
    """Replaces the text input of each training query by the empty text with probability ``p``
    (module docstring).

    Args:
        p: probability that a training query loses its text (0 = no dropout, 1 = never any text).
    """

    name = "text_dropout"
    needs = frozenset({"text"})

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"TextDropout: p is a probability, got {p}. Fix: give p in [0, 1], e.g. 0.5.")
        self.p = p

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not callable(getattr(pl_module, "without_text", None)):
            raise self.fail(
                f"{type(pl_module).__name__} has no without_text(batch, rows) to say what a query without text is",
                "use a multi-input retrieval model (reglab.tasks.MultiInputRetrievalModule, e.g. "
                "configs/experiment/hinted_digits_retrieval.yaml)",
            )

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        size = len(batch["target"])
        return module.without_text(batch, torch.rand(size, device=batch["target"].device) < self.p)
