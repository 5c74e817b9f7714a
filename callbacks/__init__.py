"""Every reglab technique, one module per paper, grouped by family.

Each name exported here is a :class:`reglab.technique.Technique`; the shared test
harness (tests/test_harness.py) discovers them from ``__all__`` and fails for any technique that
has no harness entry.
"""

from reglab.callbacks.averaging import EMA, SWA, MeanTeacher, OGENSelfDistillation
from reglab.callbacks.baselines import GCE, CutMix, LabelSmoothing, Mixup
from reglab.callbacks.continual import EWC, MVP, OVOR, SI, TEEN, ExperienceReplay, FeatureDistillation, L2ToPreviousTask, LwF
from reglab.callbacks.noisy_labels import ELR
from reglab.callbacks.peft import BitFit, FullFineTuning, GSLoRA, LinearProbe, LoLDU, LoRA, LoRASB, SoMA, SVFit
from reglab.callbacks.peft import PEGO, BALoRA, RegularizedMaskTuning
from reglab.callbacks.self_distillation import KnowledgeDistillation, PSKD

__all__ = [
    "CutMix", "ELR", "EWC", "FeatureDistillation", "GCE", "KnowledgeDistillation", "L2ToPreviousTask",
    "LabelSmoothing", "LwF", "Mixup", "PSKD",
    # continual-learning baselines
    "ExperienceReplay", "SI",
    # continual learning: OVOR (paper 08), TEEN (paper 47)
    "OVOR", "TEEN",
    # online continual learning: MVP (paper 16)
    "MVP",
    # parameter-efficient fine-tuning
    "BitFit", "FullFineTuning", "GSLoRA", "LinearProbe", "LoLDU", "LoRA", "LoRASB", "SoMA", "SVFit",
    "BALoRA", "PEGO", "RegularizedMaskTuning",
    # weight averaging and self-distillation between model states
    "EMA", "MeanTeacher", "OGENSelfDistillation", "SWA",
]
