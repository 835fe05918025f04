"""Fast paths for the training step, each beside the plain reference it must equal."""

from __future__ import annotations

from torch import nn


def use_fast_path(model: nn.Module, group: bool = True) -> int:
    """Route every 4-bit LoRA base through our dequantize+matmul (kernels/dequant.py) and the LoRA
    products through kernels/lora.py.

    group=True (the default) also lets each module that names `group_members` (decoder.Attention:
    q, k, v; decoder.MLP: gate, up) run those projections as one group (adapters.grouped_forward:
    one base GEMM over their stacked weights, x's gradient formed once), where every member can
    (adapters.groupable); the others run one by one. Costs a transient dense weight of the whole
    group instead of one member (Llama-3-8B gate+up: 224 MiB in bf16, 112 MiB more; the measured
    peak did not move). Measured on an H200 (docs/BENCHMARKS.md): Qwen2.5-1.5B 2048 +4.5%,
    Llama-3-8B 2048 +0.1%. group=False turns grouping off again.

    Returns the number of layers switched. Call it after the model is on its device.
    """
    import bitsandbytes as bnb

    from qlora.adapters import LoraLinear, groupable
    from qlora.kernels.dequant import Base4bit

    switched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base_layer, bnb.nn.Linear4bit):
            module.fast_base = Base4bit(module.base_layer)
            switched += 1
    for module in model.modules():
        names = getattr(module, "group_members", None)
        if names:
            # a flag, not references: the members stay where the module tree has them
            module.fast_group = group and groupable([getattr(module, n) for n in names])
    return switched


def grouped_modules(model: nn.Module) -> int:
    """How many modules run their projections grouped (use_fast_path(model, group=True))."""
    return sum(bool(getattr(m, "fast_group", False)) for m in model.modules())
