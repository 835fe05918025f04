"""The k-quants' search in torch (export/kquants_torch.py), run here on the CPU, against the numpy
search (export/kquants.py, itself pinned to the plain search and to gguf's dequantizer by
tests/test_export_kquants.py): the same packed bytes for every K type, with and without
importance weights, on random blocks and the edge cases where float details decide; on the GPU
too where there is one (the same torch ops: what the export runs there)."""

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
