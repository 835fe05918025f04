"""The parts of the fast training step: seeded dropout (Triton kernel vs torch reference),
checkpointing without RNG state, flattened optimizer parameters, the CUDA-graph batch layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qlora.adapters import AdapterConfig, attach_adapters, set_dropout_seed
from qlora.errors import QloraError
from qlora.kernels.dropout import (BLOCK, PHILOX_ROUNDS, SLOT, dropout_bits, dropout_keep,
                                   dropout_threshold, philox4x32, seeded_dropout,
                                   seeded_dropout_add_, seeded_dropout_reference,
                                   seeded_dropout_values)
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed
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


def test_philox4x32_reference_gives_random123s_known_answers():
    """Random123's kat_vectors, counter 0 and key 0, for 7 rounds (what the mask uses) and 10."""
    zero = torch.zeros(1, dtype=torch.int64)
    for rounds, want in ((7, (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
                         (10, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8))):
        assert tuple(int(lane) for lane in philox4x32(0, zero, rounds)) == want, rounds


def test_dropout_bits_give_each_16_bit_half_of_a_philox_output_to_its_own_slot():
    """Element 2048·b + 256·slot + q reads output lane slot // 2 of Philox at counter 256·b + q:
    its low 16 bits for an even slot, its high 16 bits for an odd one."""
    n = 3 * BLOCK + 300  # three whole blocks and a partial fourth (its slot 1 half full)
    bits = dropout_bits(77, n)
    lanes = philox4x32(77, torch.arange(4 * SLOT), PHILOX_ROUNDS)
    for block in range(4):
        for slot in range(8):
            start = block * BLOCK + slot * SLOT
            counters = slice(block * SLOT, (block + 1) * SLOT)
            lane = lanes[slot // 2][counters]
            want = lane & 0xFFFF if slot % 2 == 0 else lane >> 16
            assert torch.equal(bits[start:start + SLOT], want[:max(0, n - start)]), (block, slot)
    assert torch.equal(dropout_bits(77, 100), bits[:100])  # a prefix does not depend on n
    assert torch.equal(dropout_keep(77, n, 0.3), bits >= round(0.3 * 65536))


def test_reference_dropout_keeps_one_minus_threshold_over_65536_and_salts_draw_other_masks():
    n = 512 * BLOCK  # about 1e6
    seed = 2**40 + 3
    for p in (0.05, 0.1, 0.5):
        threshold = dropout_threshold(p)
        assert threshold == round(p * 65536)
        kept = dropout_keep(seed, n, p)
        assert abs(float(kept.float().mean()) - (1 - threshold / 65536)) < 0.002, p
        for slot in range(8):  # each 16-bit half keeps its share of its own elements
            by_slot = kept.view(-1, 8, SLOT)[:, slot].float().mean()
            assert abs(float(by_slot) - (1 - threshold / 65536)) < 0.005, (p, slot)
    bits = dropout_bits(seed, n)
    threshold = dropout_threshold(0.1)
    kept = dropout_keep(seed, n, 0.1)
    assert bool(kept[bits == threshold].all()) and not bool(kept[bits == threshold - 1].any())
    other = dropout_keep(seed + 1, n, 0.1)  # another salt is another key
    # independent masks differ on 2·0.1·0.9 = 18% of the elements
    assert abs(float((kept != other).float().mean()) - 0.18) < 0.005
    x = torch.randn(n // 4)
    seed_tensor = torch.tensor(seed - 1, dtype=torch.int64)
    dropped = seeded_dropout_reference(x, seed_tensor, 1, 0.1)
    keep = dropout_keep(seed, x.numel(), 0.1)
    assert torch.equal(dropped, torch.where(keep, x * (1 / 0.9), 0.0))


def test_a_dropout_probability_the_16_bit_masks_cannot_draw_is_refused():
    x, seed = torch.randn(64), torch.tensor(5, dtype=torch.int64)
    with pytest.raises(QloraError, match="lora_dropout.*use 0 .*1/65536"):
        seeded_dropout(x, seed, 1, 1e-6)  # round(1e-6 · 65536) = 0: it would drop nothing
    for call in (lambda: seeded_dropout_add_(torch.zeros(64), x, seed, 1, 1e-6),
                 lambda: seeded_dropout_reference(x, seed, 1, 1e-6),
                 lambda: seeded_dropout(x, seed, 1, -0.1), lambda: seeded_dropout(x, seed, 1, 1.0)):
        with pytest.raises(QloraError, match="lora_dropout"):
            call()
    assert dropout_threshold(1 / 65536) == 1
    assert seeded_dropout(x, seed, 1, 0.0) is x  # 0 is no dropout
    # and where the value enters: the adapter config
    from qlora.adapters import AdapterConfig

    with pytest.raises(QloraError, match="lora_dropout.*use 0"):
        AdapterConfig(dropout=1e-6)
    assert AdapterConfig(dropout=0.0).dropout == 0.0 and AdapterConfig(dropout=0.05).dropout == 0.05
    with pytest.raises(QloraError, match="one shape and dtype"):
        seeded_dropout_add_(torch.zeros(64, dtype=torch.float16), x, seed, 1, 0.1)
    with pytest.raises(QloraError, match="contiguous"):
        seeded_dropout_add_(torch.zeros(8, 8).t(), x.view(8, 8), seed, 1, 0.1)


def test_dropout_add_on_the_cpu_adds_the_masks_seeded_dropout_draws():
    """Without Triton both draw from torch's generator: the same mask for the same (seed, salt)."""
    x, out = torch.randn(33, 70), torch.randn(33, 70)
    seed = torch.tensor(41, dtype=torch.int64)
    want = out + seeded_dropout_values(x, seed, 3, 0.2)
    assert seeded_dropout_add_(out, x, seed, 3, 0.2) is out
    assert torch.equal(out, want)


KERNEL_CHECK = r"""
import json, sys, torch, triton, triton.language as tl
from qlora.kernels.dropout import (PHILOX_ROUNDS, _dropout_triton, philox4x32, seeded_dropout_add_,
                                   seeded_dropout_reference)


@triton.jit
def randint4x_kernel(seed_ptr, offsets_ptr, out_ptr, n, ROUNDS: tl.constexpr, SIZE: tl.constexpr):
    i = tl.arange(0, SIZE)
    lanes = tl.randint4x(tl.load(seed_ptr), tl.load(offsets_ptr + i, mask=i < n), n_rounds=ROUNDS)
    for lane in tl.static_range(4):
        tl.store(out_ptr + lane * n + i, lanes[lane].to(tl.int64), mask=i < n)


def bf16_truncated(v):
    # Triton's interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even)
    return (v.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def bytes_of(t):  # bit for bit: -0.0 is not 0.0
    return t.reshape(-1).view(torch.int8)


def same(got, want_fp32, dtype):
    want = bf16_truncated(want_fp32) if dtype == torch.bfloat16 else want_fp32.to(dtype)
    return got.dtype == dtype and torch.equal(bytes_of(got), bytes_of(want))


out = {}
offsets = torch.tensor([0, 1, 255, 256, 2**23 - 1, 2**23, 123456789, 2**31 - 1], dtype=torch.int64)
for seed in (0, 77, 2**41 + 977, 2**63 - 1, -5):
    got = torch.empty(4, len(offsets), dtype=torch.int64)
    randint4x_kernel[(1,)](torch.tensor(seed), offsets.to(torch.int32), got, len(offsets),
                           ROUNDS=PHILOX_ROUNDS, SIZE=8)
    want = torch.stack(philox4x32(seed, offsets, PHILOX_ROUNDS))
    out[f"randint4x-{seed}"] = bool(torch.equal(got, want))

# 3·2048 + 300: whole blocks and a partial one; 37·129 = 4773; 5·41 = 205: less than one slot;
# 3500: a partial block that ends in slot 5; 2·2048: whole blocks only
seed = torch.tensor(2**41 + 977, dtype=torch.int64)
for shape in ((3 * 2048 + 300,), (37, 129), (5, 41), (3500,), (2, 2048)):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(len(out))
        x = torch.randn(*shape, generator=g).to(dtype)
        acc = torch.randn(*shape, generator=g).to(dtype)
        dropped = seeded_dropout_reference(x.float(), seed, 5, 0.25)  # fp32, before the rounding
        out[f"dropout-{shape}-{dtype}"] = same(_dropout_triton(x, seed, 5, 0.25), dropped, dtype)
        got = acc.clone()
        seeded_dropout_add_(got, x, seed, 5, 0.25)
        out[f"add-{shape}-{dtype}"] = same(got, acc.float() + dropped, dtype)
        if dtype != torch.bfloat16:  # the reference itself, rounded by torch
            out[f"vs-reference-{shape}-{dtype}"] = bool(torch.equal(
                _dropout_triton(x, seed, 5, 0.25), seeded_dropout_reference(x, seed, 5, 0.25)))
print(json.dumps(out))
"""


def test_triton_dropout_kernel_equals_the_torch_reference(tmp_path):
    """The Triton kernel run by Triton's interpreter on the CPU: tl.randint4x with PHILOX_ROUNDS
    is philox4x32; the kernel and its accumulating form give the reference's bits (in bf16 the
    interpreter truncates where the GPU rounds to nearest: the reference is truncated alike, and
    benchmarks/gpu_check.py compares the GPU with the rounded reference)."""
    pytest.importorskip("triton")
    script = tmp_path / "dropout_kernel_check.py"  # a file: Triton reads its kernels' source
    script.write_text(KERNEL_CHECK)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result) == 5 + 5 * 3 * 2 + 5 * 2
    assert [case for case, ok in result.items() if not ok] == []


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
    applied = apply_speed(model, SpeedPlan(seeded_dropout=True))
    seed, stride = applied.dropout_seed, applied.dropout_stride
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
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
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
        if optim == "adamw_torch":  # the same elementwise arithmetic; the clipping norm is
            # summed in another order over one flat buffer: equal up to float rounding
            torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-5, atol=1e-6)
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


def test_flattening_holds_two_copies_of_the_adapters_at_most():
    """The flat parameter and its gradient buffer are made while the adapters' own storages are
    freed one by one: at most two adapter-sized copies live at once (a mixture of experts'
    adapters are GiBs: a third copy is what fails under a 24 GB cap)."""
    from live_bytes import LiveBytes

    model = tiny_model(dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.nbytes for p in params)
    count = LiveBytes()
    count.track(params)
    with count:
        opt = build_optimizer(model, "adamw_torch", 1e-3, 0.0, (0.9, 0.999), 1e-8)
    (flat,) = opt.param_groups[0]["params"]
    assert count.current == 2 * adapter_bytes == flat.nbytes + flat.grad.nbytes
    # the largest adapter's copy is the most the old and new storages overlap by
    assert count.peak <= 2 * adapter_bytes + max(p.nbytes for p in params)


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
