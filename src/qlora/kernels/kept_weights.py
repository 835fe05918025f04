"""Dense weights a checkpoint's rerun makes, held for the backward that follows it.

A checkpointed layer is run again in backward just before its backward runs, and that rerun
dequantizes the same frozen weights the backward then dequantizes once more. Inside
`rerun_keeps_weights` (speed/checkpointing.CheckpointedLayer's rerun) a GEMM over frozen weights
hands the dense weight it made to `keep`, and the backward that needs it `take`s it by the same
key instead of dequantizing again: one dequantize less per weight, for the dense weights of one
layer held from its rerun to its backward. Two users: kernels/matmul_4bit.Matmul4bit (the dense
linears, keyed by their 4-bit bytes) and kernels/experts.GroupedBase (the last part of a
projection of experts made dense).

Plain module state: reruns and backward run on one thread, one layer at a time, and a CUDA
graph captures what they do like any other Python.
"""

from __future__ import annotations

import contextlib
from typing import Hashable

import torch

_keeping = False
_kept: dict = {}


@contextlib.contextmanager
def rerun_keeps_weights():
    """Around a checkpointed layer's rerun: each dense weight given to `keep` is held until the
    backward that takes it. Users keep only a weight whose backward will run and take it
    (Matmul4bit's LoRA group always has one; GroupedBase keeps where its rows want a gradient);
    what an earlier rerun kept and no backward took is dropped here, and a checkpointed forward
    drops what a step that failed midway left (speed/fast_decoder.py)."""
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


def keep(key: Hashable, weight: torch.Tensor) -> None:
    """Inside a rerun (rerun_keeps_weights): hold `weight` for the backward that takes `key`."""
    if _keeping:
        _kept[key] = weight


def take(key: Hashable) -> torch.Tensor | None:
    """The dense weight the layer's rerun kept under `key`, if it did, handed over (so its
    memory goes with this use)."""
    return _kept.pop(key, None)


def drop_kept_weights() -> None:
    """Forget the dense weights a rerun kept that no backward took (a step that failed midway)."""
    _kept.clear()
