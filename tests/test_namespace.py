"""reglab installs under one import name: a user's project with its own ``callbacks.py``,
``datamodules/`` package and ``lightning_app`` module ahead on ``sys.path`` trains with ELR + EMA,
through the Python API and through ``reglab fit``, from a wheel of the project installed into a
fresh folder (not the editable checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the folders setup.py installs (as reglab, reglab.callbacks, reglab.datamodules)
PACKAGE_FOLDERS = ("lightning_app", "callbacks", "datamodules")

USER_MODULES = {
    # names a Lightning project commonly has next to its training script
    "callbacks.py": "USER_CALLBACKS = True\n",
    "datamodules/__init__.py": "USER_DATAMODULES = True\n",
    "lightning_app.py": "raise ImportError('the user project has its own lightning_app module')\n",
}

TRAIN_SCRIPT = """
import callbacks, datamodules                      # the user's own modules come first
import lightning as L
import reglab
from reglab.callbacks import EMA, ELR
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule

assert callbacks.USER_CALLBACKS and datamodules.USER_DATAMODULES
data = DigitsDataModule(flatten=True, batch_size=256)
model = ClassificationModule("mlp", num_classes=data.num_classes, input_shape=data.input_shape)
trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=1, callbacks=[ELR(), EMA(decay=0.9)])
trainer.fit(model, datamodule=data)
print("REGLAB_FROM", reglab.__file__)
print("TRAINED_STEPS", trainer.global_step)
"""

USER_CONFIG = """
trainer: {max_steps: 3, limit_val_batches: 1, enable_progress_bar: false, enable_model_summary: false}
data:
  class_path: reglab.datamodules.DigitsDataModule
  init_args: {flatten: true, batch_size: 256}
model:
  class_path: reglab.tasks.ClassificationModule
  init_args: {backbone: mlp}
techniques:
  elr: {class_path: reglab.callbacks.ELR}
  ema: {class_path: reglab.callbacks.EMA, init_args: {decay: 0.9}}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without dependencies) into its own folder."""
    root = tmp_path_factory.mktemp("install")
    # built from a copy of what the wheel is made of: setuptools builds in the source folder's build/, and a
    # build/ left in the checkout by an earlier build would put files since moved or deleted into the wheel
    source = root / "source"
    for name in PACKAGE_FOLDERS:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"), str(source)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (root / "wheel").glob("reglab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, text=True)
    return root / "site"


@pytest.fixture
def user_project(tmp_path) -> Path:
    for name, text in USER_MODULES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAIN_SCRIPT))
    (tmp_path / "user.yaml").write_text(USER_CONFIG)
    return tmp_path


def run_in(project: Path, site: Path, *command: str) -> str:
    # the user's folder first, then the installed wheel; the editable checkout's finder comes last
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(site)])}
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_installed_names_leave_the_users_callbacks_datamodules_and_lightning_app_alone(installed, user_project):
    out = run_in(user_project, installed, sys.executable, "train.py")
    assert f"REGLAB_FROM {installed}" in out  # the wheel's copy, not the checkout
    assert "TRAINED_STEPS 3" in out


def test_reglab_fit_runs_from_the_user_project(installed, user_project):
    run_in(user_project, installed, sys.executable, "-m", "reglab", "fit", "--config", "user.yaml",
           "--runs_dir=runs", "--run_name=user")
    (run_dir,) = (user_project / "runs" / "user").glob("version_*")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "reglab.callbacks.ELR" in (run_dir / "config.yaml").read_text()


def test_the_wheel_holds_only_the_reglab_namespace(installed):
    (wheel,) = (installed.parent / "wheel").glob("reglab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"reglab"}
    assert {"reglab/callbacks/noisy_labels/elr.py", "reglab/datamodules/digits.py", "reglab/cli.py"} <= set(names)
