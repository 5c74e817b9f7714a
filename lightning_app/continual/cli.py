"""``reglab fit-tasks``: fit a task sequence from the same composable configs as ``reglab fit``.

    reglab fit-tasks --config configs/experiment/split_digits.yaml --config configs/technique/ewc.yaml
    reglab fit-tasks --config ... --ckpt_path runs/split_digits/version_0/checkpoints/task_1_end.ckpt
    reglab fit-tasks --config ... --ckpt_path last

``data`` must be a :class:`reglab.datamodules.TaskSequenceDataModule`. The ``trainer`` section applies to
every task's (fresh) trainer; techniques, ``--run_name`` and ``--runs_dir`` work as in ``reglab fit``.
``--ckpt_path`` takes a boundary checkpoint (``task_<t>_end.ckpt``) or one from inside a task
(``task_<t>/*.ckpt``); ``--ckpt_path last`` continues the newest version of the run (same
``--run_name``) that has a checkpoint, from its newest checkpoint (boundary or inside a task),
in that version's folder. ``--checkpoint_every_n_steps n`` adds checkpoints inside tasks.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning import Callback

from reglab.datamodules.tasks import TaskSequenceDataModule
from reglab.cli import ReglabCLI, merge_technique_configs
from reglab.continual.runner import TaskSequenceRunner, latest_checkpoint
from reglab.nonfinite import NonFiniteLossError
from reglab.run_folder import RUN_DIR_ENV, RunFolder, numbered
from reglab.technique import Technique

RUNNER_OPTIONS = ("--ckpt_path", "--checkpoint_every_n_steps")


def split_runner_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take the runner's own options out of ``argv`` (LightningCLI does not know them)."""
    rest, options, i = [], {}, 0
    while i < len(argv):
        key, _, value = argv[i].partition("=")
        if key in RUNNER_OPTIONS:
            if not value:
                i += 1
                value = argv[i]
            options[key[2:]] = value
        else:
            rest.append(argv[i])
        i += 1
    return rest, options


def resume_last(root: Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` for ``--ckpt_path last``: the newest version of the run whose
    folder holds a checkpoint, and its newest checkpoint."""
    for version in reversed(numbered(root, "version")):
        checkpoint = latest_checkpoint(version)
        if checkpoint is not None:
            return version, checkpoint
    raise SystemExit(
        f"reglab fit-tasks --ckpt_path last: no checkpoint under {root}/version_*/checkpoints; "
        "start a new run without --ckpt_path, or pass a checkpoint's path"
    )


def main(argv: list[str]) -> TaskSequenceRunner:
    argv, options = split_runner_options(argv)
    cli = ReglabCLI(args=merge_technique_configs(argv), run=False)
    if not isinstance(cli.datamodule, TaskSequenceDataModule):
        raise SystemExit(
            f"reglab fit-tasks: data is {type(cli.datamodule).__name__}; wrap it in "
            "reglab.datamodules.TaskSequenceDataModule (see configs/experiment/split_digits.yaml)"
        )
    trainer_config = dict(cli._get(cli.config_init, "trainer", default={}))
    techniques = [t for t in (cli._get(cli.config_init, "techniques") or {}).values() if t is not None]
    others = [cb for cb in trainer_config.pop("callbacks", None) or [] if not isinstance(cb, Technique)]
    trainer_config.pop("logger", None)
    every = options.get("checkpoint_every_n_steps")
    ckpt_path = options.get("ckpt_path")
    if ckpt_path == "last":
        run_dir, ckpt_path = resume_last(cli._run_dir.parent)
        folder = RunFolder.existing(run_dir)
        print(f"resuming {run_dir} from {ckpt_path}")
    else:
        folder = RunFolder.new(cli._run_dir.parent)
    os.environ[RUN_DIR_ENV] = str(folder.path)
    runner = TaskSequenceRunner(
        cli.model, cli.datamodule, techniques, trainer_config, callbacks=[cb for cb in others if isinstance(cb, Callback)],
        run_dir=folder.path, checkpoint_every_n_steps=int(every) if every else None,
    )
    try:
        cli.parser.save(cli.config, folder.path / folder.config_name(), skip_none=False, multifile=False)
        runner.run(ckpt_path=ckpt_path)
    except BaseException as error:
        folder.close(keep=runner.trained_any)
        if isinstance(error, NonFiniteLossError):
            raise SystemExit(f"reglab fit-tasks: {error}") from None
        raise
    folder.close(keep=True)
    print((folder.path / "accuracy_matrix.md").read_text())
    print(f"accuracy matrix, scores and heat map: {folder.path}")
    return runner
