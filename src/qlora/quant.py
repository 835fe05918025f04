"""Quantization choices → bitsandbytes calls.

The frozen base linears are bitsandbytes modules holding bitsandbytes' own bytes, so a layout
that transformers + bitsandbytes writes or reads is ours too. Embeddings, norms and the output
head never pass through here: they stay in the 16-bit compute dtype.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from qlora.errors import QloraError

# bitsandbytes' CPU backend, when it is imported (lazily, by the functions below), tries to fetch
# a gemm kernel from the model hub through the optional `kernels` package and, without it, tells
# every command to `pip install kernels`: advice to download code at run time for a speed-up the
# CPU path does without. Set here, before any import of bitsandbytes, on that module's logger
# alone (it logs nothing else); its errors still pass.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Its 8-bit matmul logs, on every call with fp32 inputs (the CPU; eval-mode forwards on a GPU),
# that it casts them to fp16: expected of LLM.int8, and hundreds of lines a run (compare's two
# tiny 8-bit steps: 140). That logger logs nothing else (its other notice is a warnings.warn).
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
FOUR_BIT_METHODS = ("nf4", "fp4")  # bitsandbytes Linear4bit; int8 is LLM.int8, none 16-bit
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocks of absmax values a nested scale covers
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
        if self.method not in QUANT_METHODS:
            raise QloraError(f"quant {self.method!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QloraError(f"quant blocksize {self.blocksize} must be a power of two in 32..4096")
        if isinstance(self.compute_dtype, str):
            object.__setattr__(self, "compute_dtype", parse_dtype(self.compute_dtype))

    @property
    def is_4bit(self) -> bool:
        return self.method in FOUR_BIT_METHODS


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
        layer = linear8bit_frozen_class()(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False,
            threshold=quant.int8_threshold, device="meta",
        )
        layer.weight = _int8_params(weight, device)
    layer.bias = bias_param
    return layer


def rows_align(out_features: int, in_features: int, parts: int, quant: QuantConfig) -> bool:
    """Whether a 4-bit weight [out, in] splits into `parts` equal runs of whole rows that are
    also equal runs of whole quantization blocks and of whole compute-dtype values of its packed
    bytes (how FSDP2 cuts them, train/distributed.float_storage_4bit): then each part can be
    read and quantized alone (quantize_linear_rows)."""
    if not quant.is_4bit or out_features % parts:
        return False
    per_part = out_features // parts * in_features  # weight values in a part
    return per_part % quant.blocksize == 0 and per_part % (2 * quant.compute_dtype.itemsize) == 0


def quantize_linear_rows(rows: torch.Tensor, first_row: int, out_features: int,
                         quant: QuantConfig, device: torch.device | str,
                         gather) -> nn.Module:
    """A 4-bit linear [out_features, in] of which only `rows` (from row `first_row`) were read.

    Its packed bytes are bitsandbytes' bytes of the whole weight where those rows sit (NF4/FP4
    codes and absmax are per block of `blocksize` values, and the part is whole blocks:
    rows_align), zero elsewhere; its quant state is the whole weight's, made from every part's
    absmax (`gather`: joins the parts' tensors along dim 0 in part order, a collective) as
    bitsandbytes makes it (double quantization subtracts the mean of ALL the absmax values, then
    quantizes them in blocks of 256). A sharded run keeps only its part of the bytes anyway."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    dtype = quant.compute_dtype
    in_features = rows.shape[1]
    part = rows.to(device, dtype).contiguous()
    packed, state = F.quantize_4bit(part, blocksize=quant.blocksize, compress_statistics=False,
                                    quant_type=quant.method)
    absmax = gather(state.absmax)
    if quant.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(absmax=qabsmax, shape=torch.Size((out_features, in_features)),
                             dtype=dtype, blocksize=quant.blocksize, code=state.code,
                             quant_type=quant.method, offset=offset, state2=state2)
    else:
        state = F.QuantState(absmax=absmax, shape=torch.Size((out_features, in_features)),
                             dtype=dtype, blocksize=quant.blocksize, code=state.code,
                             quant_type=quant.method)
    whole = torch.zeros((out_features * in_features // 2, 1), dtype=torch.uint8,
                        device=packed.device)
    start = first_row * in_features // 2
    whole[start:start + packed.shape[0]] = packed
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=quant.double_quant, quant_type=quant.method,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(whole, requires_grad=False, quant_state=state,
                                     blocksize=quant.blocksize,
                                     compress_statistics=quant.double_quant,
                                     quant_type=quant.method, bnb_quantized=True)
    _keep_cpu_layout(layer)
    return layer


@functools.cache
def linear8bit_frozen_class() -> type:
    """The class is made on first use: bitsandbytes is imported when an 8-bit layer is made."""
    import bitsandbytes as bnb

    class Linear8bitFrozen(bnb.nn.Linear8bitLt):
        """bitsandbytes' LLM.int8 linear, frozen: the same forward; backward keeps nothing.

        bitsandbytes' MatMul8bitLt keeps its input (cast to fp16) as an attribute of the autograd
        context, outside save_for_backward, where gradient checkpointing cannot drop it: every
        8-bit layer then holds its input until backward, 5.6 GiB more at Llama-3-8B seq 2048
        (measured). The base is frozen, so backward needs only the weight the module holds.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                return _FrozenInt8Matmul.apply(x, self)
            return super().forward(x)

    return Linear8bitFrozen


class _FrozenInt8Matmul(torch.autograd.Function):
    """y = LLM.int8(x, W) as bitsandbytes computes it; dy/dx = dy @ dequantized W, as bitsandbytes'
    own backward computes it (codes × row scale / 127 in x's dtype), read from the module."""

    @staticmethod
    def forward(ctx, x, layer):
        import bitsandbytes as bnb

        ctx.layer, ctx.x_dtype = layer, x.dtype
        return bnb.nn.Linear8bitLt.forward(layer, x)  # grad is off in here: bnb records nothing

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        weight = layer.weight.data.to(ctx.x_dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        return grad_out.to(ctx.x_dtype) @ weight, None


def _int8_params(weight: torch.Tensor, device: torch.device | str):
    """LLM.int8 row-wise codes and scales of `weight`, computed on `device`.

    Int8Params quantizes only when moved off the CPU: a weight already on the GPU (a checkpoint
    loaded there, a random benchmark weight) would stay 16-bit inside a Linear8bitLt, twice the
    memory. Quantizing here makes the layout the same wherever the weight comes from.
    """
    import bitsandbytes as bnb

    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(device, torch.float16))
    param = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False)
    param.CB, param.SCB = param.data, scales
    return param


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


class QuantizedStack(nn.Module):
    """`count` frozen 4-bit weights of one shape [out, in] side by side: a mixture of experts'
    per-expert weights of one projection. Each member is quantized on its own by bitsandbytes,
    exactly as a Linear4bit of that weight holds it (the same bytes, absmax and, with double
    quantization, its own nested scales and offset), and stored in one tensor per part so that
    all members dequantize in one batched call (kernels/experts.py) instead of one call each.

    Buffers: `data` uint8 [count, n/2]; `absmax` [count, blocks] (fp32, or uint8 codes with
    double quantization); `nested_absmax` fp32 [count, nested blocks] and `offset` fp32 [count]
    with double quantization; `code` fp32 [16] (NF4 or FP4 values), `nested_code` fp32 [256].
    """

    def __init__(self, count: int, shape: tuple[int, int], quant: QuantConfig, device):
        super().__init__()
        if not quant.is_4bit:
            raise QloraError(f"quant {quant.method!r} cannot hold expert weights; mixture-of-"
                             "experts models take nf4, fp4 or none")
        out_features, in_features = shape
        n = out_features * in_features
        blocks = -(-n // quant.blocksize)
        self.shape, self.count = (out_features, in_features), count
        self.blocksize, self.quant_type = quant.blocksize, quant.method
        self.dtype, self.nested = quant.compute_dtype, quant.double_quant
        self.nested_blocksize = NESTED_BLOCKSIZE
        kw = dict(device=device)
        self.register_buffer("data", torch.zeros(count, -(-n // 2), dtype=torch.uint8, **kw))
        self.register_buffer("absmax", torch.zeros(
            count, blocks, dtype=torch.uint8 if self.nested else torch.float32, **kw))
        nested_blocks = -(-blocks // self.nested_blocksize) if self.nested else 0
        self.register_buffer("nested_absmax", torch.zeros(count, nested_blocks, **kw))
        self.register_buffer("offset", torch.zeros(count if self.nested else 0, **kw))
        self.register_buffer("code", torch.zeros(16, **kw))
        self.register_buffer("nested_code", torch.zeros(256 if self.nested else 0, **kw))

    def set_member(self, index: int, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] into member `index`, on the stack's device, as
        bitsandbytes' Params4bit quantizes it (cast to the compute dtype first, as transformers
        casts a checkpoint before quantizing)."""
        import bitsandbytes as bnb

        if tuple(weight.shape) != self.shape:
            raise QloraError(f"an expert weight of shape {tuple(weight.shape)} where config.json "
                             f"implies {self.shape}; config.json and weights disagree")
        packed, state = bnb.functional.quantize_4bit(
            weight.to(self.data.device, self.dtype).contiguous(), blocksize=self.blocksize,
            compress_statistics=self.nested, quant_type=self.quant_type)
        self.data[index] = packed.view(-1)
        self.absmax[index] = state.absmax
        self.code.copy_(state.code)
        if self.nested:
            self.nested_absmax[index] = state.state2.absmax
            self.offset[index] = state.offset
            self.nested_code.copy_(state.state2.code)

    def member_state(self, index: int):
        """bitsandbytes' QuantState of member `index` (views of the stack's tensors)."""
        from bitsandbytes.functional import QuantState

        nested = None
        if self.nested:
            nested = QuantState(absmax=self.nested_absmax[index], code=self.nested_code,
                                blocksize=self.nested_blocksize, dtype=torch.float32)
        return QuantState(absmax=self.absmax[index], shape=torch.Size(self.shape),
                          code=self.code, blocksize=self.blocksize, quant_type=self.quant_type,
                          dtype=self.dtype, offset=self.offset[index] if self.nested else None,
                          state2=nested)

    def dequantize_member(self, index: int) -> torch.Tensor:
        """Member `index`'s dense weight [out, in] in the compute dtype, by bitsandbytes."""
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(self.data[index], self.member_state(index))
