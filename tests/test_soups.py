"""Model soups: averaging, the greedy recipe, mismatched ingredients, and `reglab soup` end to end."""

from __future__ import annotations

import doctest

import lightning as L
import pytest
import torch
import yaml

import reglab.soups
from reglab.datamodules import DigitsDataModule
from reglab.cli import main
from reglab.soups import (
    SoupIngredientError,
    average_state_dicts,
    greedy_soup,
    soup_table,
    uniform_soup,
)
from reglab.tasks import ClassificationModule


def test_average_is_the_entrywise_mean_in_each_entrys_dtype_and_counters_come_from_the_first():
    batch_norms = [torch.nn.BatchNorm1d(3) for _ in range(3)]
    for steps, bn in enumerate(batch_norms, start=1):
        bn.weight.data.fill_(float(steps))
        bn.num_batches_tracked.fill_(10 * steps)
    states = [{**bn.state_dict(), "half": torch.full((2,), float(i), dtype=torch.bfloat16)} for i, bn in enumerate(batch_norms)]
    averaged = average_state_dicts(states)
    assert torch.equal(averaged["weight"], torch.full((3,), 2.0))
    assert averaged["num_batches_tracked"].item() == 10 and averaged["num_batches_tracked"].dtype == torch.long
    assert averaged["half"].dtype == torch.bfloat16 and torch.equal(averaged["half"], torch.ones(2, dtype=torch.bfloat16))
    assert averaged["weight"] is not states[0]["weight"]


@pytest.mark.parametrize(
    "other, message",
    [
        ({"a": torch.zeros(2), "b": torch.zeros(3)}, r"`b` is in ingredient 1 but not in ingredient 0"),
        ({"a": torch.zeros(3)}, r"`a` has shape \(2,\) in ingredient 0 but \(3,\) in ingredient 1"),
        ({"a": torch.zeros(2, dtype=torch.float16)}, r"`a` has dtype torch.float32 in ingredient 0 but torch.float16"),
        ({}, r"`a` is in ingredient 0 but not in ingredient 1"),
    ],
)
def test_mismatched_ingredients_name_the_first_differing_entry(other, message):
    with pytest.raises(SoupIngredientError, match=message):
        average_state_dicts([{"a": torch.zeros(2)}, other])


def test_greedy_soup_starts_with_the_best_keeps_ties_and_skips_what_lowers_the_metric():
    # held-out metric: minus the distance of the (scalar) weight to 1; values exact in binary
    ingredients = {"far": 3.0, "best": 1.25, "twin": 1.25, "worse": 2.0}
    states = [{"w": torch.tensor(value)} for value in ingredients.values()]
    soup = greedy_soup(states, evaluate=lambda sd: -abs(float(sd["w"]) - 1.0), names=list(ingredients))
    assert [i.name for i in soup.ingredients] == ["best", "twin", "worse", "far"]  # stable among equals
    assert [i.kept for i in soup.ingredients] == [True, True, False, False]  # the twin ties: kept
    assert soup.kept == ["best", "twin"] and float(soup.state_dict["w"]) == 1.25
    assert soup.metric == -0.25
    assert soup.ingredients[2].soup_metric_with_it == -0.5  # (1.25 + 1.25 + 2) / 3 = 1.5
    assert soup.ingredients[2].soup_metric_after == -0.25
    table = soup_table(soup, "val/score")
    assert "| best | -0.2500 | yes | -0.2500 | -0.2500 |" in table and "| worse | -1.0000 | no | -0.5000 |" in table


def test_greedy_soup_minimises_when_asked_and_uniform_averages_everything():
    states = [{"w": torch.tensor(v)} for v in (0.0, 4.0, 1.0)]
    soup = greedy_soup(states, evaluate=lambda sd: float(sd["w"]), higher_is_better=False)
    assert soup.kept == ["ingredient 0"] and float(soup.state_dict["w"]) == 0.0
    uniform = uniform_soup(states, evaluate=lambda sd: float(sd["w"]))
    assert float(uniform.state_dict["w"]) == pytest.approx(5 / 3) and uniform.metric == pytest.approx(5 / 3)
    assert [i.metric for i in uniform.ingredients] == [0.0, 4.0, 1.0]
    assert uniform_soup(states).ingredients[0].metric is None


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Three checkpoints of one tiny MLP fine-tuned from the same weights (a short fit, then
    perturbations of it), a fourth of another width, and a data config."""
    root = tmp_path_factory.mktemp("soup")
    L.seed_everything(0, verbose=False)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)}, lr=1e-2)
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=DigitsDataModule(flatten=True, batch_size=64))
    trainer.save_checkpoint(root / "a.ckpt")
    base = torch.load(root / "a.ckpt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, scale in (("b", 0.01), ("c", 0.5)):
        checkpoint = dict(base)
        checkpoint["state_dict"] = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base["state_dict"].items()}
        torch.save(checkpoint, root / f"{name}.ckpt")
    other = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (8,)})
    torch.save({**base, "state_dict": other.state_dict()}, root / "narrow.ckpt")
    config = root / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "reglab.datamodules.DigitsDataModule",
                                               "init_args": {"flatten": True, "batch_size": 256}}}))
    return root


def test_reglab_soup_greedy_writes_a_loadable_checkpoint_and_a_table(ingredients, capsys):
    out = ingredients / "soups" / "greedy.ckpt"
    main(["soup", "--checkpoints", *(str(ingredients / f"{n}.ckpt") for n in "abc"), "--method", "greedy",
          "--config", str(ingredients / "data.yaml"), "--out", str(out)])
    soup = ClassificationModule.load_from_checkpoint(out)
    assert soup(torch.zeros(2, 64)).shape == (2, 10)
    checkpoint = torch.load(out, weights_only=True)
    assert "optimizer_states" not in checkpoint and checkpoint["soup"]["method"] == "greedy"
    rows = checkpoint["soup"]["ingredients"]
    assert rows[0]["kept"] and rows[0]["metric"] == max(r["metric"] for r in rows)
    assert checkpoint["soup"]["value"] >= rows[0]["metric"]
    assert not next(r for r in rows if r["name"].endswith("c.ckpt"))["kept"]  # too far from the others
    report = out.with_suffix(".md").read_text()
    assert "reglab soup --checkpoints" in report and "| val/acc alone | kept |" in report
    assert "kept" in capsys.readouterr().out


def test_reglab_soup_uniform_needs_no_data_and_refuses_mismatched_ingredients(ingredients):
    out = ingredients / "uniform.ckpt"
    main(["soup", "--checkpoints", str(ingredients / "a.ckpt"), str(ingredients / "b.ckpt"), "--method", "uniform",
          "--out", str(out)])
    states = [torch.load(ingredients / f"{n}.ckpt", weights_only=True)["state_dict"] for n in "ab"]
    soup = torch.load(out, weights_only=True)["state_dict"]
    torch.testing.assert_close(soup["head.weight"], (states[0]["head.weight"] + states[1]["head.weight"]) / 2)
    with pytest.raises(SystemExit, match=r"narrow.ckpt.*`backbone.layers.1.weight` has shape \(16, 64\).*\(8, 64\)"):
        main(["soup", "--checkpoints", str(ingredients / "a.ckpt"), str(ingredients / "narrow.ckpt"),
              "--method", "uniform", "--out", str(ingredients / "mismatched.ckpt")])
    with pytest.raises(SystemExit):
        main(["soup", "--checkpoints", str(ingredients / "a.ckpt"), str(ingredients / "b.ckpt"), "--method", "greedy",
              "--out", str(ingredients / "no_data.ckpt")])


def test_docstring_examples_run():
    assert doctest.testmod(reglab.soups, verbose=False).failed == 0
