"""The ``reglab`` command: LightningCLI's fit/validate/test/predict plus reglab's own commands.

Configs compose: pass several ``--config`` files (data, model, technique, trainer); later ones
override earlier ones. Techniques live under their own key, a mapping from a name to a technique,
so a second file *adds* a technique instead of replacing the first file's list (the
``trainer.callbacks`` pitfall of LightningCLI)::

    # configs/technique/elr.yaml
    techniques:
      elr:
        class_path: reglab.callbacks.ELR
        init_args: {beta: 0.7, lam: 3.0}

    reglab fit --config configs/experiment/quickstart.yaml --config configs/technique/label_smoothing.yaml

Setting ``techniques: {elr: null}`` in a later file removes one. Every run writes CSV and
TensorBoard logs, the resolved ``config.yaml`` and ``checkpoints/last.ckpt`` into one folder,
``<runs_dir>/<run_name>/version_<k>``; ``--ckpt_path last`` resumes the newest run of that name
in its own folder, appending to its logs and keeping the config of every start
(``config.<n>.yaml``); ``validate`` / ``test`` / ``predict --ckpt_path last`` log into a folder of
their own inside it (``test_0``, ...). See :mod:`reglab.run_folder` for the folder's lock.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import sys
import typing
import zipfile
from pathlib import Path
from typing import Annotated, Any

import yaml
from jsonargparse import Namespace
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from reglab.resume import InexactResumeError, RunCheckpoint
from reglab.nonfinite import NonFiniteGuard, NonFiniteLossError
from reglab.run_folder import RUN_DIR_ENV, RunFolder, next_number, numbered, run_loggers
from reglab.paths import RelativeToConfig
from reglab.summary import print_run_summary


class ReglabCLI(LightningCLI):
    """LightningCLI with composable technique configs and one folder per run.

    The run folder is reserved and locked while the command parses (so a clash fails at once),
    and released when the command ends; a folder this command created is removed again if it
    fails before its first training step. With ``run=False`` the caller releases it
    (``cli.run_folder.close(keep=...)``) or process exit does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", True)
        self.run_folder: RunFolder | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._close_run_folder(succeeded=False)
            raise
        if kwargs.get("run", True):
            self._close_run_folder(succeeded=True)

    def _close_run_folder(self, succeeded: bool) -> None:
        if self.run_folder is not None:
            trainer = getattr(self, "trainer", None)
            self.run_folder.close(keep=succeeded or (trainer is not None and trainer.global_step > 0))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--techniques",
            type=dict[str, Callback | None] | None,
            default=None,
            help="Techniques by name; files merge, `name: null` removes one.",
        )
        parser.add_argument("--run_name", type=str, default="run", help="Folder name of this run.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run folders go.")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test and print a summary."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # reglab's entry points read sys.argv themselves and pass what they rewrote as ``args``;
        # LightningCLI would warn that both are given, so it sees only the program name meanwhile
        if args is None:
            return super().parse_arguments(parser, args)
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    # -- configuration ------------------------------------------------------------------------
    def _subconfig(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        fill_model_shape_from_data(config)
        self.run_folder = open_run_folder(config, self.subcommand)
        self._run_dir = self.run_folder.path
        # every start keeps its own config file (a resumed run's earlier ones stay)
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": self.run_folder.config_name()}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        techniques = self._get(self.config_init, "techniques") or {}
        callbacks = list(config.get("callbacks") or [])
        callbacks += [technique for technique in techniques.values() if technique is not None]
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(cb, ModelCheckpoint) for cb in callbacks
        ):
            callbacks.append(RunCheckpoint(dirpath=self._run_dir / "checkpoints", save_last=True))
        if not any(isinstance(cb, NonFiniteGuard) for cb in callbacks):
            callbacks.append(NonFiniteGuard())
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(cb, RichProgressBar) for cb in callbacks
        ):
            callbacks.append(RichProgressBar(leave=True))
        kwargs["callbacks"] = callbacks
        if config.get("logger") in (None, True):
            kwargs["logger"] = run_loggers(self._run_dir)
        kwargs.setdefault("default_root_dir", str(self._run_dir))
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if self._subconfig().get("test_after_fit"):
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics.update(results[0] if results else {})
        print_run_summary(self.trainer, metrics, self._run_dir)


DATA_SHAPE_KEYS = ("num_classes", "num_known_classes", "input_shape", "query_cardinalities", "item_cardinalities", "num_items", "vocab_size",
                   "max_text_length")


def fill_model_shape_from_data(config: Namespace) -> None:
    """Set the model's ``num_classes`` / ``input_shape`` (a two-tower model's ``query_cardinalities`` /
    ``item_cardinalities``, a multi-input retrieval model's ``num_items`` / ``vocab_size`` /
    ``max_text_length``) from the DataModule when it has them.

    Only for model classes whose constructor takes these arguments and left them unset; the
    DataModule is built once here to read them (reglab DataModules load nothing in ``__init__``).
    """
    model_cfg, data_cfg = config.get("model"), config.get("data")
    if model_cfg is None or data_cfg is None or not isinstance(model_cfg, Namespace):
        return
    model_class = import_class(model_cfg.class_path)
    wanted = [
        key
        for key in DATA_SHAPE_KEYS
        if key in inspect.signature(model_class).parameters and model_cfg.init_args.get(key) is None
    ]
    if not wanted:
        return
    datamodule = _instantiate_datamodule(data_cfg)
    for key in wanted:
        value = getattr(datamodule, key, None)
        if value is not None:
            model_cfg.init_args[key] = list(value) if isinstance(value, tuple) else value


def _instantiate_datamodule(data_cfg: Namespace) -> LightningDataModule:
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    return parser.instantiate_classes(Namespace(data=data_cfg)).data


def import_class(class_path: str) -> type:
    """The class (or function) a dotted path such as ``reglab.tasks.ClassificationModule`` names."""
    module_name, _, name = class_path.rpartition(".")
    return getattr(__import__(module_name, fromlist=[name]), name)


def open_run_folder(config: Namespace, subcommand: str | None) -> RunFolder:
    """The folder this command writes into, reserved and locked.

    ``fit`` starts ``<runs_dir>/<run_name>/version_<k>`` (a new ``k``), or with ``--ckpt_path
    last`` continues the newest version holding ``checkpoints/last.ckpt`` (and points
    ``ckpt_path`` at that file). ``validate`` / ``test`` / ``predict --ckpt_path last`` get a
    folder of their own inside that run (``<subcommand>_<k>``), beside the training logs. Built
    without a subcommand (``run=False``), nothing is created: the folder a fit would start.
    """
    if RUN_DIR_ENV in os.environ and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return RunFolder.shared(os.environ[RUN_DIR_ENV])  # a DDP worker started by rank 0
    root = Path(config.get("runs_dir") or "runs") / (config.get("run_name") or "run")
    if subcommand is None:
        return RunFolder(root / f"version_{next_number(root)}", lock=False)
    if config.get("ckpt_path") == "last":
        run_dir = last_resumable(root)
        config.ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
        folder = RunFolder.existing(run_dir) if subcommand == "fit" else RunFolder.new(run_dir, prefix=subcommand)
    else:
        folder = RunFolder.new(root)
    os.environ[RUN_DIR_ENV] = str(folder.path)
    return folder


def last_resumable(root: Path) -> Path:
    """The newest ``<root>/version_<k>`` with a ``checkpoints/last.ckpt``; refuses an incomplete one."""
    resumable = [v for v in numbered(root, "version") if (v / "checkpoints" / "last.ckpt").is_file()]
    if not resumable:
        raise SystemExit(
            f"--ckpt_path last: no checkpoints/last.ckpt under {root}/version_*; start a new run "
            "without --ckpt_path, or pass the checkpoint's path"
        )
    last = resumable[-1] / "checkpoints" / "last.ckpt"
    if not zipfile.is_zipfile(last):  # torch.save writes a zip archive; a cut-off one has no directory
        others = sorted(str(p) for p in last.parent.glob("*.ckpt") if p != last and zipfile.is_zipfile(p))
        raise SystemExit(
            f"--ckpt_path last: {last} is incomplete (its process was probably killed while saving it); "
            f"nothing in {resumable[-1]} was changed. Fix: resume from another checkpoint with "
            f"--ckpt_path <file> ({', '.join(others) if others else 'this run has no other complete one'}), "
            "or start a new run without --ckpt_path."
        )
    return resumable[-1]



# the sections every command needs from a file or a --<section>... argument, and a file that has each
SECTION_EXAMPLES = {"data": "configs/data/digits.yaml", "model": "configs/model/cnn.yaml"}


def merge_technique_configs(argv: list[str]) -> list[str]:
    """Make ``techniques`` mappings of successive ``--config`` files add up, check what the files
    name, and resolve their relative paths.

    jsonargparse replaces a dict-valued key as a whole when a later config sets it; this reads
    the config files, deep-merges their ``techniques`` (a later ``name: null`` removes ``name``),
    and passes the merged mapping right after the last ``--config``, so explicit
    ``--techniques...`` arguments after it still override it. On the way, every technique's and
    ``trainer.callbacks`` entry's ``init_args`` are checked against its class's signature (a
    misspelled key names the file and the closest valid name), and arguments annotated
    :data:`ConfigPath` are made absolute against the directory of the file that names them; the
    rewritten ``trainer.callbacks`` follow their file, which sets the same list.
    """
    config_positions = [
        i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")
    ]
    merged: dict[str, Any] = {}
    found = False
    inserts: dict[int, list[str]] = {}
    sections: set[str] = set()
    paths: list[str] = []
    for i in config_positions:
        path = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
        if not Path(path).is_file():
            continue
        paths.append(path)
        config = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(config, dict):
            continue
        sections.update(config)
        after = i + (1 if "=" in argv[i] else 2)
        callbacks = (config.get("trainer") or {}).get("callbacks")
        if isinstance(callbacks, list):
            resolved = [_checked_entry(entry, None, path, f"trainer.callbacks[{k}]") for k, entry in enumerate(callbacks)]
            if resolved != callbacks:
                inserts[after] = [f"--trainer.callbacks={json.dumps(resolved)}"]
        techniques = config.get("techniques")
        if isinstance(techniques, dict):
            found = True
            techniques = {
                name: _checked_entry(entry, (merged.get(name) or {}).get("class_path"), path, f"techniques.{name}")
                for name, entry in techniques.items()
            }
            merged = deep_merge(merged, techniques)
    _check_required_sections(argv, sections, paths)
    if found:
        last = config_positions[-1] + (1 if "=" in argv[config_positions[-1]] else 2)
        merged = {name: value for name, value in merged.items() if value is not None}
        inserts.setdefault(last, []).append(f"--techniques={json.dumps(merged)}")
    for position in sorted(inserts, reverse=True):
        argv = argv[:position] + inserts[position] + argv[position:]
    return argv


def _checked_entry(entry: Any, class_path: str | None, path: str, where: str) -> Any:
    """One ``{class_path, init_args}`` entry of ``path``: its ``init_args`` checked against the
    class's signature, its :data:`ConfigPath` arguments made absolute against ``path``'s folder."""
    if not isinstance(entry, dict) or not isinstance(entry.get("init_args"), dict):
        return entry
    class_path = entry.get("class_path") or class_path
    try:
        cls = import_class(class_path)
    except (AttributeError, ImportError, ValueError, TypeError):
        return entry  # jsonargparse names an unknown class itself
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return entry
    valid = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in entry["init_args"]:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise SystemExit(
                f"{path}: `{where}.init_args.{key}` is not an argument of {class_path}. Fix: {hint}"
                f"{cls.__name__} takes {', '.join(valid)}."
            )
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except (NameError, TypeError):  # an annotation names a type only imported for type checking
        hints = {}
    init_args = {
        key: _absolute(value, Path(path)) if _is_config_path(hints.get(key)) else value
        for key, value in entry["init_args"].items()
    }
    return {**entry, "init_args": init_args}


def _is_config_path(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return RelativeToConfig in annotation.__metadata__
    return any(_is_config_path(arg) for arg in typing.get_args(annotation))


def _absolute(value: Any, config: Path) -> Any:
    if not isinstance(value, str) or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(config.parent.absolute() / value)


def _check_required_sections(argv: list[str], sections: set[str], paths: list[str]) -> None:
    """Config files that leave out the data or the model: say which is missing, before
    LightningCLI's "the following arguments are required: fit.model"."""
    if not paths or any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in argv):
        return
    given = {arg[2:].split(".", 1)[0].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    missing = [section for section in SECTION_EXAMPLES if section not in sections and section not in given]
    if missing:
        files = " ".join(f"--config {SECTION_EXAMPLES[section]}" for section in missing)
        raise SystemExit(
            f"reglab: no {' and no '.join(f'`{section}:`' for section in missing)} section in "
            f"{', '.join(paths)}, so the {' and the '.join(missing)} config "
            f"{'files are' if len(missing) > 1 else 'file is'} missing. Fix: pass "
            f"{'them' if len(missing) > 1 else 'it'} before this file (e.g. {files}), or start from an experiment config "
            "(--config configs/experiment/quickstart.yaml) and add this file after it."
        )


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` key by key (nested mappings too), as config files compose."""
    out = dict(base)
    for key, value in update.items():
        # another class under the same name is a new technique: the old one's init_args don't apply
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _replaces_class(out[key], value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _replaces_class(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return "class_path" in new and new["class_path"] != old.get("class_path")


#: reglab's own commands beside LightningCLI's, by the function that runs each. Named by path so
#: that the core CLI imports no family (fit-tasks belongs to continual learning, soup to averaging).
COMMANDS = {
    "bench": "reglab.bench.cli:main",
    "condense": "reglab.condensation.pipeline:main",
    "docs": "reglab.docs:main",
    "fit-tasks": "reglab.continual.cli:main",
    "generate": "reglab.tasks.language_model:main",
    "ridge-risk": "reglab.analysis.ridge_risk:main",
    "saliency": "reglab.analysis.saliency:main",
    "sample": "reglab.generative.sample:main",
    "smoothers": "reglab.analysis.smoothers:main",
    "soup": "reglab.soups:main",
}


#: exit status of a command stopped by SIGTERM (128 + 15, as a shell reports a process the signal
#: ended): Lightning ends the fit gracefully with a ``SystemExit`` of status 0, which would make a
#: preempted run look finished to a scheduler or a script
SIGTERM_STATUS = 143


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``reglab`` console script and ``python -m reglab``."""
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in COMMANDS:
            module_name, _, function = COMMANDS[argv[0]].partition(":")
            getattr(importlib.import_module(module_name), function)(argv[1:])
            return
        ReglabCLI(args=merge_technique_configs(argv))
    except (NonFiniteLossError, InexactResumeError) as error:
        raise SystemExit(f"reglab: {error}") from None
    except SystemExit as stop:
        # Lightning's SIGTERMException; only a command that imported Lightning can raise it, and
        # light commands (`reglab docs`) should not import Lightning to find out
        lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if lightning_exceptions is None or not isinstance(stop, lightning_exceptions.SIGTERMException):
            raise
        print("reglab: stopped by SIGTERM. Fix: a `reglab fit` run continues from its last checkpoint with "
              "`--ckpt_path last`; a benchmark wrote nothing for the claim it was running: run it again.",
              file=sys.stderr)
        raise SystemExit(SIGTERM_STATUS) from None


if __name__ == "__main__":
    main()
