"""What a careful user runs and sees when something is wrong (issue 10): one case per row, the
call, the message it must show, and that nothing was lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from reglab.cli import main
from reglab.tasks import ClassificationModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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

