"""The parts of the fast training step: seeded dropout (Triton kernel vs torch reference),
checkpointing without RNG state, flattened optimizer parameters, the CUDA-graph batch layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qlora.adapters import AdapterConfig, attach_adapters, seed_dropout, set_dropout_seed
from qlora.kernels.dropout import (QUARTER, dropout_uniforms, philox_uniform, philox_uniform4,
                                   seeded_dropout, seeded_dropout_reference)
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.train.graphs import document_offsets, pad_batch
from qlora.train.optim import build_optimizer, zero_grads

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)


def tiny_model(dropout: float, quant: str = "none"):
    torch.manual_seed(0)  # the adapters' initialisation
    spec = spec_from_config(dict(TINY))
    model = random_model(spec, QuantConfig(method=quant, compute_dtype=torch.float32), seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():  # B away from zero, so every adapter path carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_philox_reference_is_deterministic_and_uniform():
    u = philox_uniform(1234, torch.arange(200_000))
    assert torch.equal(u, philox_uniform(1234, torch.arange(200_000)))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    # a different key is a different stream
    assert float((u == philox_uniform(1235, torch.arange(200_000))).float().mean()) < 1e-3


def test_dropout_uniforms_give_each_philox_output_to_its_own_quarter_block():
    """Element 1024·b + 256·lane + q reads output `lane` of Philox at counter 256·b + q; output 0 is
    what tl.rand returns, so the first quarter of each block is the old one-draw-per-element mask."""
    u = dropout_uniforms(77, 3 * 1024 + 300)  # two whole blocks and a partial third
    outputs = philox_uniform4(77, torch.arange(4 * QUARTER))
    for block in range(4):
        for lane in range(4):
            start = block * 4 * QUARTER + lane * QUARTER
            want = outputs[lane][block * QUARTER:(block + 1) * QUARTER][:max(0, len(u) - start)]
            assert torch.equal(u[start:start + QUARTER], want), (block, lane)
    assert torch.equal(outputs[0], philox_uniform(77, torch.arange(4 * QUARTER)))
    assert torch.equal(dropout_uniforms(77, 100), u[:100])  # a prefix does not depend on n


def test_reference_dropout_drops_p_and_salts_draw_different_masks():
    x = torch.ones(977 * 1024)  # about 1e6
    seed = torch.tensor(2**40 + 3, dtype=torch.int64)
    kept = seeded_dropout_reference(x, seed, 1, 0.1) != 0
    assert abs(1.0 - float(kept.float().mean()) - 0.1) < 0.005
    for lane in range(4):  # each Philox output drops p of its own elements
        by_lane = kept.view(-1, 4, QUARTER)[:, lane].float().mean()
        assert abs(1.0 - float(by_lane) - 0.1) < 0.01, lane
    other = seeded_dropout_reference(x, seed, 2, 0.1) != 0
    # independent masks differ on 2·0.1·0.9 = 18% of the elements
    assert abs(float((kept != other).float().mean()) - 0.18) < 0.01


KERNEL_CHECK = r"""
import json, os, torch
from qlora.kernels.dropout import _dropout_triton, seeded_dropout_reference
out = {}
# 37·129 = 4773: whole blocks and a partial one; 5·41 = 205: less than one quarter of a block;
# 700: a partial block that ends in its third quarter; 3·1024: whole blocks only
for shape in ((37, 129), (5, 41), (700,), (3, 1024)):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(*shape, dtype=dtype)
        seed = torch.tensor(2**41 + 977, dtype=torch.int64)
        a, b = _dropout_triton(x, seed, 5, 0.25), seeded_dropout_reference(x, seed, 5, 0.25)
        out[f"{shape}-{dtype}"] = dict(dtype=str(dtype), same_mask=bool(torch.equal(a == 0, b == 0)),
                                       max_diff=float((a.float() - b.float()).abs().max()),
                                       max_abs=float(b.float().abs().max()))
print(json.dumps(out))
"""


def test_triton_dropout_kernel_equals_the_torch_reference():
    """The Triton kernel run by Triton's interpreter on the CPU: the same mask bit for bit, the
    same values (fp32 exactly; bf16 within one rounding, the interpreter rounds by truncation)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result) == 8
    for case, r in result.items():
        assert r["same_mask"], case
        limit = 0.0 if r["dtype"] == "torch.float32" else r["max_abs"] * 2**-7
        assert r["max_diff"] <= limit, case


def test_seeded_dropout_masks_scales_and_reuses_the_mask_in_backward():
    x = torch.randn(64, 256, requires_grad=True)
    seed = torch.tensor(99, dtype=torch.int64)
    y = seeded_dropout(x, seed, 3, 0.2)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.8) < 0.02
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    assert torch.equal(seeded_dropout(x, seed, 3, 0.2), y)  # same (seed, salt): same mask
    assert not torch.equal(seeded_dropout(x, seed, 4, 0.2) != 0, kept)  # another salt: another
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.8, 0.0))


def test_checkpointing_without_rng_state_gives_the_same_gradients_under_seeded_dropout():
    """What lets a step be captured as a CUDA graph: layers recomputed in backward draw the same
    dropout masks from the seed tensor, with torch's RNG state neither saved nor restored."""
    model = tiny_model(dropout=0.3)
    seed = torch.zeros((), dtype=torch.int64)
    stride = seed_dropout(model, seed)
    assert stride == 2 * 7 and model.layers_use_rng is False
    model.train()
    ids = torch.randint(0, 300, (2, 48))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        set_dropout_seed(seed, run_seed=7, micro_batch_index=3, stride=stride)
        torch.manual_seed(checkpointing)  # the global RNG must not matter
        model(ids, labels=ids).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and the masks do act: another micro-batch index gives other gradients
    model.zero_grad()
    set_dropout_seed(seed, run_seed=7, micro_batch_index=4, stride=stride)
    model(ids, labels=ids).backward()
    other = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_flattened_parameters_train_like_separate_ones(optim):
    ids = torch.randint(0, 300, (2, 32))
    finals = []
    for flat in (False, True):
        model = tiny_model(dropout=0.0)
        model.train()
        opt = build_optimizer(model, optim, 1e-2, 0.01, (0.9, 0.999), 1e-8, flat=flat)
        if flat:
            assert sum(len(g["params"]) for g in opt.param_groups) == 1
        for _ in range(3):
            model(ids, labels=ids).backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 0.3)
            opt.step()
            zero_grads(opt)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in finals[0]:
        if optim == "adamw_torch":  # the same elementwise arithmetic: equal
            torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-6, atol=1e-7)
    if optim == "adamw_8bit":
        # 8-bit states: blocks now span matrices, and small matrices (< 4096 values) no longer
        # get 32-bit states: the same updates up to quantization
        start = {n: p.detach() for n, p in tiny_model(0.0).named_parameters() if p.requires_grad}
        sep = torch.cat([(finals[0][n] - start[n]).reshape(-1) for n in start])
        flat = torch.cat([(finals[1][n] - start[n]).reshape(-1) for n in start])
        assert float((flat - sep).norm() / sep.norm()) < 0.05


def test_flattened_gradients_are_views_that_backward_fills():
    model = tiny_model(dropout=0.0)
    opt = build_optimizer(model, "adamw_torch", 1e-3, 0.0, (0.9, 0.999), 1e-8)
    (flat,) = opt.param_groups[0]["params"]
    ids = torch.randint(0, 300, (1, 16))
    model(ids, labels=ids).backward()
    assert float(flat.grad.abs().sum()) > 0
    grads = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    assert torch.equal(grads, flat.grad)
    zero_grads(opt)
    assert float(flat.grad.abs().sum()) == 0 and all(
        p.grad is not None for p in model.parameters() if p.requires_grad)


def test_graph_batch_layout_pads_rows_with_a_document_of_their_own():
    # two rows: row 0 holds documents of 3 and 2 tokens, row 1 one of 5; padded to 8 per row
    ids, pos, labels = torch.arange(10).view(2, 5), torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]), \
        torch.arange(10).view(2, 5)
    pids, ppos, plabels = pad_batch(ids, pos, labels, 8)
    assert document_offsets(ppos) == [0, 3, 5, 8, 13, 16]
    assert torch.equal(ppos[:, 5:], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(plabels[:, :5], labels) and bool((plabels[:, 5:] == -100).all())
    assert torch.equal(pids[:, :5], ids)
    assert document_offsets(pos) == [0, 3, 5, 10]
