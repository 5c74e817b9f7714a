"""Claim protocol of few-shot class-incremental sessions on the tiny CLIP, registered with ``reglab bench effects``.

``clip_sessions`` (issue 13 item 2, for CPE-CLIP): per seed the tiny CLIP of ``pretrain_config`` is pretrained
once (:func:`reglab.tasks.clip.seed_pretraining`: the seed as seed and split seed, ``pretrain_epochs``,
``pretrain_domains``; the same cache entry as the base-to-novel and cross-domain protocols with the same
settings). Each arm starts a :class:`~reglab.tasks.CLIPModule` (``objective: classification``, one head: the
text tower over all ten class prompts) from it and runs a :class:`~reglab.continual.TaskSequenceRunner` over a
:class:`~reglab.datamodules.TaskSequenceDataModule` of the captioned digits of ``domains`` on the seed's split:
a base session of ``data.first_task_classes`` classes with all their training images, then sessions of a few
classes with ``data.shots`` images each (CPE-CLIP's FSCIL protocol in miniature: CIFAR-100's 60 base classes
and 8 sessions of 5 ways x 5 shots). Evaluation is zero-shot over every class seen so far (the runner's
class-incremental rule). Metrics: ``session_<t>_acc``, the accuracy on the test images of every class seen
after session ``t`` (the FSCIL papers' per-session accuracy: the runner's row ``t`` weighted by each task's test
images); ``average_session_acc``, their mean over the sessions (the papers' "Avg"); ``last_session_acc``; and the
runner's scores (``average_accuracy``, ``forgetting``, ...). An arm: ``techniques`` (e.g.
:class:`~reglab.callbacks.continual.CPECLIP`) and ``train: false`` for the zero-shot reference (the data's
hand-written prompts, no step). A claim file names ``module: reglab.continual.clip_claims``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from reglab.bench.protocols import ClaimError, Protocol, register_protocol
from reglab.continual.claims import QUIET, build_techniques, check_technique_specs
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import CaptionedDigitsDataModule, TaskSequenceDataModule
from reglab.datamodules.domains import DOMAINS
from reglab.tasks import CLIPModule
from reglab.tasks.clip import seed_pretraining


def session_accuracies(rows: list[list[float]], test_sizes: list[int]) -> list[float]:
    """Per session ``t``, the accuracy on the test images of every class seen after it: row ``t`` of the accuracy
    matrix (one accuracy per task ``0..t``) weighted by each task's number of test images.

    Example:
        >>> session_accuracies([[0.9], [0.8, 0.5]], [300, 100])
        [0.9, 0.725]
    """
    return [sum(acc * n for acc, n in zip(row, test_sizes)) / sum(test_sizes[: len(row)]) for row in rows]


@register_protocol("clip_sessions")
class CLIPSessionsProtocol(Protocol):
    """Few-shot class-incremental sessions on the seed's pretrained tiny CLIP (module docstring)."""

    defaults = {"pretrain_config": "configs/experiment/tiny_clip_pretrain.yaml", "pretrain_epochs": 4,
                "pretrain_trainer": {}, "pretrain_domains": ["upright", "coloured"], "cache_dir": "runs/pretrained",
                "domains": ["coloured", "rotated", "noisy"],
                "data": {"num_tasks": 4, "first_task_classes": 4, "shots": 5, "batch_size": 8},
                "epochs": 5, "lr": 2e-3, "trainer": {}}

    def __init__(self, claim_name: str, settings: dict[str, Any]) -> None:
        # a claim file names only the data settings it changes
        super().__init__(claim_name, {**settings, "data": {**self.defaults["data"], **settings.get("data", {})}})

    def check_settings(self) -> None:
        s = self.settings
        if not Path(s["pretrain_config"]).is_file():
            raise ClaimError(f"claim {self.claim_name}: pretrain_config {s['pretrain_config']} is not a file. Fix: "
                             "give a `reglab fit` config of a CLIPModule (configs/experiment/tiny_clip_pretrain.yaml).")
        for key in ("domains", "pretrain_domains"):
            if s[key] is not None and (not s[key] or not set(s[key]) <= set(DOMAINS)):
                raise ClaimError(f"claim {self.claim_name}: {key} {s[key]} must name some of {list(DOMAINS)}. "
                                 f"Fix: e.g. {key}: [coloured, rotated, noisy].")
        if not s["data"]["shots"] or not s["data"]["first_task_classes"]:
            raise ClaimError(f"claim {self.claim_name}: clip_sessions needs data.first_task_classes (the base "
                             "session) and data.shots (images per new class). Fix: e.g. data: {first_task_classes: 4, "
                             "shots: 5}.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        check_technique_specs(self.claim_name, arm, spec, {"techniques", "train"})
        if spec.get("train", True) is False and spec.get("techniques"):
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: train: false runs no step, so its techniques would "
                             "do nothing. Fix: drop them, or train the arm.")

    def sessions(self, seed: int) -> TaskSequenceDataModule:
        data = dict(self.settings["data"])
        base = CaptionedDigitsDataModule(domains=self.settings["domains"], batch_size=data.pop("batch_size"),
                                         split_seed=seed, seed=seed)
        return TaskSequenceDataModule(base, **data)

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        pretrained = CLIPModule.load_from_checkpoint(
            seed_pretraining(s["pretrain_config"], seed, s["pretrain_epochs"], s["pretrain_domains"],
                             s["pretrain_trainer"], s["cache_dir"]), map_location="cpu")
        L.seed_everything(seed, verbose=False)
        module = CLIPModule(**{**pretrained.hparams, "num_classes": 10, "objective": "classification",
                               "lr": s["lr"], "text_lr": s["lr"]})
        module.clip.load_state_dict(pretrained.clip.state_dict())
        data = self.sessions(seed)
        trainer = {**QUIET, "max_epochs": s["epochs"], **s["trainer"]}
        if spec.get("train", True) is False:
            trainer["limit_train_batches"] = 0
        # the boundary checkpoints hold the whole CLIP (~94 MB each): a scratch folder, removed once scored
        with tempfile.TemporaryDirectory(dir=workdir) as run_dir:
            runner = TaskSequenceRunner(module, data, build_techniques(spec), trainer, run_dir=run_dir, log=False)
            runner.run()
        sizes = [len(data.task_split("test", task)) for task in range(data.num_tasks)]
        sessions = session_accuracies(runner.progress.rows["class_il"], sizes)
        return {**{f"session_{t}_acc": acc for t, acc in enumerate(sessions)},
                "average_session_acc": sum(sessions) / len(sessions), "last_session_acc": sessions[-1],
                **runner.scores()}

    def describe(self) -> list[str]:
        s, data = self.settings, self.settings["data"]
        ways = (10 - data["first_task_classes"]) // (data["num_tasks"] - 1)
        return [f"Few-shot class-incremental sessions on the tiny CLIP (`reglab.continual.clip_claims`, protocol "
                f"`clip_sessions`): the CLIP of `{s['pretrain_config']}` pretrained per seed for "
                f"{s['pretrain_epochs']} epochs on that seed's split (domains {s['pretrain_domains']}); a base session "
                f"of {data['first_task_classes']} digits with all their training images of {s['domains']}, then "
                f"{data['num_tasks'] - 1} sessions of {ways} ways x {data['shots']} shots, {s['epochs']} epochs each "
                f"(AdamW {s['lr']}, batches of {data['batch_size']}); class order drawn with the seed. "
                "`session_<t>_acc`: zero-shot test accuracy over every class seen after session t; "
                "`average_session_acc` their mean over the sessions, `last_session_acc` the last.", ""]
