"""A run's folder: reserved atomically, locked while a process writes into it, and appended to.

Every ``reglab`` command that writes logs goes through :class:`RunFolder`:

* a new run reserves ``<root>/version_<k>`` with ``os.mkdir`` (the first ``k`` that no other
  process created first), so two runs started at once never share a folder;
* a process that writes into a run's folder holds ``reglab.lock`` there (its PID and host); a
  second process fails at once with :class:`RunFolderBusy`, naming the folder and the holder. A
  lock whose process is dead is taken over, so a killed run never leaves its folder stuck. DDP
  workers that rank 0 started (``REGLAB_RUN_DIR`` set, ``LOCAL_RANK > 0``) share rank 0's lock;
* logs continue: :class:`AppendingCSVLogger` keeps the rows of ``metrics.csv`` that earlier
  starts wrote, and TensorBoard adds an event file beside the earlier ones;
* every start keeps its own config: ``config.yaml`` for the first, ``config.<n>.yaml`` for the
  n-th resume (:meth:`RunFolder.config_name`);
* a folder this process created and that never got past start-up (no optimizer step) is removed
  on failure (:meth:`RunFolder.close`), so failed starts leave no empty versions behind.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()) / "demo"
    >>> folder = RunFolder.new(root)
    >>> folder.path.name, (folder.path / LOCK_NAME).is_file()
    ('version_0', True)
    >>> RunFolder.new(root).path.name       # the next start reserves the next version
    'version_1'
    >>> folder.close(keep=True)
    >>> (folder.path / LOCK_NAME).exists(), folder.path.is_dir()
    (False, True)
"""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import socket
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

RUN_DIR_ENV = "REGLAB_RUN_DIR"
LOCK_NAME = "reglab.lock"


class RunFolderBusy(SystemExit):
    """Another live process writes into the run folder (a ``SystemExit``: the command ends with the message)."""


def numbered(root: Path, prefix: str) -> list[Path]:
    """The folders ``<root>/<prefix>_<k>``, by ``k``."""
    found = (p for p in root.glob(f"{prefix}_*") if p.is_dir() and p.name[len(prefix) + 1 :].isdigit())
    return sorted(found, key=lambda p: int(p.name[len(prefix) + 1 :]))


def next_number(root: Path, prefix: str = "version") -> int:
    """One more than the highest ``k`` of ``<root>/<prefix>_<k>`` (0 if there is none)."""
    existing = numbered(root, prefix)
    return int(existing[-1].name[len(prefix) + 1 :]) + 1 if existing else 0


def reserve(root: Path, prefix: str = "version") -> Path:
    """Create and return ``<root>/<prefix>_<k>`` for the first free ``k`` after the existing ones.

    ``os.mkdir`` either creates the folder or fails because another process just did: the loser
    tries the next number, so no two processes ever get the same folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    k = next_number(root, prefix)
    while True:
        try:
            (root / f"{prefix}_{k}").mkdir()
            return root / f"{prefix}_{k}"
        except FileExistsError:
            k += 1


def _me() -> tuple[int, str]:
    return os.getpid(), socket.gethostname()


def _read_holder(lock: Path) -> tuple[int, str]:
    """(PID, host) written in a lock file; (-1, "?") while it is unreadable or half written."""
    try:
        pid, host = lock.read_text().split("\n")[:2]
        return int(pid), host
    except (OSError, ValueError):
        return -1, "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolder:
    """One run's folder, held by this process while it writes there.

    Build it with :meth:`new` (a fresh, reserved version), :meth:`existing` (a folder to write
    into again, e.g. to resume) or :meth:`shared` (a DDP worker inside rank 0's folder).

    Args:
        path: the folder.
        fresh: this process created it (so :meth:`close` may remove it after a failed start).
        lock: take the folder's lock now.
    """

    def __init__(self, path: str | Path, *, fresh: bool = False, lock: bool = True) -> None:
        self.path = Path(path)
        self.fresh = fresh
        self._locked = False
        if lock:
            self._lock()

    @classmethod
    def new(cls, root: str | Path, prefix: str = "version") -> RunFolder:
        """Reserve the next ``<root>/<prefix>_<k>`` and lock it."""
        return cls(reserve(Path(root), prefix), fresh=True)

    @classmethod
    def existing(cls, path: str | Path) -> RunFolder:
        """Lock an existing run folder to write into it again."""
        return cls(path)

    @classmethod
    def shared(cls, path: str | Path) -> RunFolder:
        """The folder of the rank-0 process that started this DDP worker; rank 0 holds the lock."""
        return cls(path, lock=False)

    # -- the lock -------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def _lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, host = self._holder()
                if (pid, host) == _me():
                    break  # this process holds it already (an in-process command before this one)
                if pid < 0:  # its holder has created it but not written it yet
                    time.sleep(0.01)
                    continue
                if host == _me()[1] and not _alive(pid):
                    self._remove_stale((pid, host))
                    continue
                raise RunFolderBusy(
                    f"{self.path} is in use by process {pid} on {host} (lock file {self.lock_path}). "
                    "Fix: wait for that run to end or stop it, or start this one under another --run_name."
                ) from None
            with os.fdopen(fd, "w") as file:
                file.write("{}\n{}\n".format(*_me()))
            break
        else:
            raise RunFolderBusy(
                f"{self.path}: its lock file {self.lock_path} cannot be read. "
                "Fix: if no process writes into this run folder, delete the lock file."
            )
        self._locked = True
        atexit.register(self._unlock)

    def _holder(self) -> tuple[int, str]:
        return _read_holder(self.lock_path)

    def _remove_stale(self, holder: tuple[int, str]) -> None:
        # renaming is atomic: of two processes taking over the same stale lock, one moves it away
        stale = self.lock_path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.lock_path, stale)
        except FileNotFoundError:
            return
        if _read_holder(stale) != holder:  # a rival replaced the stale lock first: give its lock back
            try:
                os.link(stale, self.lock_path)
            except FileExistsError:
                pass
        stale.unlink()

    def _unlock(self) -> None:
        if self._locked and self._holder() == _me():
            self.lock_path.unlink()
        self._locked = False
        atexit.unregister(self._unlock)

    def close(self, keep: bool) -> None:
        """Release the lock; a fresh folder is removed unless ``keep`` (the command got past start-up)."""
        self._unlock()
        if self.fresh and not keep:
            shutil.rmtree(self.path, ignore_errors=True)

    # -- what goes into it ------------------------------------------------------------------------
    def config_name(self) -> str:
        """``config.yaml`` for the first start in this folder, ``config.<n>.yaml`` for the n-th resume."""
        n = 0
        while (self.path / self._config_file(n)).exists():
            n += 1
        return self._config_file(n)

    @staticmethod
    def _config_file(n: int) -> str:
        return "config.yaml" if n == 0 else f"config.{n}.yaml"



def run_loggers(log_dir: str | Path) -> list[Logger]:
    """CSV and TensorBoard loggers writing into ``log_dir`` itself, continuing what is there."""
    log_dir = Path(log_dir)
    return [
        AppendingCSVLogger(log_dir.parent, name="", version=log_dir.name),
        TensorBoardLogger(log_dir.parent, name="", version=log_dir.name, default_hp_metric=False),
    ]


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; we read its header instead, so that save() appends
        # (and rewrites the header, keeping every row, when a new key appears: Lightning's own path)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """A :class:`~lightning.pytorch.loggers.CSVLogger` that continues the ``metrics.csv`` of its folder.

    A resumed run's rows follow the earlier ones; rows logged after the checkpoint the run
    resumed from appear twice (first attempt, then resumed), each with its step.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> for start in range(2):
        ...     logger = AppendingCSVLogger(folder, name="", version="run")
        ...     logger.log_metrics({"loss": 1.0 / (start + 1)}, step=start)
        ...     logger.save()
        >>> print(open(f"{folder}/run/metrics.csv").read().strip())
        loss,step
        1.0,0
        0.5,1
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
