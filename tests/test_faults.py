"""What a careful user runs and sees when something is wrong (issue 10): one case per row, the
call, the message it must show, and that nothing was lost."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from reglab.callbacks import ELR, PSKD
from reglab.callbacks.fine_tuning import PretrainedWeights
from reglab.callbacks.self_distillation import KnowledgeDistillation
from reglab.cli import ReglabCLI, main, merge_technique_configs
from reglab.datamodules import DigitsDataModule
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# --- item 4: checks at setup ---


def _trainer(max_steps: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                     **kwargs)


def _digits_mlp(**kwargs) -> ClassificationModule:
    shape = {"num_classes": 10, "input_shape": (64,), **kwargs}
    return ClassificationModule("mlp", backbone_kwargs={"hidden_sizes": (8,)}, **shape)


class _Samples(Dataset):
    """``n`` samples of 4 features with labels in ``[0, classes)``, as dict batches with ``index``."""

    def __init__(self, n: int, classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=generator), torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "target": self.y[i], "index": i}


class _PlainData(L.LightningDataModule):
    """A DataModule not built on reglab's base: declares no num_classes / num_train_samples."""

    def __init__(self, n: int = 40, classes: int = 3) -> None:
        super().__init__()
        self.n, self.classes = n, classes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Samples(self.n, self.classes), batch_size=8)


@pytest.mark.parametrize("wrong", [{"num_classes": 5}, {"input_shape": (32,)}])
def test_model_built_for_other_data_fails_at_setup(wrong):
    key, value = next(iter(wrong.items()))
    with pytest.raises(ValueError, match=rf"built with {re.escape(f'{key}={value}')}.*DigitsDataModule has {key}=.*Fix: build the module "
                                         rf"with {key}=datamodule.{key}"):
        _trainer().fit(_digits_mlp(**wrong), datamodule=DigitsDataModule(flatten=True, batch_size=32))


@pytest.mark.parametrize("technique", [ELR, PSKD])
def test_per_sample_table_smaller_than_the_training_set_fails_at_setup(technique):
    data = DigitsDataModule(flatten=True, batch_size=32)
    name = technique.__name__
    with pytest.raises(TechniqueConfigError, match=rf"{name}: num_samples=100 is smaller than the \d+ training samples "
                                                   r"of DigitsDataModule.*Fix: leave num_samples unset"):
        _trainer(callbacks=[technique(num_samples=100)]).fit(_digits_mlp(), datamodule=data)


def test_per_sample_table_smaller_than_another_datamodules_training_set_fails_at_the_first_step():
    # the first batch holds samples 0..7 only: the table's 20 rows are checked against the dataset's 40
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)})
    elr = ELR(num_samples=20, num_classes=3)
    with pytest.raises(TechniqueConfigError, match=r"ELR: its per-sample table has 20 rows.*at least 40 samples.*"
                                                   r"Fix: pass num_samples >= 40"):
        _trainer(max_steps=5, callbacks=[elr]).fit(module, datamodule=_PlainData(n=40))


def test_labels_out_of_range_from_another_datamodule_fail_at_the_first_step():
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)})
    with pytest.raises(TechniqueConfigError, match=r"_PlainData: the first training batch has label 4, but "
                                                   r"ClassificationModule has 3 classes.*Fix: map the labels"):
        _trainer().fit(module, datamodule=_PlainData(classes=5))


class _OwnStep(RegularizedMixin, L.LightningModule):
    """A module that uses the mixin but computes its own loss in training_step (ignoring techniques)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def forward_step(self, batch):
        return StepOutput(logits=self.net(batch["input"]), target=batch["target"], index=batch["index"])

    def training_step(self, batch, batch_idx):
        out = self.forward_step(batch)
        return F.cross_entropy(out.logits, out.target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OwnStepWithContract(_OwnStep):
    def training_step(self, batch, batch_idx):
        loss, out, terms = self.regularized_step(batch)
        return loss


def test_own_training_step_that_skips_the_techniques_fails_at_the_first_step():
    elr = ELR(num_samples=40, num_classes=3)
    with pytest.raises(TechniqueConfigError, match=r"ELR: .*_OwnStep.training_step does not run the step contract, "
                                                   r"so the technique does nothing.*self.regularized_step\(batch\)"):
        _trainer(callbacks=[elr]).fit(_OwnStep(), datamodule=_PlainData())
    elr = ELR(num_samples=40, num_classes=3)  # a training_step that runs the contract is accepted and ELR acts
    _trainer(max_steps=2, callbacks=[elr]).fit(_OwnStepWithContract(), datamodule=_PlainData())
    assert elr.targets.table.abs().sum() > 0


def test_mixin_after_lightningmodule_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Wrong: RegularizedMixin comes after LightningModule.*Fix: list the mixin "
                                        r"first: class Wrong\(RegularizedMixin, LightningModule\)"):
        class Wrong(L.LightningModule, RegularizedMixin):
            def forward_step(self, batch):
                raise AssertionError("never reached")


def test_technique_reused_for_another_models_fit_is_refused():
    data = DigitsDataModule(flatten=True, batch_size=32)
    elr, first = ELR(), _digits_mlp()
    _trainer(callbacks=[elr]).fit(first, datamodule=data)
    table = elr.targets.table.clone()
    with pytest.raises(TechniqueConfigError, match=r"ELR: this ELR object already trained another model.*"
                                                   r"Fix: build a new ELR\(...\) for every fit"):
        _trainer(callbacks=[elr]).fit(_digits_mlp(), datamodule=data)
    assert torch.equal(elr.targets.table, table)  # the first fit's state is untouched
    _trainer(max_steps=2, callbacks=[elr]).fit(first, datamodule=data)  # the same model continues


def _bad_technique_file(tmp_path: Path) -> Path:
    path = tmp_path / "elr_typo.yaml"
    path.write_text("techniques:\n  elr:\n    class_path: reglab.callbacks.ELR\n    init_args: {beta: 0.7, lamm: 3.0}\n")
    return path


def test_misspelled_technique_argument_names_the_file_the_key_and_the_closest_name(tmp_path):
    bad = _bad_technique_file(tmp_path)
    with pytest.raises(SystemExit, match=rf"{bad}: `techniques.elr.init_args.lamm` is not an argument of "
                                         r"reglab.callbacks.ELR. Fix: did you mean `lam`\?"):
        main(["fit", "--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(bad),
              f"--runs_dir={tmp_path}"])
    assert not (tmp_path / "quickstart").exists()


def test_misspelled_callback_argument_is_named_too(tmp_path):
    bad = tmp_path / "callbacks.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "reglab.callbacks.fine_tuning.PretrainedWeights",
                                                              "init_args": {"pretrain_confg": "x.yaml"}}]}}))
    with pytest.raises(SystemExit, match=r"`trainer.callbacks\[0\].init_args.pretrain_confg`.*did you mean `pretrain_config`"):
        merge_technique_configs(["--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(bad)])


def test_technique_file_without_a_data_file_says_which_file_is_missing(tmp_path):
    elr = CONFIGS / "technique/elr.yaml"
    with pytest.raises(SystemExit, match=rf"no `data:` and no `model:` section in {elr}, so the data and the model config "
                                         r"files are missing. Fix: pass them.*configs/data/digits.yaml"):
        main(["fit", "--config", str(elr), f"--runs_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"no `data:` section in .*so the data config file is missing"):
        main(["fit", "--config", str(CONFIGS / "model/cnn.yaml"), "--config", str(elr), f"--runs_dir={tmp_path}"])


PATH_KEYS = ("pretrain_config", "teacher_config", "checkpoint", "teacher_checkpoint", "cache_dir")


def _marked_paths(argv: list[str]) -> list[str]:
    """The values of the path arguments the CLI rewrote (callbacks and techniques)."""
    found = []
    for arg in argv:
        if arg.startswith(("--trainer.callbacks=", "--techniques=")):
            entries = json.loads(arg.split("=", 1)[1])
            entries = entries.values() if isinstance(entries, dict) else entries
            for entry in entries:
                for key in PATH_KEYS:
                    if key in entry.get("init_args", {}):
                        found.append(entry["init_args"][key])
    return found


def test_nested_config_paths_in_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        complete = ["--config", str(CONFIGS / "data/digits.yaml"), "--config", str(CONFIGS / "model/cnn.yaml")]
        named += _marked_paths(merge_technique_configs(["--config", str(path), *complete]))
    in_files = [line for path in CONFIGS.rglob("*.yaml") for line in path.read_text().splitlines()
                if re.match(rf"\s+({'|'.join(PATH_KEYS)}):", line)]
    assert in_files and len(named) == len(in_files), (named, in_files)  # every one was rewritten
    for value in named:
        assert Path(value).is_absolute() and Path(value).is_file(), value


def test_nested_config_paths_and_caches_resolve_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "teacher.yaml").write_text("seed_everything: 0\n")
    (folder / "pretrain.yaml").write_text("seed_everything: 0\n")
    student = folder / "student.yaml"
    student.write_text(yaml.safe_dump({
        "trainer": {"callbacks": [{"class_path": "reglab.callbacks.fine_tuning.PretrainedWeights",
                                   "init_args": {"pretrain_config": "pretrain.yaml", "cache_dir": "cache"}}]},
        "techniques": {"kd": {"class_path": "reglab.callbacks.KnowledgeDistillation",
                              "init_args": {"teacher_config": "teacher.yaml", "cache_dir": "../cache"}}},
    }))
    monkeypatch.chdir(tmp_path.parent)  # any other directory
    built = ReglabCLI(args=merge_technique_configs(["--config", str(CONFIGS / "experiment/quickstart.yaml"),
                                                    "--config", str(student), f"--runs_dir={tmp_path}"]), run=False)
    (start,) = [cb for cb in built.trainer.callbacks if isinstance(cb, PretrainedWeights)]
    (kd,) = [cb for cb in built.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert (start.pretrain_config, start.cache_dir) == (str(folder / "pretrain.yaml"), str(folder / "cache"))
    assert (kd.teacher_config, kd.cache_dir) == (str(folder / "teacher.yaml"), str(tmp_path / "cache"))


def test_commands_run_without_lightningclis_args_warning(tmp_path, monkeypatch):
    args = ["--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["reglab", *args])  # as the console script sees them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ReglabCLI(args=merge_technique_configs(args), run=False)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "args parameter is intended" in m], messages
    assert sys.argv == ["reglab", *args]


# --- item 6: soups ---


@pytest.fixture
def two_ingredients(tmp_path):
    """Two checkpoints of one tiny architecture (no training: refusals happen before averaging)."""
    paths = []
    for name in ("a", "b"):
        module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (4,)})
        torch.save({"state_dict": module.state_dict()}, tmp_path / f"{name}.ckpt")
        paths.append(tmp_path / f"{name}.ckpt")
    return paths


def _soup(*checkpoints: Path | str, out: Path | str, extra: tuple[str, ...] = ()) -> None:
    main(["soup", "--checkpoints", *map(str, checkpoints), "--method", "uniform", "--out", str(out), *extra])


@pytest.mark.parametrize("spelling", ["same path", "other spelling", "symlink"])
def test_soup_out_equal_to_an_ingredient_is_refused_and_the_ingredient_kept(two_ingredients, spelling, tmp_path):
    a, b = two_ingredients
    out = {"same path": a, "other spelling": tmp_path / "sub" / ".." / "a.ckpt", "symlink": tmp_path / "link.ckpt"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(a, out)
    before = a.read_bytes()
    with pytest.raises(SystemExit, match=r"is the ingredient .*a\.ckpt.*destroy.*Fix: choose another --out"):
        _soup(a, b, out=out)
    assert a.read_bytes() == before


def test_soup_report_equal_to_an_ingredient_is_refused(two_ingredients, tmp_path):
    a, b = two_ingredients
    before = b.read_bytes()
    with pytest.raises(SystemExit, match=r"is the ingredient .*b\.ckpt"):
        _soup(a, b, out=tmp_path / "soup.ckpt", extra=("--report", str(b)))
    assert b.read_bytes() == before and not (tmp_path / "soup.ckpt").exists()


@pytest.mark.parametrize("existing", ["soup.ckpt", "soup.md"])
def test_soup_never_overwrites_an_existing_file(two_ingredients, tmp_path, existing):
    (tmp_path / existing).write_text("the user's file")
    with pytest.raises(SystemExit, match=rf"{existing} already exists.*never overwrites.*Fix: choose another --out"):
        _soup(*two_ingredients, out=tmp_path / "soup.ckpt")
    assert (tmp_path / existing).read_text() == "the user's file"


def test_soup_of_a_missing_checkpoint_names_it(two_ingredients, tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint at .*missing\.ckpt.*Fix: check the path"):
        _soup(two_ingredients[0], tmp_path / "missing.ckpt", out=tmp_path / "soup.ckpt")


def test_soup_of_a_file_that_is_not_a_checkpoint_names_it(two_ingredients, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"cannot read the checkpoint .*notes\.ckpt"):
        _soup(two_ingredients[0], tmp_path / "notes.ckpt", out=tmp_path / "soup.ckpt")


def test_soup_of_one_ingredient_is_refused(two_ingredients, tmp_path):
    with pytest.raises(SystemExit, match=r"one checkpoint .* is no soup.*Fix: pass two or more"):
        _soup(two_ingredients[0], out=tmp_path / "soup.ckpt")
    with pytest.raises(SystemExit, match=r"are the same checkpoint.*Fix: pass each ingredient once"):
        _soup(two_ingredients[0], two_ingredients[0], out=tmp_path / "soup.ckpt")
    assert not (tmp_path / "soup.ckpt").exists()

