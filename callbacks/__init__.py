"""Every reglab technique, one module per paper, grouped by family.

Each name exported here is a :class:`lightning_app.technique.Technique`; the shared test
harness (tests/test_harness.py) discovers them from ``__all__`` and fails for any technique that
has no harness entry.
"""

from callbacks.averaging import EMA, SWA, MeanTeacher, OGENSelfDistillation
from callbacks.baselines import GCE, CutMix, LabelSmoothing, Mixup
from callbacks.continual import EWC, FeatureDistillation, L2ToPreviousTask, LwF
from callbacks.noisy_labels import ELR
from callbacks.peft import BitFit, FullFineTuning, LinearProbe, LoLDU, LoRA, LoRASB, SVFit
from callbacks.self_distillation import KnowledgeDistillation, PSKD

__all__ = [
    "CutMix", "ELR", "EWC", "FeatureDistillation", "GCE", "KnowledgeDistillation", "L2ToPreviousTask",
    "LabelSmoothing", "LwF", "Mixup", "PSKD",
    # parameter-efficient fine-tuning
    "BitFit", "FullFineTuning", "LinearProbe", "LoLDU", "LoRA", "LoRASB", "SVFit",
    # weight averaging and self-distillation between model states
    "EMA", "MeanTeacher", "OGENSelfDistillation", "SWA",
]
