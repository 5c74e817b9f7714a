"""Continual learning: regularizers that work across the tasks of ``reglab fit-tasks``
(``reglab.continual``). Each regularizer is a no-op until its first ``on_task_end``;
experience replay rehearses from the first step."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
