"""kernels/lora.py: a group of LoRA layers over frozen 4-bit bases (LoraProducts, then the base
GEMM) against the plain autograd composition base_i(x) + s_i·B_i·A_i·D_i(x), forward and every
gradient, with and without dropout; on the CPU through the torch reference dequantize and the
dropout's CPU masks (the kernels' own tests compare those with the Triton kernels)."""

from __future__ import annotations

import types

import pytest
import torch

from qlora.kernels.dequant import dequantize_4bit, packed_from_bnb
from qlora.kernels.matmul_4bit import Base4bit
from qlora.kernels.dropout import seeded_dropout, seeded_dropout_values
from qlora.kernels.lora import LoraGroup, lora_4bit

from test_dequant_kernel import quantized_weight  # noqa: E402


def group_of(widths, in_features=64, r=4, p=0.0, seed=0, same_scale=False):
    g = torch.Generator().manual_seed(seed)
    params = [quantized_weight(rows, in_features, s) for s, rows in enumerate(widths)]
    bases = [Base4bit(types.SimpleNamespace(weight=w)) for w in params]
    weights = [dequantize_4bit(packed_from_bnb(w)) for w in params]
    As = [torch.randn(r, in_features, generator=g, requires_grad=True) for _ in widths]
    Bs = [torch.randn(rows, r, generator=g, requires_grad=True) for rows in widths]
    group = LoraGroup(scales=tuple(2.0 if same_scale else 0.5 + i for i in range(len(widths))),
                      salts=tuple(10 * i + 1 for i in range(len(widths))),
                      out_features=tuple(widths), p=p,
                      metas=tuple(b.meta for b in bases),
                      tensors=tuple(t for b in bases for t in b.tensors()))
    return group, weights, As, Bs


def plain(x, seed, group, weights, As, Bs):
    outs = []
    for w, a, b, s, salt in zip(weights, As, Bs, group.scales, group.salts):
        dropped = seeded_dropout(x, seed, salt, group.p)  # autograd's, on any device
        outs.append(x @ w.t() + s * (dropped @ a.t()) @ b.t())
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("same_scale", [False, True])  # one config's scale: the one-kernel cast
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("widths", [(48,), (48, 16, 16)])
def test_lora_group_equals_the_plain_composition_and_its_gradients(widths, p, same_scale):
    group, weights, As, Bs = group_of(widths, p=p, same_scale=same_scale)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    seed = torch.tensor(1234, dtype=torch.int64)
    dy = torch.randn(3, 5, sum(widths), generator=g)
    leaves = (x, *As, *Bs)

    want = plain(x, seed, group, weights, As, Bs)
    want_grads = torch.autograd.grad(want, leaves, dy)
    got = lora_4bit(x, seed, group, As + Bs)
    got_grads = torch.autograd.grad(got, leaves, dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["x"] + [f"A{i}" for i in range(len(As))] + [f"B{i}" for i in range(len(Bs))],
                          got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
    if p:  # the masks act, and each layer has its own
        masks = [seeded_dropout_values(torch.ones(15, 64), seed, salt, p) != 0 for salt in group.salts]
        assert not bool(masks[0].all())
        assert all(not torch.equal(masks[0], m) for m in masks[1:])


def test_an_input_without_gradient_still_gives_the_adapters_theirs(monkeypatch):
    """Layer 0's q, k, v read the frozen embeddings: no input gradient, and no base GEMM for it
    (backward dequantizes nothing)."""
    from qlora.kernels import matmul_4bit

    group, weights, As, Bs = group_of((48, 16), p=0.25)
    x = torch.randn(2, 6, 64)
    seed = torch.tensor(5, dtype=torch.int64)
    dy = torch.randn(2, 6, 64)
    want = torch.autograd.grad(plain(x, seed, group, weights, As, Bs), As + Bs, dy)
    out = lora_4bit(x, seed, group, As + Bs)
    calls = []
    build = matmul_4bit.dequantize_group
    monkeypatch.setattr(matmul_4bit, "dequantize_group",
                        lambda packs, dtype: calls.append(1) or build(packs, dtype))
    got = torch.autograd.grad(out, As + Bs, dy)
    assert calls == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
