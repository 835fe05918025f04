"""Fast paths for the training step, each beside the plain reference it must equal."""

from __future__ import annotations

from torch import nn


def use_fast_path(model: nn.Module) -> int:
    """Route every 4-bit LoRA base through our dequantize+matmul (kernels/dequant.py).

    Returns the number of layers switched. Call it after the model is on its device.
    """
    import bitsandbytes as bnb

    from qlora.adapters import LoraLinear
    from qlora.kernels.dequant import Base4bit

    switched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base_layer, bnb.nn.Linear4bit):
            module.fast_base = Base4bit(module.base_layer)
            switched += 1
    return switched
