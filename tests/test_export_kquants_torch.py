"""The k-quants' search in torch (export/kquants_torch.py), run here on the CPU, against the numpy
search (export/kquants.py, itself pinned to the plain search and to gguf's dequantizer by
tests/test_export_kquants.py): the same packed bytes for every K type, with and without
importance weights, on random blocks and the edge cases where float details decide; on the GPU
too where there is one (the same torch ops: what the export runs there). Likewise gguf.quants' own
Q8_0, Q4_0 and BF16 in torch against gguf.quants."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from qlora.export import kquants, kquants_torch  # noqa: E402

KINDS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _edge_blocks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(48, 256) blocks: random weights and the cases where float details decide — zero blocks of
    either sign, constants of either sign, ±v ties for the largest magnitude, huge outliers, huge
    and tiny (subnormal products) scales, sparse and one-signed blocks, many equal magnitudes,
    zero sub-blocks inside random blocks; and per-value importance with zeros and heavy values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    x[0], x[1] = 0.0, -0.0
    x[2], x[3] = 0.5, -0.25
    x[4, :16] = -0.0  # a zero sub-block of −0 in a random block
    x[5, 7], x[5, 9] = 3.0, -3.0  # ±v tie, first the positive
    x[6, 7], x[6, 9] = -3.0, 3.0
    x[7, 100] = 1e4  # a huge outlier
    x[8, :] *= 1e30  # huge scale
    x[9, :] *= 1e-30  # subnormal products
    x[10, ::2] = 0.0
    x[11], x[12] = -np.abs(x[11]), np.abs(x[12])
    x[13] = np.round(x[13] * 100) / 100  # many equal magnitudes
    x[14, 32:64] = 0.0  # a zero sub-block in a random block (Q4_K's sub-block 1)
    x[15, :128] = 1.0  # half constant, half random
    x[16] = rng.integers(-3, 4, 256).astype(np.float32)  # small integers: exact ties in rint
    w = (rng.random((48, 256)) ** 4).astype(np.float32)
    w[:, :40], w[:, 100:108] = 0.0, 1e4
    w[20] = 0.0  # a block of zero importance
    return x, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_search_gives_the_numpy_bytes(kind, seed, device):
    x, w = _edge_blocks(seed)
    for weights in (None, w):
        ours = kquants_torch.codes(torch.from_numpy(x).to(device), kind,
                                   None if weights is None else torch.from_numpy(weights).to(device))
        theirs = kquants.codes(x, kind, weights)
        assert set(ours) == set(theirs)
        for field in theirs:
            assert ours[field].dtype == theirs[field].dtype, field
        np.testing.assert_array_equal(kquants.PACK[kind](ours), kquants.PACK[kind](theirs),
                                      err_msg=f"importance: {weights is not None}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_zeros_of_both_signs_decode_alike(kind, device):
    """A block all of zeros, +0 and −0 mixed: numpy's max picks one of the zeros by its SIMD code,
    so the f16 scale d may be stored as −0 by one search and +0 by the other (the module's
    docstring); everything else is the same bytes, and both decode to zeros."""
    rng = np.random.default_rng(3)
    x = np.where(rng.random((8, 256)) < 0.5, np.float32(0.0), np.float32(-0.0))
    ours = kquants_torch.codes(torch.from_numpy(x).to(device), kind)
    theirs = kquants.codes(x, kind)
    for field in theirs:
        if field == "d":
            np.testing.assert_array_equal(np.abs(ours[field]), np.abs(theirs[field]))
        else:
            np.testing.assert_array_equal(ours[field], theirs[field], err_msg=field)
    qt = gguf.GGMLQuantizationType[kind]
    for fields in (ours, theirs):
        assert not gguf.quants.dequantize(kquants.PACK[kind](fields), qt).any()


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_quantizes_tensors_as_numpy_does(monkeypatch, device):
    """OnDevice (what the export uses on a GPU): tasks and packing pieces that cross row ends
    (importance follows the columns) give kquants.quantize's bytes."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 768)) * 0.02).astype(np.float32)  # 18 blocks, 3 a row
    importance = (rng.random(768) ** 2).astype(np.float32)
    monkeypatch.setattr(kquants_torch, "DEVICE_CHUNK_VALUES", 5 * 256)  # tasks of 5 blocks
    monkeypatch.setattr(kquants_torch, "PACK_BLOCKS", 2)
    with kquants_torch.OnDevice(device, packers=2) as on_device:
        assert str(on_device).startswith(f"torch on {device}")
        for kind in ("Q4_K", "Q6_K"):
            for imp in (None, importance):
                np.testing.assert_array_equal(on_device.submit(x, kind, imp).result(),
                                              kquants.quantize(x, kind, imp))
        with pytest.raises(ValueError, match="multiple of 256"):
            on_device.submit(x[:, :300], "Q4_K")
        # a stack of 3 experts' [2, 768] weights, each with its own importance (6 blocks a
        # member: the 5-block tasks cross members): each member's bytes as it alone gives
        stack = x.reshape(3, 2, 768)
        per_member = (rng.random((3, 768)) ** 2).astype(np.float32)
        want = np.stack([kquants.quantize(stack[m], "Q4_K", per_member[m]) for m in range(3)])
        np.testing.assert_array_equal(on_device.submit(stack, "Q4_K", per_member).result(), want)
        np.testing.assert_array_equal(kquants.quantize(stack, "Q4_K", per_member), want)
        with pytest.raises(ValueError, match="a vector per member"):
            on_device.submit(stack, "Q4_K", per_member[:2])


def _gguf_type_rows(seed: int) -> np.ndarray:
    """(24, 256) float32, blocks of 32 (Q8_0, Q4_0) where float details decide: zero blocks of
    either sign and mixed, exact halves after scaling (ties: d = 1 for Q8_0 with a maximum of 127,
    for Q4_0 with a largest value of −8), negative maxima, ±v ties for the largest magnitude,
    magnitudes from 1e-35 (scales that vanish in f16) to 1e30 (scales beyond f16), and random
    weights with a scale per block."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 256)) * 0.02).astype(np.float32)
    blocks = x.reshape(-1, 32)  # a view: 192 blocks
    blocks[0], blocks[1] = 0.0, -0.0
    blocks[2] = np.where(rng.random(32) < 0.5, np.float32(0.0), np.float32(-0.0))
    blocks[3] = np.arange(-15.5, 16.5, 1.0)  # halves after scaling by one
    blocks[3, 0] = 127.0
    blocks[3, 1], blocks[3, 2] = 0.49999997, -0.49999997  # just below ½: floor(v + ½) rounds up
    blocks[4] = -np.abs(blocks[4])
    blocks[4, 5] = -126.5
    blocks[5] = np.arange(32) / 4 - 7.75  # Q4_0: a largest value of −8 gives d = 1
    blocks[5, 0] = -8.0
    blocks[6, 3], blocks[6, 9] = 0.5, -0.5  # ±v tie, the positive first
    blocks[7, 3], blocks[7, 9] = -0.5, 0.5
    blocks[8] *= 1e30
    blocks[9] *= 1e-35
    blocks[10] = rng.integers(-8, 8, 32)
    blocks[11] = 0.0
    blocks[11, 17] = -3.0  # a lone negative maximum
    scales = 10.0 ** rng.uniform(-30, 30, (len(blocks) - 16, 1))
    blocks[16:] *= scales.astype(np.float32)
    return x


def _bf16_rows() -> np.ndarray:
    """(4, 256) float32 whose bits decide bf16's rounding: exact ties (low half 0x8000) on odd and
    even, values that round up into infinity, subnormals, ±0, ±inf, NaNs of either sign with
    payloads in the kept and in the dropped bits."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, (4, 256), dtype=np.uint64).astype(np.uint32)
    bits[0, :64] = (bits[0, :64] & 0xFFFF0000) | 0x8000  # ties
    special = [0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x00000001, 0x80008000, 0x007FFFFF, 0x00000000,
               0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xFF810000,
               0x7FBFFFFF, 0x7FFF8000, 0xFFFFFFFF]
    bits[1, :len(special)] = special
    return bits.view(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "BF16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_gguf_types_give_gguf_bytes(type_name, seed, device):
    """Q8_0, Q4_0 and BF16 in torch (what the export runs on a GPU): gguf.quants' bytes."""
    x = _bf16_rows() if type_name == "BF16" and seed == 1 else _gguf_type_rows(seed)
    with np.errstate(all="ignore"):  # gguf's NaN and infinity arithmetic on purpose
        theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])
    ours = kquants_torch.ENCODERS[type_name](torch.from_numpy(x).to(device)).cpu().numpy()
    assert ours.dtype == theirs.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # scales past f16, on purpose
def test_on_device_encodes_every_gguf_type_as_gguf():
    """OnDevice.submit of the gguf types (on the device or, F16 / Q5_0 / Q5_1, by gguf.quants on
    its CPU threads) in tasks of a few rows: one gguf.quants.quantize call's bytes."""
    x = _gguf_type_rows(2).reshape(48, 128)
    with kquants_torch.OnDevice("cpu") as on:
        for type_name in ("Q8_0", "Q4_0", "BF16", "F16", "Q5_0", "Q5_1"):
            want = gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])
            got = on.submit(x, type_name).result()
            np.testing.assert_array_equal(got, np.ascontiguousarray(want).view(np.uint8), err_msg=type_name)
