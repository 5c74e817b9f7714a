"""Path-valued arguments that a config file names relative to itself.

A light module of its own (no Lightning, no jsonargparse) so that techniques can annotate their
arguments without importing the CLI, which reads the annotation when it merges config files.
"""

from __future__ import annotations

from typing import Annotated

__all__ = ["ConfigPath", "RelativeToConfig"]


class RelativeToConfig:
    """Marks a path-valued argument of a callback or technique as relative to the config file that
    names it (not to the working directory): annotate it ``ConfigPath``. Python callers pass
    ordinary paths (relative to the working directory)."""


ConfigPath = Annotated[str, RelativeToConfig]
