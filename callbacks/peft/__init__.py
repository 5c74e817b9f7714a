"""Parameter-efficient fine-tuning: model surgery at setup (see :mod:`callbacks.peft.base`).

Baselines: :class:`FullFineTuning`, :class:`LinearProbe`, :class:`BitFit`, :class:`LoRA` (peft).
Papers: :class:`SVFit` (#60) and :class:`LoLDU` (#69) train the diagonal between frozen factors
of the pretrained weights; :class:`LoRASB` (#55) trains an r x r core between frozen factors of
the first gradients. All three use :class:`lightning_app.nn.core_adapter.CoreAdapter`.
"""

from callbacks.peft.base import FullFineTuning, ParameterEfficientFineTuning
from callbacks.peft.loldu import LoLDU
from callbacks.peft.lora import LoRA
from callbacks.peft.lora_sb import LoRASB
from callbacks.peft.selective import BitFit, LinearProbe
from callbacks.peft.svfit import SVFit

__all__ = ["BitFit", "FullFineTuning", "LinearProbe", "LoLDU", "LoRA", "LoRASB", "ParameterEfficientFineTuning", "SVFit"]
