"""The technique registry: one machine-readable card per board row, beside its module.

A card is ``callbacks/<family>/<id>.card.yaml``: the technique's id (its module file, config file,
log prefix, state key and claim all use it), paper number, class, config, claim ids, baselines,
method card and harness case. Built techniques and planned rows (papers and baselines not built
yet) both have one, so the board (``reglab docs``, :mod:`reglab.docs`) always lists every paper.

This module is core: it reads YAML and imports no family. Classes are imported only when asked
for (:meth:`Card.load`), which is how the families' lazy exports (:func:`lazy_exports`) and the
harness builder (:func:`example_technique`) reach them.

Example:
    >>> from reglab import registry
    >>> registry.card("elr").class_path
    'reglab.callbacks.noisy_labels.ELR'
    >>> registry.exports()["ELR"]
    'reglab.callbacks.noisy_labels.elr'
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reglab.lazy import lazy_names

ID = re.compile(r"[a-z][a-z0-9_]*")
STATUSES = ("built", "planned")
#: technique: a :class:`reglab.technique.Technique` in its own module ``<family>/<id>.py``;
#: module / data: a LightningModule / DataModule named by its experiment config; command, metric,
#: layer: something else importable; reference: a comparison with nothing to build (no class).
KINDS = ("technique", "module", "data", "command", "metric", "layer", "reference")
REQUIRED = ("id", "paper", "family", "sections", "title", "class", "config", "status", "claim", "claims", "baselines")
OPTIONAL = ("kind", "note", "build", "method_card", "harness")
HARNESS_KEYS = ("init_args", "partner", "remember", "checkpoint_args", "factory", "flat_input_args", "data", "backbone_kwargs")
#: the harness DataModules a case may name (``harness.data``; default ``noisy_digits``)
HARNESS_DATA = ("noisy_digits", "domains", "recommendation", "hinted_digits", "embedding", "text_retrieval",
                "dense_text_retrieval", "captions", "diffusion", "discovery", "discovery_ncd", "text_diffusion", "music", "anomaly")
#: the harness's anomaly scenes (~5 training steps per epoch at a 32nd of the harness batch size)
EXAMPLE_ANOMALY = {"num_train": 40, "num_val": 8, "num_test": 16, "shots": 2, "train_bank": 4}
#: the harness's generated recommendation data (~5 training steps per epoch at 256, like the digits)
EXAMPLE_RECOMMENDATION = {"num_items": 100, "num_users": 50, "num_interactions": 1500}
#: the harness's generated query–passage corpus (a step encodes every query's passages with a transformer):
#: 6 people, two hard negatives (KaLM mixes pairs), passages of at most 24 pieces: ~5 steps per epoch at a 64th
#: of the harness batch size
EXAMPLE_TEXT_RETRIEVAL = {"num_entities": 6, "paired_attributes": 3, "num_hard_negatives": 2, "max_query_length": 10,
                          "max_passage_length": 24}
METHOD_CARD_KEYS = ("what", "helps_when", "costs")
SUFFIX = ".card.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CardError(ValueError):
    """A card that does not follow the format (message: the file, the problem and the fix)."""


@dataclass(frozen=True)
class Card:
    """One row of the board (see the module docstring and docs/architecture.md for the fields)."""

    id: str
    paper: int | None
    family: str
    sections: tuple[str, ...]
    title: str
    class_path: str | None
    config: str | None
    status: str
    claim: str | None
    claims: tuple[str, ...]
    baselines: tuple[str, ...]
    kind: str = "technique"
    note: str | None = None
    build: str | None = None
    method_card: dict[str, str] = field(default_factory=dict)
    harness: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def built(self) -> bool:
        return self.status == "built"

    @property
    def module(self) -> str | None:
        """Dotted name of a built technique's own module (``reglab.callbacks.<family>.<id>``)."""
        return f"reglab.callbacks.{self.family}.{self.id}" if self.kind == "technique" and self.built else None

    def load(self) -> Any:
        """Import and return the class (or function, or module) the card names."""
        if self.class_path is None:
            raise CardError(f"{self.path}: card {self.id!r} names no class. Fix: nothing to import for a reference row.")
        module_name, _, attribute = self.class_path.rpartition(".")
        if self.module and self.class_path.startswith("reglab.callbacks."):
            module_name = self.module
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            return getattr(module, attribute)
        return importlib.import_module(self.class_path)  # the card names a module (e.g. a metrics module)


def _fail(path: Path, problem: str, fix: str) -> None:
    raise CardError(f"{path}: {problem}. Fix: {fix}.")


def parse_card(path: Path, data: Any) -> Card:
    """Validate one card's fields (not the references between cards: :func:`validate`)."""
    if not isinstance(data, dict):
        _fail(path, "a card must be a YAML mapping", "write `id: ...`, `paper: ...`, ... (docs/architecture.md)")
    missing = [key for key in REQUIRED if key not in data]
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        _fail(path, f"missing fields {missing}, unknown fields {unknown}", f"cards have {list(REQUIRED)} and optionally {list(OPTIONAL)}")
    card_id, family = data["id"], data["family"]
    if not isinstance(card_id, str) or not ID.fullmatch(card_id):
        _fail(path, f"id {card_id!r} is not a snake-case id", "use lower-case letters, digits and '_', starting with a letter")
    if path.name != card_id + SUFFIX or path.parent.name != family:
        _fail(path, f"card {card_id!r} of family {family!r} is not at <family>/<id>{SUFFIX}", f"move it to {family}/{card_id}{SUFFIX}")
    paper = data["paper"]
    if paper is not None and (not isinstance(paper, int) or not 1 <= paper <= 99):
        _fail(path, f"paper must be the two-digit paper number or null for a baseline, got {paper!r}", "write e.g. `paper: 10`")
    if data["status"] not in STATUSES:
        _fail(path, f"status {data['status']!r} is not one of {STATUSES}", "write `status: built` or `status: planned`")
    kind = data.get("kind", "technique")
    if kind not in KINDS:
        _fail(path, f"kind {kind!r} is not one of {KINDS}", "pick the kind that says how the row is checked")
    class_path = data["class"]
    if kind == "reference" and class_path is not None or kind != "reference" and not isinstance(class_path, str):
        _fail(path, f"kind {kind!r} with class {class_path!r}", "a reference row has `class: null`, every other row a dotted path")
    if isinstance(class_path, str):
        if class_path.startswith("reglab.callbacks.") and class_path.split(".")[2] != family:
            _fail(path, f"class {class_path} is outside the card's family {family!r}", f"use reglab.callbacks.{family}.<Class>")
        if kind == "technique" and not class_path.startswith(f"reglab.callbacks.{family}."):
            _fail(path, f"technique class {class_path} is not under reglab.callbacks.{family}", "name the class by its family path")
    for key in ("sections", "claims", "baselines"):
        values = data[key]
        if not isinstance(values, list) or not all(isinstance(v, str) and ID.fullmatch(v) for v in values):
            _fail(path, f"{key} must be a list of snake-case ids, got {values!r}", f"write `{key}: [a, b]` (or `[]`)")
    if not data["sections"]:
        _fail(path, "sections is empty", "name the board section(s) the row appears in (reglab.docs.SECTIONS)")
    if paper is not None and len(data["sections"]) != 1:
        _fail(path, f"a paper appears in one section, got {data['sections']}", "keep the paper's own section only")
    method_card = data.get("method_card") or {}
    if not isinstance(method_card, dict) or set(method_card) - set(METHOD_CARD_KEYS):
        _fail(path, f"method_card keys {sorted(method_card)}", f"use {list(METHOD_CARD_KEYS)}")
    harness = data.get("harness") or {}
    if not isinstance(harness, dict) or set(harness) - set(HARNESS_KEYS):
        _fail(path, f"harness keys {sorted(harness) if isinstance(harness, dict) else harness!r}", f"use {list(HARNESS_KEYS)}")
    if harness.get("data", HARNESS_DATA[0]) not in HARNESS_DATA:
        _fail(path, f"harness data {harness['data']!r}", f"use one of {list(HARNESS_DATA)}")
    return Card(
        id=card_id, paper=paper, family=family, sections=tuple(data["sections"]), title=data["title"],
        class_path=class_path, config=data["config"], status=data["status"], claim=data["claim"],
        claims=tuple(data["claims"]), baselines=tuple(data["baselines"]), kind=kind, note=data.get("note"),
        build=data.get("build"), method_card=dict(method_card), harness=dict(harness), path=path,
    )


def validate(cards: dict[str, Card]) -> None:
    """Checks between cards: paper numbers unique, baselines and harness partners exist, every built
    technique has a harness case."""
    papers: dict[int, str] = {}
    for card in cards.values():
        if card.paper is not None and papers.setdefault(card.paper, card.id) != card.id:
            _fail(card.path, f"paper {card.paper} also has card {papers[card.paper]!r}", "one card per paper")
        for baseline in card.baselines:
            if baseline not in cards:
                _fail(card.path, f"baseline {baseline!r} has no card", f"add callbacks/<family>/{baseline}{SUFFIX} or fix the id")
        partner = card.harness.get("partner")
        if partner is not None and (partner not in cards or not cards[partner].harness):
            _fail(card.path, f"harness partner {partner!r} is not a card with a harness case", "name a built technique's id")
        if card.built and card.kind == "technique" and not card.harness:
            _fail(card.path, "a built technique has no harness case", "add `harness: {init_args: {...}, partner: <id>}`")


def callbacks_dir() -> Path:
    """Where ``reglab.callbacks`` lives (found without importing it)."""
    spec = importlib.util.find_spec("reglab.callbacks")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def load(directory: Path | None = None) -> dict[str, Card]:
    """Every card under ``directory`` (default: the installed ``reglab.callbacks``), by id; parsed
    once per process. The wheel ships every card, also the planned rows' in family folders that
    are not packages yet (setup.py's ``**/*.card.yaml`` glob of ``reglab.callbacks``)."""
    directory = Path(directory) if directory is not None else callbacks_dir()
    cards: dict[str, Card] = {}
    for path in sorted(directory.glob(f"*/*{SUFFIX}")):
        card = parse_card(path, yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader))
        if card.id in cards:
            _fail(path, f"id {card.id!r} is also used by {cards[card.id].path}", "ids are unique across families")
        cards[card.id] = card
    validate(cards)
    return cards


def card(card_id: str, directory: Path | None = None) -> Card:
    """The card with this id; a clear error naming close ids otherwise."""
    cards = load(directory)
    if card_id not in cards:
        close = [other for other in cards if card_id.replace("_", "") in other.replace("_", "")][:5]
        raise CardError(f"no card with id {card_id!r}. Fix: use a card id (close: {close or sorted(cards)[:5]}).")
    return cards[card_id]


def techniques(directory: Path | None = None) -> list[Card]:
    """The built techniques' cards, sorted by id."""
    return sorted((c for c in load(directory).values() if c.built and c.kind == "technique"), key=lambda c: c.id)


def built_technique_names(directory: Path | None = None) -> list[str]:
    """The ids of the built techniques, sorted (what ``reglab bench overhead`` runs)."""
    return [c.id for c in techniques(directory)]


def exports(family: str | None = None) -> dict[str, str]:
    """Exported name -> module of every built technique (of one family, or all): what the lazy
    ``reglab.callbacks`` and ``reglab.callbacks.<family>`` packages import on first access."""
    return {
        c.class_path.rpartition(".")[2]: c.module
        for c in techniques()
        if family is None or c.family == family
    }


def lazy_exports(package: str, extra: dict[str, str] | None = None) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """:func:`lazy_names` for a callbacks package: ``reglab.callbacks`` exports every built
    technique, ``reglab.callbacks.<family>`` its own (from the cards); ``extra`` maps further
    names to modules relative to ``package``."""
    family = package.split(".")[2] if package.count(".") >= 2 else None
    names = exports(family)
    names.update({name: f"{package}.{module}" for name, module in (extra or {}).items()})
    return lazy_names(package, names)


# -- small runs built from the cards' harness cases (tests/test_harness.py, reglab bench overhead) --

def example_module(seed: int = 0, backbone_kwargs: dict[str, Any] | None = None, data: str | None = None) -> Any:
    """The harness model: an MLP 64-32-10 ``ClassificationModule`` (lr 1e-2), seeded;
    ``backbone_kwargs`` add to the MLP's (a harness case's ``backbone_kwargs``, e.g. ``{norm: batch}``
    for a technique that adapts batch-norm layers). For ``data="recommendation"`` (a case's
    ``harness.data``) the model is a ``TwoTowerModule`` (lr 1e-2) for :func:`example_data`'s items; for
    ``data="hinted_digits"`` a ``MultiInputRetrievalModule`` over the MLP (lr 1e-2); for ``data="embedding"``
    an ``EmbeddingModule`` on the same MLP (16-d embedding, lr 1e-2); for ``data="text_retrieval"`` a one-layer
    ``SparseRetrievalModule`` with frozen word embeddings (lr 1e-4); for ``data="dense_text_retrieval"`` a one-layer
    ``DenseRetrievalModule`` (lr 1e-4); for ``data="captions"`` a ``CLIPModule`` (``objective: classification``, a
    one-layer text tower from MiniLM, 16-d embeddings, lr 1e-3); for ``data="diffusion"`` a class-conditional
    ``DiffusionModule`` with a tiny U-Net (channels 8, 16, no attention, 2 sampling steps, lr 1e-3); for
    ``data="text_diffusion"`` the same U-Net text-conditional with cross-attention (personalization techniques);
    for ``data="discovery"`` (and ``"discovery_ncd"``) a ``DiscoveryModule`` on the same MLP (5 known of 10
    classes, a 32-32-16 projection head, lr 1e-2); for ``data="music"`` a ``VAEModule`` on the piano-roll bars (latent 4, one hidden
    layer of 32, a two-component mixture prior: for fader techniques); for ``data="anomaly"`` an
    ``AnomalySegmentationModule`` on a random frozen U-Net (channels 8, 16, 32; lr 1e-3; its own lookup is the
    parameter-free nearest patch, which a technique replaces)."""
    import lightning as L

    from reglab.tasks import ClassificationModule, EmbeddingModule, TwoTowerModule

    L.seed_everything(seed, verbose=False)
    if data == "anomaly":
        from reglab.tasks import AnomalySegmentationModule

        return AnomalySegmentationModule(input_shape=(1, 32, 32), backbone_kwargs={"channels": [8, 16, 32]}, lr=1e-3)
    if data == "text_retrieval":
        from reglab.tasks import SparseRetrievalModule

        return SparseRetrievalModule(num_layers=1, train_word_embeddings=False, lr=1e-4)
    if data == "dense_text_retrieval":
        from reglab.tasks import DenseRetrievalModule

        return DenseRetrievalModule(num_layers=1, lr=1e-4)
    if data in ("diffusion", "text_diffusion"):
        from reglab.tasks import DiffusionModule

        text = data == "text_diffusion"
        return DiffusionModule(input_shape=(1, 8, 8), num_classes=10, block_out_channels=(8, 16), norm_num_groups=4,
                               attention_head_dim=4, attention=text, conditioning="text" if text else "class",
                               sample_steps=2, lr=1e-3)
    if data == "music":
        from reglab.tasks import VAEModule

        return VAEModule(input_shape=(1, 24, 32), latent_dim=4, hidden_dims=(32,), beta=0.2, prior_components=2)
    if data == "captions":
        from reglab.tasks import CLIPModule

        return CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), objective="classification", lr=1e-3,
                          model_kwargs={"embed_dim": 16, "text_config": {"num_hidden_layers": 1}})
    if data == "recommendation":
        from reglab.datamodules import RecommendationDataModule

        shapes = RecommendationDataModule(**EXAMPLE_RECOMMENDATION)
        return TwoTowerModule(shapes.query_cardinalities, shapes.item_cardinalities, lr=1e-2)
    if data == "hinted_digits":
        from reglab.datamodules import HintedDigitsDataModule
        from reglab.tasks import MultiInputRetrievalModule

        shapes = HintedDigitsDataModule()
        return MultiInputRetrievalModule(shapes.num_items, shapes.vocab_size, shapes.max_text_length, backbone="mlp",
                                         backbone_kwargs={"hidden_sizes": (32,)}, lr=1e-2)
    kwargs = {"hidden_sizes": (32,), **(backbone_kwargs or {})}
    if data in ("discovery", "discovery_ncd"):
        from reglab.tasks import DiscoveryModule

        return DiscoveryModule("mlp", input_shape=(64,), num_classes=10, num_known_classes=5, backbone_kwargs=kwargs,
                               projection_dim=16, projection_hidden_dim=32, lr=1e-2)
    if data == "embedding":
        return EmbeddingModule("mlp", input_shape=(64,), embedding_dim=16, backbone_kwargs=kwargs, lr=1e-2)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs=kwargs, lr=1e-2)


def example_data(batch_size: int = 256, data: str | None = None) -> Any:
    """The harness data: flat digits with 40% symmetric noise (~5 training steps per epoch at 256);
    ``data="domains"`` (a case's ``harness.data``, for techniques that need ``domain``) deals the
    same digits to two training domains, upright and rotated by 30 degrees; ``data="recommendation"``
    is a small generated recommendation set (for two-tower techniques); ``data="hinted_digits"`` the
    digits with text hints (for multi-input retrieval techniques); ``data="embedding"`` the flat digits
    without noise (for metric-learning techniques); ``data="text_retrieval"``
    a tiny generated query–passage corpus in batches of ``batch_size // 64`` queries (for sparse retrieval techniques;
    ``data="dense_text_retrieval"``: the same corpus, for dense retrieval techniques); ``data="captions"`` the
    upright digits with captions and class prompts (for prompt-learning techniques on a CLIP); ``data="diffusion"``
    the clean digits as images (1x8x8, for techniques on a diffusion model; ``"text_diffusion"`` the same);
    ``data="discovery"`` the flat digits as a GCD split (0-4 known, half labelled; unbalanced batches, ~5 steps per epoch at 256, for discovery
    techniques; ``"discovery_ncd"`` the same as an NCD split, the pool of 5-9 only); ``data="music"`` generated piano-roll bars with their
    attributes and arousal (1,600 bars, ~5 steps per epoch at 256, for fader techniques on a VAE); ``data="anomaly"`` small anomaly scenes (2 references per
    query, batches of ``batch_size // 32``, for anomaly-segmentation techniques)."""
    from reglab.datamodules import (DigitsDataModule, LabelNoise, RecommendationDataModule, RotatedDigitsDataModule,
                                    TextRetrievalDataModule)

    if data not in (None, *HARNESS_DATA):
        raise CardError(f"harness data {data!r}. Fix: use one of {list(HARNESS_DATA)}.")
    if data == "anomaly":
        from reglab.datamodules import AnomalyScenesDataModule

        return AnomalyScenesDataModule(batch_size=max(1, batch_size // 32), **EXAMPLE_ANOMALY)
    if data == "domains":
        return RotatedDigitsDataModule(train_angles=(0.0, 30.0), test_angles=(60.0,), flatten=True,
                                       batch_size=batch_size, label_noise=LabelNoise(rate=0.4))
    if data == "recommendation":
        return RecommendationDataModule(batch_size=batch_size, **EXAMPLE_RECOMMENDATION)
    if data == "hinted_digits":
        from reglab.datamodules import HintedDigitsDataModule

        return HintedDigitsDataModule(batch_size=batch_size)
    if data == "embedding":
        return DigitsDataModule(flatten=True, batch_size=batch_size)
    if data in ("discovery", "discovery_ncd"):
        from reglab.datamodules import DiscoveryDataModule

        mode = "ncd" if data == "discovery_ncd" else "gcd"
        return DiscoveryDataModule("digits", flatten=True, mode=mode, balance_batches=False, batch_size=batch_size)
    if data in ("diffusion", "text_diffusion"):
        return DigitsDataModule(batch_size=batch_size)
    if data == "music":
        from reglab.datamodules import MusicDataModule

        return MusicDataModule(num_samples=1600, batch_size=batch_size)
    if data == "captions":
        from reglab.datamodules import CaptionedDigitsDataModule

        return CaptionedDigitsDataModule(domains=["upright"], batch_size=batch_size)
    if data in ("text_retrieval", "dense_text_retrieval"):
        return TextRetrievalDataModule(batch_size=max(1, batch_size // 64), **EXAMPLE_TEXT_RETRIEVAL)
    return DigitsDataModule(flatten=True, batch_size=batch_size, label_noise=LabelNoise(rate=0.4))


def example_trainer(**kwargs: Any) -> Any:
    """A CPU ``Trainer`` without logger, checkpoints, progress bar, summary or sanity check;
    ``kwargs`` override these defaults."""
    import lightning as L

    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@functools.cache
def example_checkpoint(model: Callable[[int], Any] = example_module) -> str:
    """A Lightning checkpoint of an untrained ``model(seed=1)`` (``example_module`` by default),
    written once per process and model (a teacher for the harness: its quality does not matter,
    only that it loads)."""
    import atexit
    import shutil
    import tempfile

    import lightning as L
    import torch

    directory = tempfile.mkdtemp(prefix="reglab-example-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    teacher, path = model(1), f"{directory}/teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def example_technique(technique_id: str, model: Callable[[int], Any] = example_module) -> Any:
    """Build a technique for a small run from its card's ``harness`` case, for the model that
    ``model(seed)`` builds (the harness's ``example_module`` by default; the overhead bench passes
    a realistic one).

    ``init_args`` go to the constructor, except those listed in ``flat_input_args`` when the
    model's inputs are not flat (e.g. CutMix's ``image_shape``, which only says how flat inputs
    unflatten); every name in ``checkpoint_args`` gets :func:`example_checkpoint`'s path for that
    model; ``remember: model`` calls ``technique.remember(model(seed=1))`` (a continual technique
    as after a finished task), ``remember: model_and_batch`` adds one random batch of the model's
    input shape. (``factory`` names a set-up in tests/harness.py that the test harness uses
    instead; built here, such a technique gets the steps above only.)"""
    spec = card(technique_id).harness
    previous = model(1)
    input_shape = tuple(previous.hparams.get("input_shape") or ())  # a two-tower model has no input_shape
    kwargs = dict(spec.get("init_args") or {})
    if len(input_shape) > 1:
        for name in spec.get("flat_input_args") or ():
            kwargs.pop(name, None)
    kwargs.update({name: example_checkpoint(model) for name in spec.get("checkpoint_args") or ()})
    technique = card(technique_id).load()(**kwargs)
    remember = spec.get("remember")
    if remember == "model":
        technique.remember(previous)
    elif remember == "model_and_batch":
        import torch

        generator = torch.Generator().manual_seed(1)
        batch = {"input": torch.rand(16, *input_shape, generator=generator),
                 "target": torch.randint(0, previous.num_classes, (16,), generator=generator)}
        technique.remember(previous, [batch])
    elif remember is not None:
        raise CardError(f"{card(technique_id).path}: harness remember {remember!r}. Fix: use 'model' or 'model_and_batch'.")
    return technique
