"""Self-distillation and distillation techniques: the model, or a fixed teacher, supplies soft targets."""

from reglab.callbacks.self_distillation.knowledge_distillation import KnowledgeDistillation
from reglab.callbacks.self_distillation.ps_kd import PSKD

__all__ = ["KnowledgeDistillation", "PSKD"]
