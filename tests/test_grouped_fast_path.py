"""The grouped fast path (SpeedPlan(fast_base=True, grouped=True)): q, k, v and gate, up through one base
GEMM over their stacked 4-bit weights, against the per-projection fast path; dequantize's out=;
the fallback where a group cannot be formed; and that the module tree, state_dict and saved
adapters are those of the ungrouped model.

The Triton pieces run through Triton's interpreter in a subprocess (test_dequant_kernel.interpreted).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import test_step_parts
from qlora.adapters import AdapterConfig, attach_adapters, save_adapter, set_dropout_seed
from qlora.errors import QloraError
from qlora.kernels import matmul_4bit
from qlora.kernels.dequant import dequantize_4bit, packed_from_bnb
from qlora.kernels.matmul_4bit import Base4bit, Matmul4bit
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed, grouped_modules, use_fast_path

from test_dequant_kernel import assert_same_runs, interpreted, quantized_weight  # noqa: E402
from test_step_parts import TINY, tiny_model  # noqa: E402


def tiny_family_model(family: str, dropout: float):
    """test_step_parts' tiny NF4 model with LoRA on all seven projections, as `family` (qwen2:
    biases on q, k and v)."""
    saved = test_step_parts.TINY
    test_step_parts.TINY = dict(saved, model_type=family)
    try:
        return tiny_model(dropout, quant="nf4")
    finally:
        test_step_parts.TINY = saved


def ungrouped_and_grouped_runs(family: str, dropout: float, checkpointing: bool = True,
                               fused_kernels: bool = False):
    """(loss, adapter gradients) of one step on the fast path with grouped=False, then
    grouped=True; LoRA dropout (when on) seeded, with the same seed in both runs. fused_kernels:
    the plan's switch (the fused ops run only under Triton: the interpreter on the CPU)."""
    model = tiny_family_model(family, dropout)
    model.gradient_checkpointing = checkpointing
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    runs = []
    for group in (False, True):
        applied = apply_speed(model, SpeedPlan(fused_kernels=fused_kernels, fast_base=True,
                                               grouped=group, seeded_dropout=True))
        assert applied.fast_layers == 14
        assert grouped_modules(model) == (4 if group else 0)  # 2 layers x (attention, MLP)
        model.zero_grad()
        set_dropout_seed(applied.dropout_seed, run_seed=3, micro_batch_index=1,
                         stride=applied.dropout_stride)
        loss = model(ids, labels=ids)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    return runs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grouped_path_gives_the_per_projection_loss_and_adapter_gradients(family, dropout,
                                                                          monkeypatch):
    groups = []
    build = matmul_4bit.dequantize_group
    # every 4-bit matmul dequantizes through dequantize_group; a group is more than one weight
    monkeypatch.setattr(matmul_4bit, "dequantize_group",
                        lambda packs, dtype: (len(packs) > 1 and groups.append(1)) or build(packs, dtype))
    runs = ungrouped_and_grouped_runs(family, dropout)
    assert_same_runs(runs)
    # the grouped GEMM did run: 4 groups in forward, 4 recomputed (checkpointing), and none in
    # backward, which takes the dense weights the rerun kept (kept_weights.rerun_keeps_weights)
    assert len(groups) == 4 + 4 + 0
    if dropout:  # the masks act: the gradients differ from the dropout-free step's
        plain = ungrouped_and_grouped_runs(family, 0.0)
        assert not torch.allclose(plain[1][1][0], runs[1][1][0])


def test_qwen2_biases_reach_the_grouped_output():
    """The grouped path adds each member's bias to its own columns: shifting k's bias shifts only
    k's output, as the per-projection path does."""
    model = tiny_family_model("qwen2", 0.0)
    apply_speed(model, SpeedPlan(fast_base=True, grouped=True))
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = attn.k_proj(x), attn.q_proj(x)
        grouped = dict(zip("qkv", grouped_qkv(attn, x)))
        attn.k_proj.base_layer.bias.add_(1.0)
        shifted = dict(zip("qkv", grouped_qkv(attn, x)))
    torch.testing.assert_close(grouped["k"], before[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped["q"], before[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted["k"], grouped["k"] + 1.0, rtol=1e-5, atol=1e-5)
    assert torch.equal(shifted["q"], grouped["q"]) and torch.equal(shifted["v"], grouped["v"])


def grouped_qkv(attn, x):
    from qlora.adapters import grouped_forward

    return grouped_forward(x, (attn.q_proj, attn.k_proj, attn.v_proj))


def test_grouped_matmul_equals_separate_products_with_their_gradients():
    """x @ [W_q; W_k; W_v]ᵀ + addend: the concatenation of the separate products, and gradients
    (x; the addend's producer) of the plain torch expression."""
    params = [quantized_weight(rows, 64, seed) for seed, rows in enumerate((48, 16, 16))]
    bases = [Base4bit(types.SimpleNamespace(weight=p)) for p in params]
    weights = [dequantize_4bit(packed_from_bnb(p)) for p in params]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    h = torch.randn(3, 5, 80, generator=g, requires_grad=True)
    B = torch.randn(80, 80, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 80, generator=g)

    want = torch.cat([x @ w.t() for w in weights], dim=-1) + F.linear(h, B)
    want_grads = torch.autograd.grad(want, (x, h, B), dy)
    metas, tensors = tuple(b.meta for b in bases), [t for b in bases for t in b.tensors()]
    got = Matmul4bit.apply(x, F.linear(h, B), metas, *tensors)
    got_grads = torch.autograd.grad(got, (x, h, B), dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dequantize_into_a_row_slice_equals_the_plain_dequantize():
    """The torch reference with out=: the same bits in the slice, the rest of the buffer kept;
    a buffer that does not fit is a QloraError."""
    p = packed_from_bnb(quantized_weight(24, 64, seed=3))
    for dtype in (torch.float32, torch.bfloat16):
        buffer = torch.full((40, 64), float("nan"), dtype=dtype)
        got = dequantize_4bit(p, dtype, out=buffer[8:32])
        assert got.data_ptr() == buffer[8:32].data_ptr()
        assert torch.equal(buffer[8:32], dequantize_4bit(p, dtype))
        assert bool(buffer[:8].isnan().all()) and bool(buffer[32:].isnan().all())
    with pytest.raises(QloraError, match="out="):
        dequantize_4bit(p, torch.float32, out=torch.empty(24, 65)[:, :64])  # not contiguous
    with pytest.raises(QloraError, match="out="):
        dequantize_4bit(p, torch.bfloat16, out=torch.empty(24, 64))  # another dtype


KERNEL_OUT_CHECK = r"""
import json, torch
from qlora.kernels.dequant import dequantize_4bit_triton, dequantize, packed_from_bnb
from qlora.kernels.dropout import use_triton
from test_dequant_kernel import quantized_weight

results = {}
# 24 x 64 (whole blocks), 33 x 17 (a block that straddles rows, a partial last block)
for rows, cols in ((24, 64), (33, 17)):
    p = packed_from_bnb(quantized_weight(rows, cols, seed=rows))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buffer = torch.full((rows + 11, cols), float("nan"), dtype=dtype)
        dequantize(p, dtype, out=buffer[5:5 + rows])  # the dispatcher: the kernel here
        plain = dequantize_4bit_triton(p, dtype)
        results[f"{rows}x{cols}-{dtype}"] = bool(
            torch.equal(buffer[5:5 + rows], plain) and buffer[:5].isnan().all()
            and buffer[5 + rows:].isnan().all())
print(json.dumps(dict(results=results, kernel_runs=use_triton(p.data))))
"""


def test_dequantize_kernel_into_a_row_slice_equals_the_plain_kernel_bit_for_bit():
    out = interpreted(KERNEL_OUT_CHECK)
    assert out["kernel_runs"]
    assert len(out["results"]) == 6 and all(out["results"].values()), out["results"]


MODEL_CHECK = r"""
import json, torch
from qlora.kernels import dequant
from test_dequant_kernel import assert_same_runs
from test_grouped_fast_path import ungrouped_and_grouped_runs

launches = []
build = dequant._dequantize_kernel
dequant._dequantize_kernel = lambda: launches.append(1) or build()
assert_same_runs(ungrouped_and_grouped_runs("qwen2", 0.1, checkpointing=False))
print(json.dumps(dict(kernel_launches=len(launches))))
"""


def test_grouped_path_through_the_kernels_gives_the_per_projection_results():
    """The comparison through the interpreted dequantize and dropout kernels (qwen2: q/k/v biases;
    without checkpointing, to keep the interpreter's work small). Each run dequantizes all 14
    weights in forward and 11 in backward (layer 0's q, k, v read the frozen embeddings)."""
    assert interpreted(MODEL_CHECK)["kernel_launches"] == 2 * (14 + 11)


FUSED_CHECK = r"""
import json, torch
from qlora.kernels import fused
from qlora.speed import SpeedPlan, apply_speed
from saved_bytes import layer_saved_bytes
from test_dequant_kernel import assert_same_runs
from test_grouped_fast_path import tiny_family_model, ungrouped_and_grouped_runs

calls = {"swiglu": 0, "swiglu_packed": 0}
packed_inputs = []
for name in calls:  # count what the MLP routes through; keep swiglu_packed's input
    def counted(*args, _name=name, _fn=getattr(fused, name)):
        calls[_name] += 1
        if _name == "swiglu_packed":
            packed_inputs.append(args[0])
        return _fn(*args)
    setattr(fused, name, counted)

assert_same_runs(ungrouped_and_grouped_runs("qwen2", 0.1, checkpointing=False, fused_kernels=True))
out = dict(calls=dict(calls))

# What autograd keeps in one MLP, per token (the difference of two lengths: weight-sized tensors
# such as the quant state and the LoRA B products cancel), grouped and not
model = tiny_family_model("llama", 0.0).train()
apply_speed(model, SpeedPlan(fused_kernels=True))
mlp = model.model.layers[0].mlp
owned = [*model.parameters(), *model.buffers()]

def mlp_saved_bytes(tokens):
    x = torch.randn(1, tokens, 64, requires_grad=True)
    return layer_saved_bytes(lambda x, *_: mlp(x), x, None, None, owned + [x])

per_token = {}
for group in (False, True):
    apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=group))
    per_token[str(group)] = (mlp_saved_bytes(24) - mlp_saved_bytes(8)) / 16
kept = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
    mlp(torch.randn(1, 8, 64, requires_grad=True))
packed = packed_inputs[-1]
out.update(per_token=per_token, packed_shape=list(packed.shape),
           packed_kept=sum(t.data_ptr() == packed.data_ptr() and t.shape == packed.shape
                           for t in kept))
print(json.dumps(out))
"""


def test_grouped_fused_mlp_reads_the_packed_gate_up_output_in_place():
    """With fused kernels on, the grouped MLP hands the one [.., 2·I] gate/up output to
    fused.swiglu_packed (no copies of its halves, one gradient tensor back): the step's loss and
    adapter gradients are the ungrouped fused path's; autograd keeps that output itself, and per
    token the MLP keeps what the ungrouped one does (gate + up, down_proj's input, 3 LoRA A
    outputs: what qlora.memory counts), so no copy of gate or up is kept beside it."""
    out = interpreted(FUSED_CHECK)
    # 2 layers, no checkpointing: swiglu in the ungrouped run, swiglu_packed in the grouped one
    assert out["calls"] == {"swiglu": 2, "swiglu_packed": 2}, out
    assert out["packed_shape"] == [1, 8, 2 * TINY["intermediate_size"]], out
    assert out["packed_kept"] == 1, out
    i, r = TINY["intermediate_size"], 4
    assert out["per_token"] == {"False": 4 * (3 * i + 3 * r), "True": 4 * (3 * i + 3 * r)}, out


def targeted_model(targets: list[str], use_dora: bool = False):
    torch.manual_seed(0)
    model = random_model(spec_from_config(dict(TINY)),
                         QuantConfig(method="nf4", compute_dtype=torch.float32), seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=targets,
                                         use_dora=use_dora))
    return model


@pytest.mark.parametrize("targets,use_dora,switched", [
    (["q_proj", "v_proj"], False, 4),  # k_proj, gate_proj, up_proj are plain 4-bit linears
    (["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], True, 10),  # DoRA: no grouping
])
def test_modules_whose_members_cannot_group_keep_the_per_projection_path(targets, use_dora,
                                                                         switched):
    model = targeted_model(targets, use_dora)
    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    losses = []
    for group in (False, True):
        assert apply_speed(model, SpeedPlan(fast_base=True, grouped=group)).fast_layers == switched
        assert grouped_modules(model) == 0
        losses.append(model(ids, labels=ids).detach())
    assert torch.equal(losses[0], losses[1])


def test_grouping_leaves_the_module_tree_state_dict_and_saved_adapter_unchanged(tmp_path):
    model = tiny_family_model("qwen2", 0.0)
    names_before = [n for n, _ in model.named_parameters()]
    state_before = list(model.state_dict())
    save_adapter(model, tmp_path / "before", "tiny")
    apply_speed(model, SpeedPlan(fast_base=True, grouped=False))
    modules_ungrouped = [n for n, _ in model.named_modules()]
    use_fast_path(model)  # grouped by default
    assert grouped_modules(model) == 4
    assert [n for n, _ in model.named_modules()] == modules_ungrouped
    assert [n for n, _ in model.named_parameters()] == names_before
    assert list(model.state_dict()) == state_before
    save_adapter(model, tmp_path / "after", "tiny")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "before" / name).read_bytes()
    # and group=False turns grouping off again
    use_fast_path(model, group=False)
    assert grouped_modules(model) == 0
