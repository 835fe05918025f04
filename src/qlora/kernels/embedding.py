"""A frozen input-embedding table kept in pinned host memory, its rows gathered by the GPU.

Why: with LoRA the input embedding is frozen and read only by a gather, a few thousand of its
rows per step. An untied table is a large part of a 4-bit model's GPU memory (Llama-3-8B:
128,256 x 4096 in bf16, 0.98 GiB of a 7 GiB step). Pinned host memory is addressable from the
GPU (CUDA's unified addressing), so a kernel reads the rows it needs over PCIe: on an H100, 2048
rows of 4096 in 0.33 ms, inside a CUDA graph as well (docs/BENCHMARKS.md, 2026-11-26).

`gather_rows` runs the Triton kernel where the table is in host memory and the ids on the GPU,
and is `torch.embedding` everywhere else (the reference: tests compare the two through Triton's
interpreter). `move_to_host` puts an embedding's table there.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qlora.errors import QloraError

ROW_BLOCK = 1024  # columns per inner step of a row


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(table_ptr, ids_ptr, out_ptr, width, BLOCK: tl.constexpr):
        """Program i copies row ids[i] of the table into row i of out."""
        i = tl.program_id(0)
        row = tl.load(ids_ptr + i).to(tl.int64)
        start = 0
        while start < width:  # `while`: Triton's interpreter cannot loop `for` to a runtime bound
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            values = tl.load(table_ptr + row * width + cols, mask=inside)
            tl.store(out_ptr + i.to(tl.int64) * width + cols, values, mask=inside)
            start += BLOCK

    return gather_kernel


def gather_rows_triton(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] by the kernel, on ids' device: [*ids.shape, width]."""
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype, device=ids.device)
    if flat.numel():
        _kernel()[(flat.numel(),)](table, flat, out, table.shape[1], BLOCK=ROW_BLOCK)
    return out.view(*ids.shape, table.shape[1])


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] on ids' device; from pinned host memory by the kernel when the table is there
    and the ids are on a GPU. No gradient reaches the table (it is frozen: move_to_host)."""
    if table.device == ids.device:
        return torch.embedding(table, ids)
    if not (table.device.type == "cpu" and table.is_pinned() and ids.device.type == "cuda"):
        raise QloraError(f"an embedding table on {table.device} cannot be read by ids on "
                         f"{ids.device}: move the model to one device (model.to(...)), or the "
                         "table to pinned host memory with qlora.kernels.embedding.move_to_host")
    return gather_rows_triton(table, ids)


def move_to_host(embedding: nn.Embedding) -> int:
    """Put a frozen embedding's table in pinned host memory; returns the GPU bytes freed."""
    weight = embedding.weight
    if weight.requires_grad:
        raise QloraError("the input embedding is trainable, so its table must stay on the GPU: "
                         "set embedding_on_host: false")
    nbytes = weight.numel() * weight.element_size()
    try:
        pinned = weight.detach().to("cpu").pin_memory()
    except RuntimeError as err:  # e.g. a container's limit on page-locked memory
        raise QloraError(f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory for the "
                         f"input embedding ({str(err).splitlines()[0]}); set embedding_on_host: "
                         "false to keep it on the GPU") from err
    embedding.weight = nn.Parameter(pinned, requires_grad=False)
    return nbytes if weight.device.type == "cuda" else 0
