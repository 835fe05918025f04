"""Quantization choices → bitsandbytes calls.

The frozen base linears are bitsandbytes modules holding bitsandbytes' own bytes, so a layout
that transformers + bitsandbytes writes or reads is ours too. Embeddings, norms and the output
head never pass through here: they stay in the 16-bit compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qlora.errors import QloraError

METHODS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                  "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class QuantConfig:
    method: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    int8_threshold: float = 6.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise QloraError(f"quant {self.method!r} is not one of {', '.join(METHODS)}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QloraError(f"quant blocksize {self.blocksize} must be a power of two in 32..4096")
        if isinstance(self.compute_dtype, str):
            object.__setattr__(self, "compute_dtype", parse_dtype(self.compute_dtype))

    @property
    def is_4bit(self) -> bool:
        return self.method in ("nf4", "fp4")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise QloraError(
            f"compute dtype {name!r} is not one of bfloat16, float16, float32"
        ) from None


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig, device: torch.device | str
) -> nn.Module:
    """A frozen linear layer for `weight` [out, in], quantized on `device` as `quant` says."""
    out_features, in_features = weight.shape
    dtype = quant.compute_dtype
    bias_param = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
    if quant.method == "none":
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
        layer.bias = bias_param
        return layer
    import bitsandbytes as bnb

    if quant.is_4bit:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=dtype,
            compress_statistics=quant.double_quant, quant_type=quant.method, device="meta",
        )
        # Params4bit quantizes when moved to a device. transformers casts a checkpoint to the
        # compute dtype before quantizing; doing the same gives its bytes exactly.
        param = bnb.nn.Params4bit(
            weight.to(dtype), requires_grad=False, blocksize=quant.blocksize,
            compress_statistics=quant.double_quant, quant_type=quant.method,
        )
        layer.weight = param.to(device)
        _keep_cpu_layout(layer)
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False,
            threshold=quant.int8_threshold, device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False,
                                         has_fp16_weights=False).to(device)
    layer.bias = bias_param
    return layer


def prequantized_linear(
    tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, shape: tuple[int, int],
    quant: QuantConfig, device: torch.device | str,
) -> nn.Module:
    """A Linear4bit from a checkpoint saved 4-bit by transformers + bitsandbytes.

    `tensors` maps the suffixes after `<module>.weight` ('' for the packed bytes, '.absmax',
    '.quant_map', '.nested_absmax', '.nested_quant_map', '.quant_state.bitsandbytes__nf4'...)
    to tensors; bitsandbytes rebuilds the quant state from them, nothing is re-quantized.
    """
    import bitsandbytes as bnb

    out_features, in_features = shape
    stats = {f"weight{k}": v for k, v in tensors.items() if k}
    quant_type = "fp4" if any(k.endswith("bitsandbytes__fp4") for k in stats) else "nf4"
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=quant.compute_dtype,
        quant_type=quant_type, device="meta",
    )
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=tensors[""], quantized_stats=stats, requires_grad=False, device=device,
    )
    _keep_cpu_layout(layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, quant.compute_dtype), requires_grad=False)
    return layer


def _keep_cpu_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking the weight for its CPU bf16 inference kernel.

    On a CPU with AVX512-BF16, a Linear4bit run in eval mode without grad rewrites its weight
    into another layout once, for good; every later forward, training included, then goes
    through a kernel with no autograd formula (wrong gradients through the frozen base) and in
    bf16 whatever the compute dtype. Our layers keep bitsandbytes' standard layout.
    """
    layer.support_avx512bf16_for_cpu = False


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a base linear as a dense tensor [out, in] in the layer's compute dtype."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(
            layer.compute_dtype or torch.float32)
    if isinstance(weight, bnb.nn.Int8Params):
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        return (weight.data.float() * scb.float().unsqueeze(1) / 127.0).to(torch.float16)
    return weight
