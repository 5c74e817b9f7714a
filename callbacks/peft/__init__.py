"""Parameter-efficient fine-tuning: model surgery at setup (see :mod:`reglab.callbacks.peft.base`).

Baselines: :class:`FullFineTuning`, :class:`LinearProbe`, :class:`BitFit`, :class:`LoRA` (peft), and
:class:`PeftAdapter`, any peft method from YAML (DoRA, PiSSA, VeRA, IA3, LoHa, LoKr, OFT, BOFT, ...),
and :class:`AdaLoRA` (peft's, with its per-step rank reallocation).
Papers: :class:`SVFit` (#60) and :class:`LoLDU` (#69) train the diagonal between frozen factors
of the pretrained weights; :class:`LoRASB` (#55) trains an r x r core between frozen factors of
the first gradients. All three use :class:`reglab.nn.core_adapter.CoreAdapter`.
:class:`SoMA` (#46) trains the minor singular components of the later blocks (peft LoRA layers);
:class:`GSLoRA` (#07) forgets chosen classes with group-sparse LoRA.
:class:`RegularizedMaskTuning` (#36) trains binary masks over the pretrained weights with gradient
dropout; :class:`PEGO` (#11) and :class:`BALoRA` (#23) are LoRA with orthogonality / output regularizers.
"""

from reglab.registry import lazy_exports

# the family's techniques from their cards, and the base class a new PEFT method derives from
__getattr__, __dir__, __all__ = lazy_exports(__name__, extra={"ParameterEfficientFineTuning": "base"})
