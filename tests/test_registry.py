"""Every card validates against the code, and the registry refuses malformed cards."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

import reglab.callbacks
from reglab import registry
from reglab.technique import Technique

REPO = Path(__file__).resolve().parents[1]
CARDS = registry.load((REPO / "callbacks").resolve())
BUILT = sorted(c.id for c in CARDS.values() if c.built)


def _resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("card_id", BUILT)
def test_built_card_matches_the_code(card_id):
    card = CARDS[card_id]
    obj = card.load()
    if card.kind == "technique":
        assert inspect.isclass(obj) and issubclass(obj, Technique), card.class_path
        assert obj.name == card.id, f"{card.class_path}.name is {obj.name!r}, its card says {card.id!r}"
        source = Path(inspect.getfile(obj))
        assert (source.stem, source.parent.name) == (card.id, card.family), f"{obj} lives in {source}"
        assert _resolve(card.class_path) is obj
        assert card.config == f"configs/technique/{card.id}.yaml", "a technique's config is named by its id"
        config = yaml.safe_load((REPO / card.config).read_text())
        assert any(_resolve(t["class_path"]) is obj for t in config["techniques"].values()), card.config
        assert card.method_card.keys() == {"what", "helps_when", "costs"}, "a built technique has a full method card"
    elif card.kind in ("module", "data"):
        config = yaml.safe_load((REPO / card.config).read_text())
        key = "model" if card.kind == "module" else "data"
        assert issubclass(obj, L.LightningModule if key == "model" else L.LightningDataModule)
        assert _resolve(config[key]["class_path"]) is obj, f"{card.config} does not use {card.class_path}"
    if card.config is not None:
        assert (REPO / card.config).is_file(), f"{card.id}: config {card.config} does not exist"


@pytest.mark.parametrize("card_id", sorted(set(CARDS) - set(BUILT)))
def test_planned_card_names_an_intended_reglab_path(card_id):
    card = CARDS[card_id]
    assert card.class_path is None or card.class_path.startswith("reglab.") or importlib.util.find_spec(
        card.class_path.split(".")[0]
    ), f"{card.id}: intended class {card.class_path} is outside the reglab namespace"
    assert card.config is None or not (REPO / card.config).exists(), f"{card.id} has a config, so it is built: update its card"


def test_every_technique_class_has_a_card():
    """A concrete technique (one no other technique derives from) needs a card; bases do not."""
    ids = {c.class_path for c in CARDS.values() if c.kind == "technique" and c.built}
    found = []
    for info in pkgutil.walk_packages(reglab.callbacks.__path__, "reglab.callbacks."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Technique) and obj.__module__ == info.name:
                found.append(obj)
    leaves = [obj for obj in found if not obj.__subclasses__()]
    missing = [f"{o.__module__}.{o.__name__}" for o in leaves if f"reglab.callbacks.{o.__module__.split('.')[2]}.{o.__name__}" not in ids]
    assert len(leaves) > 20 and not missing, f"techniques without a card: {missing}"


def test_every_technique_config_names_a_built_card():
    classes = {CARDS[c].load() for c in BUILT if CARDS[c].kind == "technique"}
    for path in sorted((REPO / "configs/technique").glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text())["techniques"].values():
            assert _resolve(entry["class_path"]) in classes, f"{path.name}: {entry['class_path']} has no built card"


def test_exports_list_every_built_technique():
    names = {c.class_path.rpartition(".")[2] for c in registry.techniques()}
    assert set(reglab.callbacks.__all__) == names
    for family in {c.family for c in registry.techniques()}:
        package = importlib.import_module(f"reglab.callbacks.{family}")
        assert {c.class_path.rpartition(".")[2] for c in registry.techniques() if c.family == family} <= set(package.__all__)
        assert set(package.__all__) <= set(dir(package))


def test_installed_registry_is_the_checkout_s():
    assert registry.load().keys() == CARDS.keys()


def _card_text(**changes) -> str:
    card = yaml.safe_load((REPO / "callbacks/noisy_labels/elr.card.yaml").read_text())
    card.update(changes)
    card["baselines"] = []
    card.pop("harness")
    card["status"] = changes.get("status", "planned")
    return yaml.safe_dump({k: v for k, v in card.items() if v != "DROP"})


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("noisy_labels/elr.card.yaml", {"id": "ELR"}, "not a snake-case id"),
        ("noisy_labels/other.card.yaml", {}, "is not at <family>/<id>.card.yaml"),
        ("noisy_labels/elr.card.yaml", {"claims": "elr"}, "claims must be a list"),
        ("noisy_labels/elr.card.yaml", {"status": "done"}, "status 'done'"),
        ("noisy_labels/elr.card.yaml", {"paper": "DROP"}, "missing fields \\['paper'\\]"),
        ("noisy_labels/elr.card.yaml", {"colour": "red"}, "unknown fields \\['colour'\\]"),
        ("noisy_labels/elr.card.yaml", {"class": "reglab.callbacks.peft.ELR"}, "outside the card's family"),
        ("noisy_labels/elr.card.yaml", {"status": "built"}, "no harness case"),
        ("noisy_labels/elr.card.yaml", {"baselines": ["nope"]}, None),
    ],
)
def test_malformed_cards_are_refused_with_the_fix(tmp_path, file, changes, message):
    path = tmp_path / file
    path.parent.mkdir(parents=True)
    text = _card_text(**changes)
    if changes.get("baselines"):
        text = text.replace("baselines: []", "baselines: [nope]")
        message = "baseline 'nope' has no card"
    path.write_text(text)
    with pytest.raises(registry.CardError, match=f"{message}.*Fix: "):
        registry.load(tmp_path)


def test_unknown_id_names_close_ones():
    with pytest.raises(registry.CardError, match="lora_sb"):
        registry.card("lorasb")


def test_lazy_exports_import_only_what_is_asked_for():
    """In a fresh interpreter: the namespace imports no technique module, one technique imports
    its own family's module only, and jsonargparse resolves both class paths."""
    code = """
import sys
import reglab.callbacks
loaded = lambda prefix: sorted(m for m in sys.modules if m.startswith(prefix))
assert loaded("reglab.callbacks.") == [], loaded("reglab.callbacks.")
assert "lightning" not in sys.modules and "torch" not in sys.modules
assert "ELR" in reglab.callbacks.__all__ and "ELR" in dir(reglab.callbacks)
from reglab.callbacks import ELR
assert loaded("reglab.callbacks.") == ["reglab.callbacks.noisy_labels", "reglab.callbacks.noisy_labels.elr"], loaded("reglab.callbacks.")
assert "peft" not in sys.modules  # the PEFT family's dependency
from jsonargparse import ArgumentParser
from lightning import Callback
parser = ArgumentParser()
parser.add_argument("--cb", type=Callback)
for path in ("reglab.callbacks.ELR", "reglab.callbacks.noisy_labels.ELR"):
    cb = parser.instantiate_classes(parser.parse_args(["--cb", '{"class_path": "%s", "init_args": {"lam": 2.0}}' % path])).cb
    assert type(cb) is ELR and cb.lam == 2.0, cb
try:
    reglab.callbacks.NoSuchTechnique
except AttributeError as error:
    assert "NoSuchTechnique" in str(error)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
