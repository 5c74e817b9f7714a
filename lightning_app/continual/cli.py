"""``reglab fit-tasks``: fit a task sequence from the same composable configs as ``reglab fit``.

    reglab fit-tasks --config configs/experiment/split_digits.yaml --config configs/technique/ewc.yaml
    reglab fit-tasks --config ... --ckpt_path runs/split_digits/version_0/checkpoints/task_1_end.ckpt

``data`` must be a :class:`datamodules.TaskSequenceDataModule`. The ``trainer`` section applies to
every task's (fresh) trainer; techniques, ``--run_name`` and ``--runs_dir`` work as in ``reglab fit``.
``--ckpt_path`` takes a boundary checkpoint (``task_<t>_end.ckpt``) or one from inside a task
(``task_<t>/*.ckpt``); ``--checkpoint_every_n_steps n`` adds checkpoints inside tasks.
"""

from __future__ import annotations

from lightning import Callback

from datamodules.tasks import TaskSequenceDataModule
from lightning_app.cli import ReglabCLI, merge_technique_configs
from lightning_app.continual.runner import TaskSequenceRunner
from lightning_app.technique import Technique

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


def main(argv: list[str]) -> TaskSequenceRunner:
    argv, options = split_runner_options(argv)
    cli = ReglabCLI(args=merge_technique_configs(argv), run=False)
    if not isinstance(cli.datamodule, TaskSequenceDataModule):
        raise SystemExit(
            f"reglab fit-tasks: data is {type(cli.datamodule).__name__}; wrap it in "
            "datamodules.TaskSequenceDataModule (see configs/experiment/split_digits.yaml)"
        )
    trainer_config = dict(cli._get(cli.config_init, "trainer", default={}))
    techniques = [t for t in (cli._get(cli.config_init, "techniques") or {}).values() if t is not None]
    others = [cb for cb in trainer_config.pop("callbacks", None) or [] if not isinstance(cb, Technique)]
    trainer_config.pop("logger", None)
    every = options.get("checkpoint_every_n_steps")
    runner = TaskSequenceRunner(
        cli.model, cli.datamodule, techniques, trainer_config, callbacks=[cb for cb in others if isinstance(cb, Callback)],
        run_dir=cli._run_dir, checkpoint_every_n_steps=int(every) if every else None,
    )
    runner.run(ckpt_path=options.get("ckpt_path"))
    print((cli._run_dir / "accuracy_matrix.md").read_text())
    print(f"accuracy matrix, scores and heat map: {cli._run_dir}")
    return runner
