"""bitsandbytes' 4-bit layout, dequantized with plain torch ops and by a Triton kernel, and a
4-bit matmul over it.

bitsandbytes stores a [out, in] weight as bytes holding two 4-bit codes each (high nibble
first), one absmax per block of `blocksize` consecutive weights, and with double quantization
those absmax values themselves as uint8 codes of a 256-entry table, one fp32 scale per 256
of them, plus an offset. `dequantize_4bit` reproduces `bitsandbytes.functional.dequantize_4bit`
exactly. Written with torch ops (no custom kernel), it is the readable reference that
`dequantize_4bit_triton` equals bit for bit (tests/test_dequant_kernel.py, through Triton's
interpreter; benchmarks/gpu_check.py on CUDA). `dequantize` picks the kernel where Triton runs.

`Matmul4bit` is the autograd function of x @ Wᵀ (+ an addend) for a frozen 4-bit W, or for several
4-bit weights that read one input (q, k, v; gate, up), each dequantized into its rows of one
[Σ out, in] buffer so that one GEMM serves them all: it keeps only the 4-bit bytes for backward and
dequantizes again there, so no 16-bit copy of any weight outlives its use. kernels/lora.py puts the
LoRA adapters in front of it.

One exception, `rerun_keeps_weights`: a checkpointed layer is run again in backward just before
its backward runs, and that rerun dequantizes the same weights the backward then dequantizes once
more. Inside the context the dense weights the rerun makes are kept, and the backward that needs
each one takes it (`take_kept_weight`) instead of dequantizing again: one dequantize less per
weight, for the dense weights of one layer held from its rerun to its backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qlora.errors import QloraError
from qlora.kernels.dropout import use_triton


@dataclass(frozen=True)
class Packed4bit:
    """The tensors of one bitsandbytes 4-bit weight, unpacked from its QuantState."""

    data: torch.Tensor  # uint8 [n/2] two codes per byte, high nibble first
    absmax: torch.Tensor  # fp32 [n/blocksize], or uint8 codes when nested
    code: torch.Tensor  # fp32 [16] the NF4 or FP4 values
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype  # the dtype the weight is dequantized to
    nested_absmax: torch.Tensor | None = None  # fp32 [n/blocksize/256]
    nested_code: torch.Tensor | None = None  # fp32 [256]
    nested_blocksize: int = 256
    offset: float = 0.0


def packed_from_bnb(weight) -> Packed4bit:
    """A Packed4bit view of a `bitsandbytes.nn.Params4bit` (no copy)."""
    state = weight.quant_state
    nested = state.state2 if state.nested else None
    return Packed4bit(
        data=weight.data.view(-1), absmax=state.absmax, code=state.code,
        blocksize=state.blocksize, shape=tuple(state.shape), dtype=state.dtype,
        nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code,
        nested_blocksize=256 if nested is None else nested.blocksize,
        offset=float(state.offset) if nested is not None else 0.0,
    )


def block_scales(p: Packed4bit) -> torch.Tensor:
    """fp32 absmax of every block, undoing double quantization when present."""
    if p.nested_absmax is None:
        return p.absmax.float()
    group = torch.arange(p.absmax.numel(), device=p.absmax.device) // p.nested_blocksize
    return p.nested_code[p.absmax.long()] * p.nested_absmax[group] + p.offset


def dequantize_4bit(p: Packed4bit, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight [out, in] of a 4-bit tensor, in `dtype` (default: the stored dtype, or
    out's); written into `out` (contiguous, [out, in]) when given, and returned."""
    if out is not None:
        dtype = _checked_out(p, dtype, out)
        return out.copy_(dequantize_4bit(p, dtype))
    codes = torch.stack((p.data >> 4, p.data & 15), dim=-1).flatten().long()
    values = p.code[codes]
    n = values.numel()
    scales = block_scales(p)
    full = n - n % p.blocksize
    body = (values[:full].view(-1, p.blocksize) * scales[: full // p.blocksize, None]).flatten()
    if full < n:  # a partial last block
        body = torch.cat([body, values[full:] * scales[-1]])
    out_features, in_features = p.shape
    return body[: out_features * in_features].view(out_features, in_features).to(dtype or p.dtype)


# Packed bytes per kernel program and its warps (4096 weights, two tile rows per thread).
# gpu_check.py's dequant check times other choices beside these: on an H200 at 14336×4096,
# 2048 bytes × 8 warps 0.069 ms, 4096 × 8 0.072, 8192 × 8 0.088, 16384 × 8 0.119.
TILE_BYTES = 2048
WARPS = 8


def _dequantize_kernel():
    from qlora.kernels.dequant_triton import dequantize_kernel

    return dequantize_kernel


def _checked_out(p: Packed4bit, dtype: torch.dtype | None, out: torch.Tensor) -> torch.dtype:
    """The dtype to dequantize to when writing into `out`, which must fit the weight exactly."""
    dtype = dtype or out.dtype
    if tuple(out.shape) != tuple(p.shape) or out.dtype != dtype or not out.is_contiguous() \
            or out.device != p.data.device:
        raise QloraError(
            f"dequantize out= must be a contiguous {dtype} tensor of shape {tuple(p.shape)} on "
            f"{p.data.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
            f"(contiguous: {out.is_contiguous()}); pass a row slice of a contiguous buffer")
    return dtype


def dequantize_4bit_triton(p: Packed4bit, dtype: torch.dtype | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_4bit` as one Triton kernel, bit for bit: fp32 code × fp32 block scale, rounded
    once to `dtype` (fp32, bf16 or fp16). Written into `out` when given (see dequantize_4bit)."""
    dtype = _checked_out(p, dtype, out) if out is not None else dtype or p.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QloraError(f"4-bit weights dequantize to float32, bfloat16 or float16, not {dtype}")
    cols = 8 // dtype.itemsize  # packed bytes whose 2·cols values fill 16 bytes of output
    if p.blocksize % (2 * cols):
        raise QloraError(f"the dequantize kernel needs a blocksize that is a multiple of "
                         f"{2 * cols} for {dtype}, got {p.blocksize}; use dequantize_4bit (the "
                         "torch reference) for this weight")
    if out is None:
        out = torch.empty(p.shape, dtype=dtype, device=p.data.device)
    n_bytes = p.data.numel()
    if out.numel() == 0:
        return out
    nested = p.nested_absmax is not None
    grid = (-(-n_bytes // TILE_BYTES),)
    _dequantize_kernel()[grid](
        p.data, p.absmax, p.code,
        p.nested_absmax if nested else p.code,  # unread placeholders without double quantization
        p.nested_code if nested else p.code,
        p.offset, out, n_bytes, out.numel(),
        BLOCK_BYTES=p.blocksize // 2, NESTED=nested, NESTED_BLOCKSIZE=p.nested_blocksize,
        ROWS=TILE_BYTES // cols, COLS=cols, NATIVE_ROUNDING=out.device.type == "cuda",
        num_warps=WARPS, enable_fp_fusion=False)
    return out


def dequantize(p: Packed4bit, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight: by the Triton kernel where Triton runs (CUDA, or the CPU under
    TRITON_INTERPRET=1), by the torch reference elsewhere. Both give the same bits. Written into
    `out` (a contiguous [out, in] tensor, e.g. a row slice of a larger buffer) when given."""
    if use_triton(p.data):
        return dequantize_4bit_triton(p, dtype, out)
    return dequantize_4bit(p, dtype, out)


class Matmul4bit(torch.autograd.Function):
    """x @ W_catᵀ + addend for frozen 4-bit weights W_1, W_2, ... of one in_features, stacked by
    rows (one weight, or q/k/v, gate/up read from one input): one GEMM forward and one for x's
    gradient, where autograd would add one per layer. Backward dequantizes again instead of
    keeping any 16-bit weight; only the 4-bit bytes are kept (on ctx, see forward). Transient
    memory: the [Σ out, in] dense weight.

    The addend (optional, the output's shape and x's dtype, contiguous) is consumed: the GEMM
    accumulates into its memory and returns it (an in-place op to autograd), because an
    out-of-place addmm would first copy it into a new output, one more full pass over it.
    Arguments after `metas`: (data, absmax, code, nested_absmax, nested_code) of each weight.
    """

    @staticmethod
    def forward(ctx, x, addend, metas, *tensors):
        # The frozen bytes are held on ctx, not saved with save_for_backward: nothing of this
        # function then passes through saved-tensor hooks, so a non-reentrant checkpoint's
        # recompute stops before it when it ends a layer (down_proj): that GEMM's output is not
        # needed for backward, and skipping it saves a dequantize and a GEMM per layer.
        ctx.tensors = tensors
        ctx.metas = metas
        weight = dense_weights(metas, tensors, x.dtype)
        if _keeping:  # a checkpoint's rerun: the backward that follows takes it
            _kept[_weight_key(tensors, x.dtype)] = weight
        weight_t = weight.t()
        rows = x.reshape(-1, x.shape[-1])
        if addend is None:
            return (rows @ weight_t).view(*x.shape[:-1], weight_t.shape[1])
        ctx.mark_dirty(addend)
        addend.view(-1, weight_t.shape[1]).addmm_(rows, weight_t)
        return addend

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # (kernels/lora.py passes x detached: its backward takes W)
            weight = take_kept_weight(tensors, grad_out.dtype)
            if weight is None:
                weight = dense_weights(ctx.metas, tensors, grad_out.dtype)
            grad_x = grad_out @ weight
        grad_addend = grad_out if ctx.needs_input_grad[1] else None
        return (grad_x, grad_addend, None) + (None,) * len(tensors)


def _meta(p: Packed4bit) -> tuple:
    return (p.blocksize, p.shape, p.dtype, p.nested_blocksize, p.offset)


def _tensors(p: Packed4bit) -> list:
    return [p.data, p.absmax, p.code, p.nested_absmax, p.nested_code]


def _unpack_group(metas: tuple, tensors: tuple) -> list[Packed4bit]:
    """The Packed4bit of each weight from the flat tensor list Matmul4bit is given."""
    return [Packed4bit(data, absmax, code, *meta[:3], nested_absmax, nested_code, *meta[3:])
            for meta, (data, absmax, code, nested_absmax, nested_code)
            in zip(metas, zip(*[iter(tensors)] * 5))]


# The dense weights a checkpoint's rerun made, by weight, until a backward takes them. Plain module
# state: reruns and backward run on one thread, one layer at a time, and a CUDA graph captures
# what they do like any other Python.
_keeping = False
_kept: dict = {}


def _weight_key(tensors: tuple, dtype: torch.dtype) -> tuple:
    return tensors[0].data_ptr(), len(tensors), dtype


@contextlib.contextmanager
def rerun_keeps_weights():
    """Around a checkpointed layer's rerun: each dense weight a Matmul4bit makes is kept until the
    backward that dequantizes the same weights takes it (take_kept_weight). What an earlier rerun
    kept and no backward took (nothing, in practice: every LoRA group's backward takes its
    weight, whether or not it needs it) is dropped here."""
    global _keeping
    _kept.clear()
    _keeping = True
    try:
        yield
    finally:
        _keeping = False


@contextlib.contextmanager
def weights_not_kept():
    """Inside rerun_keeps_weights: dense weights made here are not kept (a sequence tile of the
    MLP, whose tiles would take each other's); keeping resumes after."""
    global _keeping
    before, _keeping = _keeping, False
    try:
        yield
    finally:
        _keeping = before


def take_kept_weight(tensors: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight the layer's rerun kept for these weights, if it did, handed over (so its
    memory goes with this use). LoraProducts' backward calls it whether or not it needs it."""
    return _kept.pop(_weight_key(tensors, dtype), None)


def dense_weights(metas: tuple, tensors: tuple, dtype: torch.dtype) -> torch.Tensor:
    """[Σ out, in]: the weights Matmul4bit is given (metas, flat tensors), dequantized."""
    return dequantize_group(_unpack_group(metas, tensors), dtype)


def dequantize_group(packs: list[Packed4bit], dtype: torch.dtype) -> torch.Tensor:
    """The weights' dense values stacked by rows, [Σ out, in], each written into its own rows
    (no concatenating copy). All have the same in_features."""
    rows = sum(p.shape[0] for p in packs)
    weight = torch.empty(rows, packs[0].shape[1], dtype=dtype, device=packs[0].data.device)
    start = 0
    for p in packs:
        dequantize(p, dtype, out=weight[start:start + p.shape[0]])
        start += p.shape[0]
    return weight


def matmul_4bit(x: torch.Tensor, p: Packed4bit, bias: torch.Tensor | None = None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ (+ addend, which is consumed: see Matmul4bit) (+ bias)."""
    out = Matmul4bit.apply(x, addend, (_meta(p),), *_tensors(p))
    return out if bias is None else out + bias.to(out.dtype)


class Base4bit(torch.nn.Module):
    """The frozen 4-bit base of a LoRA layer, run through `Matmul4bit`.

    It holds the same tensors as the bitsandbytes Linear4bit it stands beside, as non-persistent
    buffers: nothing is copied, state_dict and adapter files are unchanged, and `.to()` moves them
    with the model.
    """

    def __init__(self, layer):
        super().__init__()
        p = packed_from_bnb(layer.weight)
        self.register_buffer("data", p.data, persistent=False)
        self.register_buffer("absmax", p.absmax, persistent=False)
        self.register_buffer("code", p.code, persistent=False)
        self.register_buffer("nested_absmax", p.nested_absmax, persistent=False)
        self.register_buffer("nested_code", p.nested_code, persistent=False)
        self.meta = _meta(p)

    def tensors(self) -> list:
        return [self.data, self.absmax, self.code, self.nested_absmax, self.nested_code]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """x @ Wᵀ + addend + bias; the addend (x's dtype, contiguous) is consumed."""
        out = Matmul4bit.apply(x, addend, (self.meta,), *self.tensors())
        return out if bias is None else out + bias.to(out.dtype)
