"""How a claim's arms are run: the protocol registry.

A *protocol* turns one arm of a claim and one seed into a mapping ``metric -> value``. The core
knows only the plain ``fit`` protocol (:mod:`reglab.bench.fit`); every other protocol lives with
the family that owns it and registers itself when its module is imported::

    from reglab.bench.protocols import Protocol, register_protocol

    @register_protocol("task_sequence")
    class TaskSequenceProtocol(Protocol):
        defaults = {"epochs": 3}

        def run_arm(self, arm, spec, seed, workdir):
            ...
            return {"forgetting": 0.2, "average_accuracy": 0.8}

A claim file names the protocol and, unless it is built in, the module that registers it
(``protocol: task_sequence`` and ``module: reglab.continual.claims``), so the core never imports
a family and a new family adds a protocol without touching the core.
"""

from __future__ import annotations

import copy
import importlib
import io
from pathlib import Path
from typing import Any, Callable, ClassVar

#: protocols that ship with the core bench, by the module that registers them
BUILT_IN = {"fit": "reglab.bench.fit"}

PROTOCOLS: dict[str, type["Protocol"]] = {}


class ClaimError(ValueError):
    """A claim file that cannot run: raised while loading it, before any training."""


def register_protocol(name: str):
    """Class decorator: make a :class:`Protocol` subclass available under ``name``."""

    def register(cls: type[Protocol]) -> type[Protocol]:
        if name in PROTOCOLS and PROTOCOLS[name] is not cls:
            raise ClaimError(f"protocol {name!r} is registered twice ({PROTOCOLS[name].__module__} and {cls.__module__})")
        cls.name = name
        PROTOCOLS[name] = cls
        return cls

    return register


def get_protocol(name: str, module: str | None = None) -> type["Protocol"]:
    """The protocol class ``name``, importing ``module`` (or the built-in module) to register it."""
    module = module or BUILT_IN.get(name)
    if module is not None and name not in PROTOCOLS:
        importlib.import_module(module)
    if name not in PROTOCOLS:
        where = f"module {module!r} registers no such protocol" if module else "no module named in the claim file"
        raise ClaimError(
            f"unknown protocol {name!r} ({where}; registered: {sorted(PROTOCOLS)}). Fix: add `module: <the module "
            "that defines it with @register_protocol>` to the claim file."
        )
    return PROTOCOLS[name]


def instantiate(spec: dict[str, Any]) -> Any:
    """Build an object from ``{class_path: a.b.C, init_args: {...}}`` (the configs' spelling)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ClaimError(f"expected a mapping with class_path (and init_args), got {spec!r}")
    return import_object(spec["class_path"])(**spec.get("init_args", {}))


def import_object(path: str) -> Any:
    """The object a dotted ``package.module.name`` names (a class, a function), imported on use."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ClaimError(f"cannot import {path!r} ({error}). Fix: name an importable object as package.module.name.") from error


def arm_techniques(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """An arm's ``technique`` as a list of ``{class_path, init_args}`` specs (one, several to stack, or none)."""
    technique = spec.get("technique")
    if technique is None:
        return []
    return list(technique) if isinstance(technique, list) else [technique]


def check_arm_techniques(claim_name: str, arm: str, spec: dict[str, Any]) -> None:
    """Raise :class:`ClaimError` unless every technique of the arm is a ``{class_path, init_args}`` mapping."""
    for technique in arm_techniques(spec):
        if not isinstance(technique, dict) or "class_path" not in technique:
            raise ClaimError(f"claim {claim_name}, arm {arm}: a technique is `{{class_path: ..., init_args: "
                             f"{{...}}}}` (or a list of them to stack), got {technique!r}.")


def fit_then_test(module: Any, data: Any, spec: dict[str, Any], max_epochs: int,
                  trainer: dict[str, Any]) -> dict[str, float]:
    """Fit ``module`` on ``data`` for ``max_epochs`` with the arm's techniques attached and no
    validation loop (the last epoch is reported: no arm profits from more looks), then
    ``trainer.test`` it: what the test logs, less ``test/loss``, without the ``test/`` prefix.
    ``trainer`` holds further ``L.Trainer`` arguments (a claim's ``trainer`` setting)."""
    import lightning as L  # here: loading a claim file (and `reglab bench --help`) needs no Lightning

    fitter = L.Trainer(**{"max_epochs": max_epochs, "accelerator": "auto", "devices": 1, "logger": False,
                          "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                          "limit_val_batches": 0, **trainer},
                       callbacks=[instantiate(technique) for technique in arm_techniques(spec)])
    fitter.fit(module, datamodule=data)
    (logged,) = fitter.test(module, datamodule=data, verbose=False)
    return {name.removeprefix("test/"): value for name, value in logged.items() if name != "test/loss"}


class Protocol:
    """Runs one arm of a claim for one seed.

    Subclasses set ``defaults`` (every setting they read, with its default; a claim file's
    ``settings`` may only override these) and implement :meth:`run_arm`. The harness memoizes
    :meth:`run_arm` on (protocol, settings, arm spec, seed), so claims that share an arm (the same
    fine-tuning baseline, the same LoRA) run it once per process; a protocol memoizes the work
    its arms share within a seed (a pretrained model) itself.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise ClaimError(
                f"claim {claim_name}: protocol {self.name!r} has no setting(s) {sorted(unknown)}. "
                f"Fix: use one of {sorted(self.defaults)}."
            )
        self.claim_name = claim_name
        self.settings = {**copy.deepcopy(self.defaults), **settings}
        # arm -> figure name -> PNG bytes of its first run (keep_figure), written by figures()
        self.drawn: dict[str, dict[str, bytes]] = {}
        self.check_settings()

    def check_settings(self) -> None:
        """Raise :class:`ClaimError` for settings this protocol cannot run (called on construction)."""

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        """Raise :class:`ClaimError` for an arm this protocol cannot run (called at load time)."""

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        """Run arm ``arm`` (its ``spec`` from the claim file) with ``seed``: ``{metric: float}``;
        a list value is a per-epoch series (drawn by :meth:`figures`, never judged)."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """Markdown lines on the setting, for the results page (default: none beyond the settings)."""
        return []

    def keep_figure(self, arm: str, name: str, draw: Callable[[], Any]) -> None:
        """Keep figure ``name`` of ``arm`` from its first run only: ``draw()`` (a matplotlib Figure) is called
        while the run's model exists, and :meth:`figures` writes it next to the results page."""
        kept = self.drawn.setdefault(arm, {})
        if name not in kept:
            kept[name] = figure_png(draw(), arm)

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        """Write the figures next to the results page; return their markdown lines. Here the kept ones
        (:meth:`keep_figure`); a protocol that draws more adds them to these."""
        kept = [(arm, name, png) for arm in runs for name, png in self.drawn.get(arm, {}).items()]
        lines = ["## Figures (each arm's first run)", ""] if kept else []
        for arm, name, png in kept:
            (out_dir / f"{claim_name}_{arm}_{name}.png").write_bytes(png)
            lines += [f"![{arm}: {name}]({claim_name}_{arm}_{name}.png)", ""]
        return lines


def figure_png(figure: Any, title: str) -> bytes:
    """``figure`` (matplotlib) titled ``title`` as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
