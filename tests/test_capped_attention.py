"""Gemma 2's soft-capped attention through flex_attention (kernels/capped_attention.py) against
the reference's dense capped scores (models/families/gemma.capped_attention).

On the CPU flex_attention runs its eager forward (torch 2.13 has no flex backward on the CPU):
these tests compare forwards, in fp32; the gradients are compared on the GPU
(benchmarks/gpu_check.py, check_flex_capped_attention). fp32 on both sides: the reference
rounds nothing the kernel does not (its scores are fp32 too), so what differs is summation order
and the softmax's max-subtraction, ~1e-7 of the largest output; 1e-5 leaves room for it, while a
missing cap (5.0 against scores of a few units) or a wrong mask moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from qlora.kernels import capped_attention as flex
from qlora.models.attention import attention_mask
from qlora.models.families.gemma import capped_attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


PACKED = torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)])  # 3 documents, 40 tokens


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("packed", [False, True])
def test_flex_equals_the_dense_capped_scores(window, packed):
    """Causal, sliding window, packed documents, shared kv heads (4 query heads over 2)."""
    B, H, Hkv, T, D = 2, 4, 2, 40, 16
    g = torch.Generator().manual_seed(0)
    # scores of several units: the cap (5.0) bends them visibly
    q, k, v = (torch.randn(B, h, T, D, generator=g) * 2 for h in (H, Hkv, Hkv))
    positions = PACKED.repeat(B, 1) if packed else torch.arange(T).repeat(B, 1)
    dense = attention_mask(positions, 0, window, dense=True)
    want = capped_attention(q, k, v, dense, scale=0.2, cap=5.0)
    (mask,) = flex.flex_layer_masks((window,), positions, torch.device("cpu"))
    got = flex.flex_capped_attention(q, k, v, mask, scale=0.2, cap=5.0)
    assert rel_err(want, got) <= 1e-5
    uncapped = capped_attention(q, k, v, dense, scale=0.2, cap=1e9)
    assert rel_err(want, uncapped) > 1e-2  # the cap matters at these scores


def test_masks_are_shared_per_window_and_cached_for_unpacked_rows():
    positions = torch.arange(40).repeat(2, 1)
    masks = flex.flex_layer_masks((6, None, 6, None), positions, torch.device("cpu"))
    assert masks[0] is masks[2] and masks[1] is masks[3] and masks[0] is not masks[1]
    again = flex.flex_layer_masks((6, None), positions, torch.device("cpu"))
    assert again[0] is masks[0]  # made once per shape and window
    # a window no shorter than the rows hides nothing: full attention's mask
    wide = flex.flex_layer_masks((64,), positions, torch.device("cpu"))
    assert wide[0] is masks[1]


def test_fast_gemma2_runs_its_attention_through_flex_with_the_reference_logits(monkeypatch):
    """The fork end to end, with flex forced on (on the GPU it is on wherever fused_kernels is):
    a packed batch's logits equal the reference GemmaLM's, windows and documents alike, and
    every layer took a FlexMask."""
    from test_gemma import random_gemma

    from qlora.speed import SpeedPlan, apply_speed, fast_decoder

    model = random_gemma("gemma2", 0.0)
    model.eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    positions = PACKED.repeat(2, 1)
    with torch.no_grad():
        want = model(ids, position_ids=positions)
        monkeypatch.setattr(fast_decoder, "flex_available", lambda device: True)
        apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                     seeded_dropout=True))
        masks = model.layer_masks(positions, 0, torch.device("cpu"))
        assert all(isinstance(m, flex.FlexMask) for m in masks)
        got = model(ids, position_ids=positions)
    # the fp32 bound above; the 4-bit base is the same dequantized weight on both paths
    assert rel_err(want, got) <= 1e-5


def test_graph_offsets_give_the_masks_position_ids_give():
    """A CUDA graph hands over its rows' documents as flash varlen offsets (padded with empty
    documents, train/graphs.stage_batch): the flex masks read from them are those read from
    the position ids, so the attention is too."""
    from qlora.models.attention import Varlen
    from qlora.train.graphs import stage_batch

    positions = PACKED.repeat(2, 1)
    ids = torch.zeros_like(positions)
    staged = stage_batch(ids, positions, ids, pad_to=8, pinned=False)
    assert staged.cu_seqlens.numel() > 7  # padded to a power of two: empty documents at the end
    docs = flex.document_numbers(staged.cu_seqlens, 2, 40)
    want = (positions == 0).cumsum(-1)
    # the same partition of the flattened rows (numbered on from row to row)
    assert torch.equal(docs[:, 1:] != docs[:, :-1], want[:, 1:] != want[:, :-1])
    assert docs[1, 0] != docs[0, -1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) * 2 for _ in range(3))
    for window in (None, 6):
        (by_offsets,) = flex.flex_layer_masks((window,), positions, torch.device("cpu"),
                                              Varlen(staged.cu_seqlens, 40))
        (by_positions,) = flex.flex_layer_masks((window,), positions, torch.device("cpu"))
        same = [flex.flex_capped_attention(q, k, v, m, 0.2, 5.0) for m in (by_offsets, by_positions)]
        torch.testing.assert_close(*same, rtol=0, atol=0)  # the same mask, the same arithmetic


def test_every_mask_is_one_code_closing_over_tensors_only():
    """Compiled flex guards on a mask_mod's Python closure values and recompiles for each, and
    past torch's recompile limit it fails inside flex's autograd (seen on the GPU): every mask,
    windowed or not, packed or not, must be the same code over tensor cells only."""
    masks = flex.flex_layer_masks((6, None), torch.arange(40).repeat(2, 1), torch.device("cpu"))
    masks += flex.flex_layer_masks((6, None), PACKED.repeat(2, 1), torch.device("cpu"))
    mods = [m.block_mask.mask_mod for m in masks]
    assert len({mod.__code__ for mod in mods}) == 1
    for mod in mods:
        assert all(isinstance(cell.cell_contents, torch.Tensor) for cell in mod.__closure__)


@pytest.mark.parametrize("tokens", [1, 40, 128, 129, 300])
def test_rows_of_any_length_run_at_a_power_of_two_and_equal_the_dense_scores(tokens):
    """Compiled flex is specialized to one row length, so rows are padded to flex_length
    (a power of two, at least 128) after their real tokens; the real rows' outputs are the dense
    reference's (the fp32 bound of the first test), packed or not, windowed or not."""
    assert flex.flex_length(tokens) == max(128, 1 << (tokens - 1).bit_length())
    B, H, Hkv, D = 1, 2, 1, 8
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(B, h, tokens, D, generator=g) * 2 for h in (H, Hkv, Hkv))
    half = tokens // 2
    packed = torch.cat([torch.arange(half), torch.arange(tokens - half)])[None]
    for positions in (torch.arange(tokens)[None], packed):
        for window in (None, 5):
            (mask,) = flex.flex_layer_masks((window,), positions, torch.device("cpu"))
            assert mask.length == flex.flex_length(tokens)
            got = flex.flex_capped_attention(q, k, v, mask, scale=0.3, cap=5.0)
            dense = attention_mask(positions, 0, window, dense=True)
            want = capped_attention(q, k, v, dense, scale=0.3, cap=5.0)
            assert got.shape == want.shape and rel_err(want, got) <= 1e-5
