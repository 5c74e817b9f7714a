"""PEP 562 lazy exports for reglab's packages (``reglab.callbacks`` and its families through
:func:`reglab.registry.lazy_exports`, ``reglab.datamodules`` directly).

Example (a package's ``__init__.py``)::

    from reglab.lazy import lazy_names

    __getattr__, __dir__, __all__ = lazy_names(__name__, {"DigitsDataModule": "reglab.datamodules.digits"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """PEP 562 ``__getattr__``, ``__dir__`` and ``__all__`` for a package whose public ``names``
    map to the modules defining them. A name is imported on first access and then cached in the
    package, so later lookups are plain attribute reads."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, sorted(names)
