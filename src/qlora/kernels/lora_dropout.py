"""The products of LoRA layers with seeded dropout on their input, as Triton kernels that draw the
dropout masks in registers, beside the plain torch composition they must equal.

For adapters A_i [r, K] (fp32 parameters) of layers that read one input x [M, K], scales s_i, and
masks D_i (kernels/dropout.py's seeded masks, salt_i, probability p; kept values scaled by
1/(1−p)):

    down       H_i  = s_i · D_i(x) · A_iᵀ                     [M, r] each, side by side [M, n·r]
    backward   ∂A_i = s_i · ∂H_iᵀ · D_i(x)                    [r, K] each (fp32)
               ∂x   = Σ_i s_i · D_i(∂H_i · A_i)               [M, K]

Why: composed from the dropout kernel and cuBLAS, every D_i(x) is written out and read back (in
the forward, again in the checkpoint's rerun, and in backward for ∂A_i), and ∂x's parts are masked
and summed in one more pass each: about 12 ms of a 205 ms Llama-3-8B step on an H100 in a profile of
2026-11-25, all memory traffic. Here x is read once per kernel and the masks never leave
registers. Drawing the masks (Philox) is what bounds these kernels (H100 runs of 2026-11-26:
x's tile masked and summed alone takes about 80% of the forward kernel's time), so kernels/lora.py
also keeps H from the forward for the checkpoint's rerun, which then draws no mask.

How a kernel tile meets the mask: the mask's blocks are 2048 elements of one row, and a Philox
evaluation (counter 256·block + q) serves the 8 elements q, 256 + q, ..., 1792 + q of its block. A
tile is BM rows × the QW counters q0..q0+QW−1 of one block, in all 8 slots: it makes those BM·QW
Philox evaluations once per adapter (kernels/lora_dropout_triton.py).
Products are accumulated in fp32 from x's dtype; the scale s_i/(1−p) is applied to the fp32
result (the composition rounds s_i·A_i and the kept x·1/(1−p) to x's dtype first: the two differ
by a rounding).

∂A_i sums over all M rows: programs each sum a chunk of rows into an fp32 workspace
[chunks, n, r, K], which torch then sums (deterministic, no atomics).
"""

from __future__ import annotations

import torch

from qlora.kernels.dropout import (BLOCK, PHILOX_ROUNDS, SLOT, check_counters, dropout_threshold,
                                   seeded_dropout_add_, seeded_dropout_values, use_triton)

MAX_ADAPTERS = 3  # q, k, v: the largest group decoder.py forms
MAX_RANK = 64  # the rank padded to a power of two ≥ 16 (tl.dot's least size) must fit registers
# Tile constants, from sweeps on an H100 on 2026-11-26 (benchmarks/gpu_check.py
# check_lora_dropout_kernels) at Llama-3-8B's shapes:
QW = 32  # Philox counters per tile row (a tile: rows × QW counters × 8 slots)
DOWN_ROWS = 64  # H: rows per program; H reads A once per row block (16 rows: 6x x's traffic)
PROGRAMS = 1024  # H: what its column split aims for (about 8 per SM of an H100)
UP_ROWS = 32  # ∂x: rows per program
GRAD_ROWS = 32  # ∂A: rows per step of a program's loop over its row chunk
MAX_CHUNKS = 8  # ∂A: row chunks, each an fp32 [n, r, K] partial written and summed again
WARPS = 4

def fused_applies(x: torch.Tensor, n: int, r: int) -> bool:
    """Whether the Triton kernels take this product (else the torch composition does)."""
    # fp32 only under the interpreter (the tests): on a GPU tl.dot would take it as tf32; bf16
    # on the GPU only: the interpreter's tl.dot multiplies bf16's raw bits (its H came out ~1e11
    # where the composition's is ~1), so there the composition computes it
    dtypes = ((torch.float16, torch.float32) if x.device.type == "cpu"
              else (torch.bfloat16, torch.float16))
    return use_triton(x) and n <= MAX_ADAPTERS and r <= MAX_RANK and x.dtype in dtypes


# --- the plain torch composition (the reference, and the path where Triton does not run) -------
def down_reference(x, adapters, seed, salts, scales, p) -> torch.Tensor:
    return torch.cat([seeded_dropout_values(x, seed, salt, p) @ (a * s).to(x.dtype).t()
                      for a, salt, s in zip(adapters, salts, scales)], 1)


def down_grad_reference(x, grad_h, seed, salts, scales, p) -> list[torch.Tensor]:
    r = grad_h.shape[1] // len(salts)
    return [(grad_h[:, i * r:(i + 1) * r].t() @ seeded_dropout_values(x, seed, salt, p)).float() * s
            for i, (salt, s) in enumerate(zip(salts, scales))]


def up_grad_reference(grad_h, adapters, seed, salts, scales, p) -> torch.Tensor:
    r = grad_h.shape[1] // len(salts)
    total = None
    for i, (a, salt, s) in enumerate(zip(adapters, salts, scales)):
        part = grad_h[:, i * r:(i + 1) * r] @ (a * s).to(grad_h.dtype)
        if total is None:
            total = seeded_dropout_values(part, seed, salt, p)
        else:
            seeded_dropout_add_(total, part, seed, salt, p)
    return total


# --- the kernels ---------------------------------------------------------------------------------
def _kernels():
    from qlora.kernels import lora_dropout_triton as kernels  # imports Triton: see its docstring

    return kernels.lora_dropout_down, kernels.lora_dropout_up_grad, kernels.lora_dropout_down_grad


def _launch_args(rows: int, width: int, salts, scales, p: float) -> dict:
    """What every kernel takes besides tensors: salts and scales padded to three (the scale with
    the dropout's 1/(1−p) folded in), the threshold, the mask's blocks per row."""
    check_counters(rows, width)
    pad = MAX_ADAPTERS - len(salts)
    return dict(salts=list(salts) + [0] * pad,
                scales=[s / (1.0 - p) for s in scales] + [0.0] * pad,
                threshold=dropout_threshold(p), per_row=-(-width // BLOCK))


def _padded(adapters) -> list[torch.Tensor]:
    return list(adapters) + [adapters[0]] * (MAX_ADAPTERS - len(adapters))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rank_tile(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def down_triton(x, adapters, seed, salts, scales, p) -> torch.Tensor:
    (rows, width), n, r = x.shape, len(adapters), adapters[0].shape[0]
    args = _launch_args(rows, width, salts, scales, p)
    tiles = args["per_row"] * (SLOT // QW)
    # the columns split among programs (fp32 partials, summed here) so that a short row count
    # still fills the GPU: the reduction is over K, long; the output [rows, n·r] is narrow
    splits = max(1, min(tiles, _cdiv(PROGRAMS, _cdiv(rows, DOWN_ROWS))))
    per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, per_split)
    partial = torch.empty(splits, rows, n * r, dtype=torch.float32, device=x.device)
    _kernels()[0][(_cdiv(rows, DOWN_ROWS), splits)](
        x, *_padded(adapters), partial, seed, *args["salts"], *args["scales"], args["threshold"],
        rows, width, args["per_row"], tiles, per_split, r, N=n, R=_rank_tile(r), BM=DOWN_ROWS,
        QW=QW, ROUNDS=PHILOX_ROUNDS, num_warps=WARPS)
    return (partial[0] if splits == 1 else partial.sum(0)).to(x.dtype)


def backward_triton(x, grad_h, adapters, seed, salts, scales, p, want_dx: bool):
    (rows, width), n, r = x.shape, len(adapters), adapters[0].shape[0]
    args = _launch_args(rows, width, salts, scales, p)
    tiles = args["per_row"] * (SLOT // QW)
    common = dict(N=n, R=_rank_tile(r), QW=QW, ROUNDS=PHILOX_ROUNDS, num_warps=WARPS)
    # ∂A: row chunks, each a multiple of GRAD_ROWS rows, at most MAX_CHUNKS of them
    wanted = min(MAX_CHUNKS, _cdiv(rows, GRAD_ROWS))
    chunk_rows = _cdiv(_cdiv(rows, wanted), GRAD_ROWS) * GRAD_ROWS
    chunks = _cdiv(rows, chunk_rows)
    ws = torch.empty(chunks, n, r, width, dtype=torch.float32, device=x.device)
    _kernels()[2][(chunks, tiles)](
        x, grad_h, ws, seed, *args["salts"], *args["scales"], args["threshold"], rows, width,
        args["per_row"], r, chunk_rows, BM=GRAD_ROWS, **common)
    dx = None
    if want_dx:
        dx = torch.empty(rows, width, dtype=grad_h.dtype, device=x.device)
        _kernels()[1][(_cdiv(rows, UP_ROWS), tiles)](
            grad_h, *_padded(adapters), dx, seed, *args["salts"], *args["scales"],
            args["threshold"], rows, width, args["per_row"], r, BM=UP_ROWS, **common)
    return list(ws.sum(0).unbind(0)), dx


# --- what kernels/lora.py calls --------------------------------------------------------------------
def down_products(x: torch.Tensor, adapters: list[torch.Tensor], seed: torch.Tensor,
                  salts: tuple[int, ...], scales: tuple[float, ...], p: float) -> torch.Tensor:
    """H [M, n·r] in x's dtype: s_i·D_i(x)·A_iᵀ side by side (x [M, K], adapters A_i [r, K])."""
    if fused_applies(x, len(salts), adapters[0].shape[0]):
        return down_triton(x, adapters, seed, salts, scales, p)
    return down_reference(x, adapters, seed, salts, scales, p)


def backward_products(x: torch.Tensor, grad_h: torch.Tensor, adapters: list[torch.Tensor],
                      seed: torch.Tensor, salts: tuple[int, ...], scales: tuple[float, ...],
                      p: float, want_dx: bool
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(∂A_i = s_i·∂H_iᵀ·D_i(x), fp32 [r, K] each; ∂x = Σ_i s_i·D_i(∂H_i·A_i) [M, K] in
    grad_h's dtype, or None unless want_dx)."""
    if fused_applies(x, len(salts), adapters[0].shape[0]):
        return backward_triton(x, grad_h, adapters, seed, salts, scales, p, want_dx)
    return (down_grad_reference(x, grad_h, seed, salts, scales, p),
            up_grad_reference(grad_h, adapters, seed, salts, scales, p) if want_dx else None)
