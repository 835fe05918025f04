"""The Triton kernels of kernels/routing.py, which documents them: a module of its own, imported
on first use (as kernels/dequant_triton.py), since Triton must not be imported before a test sets
TRITON_INTERPRET=1 and a kernel calls `rounded` as a module global."""

import triton
import triton.language as tl


@triton.jit
def rounded(x, dtype: tl.constexpr, NATIVE_ROUNDING: tl.constexpr):
    """fp32 x in `dtype`, to nearest even: the GPU's conversion, which Triton's interpreter
    (the tests' run) would do by truncating to bf16 instead."""
    if dtype == tl.bfloat16 and not NATIVE_ROUNDING:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def sum_kernel(y_ptr, w_ptr, at_ptr, out_ptr, H: tl.constexpr, K: tl.constexpr,
               WEIGHTED: tl.constexpr, BLOCK: tl.constexpr, NATIVE_ROUNDING: tl.constexpr):
    """out[t] = Σ_c y[at[t·K + c]] in fp32, rounded once; WEIGHTED: each row times
    w[t·K + c] first, rounded to y's dtype."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < H
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(K):
        row = tl.load(at_ptr + token * K + c).to(tl.int64)
        y = tl.load(y_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(w_ptr + token * K + c).to(tl.float32)
            y = rounded(y * w, y_ptr.dtype.element_ty, NATIVE_ROUNDING).to(tl.float32)
        total += y
    tl.store(out_ptr + token * H + cols,
             rounded(total, out_ptr.dtype.element_ty, NATIVE_ROUNDING), mask=inside)

@triton.jit
def combine_backward_kernel(g_ptr, y_ptr, w_ptr, at_ptr, dy_ptr, dw_ptr, H: tl.constexpr,
                            K: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                            NATIVE_ROUNDING: tl.constexpr):
    """For choice c of token t (row r = at[t·K + c]): dy[r] = w[t·K + c] · g[t] rounded to
    dy's dtype and, with WEIGHT_GRAD, dw[t·K + c] = Σ_h g[t, h] · y[r, h] in fp32 (the whole
    row: one program a token; without it y_ptr and dw_ptr go unread)."""
    token = tl.program_id(0).to(tl.int64)
    for c in tl.static_range(K):
        row = tl.load(at_ptr + token * K + c).to(tl.int64)
        w = tl.load(w_ptr + token * K + c).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < H
            g = tl.load(g_ptr + token * H + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(dy_ptr + row * H + cols,
                     rounded(g * w, dy_ptr.dtype.element_ty, NATIVE_ROUNDING), mask=inside)
            if WEIGHT_GRAD:
                y = tl.load(y_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
                dot += g * y
        if WEIGHT_GRAD:
            tl.store(dw_ptr + token * K + c, tl.sum(dot, axis=0))
