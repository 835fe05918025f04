"""Mixtral and Qwen3-MoE (models/families/moe_blocks.py) against transformers, bitsandbytes and
PEFT on tiny random models: logits, router logits, the load-balancing loss, 4-bit experts,
adapters on the experts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fp32_bnb_reference
from test_generic import with_config
from qlora.adapters import AdapterConfig, attach_adapters, load_adapter, save_adapter
from qlora.errors import QloraError
from qlora.models import load_model
from qlora.quant import QuantConfig

FP32 = torch.float32
# name → (family, config overrides): Mixtral; Qwen3-MoE with a dense layer (mlp_only_layers) and
# renormalised weights; Qwen3-MoE with decoder_sparse_step 2 and weights not renormalised
MOE_VARIANTS = {
    "mixtral": ("mixtral", {}),
    "qwen3-moe": ("qwen3_moe", {"mlp_only_layers": [1], "output_router_logits": True}),
    "qwen3-moe-step": ("qwen3_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2,
                                     "norm_topk_prob": False}),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict:
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-moe")
    return {name: build_tiny_model(root / name, family, seed=i, **overrides)
            for i, (name, (family, overrides)) in enumerate(MOE_VARIANTS.items())}


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def token_batch(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(6, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_logits_and_router_logits_match_transformers(moe_models, variant):
    path, ids = moe_models[variant], token_batch()
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    with torch.no_grad():
        expected = hf_model(path)(ids, output_router_logits=True)
        got = ours(ids)
    # fp32, the same operations in the same order: equal to rounding (1e-5 relative)
    assert rel_err(expected.logits, got) <= 1e-5
    ours_router = ours.router_logits()
    assert len(ours_router) == len(expected.router_logits) >= 1
    for theirs, mine in zip(expected.router_logits, ours_router):
        assert rel_err(theirs, mine) <= 1e-5


def test_dense_layers_follow_mlp_only_layers_and_sparse_step(moe_models):
    from qlora.models.families.moe_blocks import SparseMoeBlock

    layers = load_model(moe_models["qwen3-moe"], QuantConfig(method="none")).model.layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == [True, False]
    layers = load_model(moe_models["qwen3-moe-step"], QuantConfig(method="none")).model.layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == [False, True, False]


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_aux_loss_and_training_loss_match_transformers(moe_models, variant):
    path, ids = moe_models[variant], token_batch(1)
    labels = ids.clone()
    labels[:, :5] = -100
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    ours.aux_loss = True  # what config.json's output_router_logits turns on
    ref = hf_model(path)
    with torch.no_grad():
        expected = ref(ids, labels=labels, output_router_logits=True)
        summed = ours(ids, labels=labels)
    n_labels = int((labels[:, 1:] != -100).sum())
    # fp32 sums over a few dozen tokens in another order: 1e-5 relative
    assert abs(float(ours.router_aux_loss()) - float(expected.aux_loss)) <= 1e-5 * float(expected.aux_loss)
    assert abs(float(summed) / n_labels - float(expected.loss)) <= 1e-5 * float(expected.loss)


def make_padded_batch(rows: list[list[int]], seed: int = 20) -> dict:
    """data/packing.make_batch of random documents of these lengths, each row's laid end to end
    (a row of several: packed), rows padded to the longest: its real_lengths say where."""
    from qlora.data import make_batch

    docs = [[{"input_ids": token_batch(seed + 10 * r + d, 1, n)[0].tolist(),
              "labels": token_batch(seed + 10 * r + d, 1, n)[0].tolist()}
             for d, n in enumerate(row)] for r, row in enumerate(rows)]
    return make_batch(docs, pad_id=0)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_aux_loss_of_a_padded_batch_matches_transformers_with_its_attention_mask(moe_models,
                                                                              variant):
    """make_batch's padding routes nothing into the load-balancing loss: over the batch's
    real_lengths it is transformers' with the attention_mask of those lengths, and the loss sum
    over the label tokens is transformers' loss (coef · label tokens · aux, as unpadded)."""
    path, batch = moe_models[variant], make_padded_batch([[24], [15], [9]])
    assert batch["real_lengths"].tolist() == [24, 15, 9]
    attention_mask = (torch.arange(24) < batch["real_lengths"][:, None]).long()
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    ours.aux_loss = True
    with torch.no_grad():
        expected = hf_model(path)(batch["input_ids"], attention_mask=attention_mask,
                                  labels=batch["labels"], output_router_logits=True)
        summed = ours(batch["input_ids"], batch["position_ids"], batch["labels"],
                      real_lengths=batch["real_lengths"])
    want = float(expected.aux_loss)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    # fp32 sums over a few dozen tokens in another order: 1e-5 relative
    assert abs(float(ours.router_aux_loss(batch["real_lengths"])) - want) <= 1e-5 * want
    assert abs(float(summed) / n_labels - float(expected.loss)) <= 1e-5 * float(expected.loss)
    # the padding's 24 of 72 rows counted would move it well past that
    assert abs(float(ours.router_aux_loss()) - want) > 1e-3 * want


@pytest.mark.parametrize("rows", [[[7, 12, 5]], [[7, 12], [5, 9]], [[20], [20]]],
                         ids=["packed", "packed-rows-padded", "one-document-rows"])
def test_graph_padding_leaves_the_aux_loss_of_the_eager_step(moe_models, rows):
    """A CUDA graph's rows (graphs.stage_batch: padded to a multiple of 32 here, after
    make_batch's own padding) give the aux loss and loss sum of the batch run eagerly: the
    graph's forward over its staged buffers, on the CPU (the arithmetic needs no CUDA)."""
    from qlora.train.graphs import _Rows, stage_batch

    model = load_model(moe_models["qwen3-moe"], QuantConfig(method="none", compute_dtype=FP32))
    assert model.aux_loss
    batch = make_padded_batch(rows)
    with torch.no_grad():
        eager = model(batch["input_ids"], batch["position_ids"], batch["labels"],
                      real_lengths=batch["real_lengths"])
        eager_aux = model.router_aux_loss(batch["real_lengths"])
        staged = stage_batch(batch["input_ids"], batch["position_ids"], batch["labels"], 32,
                             pinned=False, real_lengths=batch["real_lengths"])
        # padded to 32; varlen offsets for packed rows, none (causal) for one document a row
        assert staged.key[1] == 32 and (staged.key[2] == 0) == (len(rows[0]) == 1)
        graph = _Rows(staged, torch.device("cpu"))
        for name, t in staged.row_buffers().items():  # GraphedSteps._fill's copies
            graph.buffers[name].copy_(t)
        graphed = graph.forward(model, graph.labels)
        graphed_aux = model.router_aux_loss(graph.real_lengths)
        every_row_aux = model.router_aux_loss()
    # fp32: the real tokens' rows route alike (the padding is after them, a document of its own
    # or after a causal one); only sums over more, masked, positions differ: 1e-5 relative
    assert abs(float(graphed_aux) - float(eager_aux)) <= 1e-5 * float(eager_aux)
    assert abs(float(graphed) - float(eager)) <= 1e-5 * float(eager)
    # counted, the graph's padding rows (a quarter or more of them) would move it
    assert abs(float(every_row_aux) - float(eager_aux)) > 1e-3 * float(eager_aux)


def test_aux_loss_follows_output_router_logits(moe_models):
    on = load_model(moe_models["qwen3-moe"], QuantConfig(method="none", compute_dtype=FP32))
    off = load_model(moe_models["mixtral"], QuantConfig(method="none", compute_dtype=FP32))
    assert on.aux_loss and not off.aux_loss  # config.json's output_router_logits


def bnb_reference_with_our_experts(path, ours, quant_type: str, double_quant: bool):
    """transformers + bitsandbytes in 4 bits: attention quantized by bitsandbytes, experts left
    16-bit by transformers 5 (3D parameters, not Linear layers); those are set to our 4-bit
    experts' dense weights, so the two models hold the same weights everywhere."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=FP32)
    ref = fp32_bnb_reference(hf_model(path, quantization_config=config, device_map="cpu"))
    with torch.no_grad():
        for i, layer in enumerate(ours.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            theirs = ref.model.layers[i].mlp.experts
            assert theirs.gate_up_proj.dtype == FP32, "transformers quantized the experts"
            theirs.gate_up_proj.copy_(experts.gate_up_proj.dense_weights(FP32))
            theirs.down_proj.copy_(experts.down_proj.dense_weights(FP32))
    return ref


@pytest.mark.parametrize("variant,quant_type,double_quant", [("mixtral", "nf4", True),
                                                             ("mixtral", "fp4", False),
                                                             ("qwen3-moe", "nf4", True),
                                                             ("qwen3-moe", "fp4", False)])
def test_4bit_bytes_and_logits_match_bitsandbytes(moe_models, variant, quant_type, double_quant):
    import bitsandbytes as bnb
    from safetensors import safe_open

    path = moe_models[variant]
    quant = QuantConfig(method=quant_type, double_quant=double_quant, compute_dtype=FP32)
    ours = load_model(path, quant)
    ref = bnb_reference_with_our_experts(path, ours, quant_type, double_quant)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    quantized = [k for k in ref_state if ".weight." in k or k.endswith("proj.weight")]
    for key in quantized:
        if ref_state[key].dtype == torch.uint8 or ".weight." in key:
            assert torch.equal(ref_state[key], our_state[key]), key
    # each expert's weight: the bytes and scales a Linear4bit of it holds
    stack = ours.model.layers[0].mlp.experts.down_proj.quantized
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.startswith("model.layers.0.")
                   and (k.endswith("experts.2.w2.weight") or k.endswith("experts.2.down_proj.weight")))
        weight = f.get_tensor(key)
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64,
                              compress_statistics=double_quant, quant_type=quant_type).to("cpu")
    assert torch.equal(param.data.view(-1), stack.data[2])
    assert torch.equal(param.quant_state.absmax, stack.absmax[2])
    assert torch.equal(bnb.functional.dequantize_4bit(param.data, param.quant_state),
                       stack.dequantize_member(2))
    ids = token_batch(2)
    with torch.no_grad():
        # the same 4-bit weights computed in fp32 by both: 1e-4 relative, as test_model's
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


def randomized_adapters(model, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_adapter_on_experts_loads_in_peft_with_equal_logits(moe_models, variant, tmp_path):
    from peft import PeftModel

    path, ids = moe_models[variant], token_batch(3)
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.05))
    randomized_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT's LoRA on parameters refuses any other
    peft_model = PeftModel.from_pretrained(hf_model(path), str(tmp_path / "adapter")).eval()
    ours.eval()
    with torch.no_grad():
        # fp32, LoRA added as B(Ax) by us and folded into the weight by PEFT: 1e-5 relative
        assert rel_err(peft_model(ids).logits, ours(ids)) <= 1e-5
    again = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_peft_adapter_loads_into_ours(moe_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, ids = moe_models["mixtral"], token_batch(4)
    peft_model = get_peft_model(hf_model(path), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]))
    randomized_adapters(peft_model, seed=5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(peft_model.eval()(ids).logits, ours(ids)) <= 1e-5  # as above


def test_expert_adapters_start_as_peft_draws_them(moe_models, tmp_path):
    """Under one seed, LoRA on the experts starts as PEFT's target_parameters starts it, to the
    bit: PEFT draws both factors as nn.Linear before its kaiming A and zero B, and ExpertFactor,
    which holds B in another layout, makes that draw too, so the random stream moves alike."""
    from peft import LoraConfig, get_peft_model

    path = moe_models["qwen3-moe"]
    base = hf_model(path)
    torch.manual_seed(7)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).save_pretrained(
        str(tmp_path / "peft"))
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    torch.manual_seed(7)
    attach_adapters(ours, AdapterConfig(r=4, alpha=8,
                                        target_modules="experts.gate_up_proj,experts.down_proj"))
    save_adapter(ours, tmp_path / "ours", str(path))
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(got) == set(want) and any(".lora_A." in k for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_only_down_proj_experts_and_router_frozen(moe_models, tmp_path):
    from peft import PeftModel

    path, ids = moe_models["mixtral"], token_batch(5)
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=2, alpha=4, target_modules="v_proj,experts.down_proj"))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".gate." in n for n in trainable)  # the router stays frozen
    randomized_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", str(path))
    peft_model = PeftModel.from_pretrained(hf_model(path), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, ours.eval()(ids)) <= 1e-5  # as above


def test_dense_mlp_of_a_moe_model_refused_as_target(moe_models):
    model = load_model(moe_models["qwen3-moe"], QuantConfig(method="none"))
    with pytest.raises(QloraError, match="dense MLP"):
        attach_adapters(model, AdapterConfig(target_modules="q_proj,down_proj"))


def test_int8_refused_for_experts(moe_models):
    with pytest.raises(QloraError, match="int8"):
        load_model(moe_models["mixtral"], QuantConfig(method="int8"))


def adapted(path, quant: str, dtype: torch.dtype):
    model = load_model(path, QuantConfig(method=quant, compute_dtype=dtype))
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    randomized_adapters(model)
    return model.train()


def loss_and_grads(model, ids):
    loss = model(ids, labels=ids)
    loss.backward()
    # the first layers' adapter gradients carry the experts' input gradients back through layers
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# fp32: 16-bit experts, and 4-bit in fp32 (the padded batched matmul here, without Triton's
# interpreter; the Triton kernel: tests/test_grouped_gemm_kernel.py); bf16: torch._grouped_mm
@pytest.mark.parametrize("variant,quant,dtype", [
    ("mixtral", "none", FP32), ("mixtral", "nf4", torch.bfloat16),
    ("qwen3-moe", "nf4", FP32), ("qwen3-moe", "nf4", torch.bfloat16)])
def test_grouped_experts_equal_the_loop_over_experts(moe_models, variant, quant, dtype):
    from qlora.speed import SpeedPlan, apply_speed
    from qlora.speed.moe import FastExperts

    path, ids = moe_models[variant], token_batch(6)
    reference, grouped = adapted(path, quant, dtype), adapted(path, quant, dtype)
    apply_speed(grouped, SpeedPlan(grouped_experts=True), log=lambda _: None)
    assert all(m.grouped for m in grouped.modules() if isinstance(m, FastExperts))
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(grouped, ids)
    assert set(want) == set(got) and any("experts" in n for n in got)
    # fp32: the same products summed in another order, 1e-5 in the loss, 1e-4 in gradients
    # carried back through both layers' experts and attention; bf16: each expert's GEMM rounds
    # alike, the k outputs are added in fp32 instead of bf16: 1e-2
    tol, grad_tol = (1e-5, 1e-4) if dtype == FP32 else (1e-2, 1e-2)
    assert abs(got_loss - want_loss) <= tol * abs(want_loss)
    for name in want:
        assert rel_err(want[name].float(), got[name].float()) <= grad_tol, name


FUSED_SWIGLU_STEP = r"""
import json, torch
from qlora.speed import SpeedPlan, apply_speed
from qlora.speed.moe import FastExperts
from test_moe import adapted, loss_and_grads, token_batch

ids = token_batch(6)
exact = adapted(PATH, "nf4", torch.float32)
apply_speed(exact, SpeedPlan(grouped_experts=True), log=lambda _: None)
exact_loss, exact_grads = loss_and_grads(exact, ids)
runs = {}
for experts_fused in (False, True):
    model = adapted(PATH, "nf4", torch.bfloat16)
    apply_speed(model, SpeedPlan(grouped_experts=True, fused_kernels=True), log=lambda _: None)
    for m in model.modules():  # the experts' SwiGLU and row sums alone by torch in the first run
        if isinstance(m, FastExperts):
            m.fused = experts_fused
    loss, grads = loss_and_grads(model, ids)
    errors = [float((exact_grads[n] - grads[n].float()).abs().max() / exact_grads[n].abs().max())
              for n in exact_grads]
    runs[experts_fused] = dict(loss=loss, mean_error=sum(errors) / len(errors),
                               names=sorted(grads) == sorted(exact_grads))
print(json.dumps(dict(torch=runs[False], fused=runs[True])))
"""


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_fused_kernels_of_the_experts_are_as_close_to_fp32_as_torchs(moe_models, variant):
    """The grouped experts' Triton kernels (fused_kernels, run by Triton's interpreter): SwiGLU on
    the packed gate/up output and the row sums (kernels/routing.py), against torch's, both in
    bf16, each measured against the fp32 step: its adapter gradients no further from fp32 than
    torch's. (The kernels themselves against their torch references: tests/test_fused_kernels.py,
    tests/test_routing_kernels.py.)"""
    from test_dequant_kernel import interpreted

    result = interpreted(f"PATH = {str(moe_models[variant])!r}\n" + FUSED_SWIGLU_STEP)
    torch_run, fused = result["torch"], result["fused"]
    assert torch_run["names"] and fused["names"]
    # the kernels round as torch does (silu(gate), then the product; each weighted row, then the
    # fp32 sum), so on a GPU the two runs are one computation but for the order of fp32 sums;
    # Triton's interpreter truncates SwiGLU's conversions instead (not the row sums'), about 3x
    # torch's error a value, which the adapter gradients' distance to fp32 hardly shows
    # (measured 0.98 to 1.01 of torch's): 10% above torch's allows for it and for the tokens
    # whose near-tied router choices tip. What it is for: the experts' packed layout read as the
    # kernel reads it (gate and up swapped: 8x torch's)
    assert fused["mean_error"] <= 1.1 * torch_run["mean_error"]
    # the same bf16 step but for those roundings: the losses 1e-3 apart at most (measured 6e-6)
    assert abs(fused["loss"] - torch_run["loss"]) <= 1e-3 * abs(torch_run["loss"])


def test_expert_offsets_count_as_bincount_does():
    """The grouped path's run ends, counted without bincount's host read: equal to the cumulative
    bincount, experts with no rows (0, 4 and the last two here) included."""
    from qlora.speed.moe import expert_offsets

    flat = torch.tensor([3, 1, 3, 2, 5, 1, 3, 2, 2, 5])
    want = torch.cumsum(torch.bincount(flat, minlength=8), 0).to(torch.int32)
    assert torch.equal(expert_offsets(flat, 8), want)
    assert expert_offsets(flat, 8).tolist() == [0, 2, 5, 8, 8, 10, 10, 10]


@pytest.mark.parametrize("num_experts", [8, 256, 257, 2**15 + 1])
def test_sort_keys_hold_every_expert_id_and_give_the_int64_order(num_experts):
    """The grouped path sorts expert ids in the narrowest type that holds them (fewer radix
    passes): every id fits, the largest surviving the cast, so the stable sort's order is
    int64's."""
    from qlora.speed.moe import expert_id_dtype

    dtype = expert_id_dtype(num_experts)
    assert torch.tensor(num_experts - 1).to(dtype).item() == num_experts - 1
    flat = torch.randint(0, num_experts, (4096,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.argsort(flat.to(dtype), stable=True), torch.argsort(flat, stable=True))


def test_mlp_tiles_leave_the_sparse_blocks_whole(moe_models):
    """Long-sequence MLP tiles (speed.set_long_context) pass a sparse block by: it keeps its
    router logits for the aux loss, and tiles would leave only the last tile's."""
    from qlora.speed import SpeedPlan, apply_speed

    path, ids = moe_models["qwen3-moe"], token_batch(6)  # its config.json has the aux loss on
    reference, tiled = adapted(path, "none", FP32), adapted(path, "none", FP32)
    assert reference.aux_loss
    apply_speed(tiled, SpeedPlan(tile_mlp=4), log=lambda _: None)  # 48 tokens: 12 tiles of 4
    sparse = [hasattr(layer.mlp, "router_logits") for layer in tiled.model.layers]
    assert any(sparse) and not all(sparse)  # the fixture has a dense layer too: it is tiled
    assert all((layer.mlp.sequence_tiling is None) == routes
               for layer, routes in zip(tiled.model.layers, sparse))
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(tiled, ids)
    # the same operations in the same order (the forks add no arithmetic here): fp32 rounding
    # alike, 1e-6 only as room for a library's kernel choice
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss)
    for name in want:
        assert rel_err(want[name].float(), got[name].float()) <= 1e-6, name


def test_stack_dequantize_batched_equals_bitsandbytes_member_by_member():
    from qlora.kernels.experts import dequantize_stack
    from qlora.quant import QuantizedStack

    g = torch.Generator().manual_seed(0)
    for method, nested in (("nf4", True), ("fp4", False)):
        # 6 members of 64 × 100 (100 blocks: a partial nested group of 256 in each)
        stack = QuantizedStack(6, (64, 100), QuantConfig(method=method, double_quant=nested,
                                                         compute_dtype=FP32), "cpu")
        for i in range(6):
            stack.set_member(i, torch.randn(64, 100, generator=g) * (i + 1))
        batched = dequantize_stack(stack, FP32)
        for i in range(6):
            assert torch.equal(batched[i], stack.dequantize_member(i)), (method, i)


STACK_KERNEL_CHECK = r"""
import json, torch
from qlora.kernels.experts import dequantize_stack, dequantize_stack_triton, stack_rows
from qlora.quant import QuantConfig, QuantizedStack
g = torch.Generator().manual_seed(0)
results = {}
# 4 members of 64 x 512 (512 blocks of 64: two whole nested groups each), nf4 nested, in bf16
# and fp32; 4 members of 16 x 64, fp4 without nesting. Rows of every other member (a gate_up
# stack's gates or ups): the second nested group's 32 rows; rows 3 to 9 without nesting
for method, nested, shape, rows, dtypes in (
        ("nf4", True, (64, 512), (32, 64), (torch.float32, torch.bfloat16)),
        ("fp4", False, (16, 64), (3, 9), (torch.float32,))):
    stack = QuantizedStack(4, shape, QuantConfig(method=method, double_quant=nested,
                                                 compute_dtype=torch.float32), "cpu")
    for i in range(4):
        stack.set_member(i, torch.randn(*shape, generator=g) * (i + 1))
    for dtype in dtypes:
        name = f"{method}-{nested}-{shape}-{dtype}"
        got, want = dequantize_stack_triton(stack, dtype), dequantize_stack(stack, dtype)
        results[name] = torch.equal(got, want)
        # members 1 on, whole (views into the stack's rows)
        run = dequantize_stack_triton(stack_rows(stack, 0, shape[0], first=1), dtype)
        results[f"{name}-members-1-on"] = torch.equal(run, want[1:])
        # rows of members 1 and 3 (views of each member's bytes and scales), as the grouped GEMM
        # dequantizes a part of a projection: the kernel and the torch batch
        part = stack_rows(stack, *rows, first=1, step=2)
        for kind, dense in (("kernel", dequantize_stack_triton(part, dtype)),
                            ("torch", dequantize_stack(part, dtype))):
            results[f"{name}-rows-{kind}"] = torch.equal(dense, want[1::2, rows[0]:rows[1]])
print(json.dumps(results))
"""


def test_stack_dequantize_kernel_equals_the_torch_batch():
    from test_dequant_kernel import interpreted

    results = interpreted(STACK_KERNEL_CHECK)
    assert len(results) == 12 and all(results.values()), results


def test_stack_rows_refuse_a_part_off_the_blocks():
    from qlora.kernels.experts import stack_rows
    from qlora.quant import QuantizedStack

    stack = QuantizedStack(2, (64, 512), QuantConfig(method="nf4", double_quant=True), "cpu")
    stack_rows(stack, 32, 64)  # the second nested group of 256 blocks: a view
    with pytest.raises(QloraError, match="quantization block"):
        stack_rows(stack, 16, 64)  # inside the first group


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_merge_folds_the_experts(moe_models, variant, tmp_path):
    from qlora.merge import merge_adapter

    path, ids = moe_models[variant], token_batch(7)
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    # deltas of the base weights' size: folded into W (x(W + BA)) they round as x·W does, where
    # larger ones (0.3) swing the fp32 logits by 1e-4 through two layers of sharp routing
    randomized_adapters(ours, std=0.05)
    save_adapter(ours, tmp_path / "adapter", str(path))
    merged = merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(safe_open(str(path / "model.safetensors"), "pt").keys())  # Hub layout
    folded = load_model(merged, QuantConfig(method="none", compute_dtype=FP32))
    with torch.no_grad():
        # fp32: B(Ax) added against x(W + BA); 1e-5 relative
        assert rel_err(ours.eval()(ids), folded(ids)) <= 1e-5
        assert rel_err(hf_model(merged)(ids).logits, folded(ids)) <= 1e-5  # transformers reads it


def test_train_command_lowers_the_loss(moe_models, tmp_path, capsys):
    """`qlora train` with its defaults (NF4 experts, LoRA on attention and experts, dropout,
    checkpointing, the grouped experts) on Qwen3-MoE with the aux loss on; PEFT loads the result."""
    from peft import PeftModel

    from qlora.cli import main

    path = moe_models["qwen3-moe"]
    rows = [{"prompt": f"{w} = ", "completion": w.upper()}
            for w in ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--model", str(path), "--data", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--micro_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--learning_rate", "2e-2", "--warmup_steps", "0", "--device", "cpu",
            "--max_seq_length", "64", "--double_quant", "false", "--logging_steps", "1",
            "--save_steps", "2"]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["lora_dropout"] == 0.0
    PeftModel.from_pretrained(hf_model(path), str(out))  # loads without error

    # checkpoints of a qlora that held the experts' lora_B as PEFT's [out, r·E], not [E, r, out]:
    # resuming one is refused, saying so, where its shapes alone would be named otherwise
    for step in (out / "checkpoints").glob("step-*"):
        saved = load_file(str(step / "trainable.safetensors"))
        assert any(t.ndim == 3 for t in saved.values())  # the experts' lora_B
        save_file({k: t.permute(2, 1, 0).reshape(t.shape[2], -1).contiguous() if t.ndim == 3
                   else t for k, t in saved.items()}, str(step / "trainable.safetensors"))
    capsys.readouterr()
    assert main(args[:args.index("--max_steps") + 1] + ["6"] + args[args.index("--max_steps") + 2:]
                + ["--resume", "latest"]) == 2
    assert "experts' lora_B as an older qlora did" in capsys.readouterr().err


# --- the memory planner (memory/) ---------------------------------------------------------------
PLANNER_CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=128, intermediate_size=64,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=352,
                      moe_intermediate_size=64, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=False, head_dim=32),
}


def planner_config(family: str) -> dict:
    return dict(PLANNER_CONFIGS[family], num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)


@pytest.mark.parametrize("family", list(PLANNER_CONFIGS))
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,experts.down_proj"])
def test_planner_counts_expert_weights_and_adapters(family, targets):
    from qlora import memory
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantizedStack

    config = planner_config(family)
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    held = sum(b.nbytes for m in model.modules() if isinstance(m, QuantizedStack)
               for b in m.buffers()) + model.model.layers[0].mlp.gate.weight.nbytes
    arch, cfg = memory.arch_from_config(config), memory.PlanConfig(r=8, targets=targets,
                                                                   alloc_rounding=False)
    assert memory.weights.expert_stack_bytes(arch, cfg) == held
    attach_adapters(model, AdapterConfig(r=8, alpha=16, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.weights.adapter_param_count(arch, cfg) == trainable


def test_planner_gives_no_mlp_tiles_to_sparse_blocks():
    # apply_speed leaves sparse blocks whole (test_mlp_tiles_leave_the_sparse_blocks_whole): a
    # plan that counted tiles there was lower than the run (Qwen3-30B-A3B at 32k: 32.10 against
    # 32.94 GiB), and the long-context choice would pick tiles that save nothing
    from qlora import memory
    from qlora.memory import PlanConfig, plan

    for shape in ("qwen3-30b-a3b", "mixtral-8x7b"):
        arch = memory.resolve_arch(shape=shape)
        cfg = PlanConfig(seq_len=32768)
        assert plan(arch, cfg).allocated == plan(arch, dataclasses.replace(cfg, tile_mlp=True)).allocated
    # a budget the tiles' undercount fitted (44.2 GiB at 32k: 32.94 counted 32.10 with tiles)
    chosen = memory.long_context_choice(memory.resolve_arch(shape="qwen3-30b-a3b"),
                                        PlanConfig(seq_len=32768), int(44.2 * memory.GiB))
    assert chosen.tile_mlp is False


@pytest.mark.parametrize("family", list(PLANNER_CONFIGS))
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,experts.down_proj"])
def test_planner_routed_activations_equal_what_autograd_keeps(family, targets):
    """A sparse layer on the grouped path (4-bit experts, LoRA, bf16): what autograd keeps equals
    the planner's terms, with a balanced router and with every token sent to the same experts."""
    from saved_bytes import layer_saved_bytes

    from qlora import memory
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.speed import SpeedPlan, apply_speed

    config, r, tokens = planner_config(family), 8, 64
    arch = memory.arch_from_config(config)
    cfg = memory.PlanConfig(r=r, lora_dropout=0.0, targets=targets, seq_len=tokens,
                            alloc_rounding=False, kernels="eager")
    expected = (sum(memory.activations.layer_activation_terms(arch, cfg).values()) * tokens
                + sum(memory.weights.layer_weight_terms(arch, cfg).values()))
    for unbalanced in (False, True):
        model = random_model(spec_from_config(config), QuantConfig(
            method="nf4", double_quant=True, compute_dtype=torch.bfloat16))
        attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=0.0, target_modules=targets))
        apply_speed(model, SpeedPlan(grouped_experts=True), log=lambda _: None)
        layer = model.model.layers[0]
        if unbalanced:  # every token to the same top_k experts
            with torch.no_grad():
                layer.mlp.gate.weight.zero_()
                layer.mlp.gate.weight[:arch.moe.top_k] = torch.linspace(3, 5, arch.moe.top_k)[:, None]
        x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().abs()
        x.requires_grad_(True)
        cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
        owned = [*model.parameters(), *model.buffers(), x, cos, sin]
        assert layer_saved_bytes(layer.train(), x, cos, sin, owned) == expected, unbalanced


FUSED_ROUTED_COUNT = r"""
import json, torch
from saved_bytes import layer_saved_bytes
from qlora import memory
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed
from test_moe import PLANNER_CONFIGS, planner_config

import qlora.kernels.experts as kernels
results = {}
# each family on torch._grouped_mm (the CPU's in bf16, as sm90's), then on the Triton grouped
# GEMM (as GPUs below sm90 run it) with a balanced router and with every token to the same experts
for family, triton, unbalanced in [(f, False, False) for f in PLANNER_CONFIGS] + [
        (f, True, u) for f in PLANNER_CONFIGS for u in (False, True)]:
    if triton:
        kernels.grouped_mm_runs = lambda a, b: False
    config, r, tokens = planner_config(family), 8, 64
    model = random_model(spec_from_config(config), QuantConfig(
        method="nf4", double_quant=True, compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=0.0, target_modules="all-linear"))
    model.train()
    seed = apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                        seeded_dropout=True, grouped_experts=True),
                       log=lambda _: None).dropout_seed
    layer = model.model.layers[0]
    if unbalanced:  # every token to the same top_k experts
        top_k = memory.arch_from_config(config).moe.top_k
        with torch.no_grad():
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:top_k] = torch.linspace(3, 5, top_k)[:, None]
    taken = []
    apply = kernels.TritonGroupedMM.apply
    kernels.TritonGroupedMM.apply = lambda *args: taken.append(1) or apply(*args)
    x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().abs()
    x.requires_grad_(True)
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
    # x not owned: the fused norm keeps its bf16 input, which the plan counts as the layer's
    owned = [*model.parameters(), *model.buffers(), cos, sin, seed]
    saved = layer_saved_bytes(layer, x, cos, sin, owned)
    kernels.TritonGroupedMM.apply = apply
    arch = memory.arch_from_config(config)
    cfg = memory.PlanConfig(r=r, lora_dropout=0.0, seq_len=tokens, alloc_rounding=False,
                            seeded_dropout=True, kernels="fused")
    planned = (sum(memory.activations.layer_activation_terms(arch, cfg).values()) * tokens
               + sum(memory.weights.layer_weight_terms(arch, cfg).values()))
    results[f"{family}, triton {triton}, unbalanced {unbalanced}"] = [saved, planned, len(taken)]
print(json.dumps(results))
"""


def test_planner_routed_activations_equal_what_the_fused_step_keeps():
    """As test_planner_routed_activations_equal_what_autograd_keeps, on the fused path (Triton's
    interpreter): the packed SwiGLU kernel keeps the gate/up output alone, no silu(gate), and the
    fused norms their bf16 inputs; the plan's terms equal what autograd keeps, byte for byte. The
    same with the experts' GEMMs on the Triton grouped GEMM (GPUs below sm90), balanced and with
    every token to the same experts: exact rows, so the one plan holds for either routing."""
    from test_dequant_kernel import interpreted

    results = interpreted(FUSED_ROUTED_COUNT)
    assert len(results) == 3 * len(PLANNER_CONFIGS)
    assert all(saved == planned for saved, planned, _ in results.values()), results
    # the Triton runs took the kernel (the forward's four expert GEMMs at least), the others not
    assert all((launches >= 4) == (", triton True" in name)
               for name, (_, _, launches) in results.items()), results


# measured on an H100 80GB, 2026-12-07 (docs/BENCHMARKS.md, "Mixtures of experts"), graphed,
# experts in parts of 384 MiB: Qwen3 checkpointed as today (the rerun keeping each projection's
# last part), the others before that (without checkpointing nothing is kept; Mixtral then kept
# no part, its plan now 0.58 GiB higher for the last parts of gate_up and down)
@pytest.mark.parametrize("shape,checkpointing,measured_gib", [
    ("qwen3-30b-a3b", True, 21.526),  # 19:31, under a 22.35 GiB cap
    ("qwen3-30b-a3b", False, 34.818),  # 15:03, no cap: what --auto-fit picks from ~47.1 GiB
    ("mixtral-8x7b", True, 25.966)])  # 15:08, under a 37.25 GiB cap
def test_moe_plans_within_10_percent_of_the_graphed_steps_peaks(shape, checkpointing,
                                                                 measured_gib):
    """`qlora plan`'s configuration of the benchmark's step (fused kernels, the input embedding
    on the host, attention not kept, r16 on attention and every expert) against the peak
    allocated bytes train_step.py measured: within 10%, the bound every stored calibration
    point is held to (within 1.5% where measured as today's step; Mixtral 2.6% over)."""
    from qlora import memory

    cfg = memory.PlanConfig(seq_len=2048, keep_attention=0, checkpointing=checkpointing,
                            kernels="fused", embedding_on_host=True)
    planned = memory.plan(memory.resolve_arch(shape=shape), cfg).allocated / memory.GiB
    assert planned == pytest.approx(measured_gib, rel=0.10)


def test_named_moe_shapes_have_their_real_sizes():
    from qlora import memory

    # published totals: Mixtral-8x7B 46.7B, Qwen3-30B-A3B 30.5B
    for name, billions in [("mixtral-8x7b", 46.70), ("qwen3-30b-a3b", 30.53)]:
        assert memory.resolve_arch(shape=name).num_params() / 1e9 == pytest.approx(billions, abs=0.01)


# (the most of a projection's experts dense at once then, the peak allocated GiB measured): runs
# of at most 256 MiB (2026-12-06 11:17: parts of that budget are 192 MiB, 64 MiB or 0.3% of the
# peak off); 768 MiB, each of Qwen3's projections whole (12-06 22:21); parts of 384 MiB, the
# step in a CUDA graph (2026-12-07 12:24)
@pytest.mark.parametrize("part_mib,measured_gib", [(256, 20.906), (768, 21.308), (384, 21.071)])
def test_qwen3_moe_plan_within_10_percent_of_the_h100_peak(monkeypatch, part_mib, measured_gib):
    """The plan of the MoE step measured on a GPU (benchmarks/train_step.py, Qwen3-30B-A3B shape,
    seq 2048, r16 on attention and every expert, dropout 0.05 seeded, attention not kept, host
    embedding, paged 8-bit AdamW; H100 80GB under a 22.35 GiB cap), planned under the experts'
    dense budget it was measured with. Within 10%, the bound every stored calibration
    point is held to."""
    import qlora.kernels.experts as kernels
    from qlora import memory

    monkeypatch.setattr(kernels, "PART_BYTES", part_mib * 2**20)
    cfg = memory.PlanConfig(seq_len=2048, keep_attention=0, embedding_on_host=True)
    planned = memory.plan(memory.resolve_arch(shape="qwen3-30b-a3b"), cfg).allocated / memory.GiB
    assert planned == pytest.approx(measured_gib, rel=0.10)


@pytest.mark.parametrize("variant,arch", [("mixtral", "llama"), ("qwen3-moe", "qwen3moe")])
def test_gguf_export_stacks_the_experts(moe_models, variant, arch, tmp_path):
    """llama.cpp's layout, as its convert_hf_to_gguf.py writes it: each layer's experts stacked
    [E, out, in] as ffn_{gate,up,down}_exps, the router ffn_gate_inp in F32, the expert counts."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from qlora.export.gguf import export_gguf

    from qlora.tiny import build_tiny_model

    # the tests' Qwen3-MoE has a dense layer, which llama.cpp's qwen3moe has not: one without
    path = (moe_models[variant] if variant == "mixtral"
            else build_tiny_model(tmp_path / "qwen3-moe", "qwen3_moe", seed=7))
    out = export_gguf(path, tmp_path / "model.gguf", "f16", log=lambda _: None)
    reader = GGUFReader(str(out))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    assert int(fields[f"{arch}.expert_count"].parts[-1][0]) == 4
    assert int(fields[f"{arch}.expert_used_count"].parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    block = "block_sparse_moe" if variant == "mixtral" else "mlp"
    names = {"ffn_gate_exps": ("w1", "gate_proj"), "ffn_up_exps": ("w3", "up_proj"),
             "ffn_down_exps": ("w2", "down_proj")}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for role, linear in names.items():
            linear = linear[0] if variant == "mixtral" else linear[1]
            want = np.stack([f.get_tensor(f"model.layers.0.{block}.experts.{e}.{linear}.weight").numpy()
                             for e in range(4)]).astype(np.float16)
            got = np.asarray(tensors[f"blk.0.{role}.weight"].data).reshape(want.shape)
            assert np.array_equal(got, want), role
        router = tensors["blk.0.ffn_gate_inp.weight"]
        assert router.tensor_type.name == "F32"
        assert np.array_equal(np.asarray(router.data).reshape(4, 64),
                              f.get_tensor(f"model.layers.0.{block}.gate.weight").numpy())


def test_gguf_export_refuses_what_it_does_not_write(moe_models, tmp_path):
    from qlora.export.gguf import export_gguf

    with pytest.raises(QloraError, match="norm_topk_prob"):  # llama.cpp always renormalises
        export_gguf(moe_models["qwen3-moe-step"], tmp_path / "b.gguf", "f16")
    with pytest.raises(QloraError, match="dense"):  # llama.cpp's qwen3moe: every layer sparse
        export_gguf(moe_models["qwen3-moe"], tmp_path / "c.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_router_aux_loss_option_overrides_config_json(moe_models, tmp_path):
    from qlora.config import load_config
    from qlora.train.model import build_model

    def built(path, value):
        cfg = load_config(None, dict(model=str(path), data="unused.jsonl", output_dir=str(tmp_path),
                                     quant="none", router_aux_loss=value))
        return build_model(cfg, torch.device("cpu"), FP32)

    assert built(moe_models["qwen3-moe"], None).aux_loss  # output_router_logits: true
    assert not built(moe_models["qwen3-moe"], "false").aux_loss
    assert built(moe_models["mixtral"], "true").aux_loss  # output_router_logits: false


def test_a_preference_method_says_where_trl_would_add_the_router_loss(moe_models, tmp_path):
    """config.json's output_router_logits decides for every method; where it leaves the loss
    out of DPO's or KTO's, the log says that TRL's DPOTrainer and KTOTrainer would add it."""
    from qlora.config import load_config
    from qlora.train.model import aux_loss_lines, build_model

    def lines(path, **options):
        cfg = load_config(None, dict(model=str(path), data="unused.jsonl",
                                     output_dir=str(tmp_path), quant="none", **options))
        return aux_loss_lines(build_model(cfg, torch.device("cpu"), FP32), cfg)

    assert lines(moe_models["mixtral"], method="dpo") == [  # output_router_logits: false
        "router_aux_loss: off (config.json's output_router_logits is not true); TRL's "
        "DPOTrainer and KTOTrainer add router_aux_loss_coef (0.001) x the router's "
        "load-balancing loss to the loss regardless: router_aux_loss: true does that"]
    assert lines(moe_models["mixtral"], method="dpo", router_aux_loss="true") == []
    assert lines(moe_models["mixtral"], method="orpo") == []  # TRL's ORPOTrainer: as here
    assert lines(moe_models["mixtral"]) == []  # supervised: as transformers
    assert lines(moe_models["qwen3-moe"], method="kto") == []  # output_router_logits: true


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("method,packed", [("dpo", False), ("dpo", True), ("kto", True)])
def test_preference_step_with_the_router_loss_equals_trl(moe_models, tmp_path, method, packed):
    """A DPO or KTO micro-batch on Qwen3-MoE with its load-balancing loss on, padded or packed
    (a pair's prompt once: its tokens weigh 2, as in TRL's two rows), through the speed layer,
    against TRL's DPOTrainer / KTOTrainer on transformers + peft with the same adapter: the loss
    (TRL's mean + coef x the policy forward's aux), its logged aux_loss and every adapter
    gradient agree to rel 1e-4, as test_preference's steps without experts. The coefficient is
    0.3, so that the aux term (about 0.3 x 1) is far above that bound on a loss of about 0.7."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from qlora.data.preference import pair_batch, unpaired_batch
    from qlora.methods import dpo, kto
    from qlora.methods.preference import PreferenceOptions, batch_loss, metric_means
    from qlora.speed import SpeedPlan, apply_speed
    from test_preference import (_randomize, _router_step_agrees_with_trl, _trl_args,
                                 _trl_pair_inputs, _trl_peft_model, _trl_unpaired_inputs,
                                 _varied_examples)

    path = with_config(moe_models["qwen3-moe"], tmp_path / "model", router_aux_loss_coef=0.3)
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=ATTENTION))
    _randomize(ours, 7, 0.3)
    apply_speed(ours, SpeedPlan())
    ours.loss_chunk_tokens = 5
    ours.train()
    save_adapter(ours, tmp_path / "adapter", str(path))
    examples = _varied_examples("pairs" if method == "dpo" else "unpaired")
    B = len(examples)
    if method == "dpo":
        batch, module, opts = pair_batch(examples, 0, packed), dpo, PreferenceOptions(beta=0.3)
        args = _trl_args(DPOConfig, tmp_path / "trl", B, beta=0.3)
        trainer_class, inputs = DPOTrainer, _trl_pair_inputs(examples)
    else:
        batch, module, opts = unpaired_batch(examples, 0, packed), kto, PreferenceOptions(beta=0.2)
        args = _trl_args(KTOConfig, tmp_path / "trl", B, beta=0.2)
        trainer_class, inputs = KTOTrainer, _trl_unpaired_inputs(examples)
    ours.zero_grad()
    loss_sum, sums = batch_loss(module, ours, batch, opts)
    (loss_sum / B).backward()

    trainer, peft_model = _trl_peft_model(trainer_class, args, path, tmp_path / "adapter",
                                          targets=ATTENTION)
    assert trainer.router_aux_loss_coef == 0.3
    their_aux = _router_step_agrees_with_trl(ours, loss_sum, sums, B, trainer, peft_model, inputs)
    if method == "kto":  # an evaluation's one forward over examples and KL sequences: the same
        with torch.no_grad():
            evaluated = metric_means(batch_loss(module, ours, batch, opts)[1])["aux_loss"]
        assert abs(evaluated - their_aux) <= 1e-4 * their_aux


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_greedy_generation_matches_transformers(moe_models, variant):
    from qlora.infer import GenerationOptions, generate

    path, prompt = moe_models[variant], [5, 40, 41, 42, 43, 44]
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    got = generate(ours, prompt, GenerationOptions(max_new_tokens=16))
    out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def test_packed_rows_equal_documents_alone(moe_models):
    """Routing is per token: a packed row's documents route and attend as they do alone."""
    model = load_model(moe_models["qwen3-moe"], QuantConfig(method="none", compute_dtype=FP32))
    docs = [token_batch(8, 1, 7)[0], token_batch(9, 1, 12)[0], token_batch(10, 1, 5)[0]]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions)
        alone = model(docs[1][None])
    # fp32, the same rows through masked instead of causal attention: 1e-5
    torch.testing.assert_close(packed[0, 7:19], alone[0], rtol=1e-5, atol=1e-5)


def test_aux_loss_gradient_survives_checkpointing(moe_models):
    """The router logits leave each checkpointed layer beside its output: the load-balancing
    loss's gradient must reach the adapters the same with checkpointing as without."""
    from qlora.speed import SpeedPlan, apply_speed

    ids, grads = token_batch(11), []
    for checkpointing in (False, True):
        model = adapted(moe_models["qwen3-moe"], "none", FP32)
        apply_speed(model, SpeedPlan(grouped_experts=True, seeded_dropout=True), log=lambda _: None)
        model.gradient_checkpointing = checkpointing
        model(ids, labels=ids)
        model.router_aux_loss().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name in grads[0]:  # the same forward run again: equal to the bit
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_a_forward_drops_the_last_forwards_router_logits_before_its_first_layer(moe_models):
    """The kept router logits hold their forward's autograd graph and with it the adapters'
    gradient accumulators, which a new forward would reuse, bound to the stream they were made
    on: a CUDA graph's capture after an eager step failed on that (H100, 2026-12-06). The next
    forward lets them go before its first layer runs."""
    import weakref

    model = adapted(moe_models["qwen3-moe"], "nf4", FP32)
    ids = token_batch(13)
    model(ids, labels=ids).backward()
    last = [weakref.ref(t) for t in model.router_logits()]
    alive_at_first_layer = []
    model.model.layers[0].register_forward_pre_hook(
        lambda *_: alive_at_first_layer.append(any(ref() is not None for ref in last)))
    model(ids, labels=ids)
    assert alive_at_first_layer == [False]


@pytest.mark.parametrize("grouped", [False, True])
def test_a_checkpoint_rerun_leaves_nothing_alive_after_backward(moe_models, grouped):
    """The router logits are the model forward's: a checkpoint's rerun in backward that kept its
    own would hold every tensor the rerun saved, layer after layer, until the next forward."""
    from live_bytes import LiveBytes

    from qlora.speed import SpeedPlan, apply_speed

    model = adapted(moe_models["qwen3-moe"], "nf4", torch.bfloat16)
    apply_speed(model, SpeedPlan(grouped_experts=grouped, seeded_dropout=True), log=lambda _: None)
    model.gradient_checkpointing = True
    ids = token_batch(12)
    count = LiveBytes()
    with count:
        loss = model(ids, labels=ids)
        forward_logits = model.router_logits()
        loss.backward()
        del loss
    assert all(a is b for a, b in zip(model.router_logits(), forward_logits))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in forward_logits + grads}
    assert count.current == sum(kept.values())  # the forward's logits and the adapters' grads


def test_row_parts_cover_every_row_within_the_budget():
    from qlora.kernels.experts import GROUPED_MM_ROWS, PART_BYTES, row_alignment, row_parts

    mib = 2**20
    # Qwen3-30B-A3B: gate_up (128 experts x 1,536 x 2,048, 768 MiB dense) one part for the gates
    # and one for the ups; down (384 MiB) whole. Mixtral-8x7B's gate_up (1.75 GiB) in three parts
    # of each member: 4 rows begin a nested group (16,384 values over 4,096 columns), 8 make a
    # width torch._grouped_mm takes (16-byte rows in bf16)
    assert row_parts(1536, 128 * 2048 * 2, row_alignment(2048, 64, 256), 2) == (
        (0, 768), (768, 1536))
    assert row_parts(2048, 128 * 768 * 2, row_alignment(768, 64, 256)) == ((0, 2048),)
    assert row_alignment(4096, 64, 256) == 8 and row_alignment(768, 64, 256) == 64
    assert row_alignment(768, 64, None) == GROUPED_MM_ROWS == row_alignment(768, None, None)
    mixtral = row_parts(28672, 8 * 4096 * 2, row_alignment(4096, 64, 256), 2)
    assert len(mixtral) == 6 and mixtral[3][0] == 14336
    assert all((stop - start) % GROUPED_MM_ROWS == 0 for start, stop in mixtral)
    # the even size rounded up to the alignment (39 rows to 64) would pass the budget: 32 rows
    assert row_parts(155, 9248730, 32) == ((0, 32), (32, 64), (64, 96), (96, 128), (128, 155))
    for rows, row_bytes, align, members in ((1536, 128 * 2048 * 2, 8, 2), (28672, 65536, 8, 2),
                                            (4096, 8 * 14336 * 2, 8, 1), (100, 9 * mib, 7, 1),
                                            (64, 64 * mib, 64, 1), (155, 9248730, 32, 1)):
        parts = row_parts(rows, row_bytes, align, members)
        assert [r for start, stop in parts for r in range(start, stop)] == list(range(rows))
        member_rows = rows // members
        for start, stop in parts:  # within one member, from an aligned row of it
            assert start // member_rows == (stop - 1) // member_rows or len(parts) == 1
            assert (start % member_rows) % align == 0
            # within the budget, unless one aligned step of rows is over it
            assert (stop - start) * row_bytes <= max(PART_BYTES, align * row_bytes)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_experts_in_parts_equal_all_at_once(moe_models, monkeypatch, quant):
    """Each projection in parts of its output rows (the budget shrunk so that each of the tiny
    model's goes in parts of the fewest aligned rows: nf4's gates then its ups, the 16-bit
    weights' a row at a time): the forward's outputs are the same dot products, though a GEMM
    of one output row may sum them in another order than the whole one (the CPU's does: the
    logits differ by ~1e-7), so the loss within 1e-6 relative (a few roundings of 2^-24, 6e-8);
    the input gradients are sums over the parts of shorter dot products, so the adapters'
    gradients differ by reassociation alone, carried back through both layers: 1e-5, as the
    fp32 grouped-against-loop loss."""
    dtype = FP32
    import qlora.kernels.experts as kernels
    import qlora.speed.moe as moe
    from qlora.speed import SpeedPlan, apply_speed

    path, ids = moe_models["mixtral"], token_batch(6)
    results, parts = [], []
    for budget in (kernels.PART_BYTES, 1):  # all at once; then the smallest parts
        monkeypatch.setattr(kernels, "PART_BYTES", budget)
        torch.manual_seed(0)
        model = adapted(path, quant, dtype)
        apply_speed(model, SpeedPlan(grouped_experts=True), log=lambda _: None)
        experts = model.model.layers[0].mlp.experts
        parts.append(moe.expert_parts(experts.gate_up_proj, dtype))
        results.append(loss_and_grads(model, ids))
    assert len(parts[0]) == 1 and len(parts[1]) >= 2  # nf4: the gates, then the ups
    (want_loss, want), (got_loss, got) = results
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss) and set(got) == set(want)
    for name in want:
        assert rel_err(want[name], got[name]) <= 1e-5, name


@pytest.mark.parametrize("rerun", [False, True])
def test_grouped_base_in_four_parts_sums_each_parts_input_gradient(rerun):
    """GroupedBase over a projection in four parts of output rows (fp64, so the products are
    exact to the comparison): the output and x's gradient equal the whole weight's, per expert;
    inside a checkpoint's rerun the last part made is kept and its backward makes only the other
    three, taking it (nothing is left kept); outside one, backward makes all four."""
    from qlora.kernels import kept_weights
    from qlora.kernels.experts import GroupedBase

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)  # [E, out, in]
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 8, generator=g, dtype=torch.float64)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 has no rows
    made = []

    def part(dtype, start, stop):
        made.append((start, stop))
        return weight[:, start:stop].to(dtype)

    parts = ((0, 2), (2, 4), (4, 6), (6, 8))
    with kept_weights.rerun_keeps_weights() if rerun else contextlib.nullcontext():
        y = GroupedBase.apply(x, offsets, part, parts, "projection")
    forward = list(made)
    y.backward(dy)
    want_y = torch.cat([x[:2] @ weight[0].T, x[2:] @ weight[2].T])
    want_dx = torch.cat([dy[:2] @ weight[0], dy[2:] @ weight[2]])
    assert torch.allclose(y, want_y, rtol=1e-12, atol=0) and forward == list(parts)
    assert torch.allclose(x.grad, want_dx, rtol=1e-12, atol=0)
    assert made[4:] == list(reversed(parts[:-1] if rerun else parts))  # the last part first
    assert kept_weights._kept == {}


@pytest.mark.parametrize("budget", ["whole", "parts"])
def test_a_checkpoint_rerun_keeps_each_projections_last_part_for_its_backward(moe_models,
                                                                            monkeypatch, budget):
    """A checkpointed sparse layer's rerun dequantizes its experts again and keeps each
    projection's last part made (the whole projection where it is made in one) for its backward
    (kernels/experts.GroupedBase, kernels/kept_weights), which runs that part first and
    dequantizes only the others again (so what is held stays within PART_BYTES a projection).
    Loss and adapter gradients are the step's without checkpointing to the bit (the rerun makes
    the same dense weights), and nothing kept outlives the backward."""
    import qlora.kernels.experts as kernels
    import qlora.speed.moe as moe
    from qlora.kernels import kept_weights
    from qlora.models.families.moe_blocks import SparseMoeBlock
    from qlora.speed import SpeedPlan, apply_speed

    if budget == "parts":
        monkeypatch.setattr(kernels, "PART_BYTES", 1)  # every projection in its smallest parts
    build, ids = moe.dequantize_experts, token_batch(7)
    runs, counts = [], []
    for checkpointing in (False, True):
        model = adapted(moe_models["mixtral"], "nf4", FP32)
        apply_speed(model, SpeedPlan(grouped_experts=True, seeded_dropout=True),
                    log=lambda _: None)
        model.gradient_checkpointing = checkpointing
        calls = []
        monkeypatch.setattr(moe, "dequantize_experts",
                            lambda stack, dtype: calls.append(stack.shape) or build(stack, dtype))
        loss = model(ids, labels=ids)
        forward = len(calls)
        loss.backward()
        counts.append((forward, len(calls) - forward))
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                     if p.grad is not None}))
    layers = sum(isinstance(m, SparseMoeBlock) for m in model.modules())
    experts = model.model.layers[0].mlp.experts
    parts = [len(moe.expert_parts(p, FP32)) for p in (experts.gate_up_proj, experts.down_proj)]
    # in parts: gate_up as its gates, then its ups; down's rows cannot be parted on an aligned
    # boundary here, so it stays whole (and kept): both cases in one step
    assert parts == [1, 1] if budget == "whole" else parts[0] >= 2 and parts[1] == 1
    made = layers * sum(parts)  # dequantize calls over every projection once
    kept = layers * len(parts)  # each projection's last part
    assert counts[0] == (made, made)  # forward, and backward's input gradients
    assert counts[1] == (made, made + made - kept)  # and the rerun, which keeps the last parts
    assert kept_weights._kept == {}
    (want_loss, want), (got_loss, got) = runs
    assert torch.equal(got_loss, want_loss) and want and set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("targets", ["experts.gate_up_proj,experts.down_proj",
                                     "experts.down_proj"])
def test_a_rerun_keeps_no_expert_weight_its_backward_would_not_take(moe_models, targets):
    """With adapters on the experts alone, the first sparse layer's rows come from the frozen
    embedding and want no gradient: no backward runs for its gate_up (nor, without gate_up's
    adapter, for its down), so its rerun must keep nothing for them: a kept weight would stay
    held through the optimizer step and the next forward. What is kept, later layers' and a
    down whose input carries gate_up's adapter, is taken by its backward."""
    import qlora.speed.moe as moe
    from qlora.kernels import kept_weights
    from qlora.speed import SpeedPlan, apply_speed

    model = load_model(moe_models["mixtral"], QuantConfig(method="nf4", compute_dtype=FP32))
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0, target_modules=targets))
    apply_speed(model, SpeedPlan(grouped_experts=True, seeded_dropout=True), log=lambda _: None)
    model.gradient_checkpointing = True
    experts = model.model.layers[0].mlp.experts
    no_backward = [moe.base_of(experts.gate_up_proj)]
    if "gate_up" not in targets:
        no_backward.append(moe.base_of(experts.down_proj))
    kept_keys, keep = [], kept_weights.keep
    kept_weights.keep = lambda key, weight: kept_keys.append(key) or keep(key, weight)
    try:
        ids = token_batch(8)
        model(ids, labels=ids).backward()
    finally:
        kept_weights.keep = keep
    assert kept_weights._kept == {}  # everything kept was taken
    bases = [key[0] for key in kept_keys]
    assert not any(b is base for b in bases for base in no_backward)
    assert any(isinstance(b, torch.nn.Module) for b in bases)  # the later layers' were kept


def test_cuda_graphs_refused_names_what_reads_the_host(moe_models, monkeypatch):
    """The fast MoE model is captured only where its experts read nothing on the host: grouped,
    and on this CPU (no Triton interpreter here) torch._grouped_mm taking the operands and every
    part's width (bf16, rows of 16-byte multiples); each other case names its reason. (Where
    Triton runs, a CUDA GPU, the grouped GEMM kernel takes every other case and nothing is
    refused: tests/test_grouped_gemm_kernel.py.)"""
    import qlora.kernels.experts as kernels
    from qlora.speed import SpeedPlan, apply_speed

    def refused(dtype, r=8, plan=SpeedPlan(grouped_experts=True), quant="nf4"):
        model = load_model(moe_models["qwen3-moe"], QuantConfig(method=quant, compute_dtype=dtype))
        attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=0.0))
        apply_speed(model, plan, log=lambda _: None)
        return model.cuda_graphs_refused

    assert refused(torch.bfloat16) is None
    assert "reference loop" in refused(torch.bfloat16, plan=SpeedPlan())
    assert "_grouped_mm" in refused(FP32)  # the padded fallback
    assert "_grouped_mm" in refused(torch.bfloat16, r=4)  # LoRA rows of 8 bytes
    monkeypatch.setattr(kernels, "PART_BYTES", 1)  # every projection in parts: read nothing
    assert refused(torch.bfloat16) is None and refused(torch.bfloat16, quant="none") is None
    monkeypatch.setattr(kernels, "GROUPED_MM_ROWS", 1)  # 16-bit experts' parts a row wide
    assert "_grouped_mm" in refused(torch.bfloat16, quant="none")


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_per_token_losses_equal_transformers(moe_models, variant):
    """A preference method asks the model for each label token's loss (per_token=True, as
    methods/preference.row_logps): a mixture of experts gives transformers' cross-entropy of each
    token, the load-balancing loss left out (qwen3-moe has it on), as it is no token's log-prob;
    then a DPO batch's loss runs on it. fp32, the same operations: rel 1e-5 (rounding)."""
    import torch.nn.functional as F

    from qlora.data.preference import pair_batch
    from qlora.methods import dpo
    from qlora.methods.preference import PreferenceOptions, batch_loss

    path, ids = moe_models[variant], token_batch()
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    with torch.no_grad():
        got = ours(ids, labels=ids, per_token=True)
        logits = hf_model(path)(ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none")
    assert got.shape == want.shape and rel_err(want, got) <= 1e-5
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11, 12]}] * 2
    loss, _ = batch_loss(dpo, ours, pair_batch(pairs, 0), PreferenceOptions())
    assert torch.isfinite(loss)


def test_cuda_graphs_refused_names_mixtrals_router_jitter(tmp_path):
    """Mixtral's router jitter draws from the global RNG in training (speed.apply_speed then
    leaves layers_use_rng on, and train/graphs.unsupported_reason refuses the capture): the
    reason given is the jitter, not the LoRA dropout, which here is off."""
    from qlora.speed import SpeedPlan, apply_speed
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "mixtral", "mixtral", router_jitter_noise=0.01)
    model = load_model(path, QuantConfig(method="nf4", compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    apply_speed(model, SpeedPlan(grouped_experts=True, seeded_dropout=True), log=lambda _: None)
    assert model.layers_use_rng and "jitter" in (model.cuda_graphs_refused or "")


def test_grouped_moe_step_reads_nothing_on_the_host(moe_models, monkeypatch):
    """A training forward (with the load-balancing loss) and backward of the grouped path in bf16
    make no tensor-to-Python read from the MoE code (the routing, the grouped experts, the aux
    loss over a padded batch's real tokens): each would be a host sync on a GPU, and a CUDA
    graph's capture fails on one (the capture itself is gpu_check's). The reads the dense layers make outside a capture (the
    attention layout, which a graph takes from its buffers) are not the MoE code's."""
    import traceback

    from qlora.speed import SpeedPlan, apply_speed

    model = adapted(moe_models["qwen3-moe"], "nf4", torch.bfloat16)
    assert model.aux_loss
    apply_speed(model, SpeedPlan(grouped_experts=True), log=lambda _: None)
    moe_files = ("moe_blocks.py", "speed/moe.py", "kernels/experts.py")
    reads = []

    def recorded(name):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            # the innermost of our frames: the code that asked for the read
            caller = [f for f in traceback.extract_stack() if "/qlora/" in f.filename][-1]
            if caller.filename.endswith(moe_files):
                reads.append((name, caller.filename, caller.lineno))
            return original(tensor, *args, **kwargs)
        return read

    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, recorded(name))
    ids = token_batch(7)
    # the second row padded after 17 tokens: the aux loss's real-token weights made on the device
    model(ids, labels=ids, real_lengths=torch.tensor([24, 17])).backward()
    monkeypatch.undo()
    assert reads == []
    experts = model.model.layers[0].mlp.experts
    assert experts.grouped and experts.gate_up_proj.lora_A.weight.grad is not None


@pytest.mark.parametrize("budget", ["whole", "parts"])
def test_planner_step_peak_bounds_what_a_moe_step_holds(monkeypatch, budget):
    """One checkpointed step of a small Qwen3-MoE-like model (4-bit experts, LoRA on attention
    and every expert, the flat optimizer), its live storage counted op by op: the planner's
    static bytes (weights, adapters, their flat gradient buffer, optimizer states) equal what
    lives between steps, and its peak is at or above the step's, by no more than its documented
    upper bounds (a layer's saved tensors, the gradients in flight and the dequantized experts
    counted as alive together, which they are not quite). Each projection whole, or in its
    smallest parts (gate_up's gates, then its ups: the rerun keeps the last part of each)."""
    from live_bytes import LiveBytes, stepped_nf4_model

    import qlora.kernels.experts as kernels
    import qlora.speed.moe as moe
    from qlora import memory
    from qlora.speed import SpeedPlan

    if budget == "parts":  # the model's step and the plan alike
        monkeypatch.setattr(kernels, "PART_BYTES", 1)
    # as the GPU's stack kernel: the dense run and nothing else (the torch batch makes int64
    # codes and fp32 values beside it); the values do not matter to what is kept
    monkeypatch.setattr(moe, "dequantize_experts", lambda stack, dtype: torch.zeros(
        stack.count, *stack.shape, dtype=dtype))
    config = dict(PLANNER_CONFIGS["qwen3_moe"], num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                  norm_topk_prob=True)
    tokens, r = 256, 8
    model, opt, ids = stepped_nf4_model(
        config, SpeedPlan(grouped_experts=True, seeded_dropout=True), tokens, r)
    between_steps = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (
        *model.parameters(), *model.buffers(), *(p.grad for g in opt.param_groups for p in g["params"]),
        *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))}
    count = LiveBytes()
    with count:
        model(ids, labels=ids).backward()
    measured = sum(between_steps.values()) + count.peak

    plan = memory.plan(memory.arch_from_config(config), memory.PlanConfig(
        r=r, lora_dropout=0.0, seq_len=tokens, alloc_rounding=False, kernels="eager",
        optimizer="adamw_torch", embedding_on_host=False))
    assert plan.flat_grads
    # between steps: what the plan leaves out are small buffers (the rotary frequencies, each
    # 4-bit linear's code books, the optimizer's step counter): 10 KB of 1.5 MB here, under 1%
    static = plan.static + plan.adapter_grads
    assert abs(static - sum(between_steps.values())) <= 0.01 * static
    # the step: no CUDA workspaces or batch tensors on the CPU
    predicted = plan.allocated - memory.sizes.CUBLAS_WORKSPACE_BYTES - 3 * 8 * tokens
    assert plan.peak_phase == "backward of the last layer"
    # at or above the count, by at most 20% of the whole here (the step's peak is 40% of it;
    # at Qwen3-30B-A3B's size the static bytes are 95% of the peak)
    assert measured <= predicted <= 1.2 * measured, (measured, predicted)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_imatrix_gives_each_expert_the_mean_square_of_its_own_tokens(moe_models, variant):
    """llama.cpp's imatrix keeps one vector an expert, averaged over the tokens routed to it:
    gate/up read the block's input, down the expert's SwiGLU of it; keyed by the checkpoint's
    per-expert names, which the exporter looks up for each expert of a stack."""
    import torch.nn.functional as F

    from qlora.export.imatrix import collect
    from qlora.models.families.moe_blocks import SparseMoeBlock
    from qlora.models.families.moe_config import hub_expert_key

    family = MOE_VARIANTS[variant][0]
    model = load_model(moe_models[variant], QuantConfig(method="none", compute_dtype=FP32))
    ids = token_batch(seed=3, batch=1, length=40)[0].tolist()
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    seen = {}
    handle = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0][0]))
    imatrix, tokens = collect(model, [ids])
    handle.remove()
    assert tokens == 40
    x = seen["x"]
    with torch.no_grad():
        _, _, index = block.gate(x)
        experts = block.experts
        for e in range(experts.num_experts):
            routed = (index == e).any(-1)
            keys = [hub_expert_key(family, "model.layers.0", p, e, part)
                    for p, part in (("gate_up_proj", 0), ("gate_up_proj", 1), ("down_proj", 0))]
            if not routed.any():
                assert not any(k in imatrix for k in keys)
                continue
            xe = x[routed]
            gate, up = F.linear(xe, experts.gate_up_proj.expert_weight(e, FP32)).chunk(2, dim=-1)
            h = F.silu(gate) * up
            for key, want in zip(keys, (xe.pow(2).mean(0), xe.pow(2).mean(0), h.pow(2).mean(0))):
                got = torch.from_numpy(imatrix[key])
                assert rel_err(want, got) <= 1e-5, key  # fp32 sums of ~40 squares


def test_gguf_export_weighs_each_expert_by_its_own_importance(tmp_path):
    """A k-quant stack of experts with an importance matrix: each expert's bytes are its own
    weight quantized with its own vector (an expert without one: every column alike), as
    llama.cpp quantizes each expert's rows with that expert's imatrix."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from qlora.export import kquants
    from qlora.export.gguf import export_gguf
    from qlora.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "mixtral", "mixtral", seed=5, hidden_size=256,
                            intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    key = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    imatrix = {key.format(e): rng.uniform(0.01, 10.0, 256).astype(np.float32) for e in (0, 1, 3)}
    out = export_gguf(path, tmp_path / "m.gguf", "q4_k_m", imatrix=imatrix, threads=1,
                      log=lambda _: None)
    stack = {t.name: t for t in GGUFReader(str(out)).tensors}["blk.0.ffn_gate_exps.weight"]
    assert stack.tensor_type.name == "Q4_K"
    got = np.asarray(stack.data).reshape(4, 256, -1)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for e in range(4):
            w = f.get_tensor(key.format(e)).float().numpy()
            want = kquants.quantize(w, "Q4_K", imatrix.get(key.format(e), np.ones(256, np.float32)))
            assert np.array_equal(got[e], want), e
            if e in imatrix:  # the importance changed the bytes: it was used, not ignored
                assert not np.array_equal(got[e], kquants.quantize(w, "Q4_K")), e


@pytest.mark.parametrize("method,packed", [("dpo", False), ("dpo", True), ("kto", True)])
def test_a_graphed_preference_step_adds_the_eager_steps_router_loss(moe_models, tmp_path, method,
                                                                    packed):
    """The CUDA graph's body (train/graphs.py, called on the CPU) of a preference micro-batch
    on Qwen3-MoE with the router loss on: its rows and router weights padded to fixed shapes,
    the padding weighing 0, so the loss, its aux_loss and every adapter gradient are the eager
    step's (rel 1e-5: the same tokens over rows longer by padding, summed in other orders)."""
    from qlora.data.preference import half, pair_batch, unpaired_batch
    from qlora.methods import PREFERENCE_METHODS
    from qlora.methods.preference import PreferenceOptions, batch_loss, metric_means
    from qlora.speed import SpeedPlan, apply_speed
    from test_preference import _randomize, _varied_examples
    from test_preference_graphs import _grads, _graph_body

    path = with_config(moe_models["qwen3-moe"], tmp_path / "model", router_aux_loss_coef=0.3)
    model = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=ATTENTION))
    _randomize(model, 7, 0.3)
    apply_speed(model, SpeedPlan())
    model.train()
    examples = _varied_examples("pairs" if method == "dpo" else "unpaired")
    batch = (pair_batch if method == "dpo" else unpaired_batch)(examples, 0, packed)
    opts = PreferenceOptions(beta=0.3)
    model.zero_grad()
    want_loss, want_metrics = batch_loss(PREFERENCE_METHODS[method], model, batch, opts)
    want_loss.backward()
    want_grads = _grads(model)
    staged, loss, metrics, grads = _graph_body(model, PREFERENCE_METHODS[method], opts, batch)
    rows = half(batch, second=False) if method == "kto" else batch  # KTO's examples' rows
    assert staged.slots["router_weights"].numel() > rows["router_weights"].numel()
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    aux, want_aux = metric_means(metrics)["aux_loss"], metric_means(want_metrics)["aux_loss"]
    assert abs(aux - want_aux) <= 1e-5 * want_aux
    assert grads.keys() == want_grads.keys() and len(grads) == 16
    for k, want in want_grads.items():
        assert float((grads[k] - want).abs().max()) <= 1e-5 * float(want.abs().max()), k


def _per_expert_adapter(stacked_dir, out, model_type: str):
    """The adapter saved in `stacked_dir` (PEFT's target_parameters over the stacked experts) in
    transformers 4's per-expert layout, as adapters trained before transformers 5 are on the Hub:
    expert e's gate and up (Mixtral's w1 and w3) each a LoRA of their own rows of B over the
    shared rows of A, its down (w2) likewise; every other tensor as it is."""

    # the Hub's per-expert names, written out here (not merge's own table): gate_up's two
    # parts, then down
    hub = {"mixtral": ("block_sparse_moe", ("w1", "w3"), "w2"),
           "qwen3_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj")}[model_type]
    config = json.loads((stacked_dir / "adapter_config.json").read_text())
    r = config["r"]
    tensors, out_tensors = load_file(str(stacked_dir / "adapter_model.safetensors")), {}
    for key, t in tensors.items():
        stem = re.match(r"^base_model\.model\.(model\.layers\.\d+)\.mlp\.experts((?:\.base_layer)*)"
                        r"\.lora_([AB])\.weight$", key)
        if stem is None:
            out_tensors[key] = t
            continue
        projection = "gate_up_proj" if stem.group(2) else "down_proj"  # the outer wrapper is down
        layer, part = stem.group(1), stem.group(3)
        experts = t.shape[0] // r if part == "A" else t.shape[1] // r
        for e in range(experts):
            parts = 2 if projection == "gate_up_proj" else 1
            for p in range(parts):
                leaf = hub[1][p] if projection == "gate_up_proj" else hub[2]
                name = f"{layer}.{hub[0]}.experts.{e}.{leaf}"
                if part == "A":
                    value = t[e * r:(e + 1) * r].clone()  # gate and up: one copy each
                else:  # PEFT's B is [out, r, E] flattened: expert e's columns e, e + E, ...
                    b = t.view(t.shape[0], r, experts)[:, :, e]
                    value = b.chunk(parts)[p]
                out_tensors[f"base_model.model.{name}.lora_{part}.weight"] = value.contiguous()
    out.mkdir()
    save_file(out_tensors, str(out / "adapter_model.safetensors"))
    names = {"mixtral": ["w1", "w2", "w3"], "qwen3_moe": ["gate_proj", "up_proj", "down_proj"]}
    targets = [t for t in config["target_modules"] or []] + names[model_type]
    (out / "adapter_config.json").write_text(json.dumps(
        {**config, "target_modules": sorted(set(targets)), "target_parameters": None}))
    return out


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_a_per_expert_adapter_merges_as_its_stacked_twin_and_is_refused_elsewhere(
        moe_models, variant, tmp_path):
    """An adapter in transformers 4's per-expert layout (experts.N.w1 …, the Hub's older Mixtral
    and Qwen3-MoE adapters) folds into the base exactly as the same adapter stacked: merge reads
    the per-expert names as the Hub checkpoint's linears. Loading it on the stacked model (generate,
    chat, eval, training) is refused, naming a tensor and pointing to merge."""

    from qlora.merge import merge_adapter

    path = moe_models[variant]
    ours = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomized_adapters(ours, std=0.05)
    save_adapter(ours, tmp_path / "stacked", str(path))
    old = _per_expert_adapter(tmp_path / "stacked", tmp_path / "old", MOE_VARIANTS[variant][0])
    want = load_file(str(merge_adapter(path, tmp_path / "stacked", tmp_path / "m1",
                                       dtype="float32") / "model.safetensors"))
    got = load_file(str(merge_adapter(path, old, tmp_path / "m2",
                                      dtype="float32") / "model.safetensors"))
    base = load_file(str(path / "model.safetensors"))
    assert got.keys() == want.keys()
    experts = [k for k in want if ".experts." in k]
    assert experts and all(not torch.equal(want[k], base[k]) for k in experts)  # all adapted
    for k in want:  # the same products B_e A_e, summed into W in the same order: equal bits
        assert torch.equal(got[k], want[k]), k
    fresh = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    with pytest.raises(QloraError, match=r"experts\.0\..* per-expert LoRA .*qlora merge"):
        load_adapter(fresh, old)


def test_only_the_policys_forward_computes_the_router_loss(moe_models, tmp_path, monkeypatch):
    """One router loss per batch, the policy's: DPO and KTO, training and evaluation, none for
    the reference's forward, KTO's KL sequences or the precomputed reference."""
    from qlora.data.preference import pair_batch, unpaired_batch
    from qlora.methods import dpo, kto
    from qlora.methods.preference import PreferenceOptions, batch_loss, precompute_reference
    from qlora.models.families.moe_blocks import MoeLM
    from test_preference import _varied_examples

    path = with_config(moe_models["qwen3-moe"], tmp_path / "model", router_aux_loss_coef=0.3)
    model = load_model(path, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=ATTENTION))
    calls = []
    aux = MoeLM.router_aux_loss
    monkeypatch.setattr(MoeLM, "router_aux_loss",
                        lambda self, *a, **k: calls.append(1) or aux(self, *a, **k))
    pairs, unpaired = _varied_examples("pairs"), _varied_examples("unpaired")
    for method, batch in ((dpo, pair_batch(pairs, 0)), (kto, unpaired_batch(unpaired, 0))):
        for grad in (True, False):
            calls.clear()
            with torch.set_grad_enabled(grad):
                batch_loss(method, model.train(grad), batch, PreferenceOptions())
            assert len(calls) == 1, (method.__name__, grad, len(calls))
    calls.clear()
    precompute_reference(model, pairs, 2, 0)
    assert not calls
