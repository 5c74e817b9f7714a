"""Parameter-efficient fine-tuning: model surgery at setup (see :mod:`callbacks.peft.base`).

Baselines: :class:`FullFineTuning`, :class:`LinearProbe`, :class:`BitFit`, :class:`LoRA` (peft).
Papers: :class:`SVFit` (#60) and :class:`LoLDU` (#69) train the diagonal between frozen factors
of the pretrained weights; :class:`LoRASB` (#55) trains an r x r core between frozen factors of
the first gradients. All three use :class:`lightning_app.nn.core_adapter.CoreAdapter`.
:class:`SoMA` (#46) trains the minor singular components of the later blocks (peft LoRA layers);
:class:`GSLoRA` (#07) forgets chosen classes with group-sparse LoRA.
:class:`RegularizedMaskTuning` (#36) trains binary masks over the pretrained weights with gradient
dropout; :class:`PEGO` (#11) and :class:`BALoRA` (#23) are LoRA with orthogonality / output regularizers.
"""

from callbacks.peft.ba_lora import BALoRA
from callbacks.peft.base import FullFineTuning, ParameterEfficientFineTuning
from callbacks.peft.gs_lora import GSLoRA
from callbacks.peft.loldu import LoLDU
from callbacks.peft.lora import LoRA
from callbacks.peft.lora_sb import LoRASB
from callbacks.peft.mask_tuning import RegularizedMaskTuning
from callbacks.peft.pego import PEGO
from callbacks.peft.selective import BitFit, LinearProbe
from callbacks.peft.soma import SoMA
from callbacks.peft.svfit import SVFit

__all__ = ["BALoRA", "BitFit", "FullFineTuning", "GSLoRA", "LinearProbe", "LoLDU", "LoRA", "LoRASB", "PEGO", "ParameterEfficientFineTuning", "RegularizedMaskTuning", "SVFit", "SoMA"]
