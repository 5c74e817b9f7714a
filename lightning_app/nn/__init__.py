"""Layers and building blocks shared by tasks, models and families.

The dense-prediction modules are exported lazily (FADC imports torchvision's deformable
convolution only when used): ``reglab.nn.FreqFusion``, ``reglab.nn.FrequencyAdaptiveDilatedConv``.
"""

from reglab.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "FreqFusion": "reglab.nn.freqfusion",
        "FrequencyAdaptiveDilatedConv": "reglab.nn.fadc",
        "FrequencySelection": "reglab.nn.fadc",
    },
)
