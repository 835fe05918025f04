"""Bytes of tensor storage alive on the CPU, counted op by op (a TorchDispatchMode), to check what
a step holds at its peak against the memory planner without a GPU (torch.cuda's allocator
statistics have no CPU counterpart). Storages made before the count are counted only where
`track` is handed them; in-place ops and views add nothing."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """`current`, `peak`: bytes of the distinct storages alive that were made inside the mode (or
    handed to `track`); a storage stops counting when it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage address → bytes
        self.current = self.peak = 0

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        weakref.finalize(storage, self._free, key)
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._add(t)
        return out


def stepped_nf4_model(config: dict, plan, tokens: int, r: int = 8):
    """(model, optimizer, ids): the NF4 random model of `config` (LoRA r on every target, no
    dropout, the speed layer applied as `plan` says, checkpointed), stepped once on `tokens`
    random ids so that everything that lives between steps (the optimizer's states too) exists
    before a second step is counted."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig
    from qlora.speed import apply_speed
    from qlora.train.optim import build_optimizer

    model = random_model(spec_from_config(config), QuantConfig(
        method="nf4", double_quant=True, compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=0.0))
    apply_speed(model.train(), plan, log=lambda _: None)
    model.gradient_checkpointing = True
    opt = build_optimizer(model, "adamw_torch", 1e-3, 0.0, (0.9, 0.999), 1e-8)
    ids = torch.randint(0, config["vocab_size"], (1, tokens),
                        generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).backward()
    opt.step()
    return model, opt, ids
