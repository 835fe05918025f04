"""The grouped expert computation of a sparse block: FastExperts, the fork of the reference
Experts (models/families/moe_blocks.py), which loops over experts.

Each token's k choices become k rows, sorted by expert (a stable argsort), so each expert's rows
are one contiguous run ending at offsets[e]. Then one grouped GEMM per projection covers every
expert (kernels/experts.py: torch._grouped_mm where it runs, else the Triton kernel, else one
padded batched matmul): the base through GroupedBase (4-bit stacks dequantized in one batched
call, again in backward but
for the part a checkpoint's rerun kept, each projection's last; a large projection's in parts of its
output rows, kernels/experts.row_parts), the
LoRA products (lora_A as PEFT's [E·r, in], lora_B held as [E, r, out]) as two more grouped GEMMs, the
scaling on A's narrow output; SwiGLU between them (with fused_kernels one Triton kernel reading the
packed gate/up output in place); each row scaled by its router weight, rounded to the hidden
dtype as the reference rounds each expert's output, and the k rows of each token added in fp32
(no atomics; kernels/routing.py: with fused_kernels one Triton kernel a direction reads each
token's k rows where the sort put them). Backward is autograd's through the same grouped GEMMs;
the row gathers' backward sums by gathers too (SortedRows), where index_select's would add by
atomics; no Python loop over experts anywhere.
"""

from __future__ import annotations

import functools

import torch

from qlora.adapters import LoraExperts
from qlora.kernels import fused as fused_kernels
from qlora.kernels.dropout import use_triton
from qlora.kernels.experts import (GroupedBase, dequantize_experts, grouped_mm, grouped_mm_path,
                                   projection_parts, stack_rows)
from qlora.kernels.routing import SortedRows, combine
from qlora.models.families.moe_blocks import ExpertLinear, Experts, expert_counts


class FastExperts(Experts):
    grouped = False  # set by apply_speed (SpeedPlan.grouped_experts)
    fused = False  # SwiGLU and the row sums by Triton kernels (fused_kernels)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self.grouped:
            return super().forward(x, index, weights)
        return grouped_experts(self, x, index, weights)


def grouped_experts(experts: Experts, x: torch.Tensor, index: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Experts.forward's result, expert GEMMs grouped: x [N, H], index and weights [N, k]."""
    k = index.shape[1]
    flat = index.reshape(-1)
    order = torch.argsort(flat.to(expert_id_dtype(experts.num_experts)), stable=True)
    offsets = expert_offsets(flat, experts.num_experts)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                       device=order.device))
    fused = getattr(experts, "fused", False) and use_triton(x)
    rows = SortedRows.apply(x, order, inverse, k, fused)
    gate_up = projection(experts.gate_up_proj, rows, offsets)
    if fused:
        hidden = fused_kernels.swiglu_packed(gate_up)  # the halves read in place, not copied
    else:
        hidden = fused_kernels.swiglu_packed_reference(gate_up)
    y = projection(experts.down_proj, hidden, offsets)
    # as the reference: each row's output times its router weight, rounded to x's dtype, the
    # k rows of a token summed in fp32
    return combine(y.to(x.dtype), weights, order, inverse, fused)


def expert_id_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer type that holds an expert's id: the sort's keys, since CUDA's radix
    sort makes a pass per key byte (int64 ids took eight; the stable order is the same)."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 2**15 else torch.int32


def expert_offsets(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E]: where each expert's run of rows ends once rows are sorted by expert (counted
    without a host sync: expert_counts)."""
    return torch.cumsum(expert_counts(flat, num_experts), 0, dtype=torch.int32)


def base_of(layer) -> ExpertLinear:
    return layer.base_layer if isinstance(layer, LoraExperts) else layer


def expert_parts(layer, dtype: torch.dtype) -> tuple[tuple[int, int], ...]:
    """The parts of output rows a projection's base is dequantized in (experts.row_parts)."""
    base = base_of(layer)
    stack = base.quantized
    return projection_parts(base.num_experts, base.out_features, base.in_features, base.members,
                            dtype.itemsize, None if stack is None else stack.blocksize,
                            stack.nested_blocksize if stack is not None and stack.nested else None)


def projection(layer, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """An expert projection (ExpertLinear, or LoraExperts over one) of rows sorted by expert,
    its base dequantized a part of its output rows at a time."""
    base = base_of(layer)
    y = GroupedBase.apply(rows, offsets, functools.partial(expert_weights, base),
                          expert_parts(layer, rows.dtype), base)
    if isinstance(layer, LoraExperts) and not layer.disabled:
        a_t, b_t = grouped_factors(layer, rows.dtype)
        # the scaling applied to A's output [rows, r], not to the [rows, out] product: the same
        # math, r / out of the work (11 of 417 ms of a Qwen3-30B-A3B step, H100, 2026-12-07)
        h = grouped_mm(rows, a_t, offsets) * layer.scaling
        y = y + grouped_mm(h, b_t, offsets)
    return y


def grouped_factors(layer: LoraExperts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Aᵀ [E, in, r], Bᵀ [E, r, out]) in `dtype`, as the grouped GEMMs take them: A cast, then a
    transposed view (torch._grouped_mm reads either layout); B cast as it is held (LoraExperts
    keeps Bᵀ: PEFT's layout, the experts innermost, took a strided copy each pass; holding Bᵀ
    made a Qwen3-30B-A3B step 7.5 ms shorter, H100, 2026-12-07, docs/BENCHMARKS.md)."""
    a, _ = layer.factors(layer.lora_A.weight.dtype)  # a view of the parameter
    return a.to(dtype).transpose(1, 2), layer.lora_B.weight.to(dtype)


def expert_weights(layer: ExpertLinear, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
    """[experts, stop − start, in]: output rows start … stop − 1 of every expert's weight (all
    of them, or rows of one of its 4-bit members: expert_parts), the 16-bit weight's, or the
    4-bit stack's dequantized in one call."""
    if layer.quantized is None:
        return layer.weight[:, start:stop].to(dtype)
    stack = layer.quantized
    if (start, stop) == (0, layer.out_features):
        dense = dequantize_experts(stack, dtype)
    else:
        rows = stack.shape[0]
        member = start // rows
        dense = dequantize_experts(stack_rows(stack, start - member * rows, stop - member * rows,
                                              member, layer.members), dtype)
    return dense.view(layer.num_experts, stop - start, layer.in_features)


def capture_blocker(experts: Experts, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a step through these experts reads the device on the host (so no CUDA graph can hold
    it), or None: the reference loop, or grouped GEMMs that go to the padded fallback (it reads
    the largest group): neither torch._grouped_mm takes them nor Triton runs (grouped_mm_path;
    on a CUDA GPU with Triton every dtype and width has a path that reads nothing)."""
    if not getattr(experts, "grouped", False):
        return "the reference loop over experts reads the routing on the host"
    widths = []
    for layer in (experts.gate_up_proj, experts.down_proj):
        base = base_of(layer)
        widths += [base.in_features, base.out_features]
        widths += [stop - start for start, stop in expert_parts(layer, dtype)]  # each part's GEMM
        if isinstance(layer, LoraExperts):
            widths.append(layer.r)
    if grouped_mm_path(device, dtype, *widths) == "padded":
        return (f"torch._grouped_mm does not take {str(dtype).replace('torch.', '')} experts of "
                f"these widths on this device (bf16 rows of 16-byte multiples, sm90+) and the "
                "Triton grouped GEMM does not run here (no CUDA GPU with Triton): the padded "
                "fallback reads the largest group on the host")
    return None
