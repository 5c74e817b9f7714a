"""Where an analysis command writes: new files in its ``--out`` folder, never over existing ones."""

from __future__ import annotations

from pathlib import Path


def new_outputs(command: str, out: Path, names: list[str]) -> list[Path]:
    """``out / name`` for each name; exit with the fix when any of them exists already.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> [path.name for path in new_outputs("reglab x", folder, ["x.png", "x.json"])]
        ['x.png', 'x.json']
    """
    paths = [out / name for name in names]
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise SystemExit(f"{command}: {', '.join(existing)} already exist(s) and are never overwritten. "
                         "Fix: choose another --out, or move the old files away yourself.")
    return paths
