"""Fused RMSNorm (alone or after the residual add), SwiGLU and RoPE: one Triton kernel each way,
beside models/decoder.py's plain torch code, which stays the reference
(tests/test_fused_kernels.py compares the two).

Why: in eager torch each of these is a chain of elementwise kernels that each read and write the
whole activation (RMSNorm: cast, square, mean, rsqrt, multiply, cast, multiply; as many again in
backward). On an H100 the Llama-3-8B step spent ~85 of 314 ms of GPU time in such kernels
(docs/BENCHMARKS.md). Fused, each op reads its inputs once and writes its output once.

Rounding: each kernel computes in fp32 and rounds to the tensor dtype where the reference rounds
(after normalising, after silu, after each RoPE product), so in bf16 the two differ only through
fp32 summation order and the GPU's exp/rsqrt.

gemma_rms_norm is Gemma's form of the norm (models/families/gemma.GemmaRMSNorm): scaled by
1 + w, in fp32 throughout, rounded once at the end, its output in x's dtype.

add_rms_norm fuses the residual stream's `total = x + residual` into the norm that follows it:
one pass reads x and residual and writes both total and norm(total); backward makes total's whole
gradient (the one passed to total plus the norm's) in one pass, the gradient of x and residual.

Saved for backward (what qlora.memory's kernels="fused" terms count): RMSNorm keeps its input and
one fp32 rstd per row; add_rms_norm keeps total (its output, the norm's input) and one fp32 rstd
per row, not x or residual; SwiGLU keeps gate and up (silu is recomputed), swiglu_packed the one
[.., 2·I] tensor that holds both; RoPE keeps cos and sin only.

Triton is imported on first use, not here: the tests set TRITON_INTERPRET=1 before that import to
run these kernels on the CPU. The decoder uses them only where Triton runs (dropout.use_triton).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qlora.errors import QloraError

ELEMENTWISE_BLOCK = 1024


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_forward(x_ptr, res_ptr, w_ptr, total_ptr, y_ptr, rstd_ptr, n_cols, eps,
                        ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                        GEMMA: tl.constexpr = False):
        """One row per program: y = w * (x * rstd) rounded to x's dtype, rstd kept for backward.
        With ADD_RESIDUAL the norm's input is x + res (rounded to x's dtype, as torch's sum is),
        also stored to total_ptr; without, res_ptr and total_ptr go unused. GEMMA: Gemma's
        norm, y = (1 + w) * (x * rstd) all in fp32, rounded once at the end (GemmaRMSNorm)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        offsets = row * n_cols + cols
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        if ADD_RESIDUAL:
            res = tl.load(res_ptr + offsets, mask=inside, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
            tl.store(total_ptr + offsets, x, mask=inside)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        # decoder.RMSNorm rounds to x's dtype before the weight: `.to(dtype).to(fp32)` here and
        # below stores an intermediate where the reference does
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if GEMMA:
            normed = xf * rstd
            w = 1.0 + w
        else:
            normed = (xf * rstd).to(x.dtype).to(tl.float32)
        tl.store(y_ptr + offsets, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def rmsnorm_backward(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, extra_ptr, n_rows, n_cols,
                         programs, ADD_GRAD: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK: tl.constexpr, GEMMA: tl.constexpr = False):
        """Rows pid, pid + programs, ...: dx per row; with ADD_GRAD, dx plus the gradient at
        extra_ptr (x's, given to add_rms_norm's total), else extra_ptr goes unused; with
        COMPUTE_DW, this program's partial sum of the weight gradient (one row of dw_ptr, summed
        over programs by the caller)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if GEMMA:
            w = 1.0 + w
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        row = pid.to(tl.int64)
        while row < n_rows:  # not `for range(pid, ...)`: the interpreter cannot index by a tensor
            offsets = row * n_cols + cols
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
            g = tl.load(g_ptr + offsets, mask=inside, other=0.0)
            rstd = tl.load(rstd_ptr + row)
            normed = x.to(tl.float32) * rstd
            if GEMMA:  # all fp32 in the forward: nothing rounded between the output and x
                gn = g.to(tl.float32) * w
            else:
                # gradient of the rounded normed value: g * w in g's dtype, then in x's (autograd casts)
                gn = (g.to(tl.float32) * w).to(g.dtype).to(x.dtype).to(tl.float32)
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (gn - normed * mean(gn * normed))
            dot = tl.sum(gn * normed, axis=0) / n_cols
            dx = rstd * (gn - normed * dot)
            if ADD_GRAD:
                # autograd sums total's two gradients in x's dtype, the norm's already rounded
                extra = tl.load(extra_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                dx = dx.to(x.dtype).to(tl.float32) + extra
            tl.store(dx_ptr + offsets, dx.to(x.dtype), mask=inside)
            if COMPUTE_DW and GEMMA:
                dw += g.to(tl.float32) * normed
            elif COMPUTE_DW:
                rounded = normed.to(x.dtype).to(tl.float32)
                dw += (g.to(tl.float32) * rounded).to(g.dtype).to(tl.float32)
            row += programs
        if COMPUTE_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=inside)

    @triton.jit
    def swiglu_forward(g_ptr, u_ptr, y_ptr, n, cols, in_row_stride, PACKED: tl.constexpr,
                       BLOCK: tl.constexpr):
        """y = silu(g) * u over n elements, y dense [rows, cols]. g and u dense too, or PACKED: the
        two column halves of one [rows, 2·cols] tensor, rows in_row_stride apart (g_ptr points at
        its column 0, u_ptr at its column cols)."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        src = offsets
        if PACKED:  # gate's column c of row r: r * in_row_stride + c
            src = offsets // cols * in_row_stride + offsets % cols
        g = tl.load(g_ptr + src, mask=inside, other=0.0)
        u = tl.load(u_ptr + src, mask=inside, other=0.0)
        gf = g.to(tl.float32)
        # F.silu's result, stored in the input dtype before the product
        silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(y_ptr + offsets, (silu * u.to(tl.float32)).to(g.dtype), mask=inside)

    @triton.jit
    def swiglu_backward(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, cols, in_row_stride,
                        PACKED: tl.constexpr, BLOCK: tl.constexpr):
        """dg and du in the inputs' layout: packed, both halves of one [.., 2·cols] gradient."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        src = offsets
        if PACKED:  # gate's column c of row r: r * in_row_stride + c
            src = offsets // cols * in_row_stride + offsets % cols
        dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + src, mask=inside, other=0.0)
        u = tl.load(u_ptr + src, mask=inside, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gf))
        # recomputed exactly as the forward did
        silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(du_ptr + src, (dy * silu).to(g.dtype), mask=inside)
        dsilu = (dy * u).to(g.dtype).to(tl.float32)
        # silu'(g) = sig * (1 + g * (1 - sig))
        tl.store(dg_ptr + src, (dsilu * sig * (1.0 + gf * (1.0 - sig))).to(g.dtype), mask=inside)

    @triton.jit
    def rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, T, H, sxb, sxh, sxt, syb, syh, syt, scb, sct,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                    BACKWARD: tl.constexpr):
        """One token (b, t) per program, all its heads: x [B, H, T, D] by strides (D contiguous).

        Forward  y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2   (x * cos + rotate_half(x) * sin)
        Backward y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1   (its transpose: the inverse rotation)
        Each product is rounded to x's dtype before the sum, as the reference's are.
        """
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // T, pid % T
        heads = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        d_in = d < HALF
        inside = (heads < H) & d_in
        cs = b * scb + t * sct + d
        c1 = tl.load(cos_ptr + cs, mask=d_in, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs + HALF, mask=d_in, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs, mask=d_in, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs + HALF, mask=d_in, other=0.0).to(tl.float32)
        xs = x_ptr + b * sxb + t * sxt + heads * sxh + d
        x1 = tl.load(xs, mask=inside, other=0.0)
        x2 = tl.load(xs + HALF, mask=inside, other=0.0).to(tl.float32)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        if BACKWARD:
            y1 = (x1 * c1).to(dtype).to(tl.float32) + (x2 * s2).to(dtype).to(tl.float32)
            y2 = (x2 * c2).to(dtype).to(tl.float32) - (x1 * s1).to(dtype).to(tl.float32)
        else:
            y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
            y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        ys = y_ptr + b * syb + t * syt + heads * syh + d
        tl.store(ys, y1.to(dtype), mask=inside)
        tl.store(ys + HALF, y2.to(dtype), mask=inside)

    return dict(rmsnorm_forward=rmsnorm_forward, rmsnorm_backward=rmsnorm_backward,
                swiglu_forward=swiglu_forward, swiglu_backward=swiglu_backward, rope=rope_kernel)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_warps(block: int) -> int:
    """Warps for one row of `block` values: a 4096-wide row spread over 16 warps, not 4."""
    return min(16, max(4, block // 256))


# ------------------------------------------------------------------------------------ RMSNorm

def _dw_programs(x: torch.Tensor, rows: int) -> int:
    """Programs that share the rows when the weight gradient is wanted: each writes one fp32 row
    of partial sums, so a few per SM rather than one per row."""
    if x.device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(rows, 4)


class FusedRMSNorm(torch.autograd.Function):
    """Saves x and one fp32 rstd per row; the weight gradient only when the weight wants one
    (QLoRA's norms are frozen: then backward is dx alone, one pass over the rows). `gemma`:
    Gemma's (1 + w) norm, rounded once, its output in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False):
        n = x.shape[-1]
        rows = x.reshape(-1, n).contiguous()
        w = weight.contiguous()
        dtype = x.dtype if gemma else torch.promote_types(x.dtype, w.dtype)
        y = torch.empty(rows.shape, device=x.device, dtype=dtype)
        rstd = torch.empty(rows.shape[0], device=x.device, dtype=torch.float32)
        # rows and y stand in for the residual and total pointers, which go unused
        _kernels()["rmsnorm_forward"][(rows.shape[0],)](rows, rows, w, y, y, rstd, n, eps,
                                                        ADD_RESIDUAL=False, BLOCK=_pow2(n),
                                                        GEMMA=gemma,
                                                        num_warps=_row_warps(_pow2(n)))
        ctx.save_for_backward(rows, w, rstd)
        ctx.shape, ctx.gemma = x.shape, gemma
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, w, rstd = ctx.saved_tensors
        dx, dw = _rmsnorm_backward(grad, rows, w, rstd, want_dw=ctx.needs_input_grad[1],
                                   gemma=ctx.gemma)
        return dx.view(ctx.shape), dw, None, None


def _rmsnorm_backward(grad: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                      want_dw: bool, extra: torch.Tensor | None = None, gemma: bool = False):
    """(dx, dw or None) of the norm of rows [n_rows, n], given the output's gradient grad; dx
    plus `extra` (a gradient shaped as rows, in their dtype) when one is given."""
    n_rows, n = rows.shape
    g = grad.reshape(n_rows, n).contiguous()
    add_grad = extra is not None
    extra = extra.reshape(n_rows, n).contiguous() if add_grad else g  # else a placeholder pointer
    dx = torch.empty_like(rows)
    programs = _dw_programs(rows, n_rows) if want_dw else n_rows
    partial = (torch.empty((programs, n), device=rows.device, dtype=torch.float32)
               if want_dw else rstd)  # a placeholder pointer when no weight gradient is made
    _kernels()["rmsnorm_backward"][(programs,)](g, rows, w, rstd, dx, partial, extra, n_rows, n,
                                                programs, ADD_GRAD=add_grad, COMPUTE_DW=want_dw,
                                                BLOCK=_pow2(n), GEMMA=gemma,
                                                num_warps=_row_warps(_pow2(n)))
    return dx, (partial.sum(0).to(w.dtype) if want_dw else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """decoder.RMSNorm's forward as one kernel: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    if x.numel() == 0:
        return weight * x
    return FusedRMSNorm.apply(x, weight, eps)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models/families/gemma.GemmaRMSNorm's forward as one kernel: (x * rsqrt(mean(x^2) + eps))
    * (1 + weight), in fp32, rounded to x's dtype once."""
    if x.numel() == 0:
        return x * (1.0 + weight)
    return FusedRMSNorm.apply(x, weight, eps, True)


class FusedAddRMSNorm(torch.autograd.Function):
    """(total, normed) = (x + residual, rms_norm(total)). Saves total, the weight and one fp32 rstd
    per row; x and residual share one gradient, total's whole one, made in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        n = x.shape[-1]
        x_rows = x.reshape(-1, n).contiguous()
        res_rows = residual.reshape(-1, n).contiguous()
        w = weight.contiguous()
        total = torch.empty_like(x_rows)
        y = torch.empty(x_rows.shape, device=x.device, dtype=torch.promote_types(x.dtype, w.dtype))
        rstd = torch.empty(x_rows.shape[0], device=x.device, dtype=torch.float32)
        _kernels()["rmsnorm_forward"][(x_rows.shape[0],)](x_rows, res_rows, w, total, y, rstd, n,
                                                          eps, ADD_RESIDUAL=True, BLOCK=_pow2(n),
                                                          num_warps=_row_warps(_pow2(n)))
        total, y = total.view(x.shape), y.view(x.shape)
        ctx.save_for_backward(total, w, rstd)
        # None, not zeros, for an output that gets no gradient: that read is skipped
        ctx.set_materialize_grads(False)
        return total, y

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor | None, grad_normed: torch.Tensor | None):
        total, w, rstd = ctx.saved_tensors
        if grad_normed is None:  # only total was used: the norm adds nothing
            return grad_total, grad_total, None, None
        rows = total.reshape(-1, total.shape[-1])
        dx, dw = _rmsnorm_backward(grad_normed, rows, w, rstd, want_dw=ctx.needs_input_grad[2],
                                   extra=grad_total)
        dx = dx.view(total.shape)
        return dx, dx, dw, None


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code add_rms_norm fuses: the residual add, then decoder.RMSNorm's math on it."""
    total = x + residual
    normed = total.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * normed.to(total.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, normed) = (x + residual, rms_norm(total, weight, eps)), in one kernel each way."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise QloraError(f"add_rms_norm needs x and residual of one shape and dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} "
                         f"{residual.dtype}; cast or reshape one to match the other")
    if x.numel() == 0:
        return add_rms_norm_reference(x, residual, weight, eps)
    return FusedAddRMSNorm.apply(x, residual, weight, eps)


# ------------------------------------------------------------------------------------- SwiGLU

def _swiglu_launch(kernel: str, *tensors: torch.Tensor, n: int, cols: int, in_row_stride: int,
                   packed: bool) -> None:
    _kernels()[kernel][(_cdiv(n, ELEMENTWISE_BLOCK),)](*tensors, n, cols, in_row_stride,
                                                        PACKED=packed, BLOCK=ELEMENTWISE_BLOCK)


class FusedSwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, and backward recomputes silu from gate."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()  # dense inputs: cols and in_row_stride go unused
        _swiglu_launch("swiglu_forward", gate, up, y, n=n, cols=n, in_row_stride=n, packed=False)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_launch("swiglu_backward", grad, gate, up, dgate, dup, n=n, cols=n, in_row_stride=n,
                       packed=False)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up as one kernel (and one in backward)."""
    if gate.dtype != up.dtype:  # one dtype in the kernel: promote as torch's product would
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    if gate.numel() == 0:
        return gate * up
    return FusedSwiGLU.apply(gate, up)


class FusedSwiGLUPacked(torch.autograd.Function):
    """silu(gu[..., :I]) * gu[..., I:] read in place from one [.., 2·I] tensor (the grouped
    gate/up GEMM's output); saves gu alone, and backward writes both halves of its gradient into
    one [.., 2·I] tensor, the one the grouped GEMM's backward multiplies (no copies, no join)."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor):
        gu = gu.contiguous()
        cols = gu.shape[-1] // 2
        y = gu.new_empty(gu.shape[:-1] + (cols,))
        # the second pointer is gu's I-th column: up's element (row, c) is gate's plus I
        _swiglu_launch("swiglu_forward", gu, gu[..., cols:], y, n=y.numel(), cols=cols,
                       in_row_stride=2 * cols, packed=True)
        ctx.save_for_backward(gu)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gu,) = ctx.saved_tensors
        grad = grad.contiguous()
        cols = gu.shape[-1] // 2
        dgu = torch.empty_like(gu)
        _swiglu_launch("swiglu_backward", grad, gu, gu[..., cols:], dgu, dgu[..., cols:],
                       n=grad.numel(), cols=cols, in_row_stride=2 * cols, packed=True)
        return dgu


def swiglu_packed_reference(gu: torch.Tensor) -> torch.Tensor:
    """decoder.MLP's torch SwiGLU on the two halves of gu [.., 2·I]: gate first, then up."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """swiglu_packed_reference as one kernel (and one in backward) for a [.., 2·I] input."""
    if gu.shape[-1] % 2:
        raise QloraError(f"swiglu_packed needs an even last dim (gate then up, I columns each), "
                         f"got shape {tuple(gu.shape)}; pass gate and up to fused.swiglu instead")
    if gu.numel() == 0:
        return swiglu_packed_reference(gu)
    return FusedSwiGLUPacked.apply(gu)


# --------------------------------------------------------------------------------------- RoPE

def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """y = the rotation of x (or its inverse) in x's memory layout; x [B, H, T, D] may be the
    transposed view of [B, T, H, D] that Attention makes: read by strides, never copied."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    y = torch.empty_like(x)  # the same strides as x (a dense tensor keeps its layout)
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0  # one table for every row broadcasts
    _kernels()["rope"][(B * T,)](x, y, cos, sin, T, H, x.stride(0), x.stride(1), x.stride(2),
                                 y.stride(0), y.stride(1), y.stride(2), cos_b, cos.stride(1),
                                 HALF=D // 2, BLOCK_H=_pow2(H), BLOCK_D=_pow2(D // 2),
                                 BACKWARD=backward)
    return y


class FusedRoPE(torch.autograd.Function):
    """RoPE is a rotation per pair (x1_i, x2_i): backward applies the inverse rotation to the
    gradient; nothing per token is saved beyond cos/sin, which every layer shares."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rope_launch(grad, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """decoder.apply_rope as one kernel: x [B, heads, T, hd]; cos/sin [B, T, hd] (no gradient)."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("fused RoPE gives cos/sin no gradient; use decoder.apply_rope")
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {x.shape[-1]}")
    dtype = torch.promote_types(x.dtype, cos.dtype)  # as x * cos would
    x = x.to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if x.numel() == 0:
        return x * cos.unsqueeze(1)
    return FusedRoPE.apply(x, cos, sin)
