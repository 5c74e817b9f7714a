"""Parameter-efficient fine-tuning: model surgery at setup (see :mod:`reglab.callbacks.peft.base`).

Baselines: :class:`FullFineTuning`, :class:`LinearProbe`, :class:`BitFit`, :class:`LoRA` (peft).
Papers: :class:`SVFit` (#60) and :class:`LoLDU` (#69) train the diagonal between frozen factors
of the pretrained weights; :class:`LoRASB` (#55) trains an r x r core between frozen factors of
the first gradients. All three use :class:`reglab.nn.core_adapter.CoreAdapter`.
:class:`SoMA` (#46) trains the minor singular components of the later blocks (peft LoRA layers);
:class:`GSLoRA` (#07) forgets chosen classes with group-sparse LoRA.
:class:`RegularizedMaskTuning` (#36) trains binary masks over the pretrained weights with gradient
dropout; :class:`PEGO` (#11) and :class:`BALoRA` (#23) are LoRA with orthogonality / output regularizers.
"""

from reglab.callbacks.peft.ba_lora import BALoRA
from reglab.callbacks.peft.base import ParameterEfficientFineTuning
from reglab.callbacks.peft.bitfit import BitFit
from reglab.callbacks.peft.full_fine_tuning import FullFineTuning
from reglab.callbacks.peft.linear_probe import LinearProbe
from reglab.callbacks.peft.gs_lora import GSLoRA
from reglab.callbacks.peft.loldu import LoLDU
from reglab.callbacks.peft.lora import LoRA
from reglab.callbacks.peft.lora_sb import LoRASB
from reglab.callbacks.peft.mask_tuning import RegularizedMaskTuning
from reglab.callbacks.peft.pego import PEGO
from reglab.callbacks.peft.soma import SoMA
from reglab.callbacks.peft.svfit import SVFit

__all__ = ["BALoRA", "BitFit", "FullFineTuning", "GSLoRA", "LinearProbe", "LoLDU", "LoRA", "LoRASB", "PEGO", "ParameterEfficientFineTuning", "RegularizedMaskTuning", "SVFit", "SoMA"]
