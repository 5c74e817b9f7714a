"""ClassDiffusion (Huang et al., "ClassDiffusion: More Aligned Personalization Tuning with Explicit Class
Guidance", 2024): personalization tuning of a text-conditional diffusion model with a semantic preservation
loss, on :class:`reglab.tasks.DiffusionModule` (``conditioning="text"``).

Personalization binds a new word to a concept shown by a few images (Custom Diffusion, which the official
code ``Rbrq03/ClassDiffusion`` builds on): the prompt of a concept of class ``c`` is the module's prompt
with a modifier word before the class name ("a handwritten digit x three" for ``prompt_template`` "a
handwritten digit {}"), the modifier's input embedding in the frozen text encoder is a new learned vector
(initialised from the placeholder word's own embedding, as Custom Diffusion initialises ``<new1>`` from a rare
token), and what trains is that vector and the U-Net's cross-attention key and value projections
(``attn2.to_k`` / ``attn2.to_v``; everything else frozen), on the diffusion loss of the concept's images
under the personalized prompt. The tuning data's ``target`` is the concept's class: each training sample is
conditioned on the personalized prompt of its class.

The semantic preservation loss (SPL, the paper's eq. 4; the official ``utils/semantic_preservation_loss.py``)
adds ``spl_weight * (1 - cos(E(personalized phrase), E(class phrase)))``, ``E`` the text encoder's sentence
embedding, so the personalized phrase stays in its class's semantic neighbourhood and prompts composing it
with other words keep the class. The official code takes CLIP's pooled (end-of-text) output and the class
word alone ("dog"); MiniLM's sentence embedding is the masked mean of its token states (how
all-MiniLM-L6-v2 was trained), and the class phrase here is the class's own prompt ("a handwritten digit
three"), so that the two phrases differ by the modifier only. Official defaults: ``spl_weight`` 1 (kept),
lr 1e-5 x batch size for 500 steps on Stable Diffusion (scaled down: the claim's tuning settings).
Plain personalization tuning, the baseline, is :class:`~reglab.callbacks.generative.PlainPersonalization`: this
class at ``spl_weight=0`` under its own name.

Mechanism in the step contract: ``transform_batch`` encodes the personalized prompts of every class with the
current modifier (one small batched MiniLM forward, differentiable in the modifier), appends them to the
module's prompt table after the null prompt (rows ``num_classes + 1 + c``; :meth:`personalized`) and points
the batch's targets at them; ``loss_terms`` returns the SPL of the samples' classes. After fitting the table
holds the tuned prompts (no gradient), so ``module.sample(labels=technique.personalized(c))`` samples them.

Method card (what it does, when it helps, what it costs): ``class_diffusion.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.generative import ClassDiffusion
    >>> spl = ClassDiffusion(spl_weight=1.0)
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.datamodules.captions import CLASS_WORDS
from reglab.step import StepOutput
from reglab.technique import Technique

#: the module attribute holding the learned modifier embedding (saved with the model's weights)
MODIFIER = "class_diffusion_modifier"
#: the U-Net parameters Custom Diffusion (and ClassDiffusion) tunes: the cross-attention keys and values
TUNED = ("attn2.to_k.", "attn2.to_v.")


def sentence_embedding(states: Tensor, mask: Tensor) -> Tensor:
    """``(P, D)`` masked mean of ``(P, L, D)`` token ``states`` over the ``(P, L)`` ``mask`` (MiniLM's pooling)."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def semantic_preservation_loss(personalized: Tensor, personalized_mask: Tensor, phrase: Tensor,
                               phrase_mask: Tensor) -> Tensor:
    """``(P,)`` ``1 - cos`` between the sentence embeddings of the personalized phrases and their class phrases
    (ClassDiffusion's SPL, per phrase pair)."""
    return 1 - torch.nn.functional.cosine_similarity(sentence_embedding(personalized.float(), personalized_mask),
                                                     sentence_embedding(phrase.float(), phrase_mask), dim=-1)


def padded(states: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``states`` and ``mask`` zero-padded (masked out) to ``length`` tokens."""
    extra = length - states.shape[1]
    return (torch.nn.functional.pad(states, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra)))


class ClassDiffusion(Technique):
    """Personalization tuning with ClassDiffusion's semantic preservation loss (module docstring).

    Args:
        spl_weight: weight of the semantic preservation loss (the official default 1; 0: plain personalization).
        modifier: the placeholder word of the concept in the prompts; one word piece of the text encoder's
            tokenizer (its embedding is replaced by the learned one).
    """

    name = "class_diffusion"

    def __init__(self, spl_weight: float = 1.0, modifier: str = "x") -> None:
        if spl_weight < 0:
            raise self.fail(f"spl_weight={spl_weight} is negative", "use 1.0 (the paper's), or 0 for plain tuning")
        self.spl_weight, self.modifier = float(spl_weight), modifier
        self._tokens: dict[str, Tensor] = {}
        self._base: tuple[Tensor, Tensor] | None = None
        self._spl: Tensor | None = None

    # setup ------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if getattr(pl_module, "conditioning", None) != "text" or not hasattr(pl_module, "prompt_states"):
            raise self.fail(f"{type(pl_module).__name__} is not a text-conditional diffusion model",
                            "use it on reglab.tasks.DiffusionModule with conditioning: text")
        tuned = [p for n, p in pl_module.unet.named_parameters() if any(key in n for key in TUNED)]
        if not tuned:
            raise self.fail("the U-Net has no cross-attention key/value projections to tune",
                            "build the DiffusionModule with attention: true")
        tokenizer, encoder = _text_encoder(pl_module.hparams.text_model)
        pieces = tokenizer.tokenize(self.modifier)
        if len(pieces) != 1:
            raise self.fail(f"the tokenizer splits the modifier {self.modifier!r} into {pieces}",
                            "use a word that is one word piece, e.g. 'x'")
        names = pl_module.hparams.class_names
        names = list(names) if names is not None else list(CLASS_WORDS)
        self._num_classes = len(names)
        prompts = [pl_module.hparams.prompt_template.format(f"{self.modifier} {name}") for name in names]
        self._tokens = dict(tokenizer(prompts, padding=True, return_tensors="pt"))
        self._modifier_id = tokenizer.convert_tokens_to_ids(pieces[0])
        # the class prompts and the null prompt: the first rows, also of a table a technique already extended
        rows = self._num_classes + 1
        self._base = (pl_module.prompt_states[:rows].detach().clone(), pl_module.prompt_mask[:rows].detach().clone())
        if not hasattr(pl_module, MODIFIER):
            pl_module.requires_grad_(False)
            for parameter in tuned:
                parameter.requires_grad_(True)
            initial = encoder.get_input_embeddings().weight[self._modifier_id].detach().clone()
            pl_module.register_parameter(MODIFIER, nn.Parameter(initial.to(pl_module.device)))
        with torch.no_grad():
            self.refresh(pl_module)

    # the prompts --------------------------------------------------------------------------------

    def personalized(self, classes: Tensor | int) -> Tensor:
        """The condition indices of the personalized prompts of ``classes`` (rows after the null prompt; after
        :meth:`setup`)."""
        return torch.as_tensor(classes) + self._num_classes + 1

    def encode(self, module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """``(C, L, D)`` token states and ``(C, L)`` mask of every class's personalized prompt, with the current
        modifier embedding (differentiable in it)."""
        _, encoder = _text_encoder(module.hparams.text_model)
        device = module.device
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        tokens = {key: value.to(device) for key, value in self._tokens.items()}
        embeddings = encoder.get_input_embeddings()(tokens["input_ids"])
        modifier = getattr(module, MODIFIER).to(embeddings.dtype).expand_as(embeddings)
        embeddings = torch.where((tokens["input_ids"] == self._modifier_id).unsqueeze(-1), modifier, embeddings)
        states = encoder(inputs_embeds=embeddings, attention_mask=tokens["attention_mask"]).last_hidden_state
        return states.float(), tokens["attention_mask"]

    def refresh(self, module: L.LightningModule) -> Tensor:
        """Rebuild the module's prompt table (class prompts, null prompt, personalized prompts) from the current
        modifier; returns the per-class SPL."""
        states, mask = self.encode(module)
        base_states, base_mask = (tensor.to(module.device) for tensor in self._base)
        length = max(base_states.shape[1], states.shape[1])
        base_states, base_mask = padded(base_states, base_mask, length)
        states, mask = padded(states, mask, length)
        module.prompt_states = torch.cat([base_states, states])
        module.prompt_mask = torch.cat([base_mask, mask])
        num_classes = len(states)
        return semantic_preservation_loss(states, mask, base_states[:num_classes], base_mask[:num_classes])

    # the step contract ----------------------------------------------------------------------------

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        self._spl = self.refresh(module)
        return {**batch, "target": self.personalized(batch["target"]).to(batch["target"].device)}

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        condition = out.extras["condition"]
        first = self.personalized(0)
        kept = condition >= first  # rows the module's condition dropout left personalized
        if not bool(kept.any()):
            return {}
        return {"spl": self.spl_weight * self._spl[condition[kept] - first].mean()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():  # the table of the tuned modifier, without the last step's graph, for sampling
            self.refresh(pl_module)


@functools.cache  # one load per process; frozen, in eval mode (no dropout on the prompts)
def _text_encoder(text_model: str) -> tuple[Any, nn.Module]:
    from transformers import AutoModel, AutoTokenizer

    from reglab.models.external import transformers_path

    path = transformers_path(text_model)
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().requires_grad_(False)

