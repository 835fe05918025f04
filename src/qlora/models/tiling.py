"""The MLP computed in sequence tiles, so that no [tokens, intermediate] tensor exists whole.

At long sequences the MLP's intermediate tensors are the largest of a layer's backward: for
Llama-3-8B at 65,536 tokens one [tokens, 14336] bf16 tensor is 1.75 GiB, and gate, up, their
product and the gradients of each are alive together (about 6 of them). The MLP reads each token
alone, so it can run over the tokens a tile at a time: forward computes the tiles one after the
other without recording them, keeps only the MLP's input, and backward recomputes one tile at a
time and back-propagates through it at once (its input's gradient written into its rows, the
adapters' gradients accumulated as usual). The peak is then one tile's intermediates.

Cost: the tile's forward is recomputed in backward. Under layer checkpointing that replaces the
rerun's recompute of the MLP, which the tiled MLP does not keep from, so a step computes the MLP
about as often as without tiles (a checkpointed layer's rerun computes it once more where its
output is read by what backward needs; SequenceTiling says when it can skip it).

Without grad (evaluation at the training length) the tiles run one after the other, recorded
by nothing. This is the reference's math: `run_mlp(mlp, x)` equals `mlp(x)` (bit for bit in fp32 where the
MLP's rows do not depend on the batch's shape). It is switched on from outside by setting
`mlp.sequence_tiling` (speed.apply_speed does, from SpeedPlan.mlp_tile_tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def default_tile_tokens(intermediate_size: int) -> int:
    """Tokens per tile: the largest power of two (at least 1024) whose [tile, intermediate] bf16
    tensor fits in 128 MiB. Why that size: a tile's backward holds about six such tensors (gate
    and up, their product, and the gradients of the three), so about 0.75 GiB at Llama-3-8B
    (4096 tokens x 14336), against 10.5 GiB for 65,536 tokens untiled; and GEMMs of 4096 rows by
    4096 x 14336 still run at the GPU's full rate, so the tiles cost no speed of their own."""
    target = (128 * 2**20) // (2 * max(intermediate_size, 1))
    return max(1024, 1 << max(target.bit_length() - 1, 0))


@dataclass(frozen=True)
class SequenceTiling:
    """How a module's MLP runs in tiles (None on the module: whole).

    tokens: tokens per tile; a forward over no more tokens than this runs whole (so short
        sequences take exactly the untiled path).
    tile_context: around each tile's computation, in forward and in its recompute, given the MLP
        and the tile's index: a fast path's state that a tile must not see (a checkpoint's rerun
        state) or must see per tile (dropout masks drawn per tile). Default: nothing.
    preserve_rng: dropout drawn from the global RNG: each tile's RNG state is kept from its
        forward and restored for its recompute, so both draw the same masks.
    """

    tokens: int
    tile_context: Callable[[nn.Module, int], contextlib.AbstractContextManager] | None = None
    preserve_rng: bool = True

    def context(self, mlp: nn.Module, index: int):
        return self.tile_context(mlp, index) if self.tile_context else contextlib.nullcontext()


def tiles_apply(mlp: nn.Module, x: torch.Tensor) -> bool:
    """Whether run_mlp tiles: tiling set and more tokens than a tile."""
    tiling = getattr(mlp, "sequence_tiling", None)
    return tiling is not None and x.numel() // x.shape[-1] > tiling.tokens


def run_mlp(mlp: nn.Module, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
    """mlp(x), in sequence tiles where `mlp.sequence_tiling` asks for them (tiles_apply).

    skip: the caller knows this run is a checkpoint's rerun whose MLP output nothing saves (a
    residual add takes it): the MLP's input is saved (all the rerun is for) and nothing is
    computed; the output is left uninitialised, never read."""
    if not tiles_apply(mlp, x):
        return mlp(x)
    if not torch.is_grad_enabled():  # evaluation at the training length: tiles, nothing recorded
        return _forward_tiles(mlp, x)[0]
    # the anchor makes the output require grad when only the adapters inside do (the first
    # layer's input does not): the tiles' backward must run for their gradients
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _TiledMLP.apply(x, anchor, mlp, skip)


def _tile_bounds(rows: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, rows)) for start in range(0, rows, tile)]


def _rng_states(x: torch.Tensor) -> tuple:
    cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(states: tuple | None, x: torch.Tensor):
    if states is None:
        yield
        return
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state(states[1], x.device)
        yield


def _forward_tiles(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The MLP over x's rows a tile at a time, nothing recorded: (output, each tile's RNG state
    where the tiling keeps them)."""
    tiling = mlp.sequence_tiling
    rows = x.reshape(-1, x.shape[-1])
    out, rng = None, []
    with torch.no_grad():
        for index, (start, end) in enumerate(_tile_bounds(rows.shape[0], tiling.tokens)):
            rng.append(_rng_states(x) if tiling.preserve_rng else None)
            with tiling.context(mlp, index):
                y = mlp(rows[start:end].unsqueeze(0)).squeeze(0)
            if out is None:
                out = y.new_empty((rows.shape[0], y.shape[-1]))
            out[start:end] = y
            del y
    return out.view(*x.shape[:-1], out.shape[-1]), rng


class _TiledMLP(torch.autograd.Function):
    """The MLP over its input's rows, one tile of `sequence_tiling.tokens` rows at a time: forward
    keeps only the input; backward reruns each tile and back-propagates through it at once."""

    @staticmethod
    def forward(ctx, x, anchor, mlp, skip):
        ctx.mlp, ctx.x_shape = mlp, x.shape
        ctx.save_for_backward(x)
        if skip:
            return x.new_empty(x.shape)
        out, ctx.rng = _forward_tiles(mlp, x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        mlp = ctx.mlp
        tiling = mlp.sequence_tiling
        rows = x.reshape(-1, x.shape[-1])
        grads = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        rng = getattr(ctx, "rng", None)
        for index, (start, end) in enumerate(_tile_bounds(rows.shape[0], tiling.tokens)):
            tile = rows[start:end].detach().requires_grad_(grad_x is not None)
            states = rng[index] if rng else None
            with torch.enable_grad(), _rng_restored(states, x), tiling.context(mlp, index):
                y = mlp(tile.unsqueeze(0)).squeeze(0)
            # the adapters' gradients accumulate where they always do; the tile's own
            # gradient goes into its rows
            if y.requires_grad:
                torch.autograd.backward(y, grads[start:end])
            del y
            if grad_x is not None:
                grad_x[start:end] = 0 if tile.grad is None else tile.grad
        return (None if grad_x is None else grad_x.view(ctx.x_shape)), None, None, None
