"""Our k-quants (export/kquants.py) read by the gguf package's own dequantizer, and llama.cpp's
per-role type mixtures (export/mixtures.py).

What is checked, block by block, for Q2_K, Q3_K, Q4_K, Q5_K and Q6_K:
- the bytes mean what our fields say: gguf.quants.dequantize(our bytes) equals the values computed
  from the fields (d, sc, m, q) directly, exactly up to f32 rounding;
- the round trip error is what the format's arithmetic allows: every value is coded to the nearest
  of the levels its sub-block's stored scale (and min) define, so a value inside the sub-block's
  range is off by at most half a step (step = d·sc, the distance between two levels), and a value
  outside it (clipped by the scale search) lands on the nearest end of the range;
- the scale search is no worse, in RMS error over random normal weights, than the naive reference
  (written here independently): each sub-block's range mapped onto the codes, round to nearest;
- an importance matrix concentrated on a few columns lowers the error on those columns;
- the fast search (what quantize runs) gives the bytes of the plain search (codes(plain=True), the
  search as written) and of the implementation before it (pinned hashes), bit for bit, on edge
  tensors with and without importance; in chunks, on threads and on worker processes alike.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from qlora.export import kquants  # noqa: E402
from qlora.export.mixtures import Model, tensor_type, use_more_bits  # noqa: E402

KINDS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# sub-block length, code range, asymmetric (value = s·q − m) or symmetric (value = s·q)
FORMAT = {"Q2_K": (16, 0, 3, False), "Q3_K": (16, -4, 3, True), "Q4_K": (32, 0, 15, False),
          "Q5_K": (32, 0, 31, False), "Q6_K": (16, -32, 31, True)}


def _blocks(seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    x[1] = 0.0  # an all-zero block
    x[2] = 0.5  # a constant block
    x[3] = -np.abs(x[3])  # all negative
    x[4, 7] = 3.0  # one outlier
    x[5] *= 1e3  # large scale
    x[6, :128] = 0.0  # half zero
    return x


def _steps_and_ranges(c, kind):
    """Per sub-block: the step between levels and the [lowest, highest] level, from the fields."""
    _, low, high, symmetric = FORMAT[kind]
    step = c["d"][:, None] * c["sc"].astype(np.float32)
    if symmetric:
        ends = np.stack([step * low, step * high], -1)
        return np.abs(step), ends.min(-1), ends.max(-1)
    offset = c["dmin"][:, None] * c["m"].astype(np.float32)
    return step, -offset, step * high - offset


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_decode_to_the_fields_and_errors_stay_within_half_a_step(kind):
    x = _blocks()
    c = kquants.codes(x, kind)
    packed = kquants.PACK[kind](c)
    qt = gguf.GGMLQuantizationType[kind]
    assert packed.shape == (64, gguf.GGML_QUANT_SIZES[qt][1])
    theirs = gguf.quants.dequantize(packed, qt)  # gguf's dequantizer reads our bytes
    ours = kquants.dequantize_codes(c, kind)
    sub = FORMAT[kind][0]
    step, lowest, highest = _steps_and_ranges(c, kind)
    for b in range(64):
        np.testing.assert_allclose(theirs[b], ours[b], rtol=1e-6, atol=1e-30, err_msg=f"block {b}")
        xb, got = x[b].reshape(-1, sub), theirs[b].reshape(-1, sub)
        lo, hi, half = lowest[b][:, None], highest[b][:, None], step[b][:, None] / 2
        inside = (xb >= lo) & (xb <= hi)
        slack = 1e-5 * np.abs(xb) + 1e-30  # f32 arithmetic of the dequantizer
        bound = np.broadcast_to(half, xb.shape) + slack
        assert np.all(np.abs(got - xb)[inside] <= bound[inside]), \
            f"block {b}: a value inside its sub-block's range is off by more than half a step"
        nearest_end = np.where(xb < lo, lo, hi)
        np.testing.assert_allclose(got[~inside], np.broadcast_to(nearest_end, xb.shape)[~inside],
                                   rtol=1e-5, atol=1e-30, err_msg=f"block {b}: clipped values")
    assert np.all(theirs[1] == 0)  # zero stays exactly zero
    np.testing.assert_allclose(theirs[2], 0.5, rtol=0.1)
    assert abs(theirs[4, 7] - 3.0) < 0.1 * 3.0


def _naive(x, kind):
    """The reference: per sub-block, its range mapped onto the codes (asymmetric: [min(x, 0),
    max(x)] onto [0, high]; symmetric: the value of largest magnitude onto the lowest code), the
    sub-block scales quantized to the format's bits against the largest, round to nearest."""
    sub, low, high, symmetric = FORMAT[kind]
    xs = x.reshape(-1, 256 // sub, sub).astype(np.float64)

    def f16(v):
        return v.astype(np.float16).astype(np.float64)

    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b != 0)

    if symmetric:
        vmax = np.take_along_axis(xs, np.abs(xs).argmax(-1)[..., None], -1)[..., 0]
        s = vmax / low
        smin = -128 if kind == "Q6_K" else -32
        smax = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)
        d = f16(smax / smin)
        sc = np.clip(np.rint(div(s, d)), smin, -smin - 1)
        step = d * sc
        q = np.clip(np.rint(div(xs, step[..., None])), low, high)
        return (step[..., None] * q).reshape(x.shape)
    levels = 15 if kind == "Q2_K" else 63
    lo = np.minimum(xs.min(-1), 0)
    s, m = (xs.max(-1) - lo) / high, -lo
    d, dmin = f16(s.max(-1, keepdims=True) / levels), f16(m.max(-1, keepdims=True) / levels)
    step = d * np.clip(np.rint(div(s, d)), 0, levels)
    offset = dmin * np.clip(np.rint(div(m, dmin)), 0, levels)
    q = np.clip(np.rint(div(xs + offset[..., None], step[..., None])), 0, high)
    return (step[..., None] * q - offset[..., None]).reshape(x.shape)


def _ours(x, kind, importance=None):
    packed = kquants.quantize(x, kind, importance)
    return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[kind]).reshape(x.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_search_beats_the_naive_reference(kind):
    x = np.random.default_rng(2).standard_normal((128, 512)).astype(np.float32)
    ours, naive = _ours(x, kind), _naive(x, kind)
    rms_ours, rms_naive = np.sqrt(((ours - x) ** 2).mean()), np.sqrt(((naive - x) ** 2).mean())
    assert rms_ours <= rms_naive, (rms_ours, rms_naive)


@pytest.mark.parametrize("kind", KINDS)
def test_importance_lowers_the_error_where_it_is_concentrated(kind):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((128, 256)).astype(np.float32)
    hot = rng.choice(256, size=8, replace=False)
    importance = np.ones(256, dtype=np.float32)
    importance[hot] = 1000.0  # as if these inputs carried most of the activation energy
    plain, steered = _ours(x, kind), _ours(x, kind, importance)
    err_plain = ((plain - x)[:, hot] ** 2).mean()
    err_steered = ((steered - x)[:, hot] ** 2).mean()
    assert err_steered < 0.8 * err_plain, (err_steered, err_plain)
    # and it is the weighted error that the search minimises
    weighted = [float((importance * (y - x) ** 2).sum()) for y in (plain, steered)]
    assert weighted[1] < weighted[0]


def _edge_tensor(seed, cols=1024):
    """Random weights with the cases where float details decide: zero blocks of either sign,
    constants, ±v ties for the largest magnitude, an outlier, large and tiny scales, sparse rows,
    one-signed rows; and importance with zero columns and a few heavy ones."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, cols)) * 0.02).astype(np.float32)
    x[0, :256], x[0, 256:512] = 0.0, -0.0
    x[1, :256], x[1, 256:272] = 0.5, -0.25
    x[2, 7] = 3.0
    x[3] = np.round(x[3] * 100) / 100  # many equal magnitudes
    x[4, :512] *= 1e3
    x[5, ::2] = 0.0
    x[6], x[7] = -np.abs(x[6]), np.abs(x[7])
    importance = (rng.random(cols) ** 4).astype(np.float32)
    importance[:40], importance[100:108] = 0.0, 1e4
    return x, importance


# sha256 (first 16 hex digits) of quantize(_edge_tensor(0)) as the implementation before the fast
# search wrote it (one numpy search per 1M-value chunk; commit 56c0b01), without / with importance
BEFORE = {"Q2_K": ("cf5d9bd72d823440", "4e3cf37e4b8bfccc"), "Q3_K": ("57a78cec24337f21", "95a74d46f9b7fe3e"),
          "Q4_K": ("97c012b5516d5a7e", "f5c0a8efe5a7f683"), "Q5_K": ("b0ce4899578f35bd", "039f83d124a4d6cd"),
          "Q6_K": ("2ff6811497f9a302", "ed3216e09c7031cc")}


@pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.0.0",
                    reason="hashed under numpy 2, whose type promotion the search's divisions follow")
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_are_those_of_the_implementation_before(kind):
    import hashlib

    x, importance = _edge_tensor(0)
    got = [hashlib.sha256(kquants.quantize(x, kind, w).tobytes()).hexdigest()[:16] for w in (None, importance)]
    assert tuple(got) == BEFORE[kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_fast_search_equals_the_plain_search_bit_for_bit(kind, seed):
    x, importance = _edge_tensor(seed)
    x[seed] *= 1e-30  # tiny values: subnormal products
    blocks = x.reshape(-1, 256)
    weights = np.broadcast_to(importance, x.shape).reshape(-1, 256)
    for w in (None, weights):
        plain = kquants.PACK[kind](kquants.codes(blocks, kind, w, plain=True))
        fast = kquants.PACK[kind](kquants.codes(blocks, kind, w))
        np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize("sub", [16, 32])
def test_row_sums_add_in_numpys_order(sub):
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((4000, sub)) * np.exp(rng.standard_normal((4000, sub)) * 6)).astype(np.float32)
    a[:10] = -0.0
    got = kquants._RowSums(4000)(kquants._by_position(a, sub))
    np.testing.assert_array_equal(got, a.sum(-1))  # bitwise: numpy's pairwise order
    assert not np.signbit(got[:10]).any()
    assert not np.array_equal(got, a.astype(np.float64).sum(-1).astype(np.float32))  # order matters


def test_tensor_quantize_is_the_blocks_row_by_row_in_chunks(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    x, importance = _edge_tensor(4, cols=512)
    for w in (None, importance):
        weights = None if w is None else np.broadcast_to(w, x.shape).reshape(-1, 256)
        whole = kquants.PACK["Q5_K"](kquants.codes(x.reshape(-1, 256), "Q5_K", weights)).reshape(8, -1)
        monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 3)  # chunks across row ends: importance follows
        np.testing.assert_array_equal(kquants.quantize(x, "Q5_K", w), whole)
        with ThreadPoolExecutor(2) as pool:
            np.testing.assert_array_equal(kquants.quantize(x, "Q5_K", w, pool), whole)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(x[:, :300], "Q4_K")


def test_in_order_keeps_tensors_queued_up_to_the_budget(monkeypatch):
    monkeypatch.setattr(kquants, "IN_FLIGHT_VALUES", 2500)
    x = np.random.default_rng(7).standard_normal((4, 256)).astype(np.float32)  # 1024 values
    log = []

    def items():
        for i in range(5):
            log.append(f"read {i}")
            yield i, kquants.submit(x, "Q4_K"), x.size
        log.append("read F32")
        yield "norm", x[0], 0  # done already: written as soon as the tensors before it are

    for key, data in kquants.in_order(items()):
        log.append(f"write {key}")
        assert data.shape == ((4, 144) if key != "norm" else (256,))
    # three tensors (3072 values) are over 2500: the oldest is waited for once the third is read
    assert log == ["read 0", "read 1", "read 2", "write 0", "read 3", "write 1", "read 4", "write 2",
                   "read F32", "write 3", "write 4", "write norm"]


def test_worker_processes_quantize_the_same_bytes(monkeypatch, tmp_path):
    x, importance = _edge_tensor(6)
    inline = kquants.quantize(x, "Q4_K", importance)
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 4)  # 32 blocks: eight chunks, enough to share out
    monkeypatch.setattr(kquants, "TASK_CHUNKS", 3)  # three tasks, the last one short
    monkeypatch.setattr(kquants, "_mapped_folder", lambda nbytes: str(tmp_path))
    with kquants.Workers(2) as workers:
        assert workers.executor(7) is None  # too small to share out: this process
        pool = workers.executor(x.size // 256)
        assert pool is not None
        np.testing.assert_array_equal(kquants.quantize(x, "Q4_K", importance, pool), inline)
    assert kquants.Workers(1).executor(10**6) is None
    assert list(tmp_path.iterdir()) == []  # the mapped files are removed once the tensor is back


def test_bf16_bits_widen_to_the_float32_values_torch_gives():
    """as_float32(bf16_bits(t)) is t.float() bit for bit: normal, subnormal, ±0, ±inf, NaN."""
    import torch

    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.5, 65504.0])
    t = torch.cat([special, torch.randn(4088)]).to(torch.bfloat16).reshape(16, 256)
    bits = kquants.bf16_bits(t)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(kquants.as_float32(bits).view(np.uint32), t.float().numpy().view(np.uint32))


def test_worker_processes_take_bf16_bits_and_give_the_float32_bytes(monkeypatch, tmp_path):
    """bf16 bit patterns handed to the workers (a file of 2 bytes a value) or encoded in this
    process: the bytes of the float32 values, a k-quant with importance and a gguf.quants type."""
    import torch

    t = (torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    x, bits = t.float().numpy(), kquants.bf16_bits(t)
    importance = np.random.default_rng(0).random(512).astype(np.float32)
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 16)  # 128 blocks: shared out in several tasks
    monkeypatch.setattr(kquants, "GGUF_TASK_VALUES", 16 * 512)
    monkeypatch.setattr(kquants, "_mapped_folder", lambda nbytes: str(tmp_path))
    want = {k: kquants.submit_type(x, k, importance if k == "Q4_K" else None).result() for k in ("Q4_K", "Q8_0")}
    with kquants.Workers(2) as workers:
        for k, expected in want.items():
            imp = importance if k == "Q4_K" else None
            np.testing.assert_array_equal(workers.submit(bits, k, imp).result(), expected)
            np.testing.assert_array_equal(kquants.submit_type(bits, k, imp).result(), expected)
    assert list(tmp_path.iterdir()) == []


# --- mixtures -----------------------------------------------------------------------------------
LLAMA_8B = Model(n_layer=32, n_head=32, n_kv_head=8, has_output=True)  # n_gqa 4
MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # worked out by hand


def _types(file_type, model=LLAMA_8B, width=4096):
    def t(name):
        return tensor_type(name, (4096, width), file_type, model).stored

    roles = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    per_layer = {r: [t(f"blk.{i}.{r}.weight") for i in range(model.n_layer)] for r in roles}
    return t("output.weight"), t("token_embd.weight"), per_layer


def test_use_more_bits_is_the_first_and_last_eighth_and_every_third():
    assert [i for i in range(32) if use_more_bits(i, 32)] == MORE_BITS_32


@pytest.mark.parametrize("file_type", ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"])
def test_k_mixtures_follow_llama_cpp(file_type):
    output, embd, layers = _types(file_type)
    default = {"q2_k": "Q2_K", "q3_k_m": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
               "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[file_type]
    assert output == "Q6_K" and embd == default
    for role in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
        assert layers[role] == [default] * 32, role
    more = ["Q6_K" if i in MORE_BITS_32 else default for i in range(32)]
    want_v = {"q2_k": ["Q4_K"] * 32,  # n_gqa 4
              "q3_k_m": ["Q5_K"] * 2 + ["Q4_K"] * 30, "q4_k_s": ["Q5_K"] * 4 + ["Q4_K"] * 28,
              "q4_k_m": more, "q5_k_m": more}.get(file_type, [default] * 32)
    want_down = {"q2_k": ["Q3_K"] * 32, "q3_k_m": ["Q5_K"] * 2 + ["Q4_K"] * 30,
                 "q4_k_s": ["Q5_K"] * 4 + ["Q4_K"] * 28, "q4_k_m": more,
                 "q5_k_m": more}.get(file_type, [default] * 32)
    want_o = {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(file_type, default)
    assert layers["attn_v"] == want_v and layers["ffn_down"] == want_down
    assert layers["attn_output"] == [want_o] * 32


def test_mixture_special_cases():
    no_gqa = Model(n_layer=32, n_head=32, n_kv_head=32, has_output=True)
    assert _types("q2_k", no_gqa)[2]["attn_v"] == ["Q3_K"] * 32
    tied = Model(n_layer=32, n_head=32, n_kv_head=8, has_output=False)
    assert _types("q4_k_m", tied)[1] == "Q6_K"  # the embedding is the output too
    big = Model(n_layer=80, n_head=64, n_kv_head=8, has_output=True)  # 70B: attn_v to Q5_K
    v = _types("q4_k_s", big)[2]["attn_v"]
    assert v == ["Q5_K"] * 80
    # llama.cpp's 70B class is per architecture: llama's needs grouped KV heads (else its 65B),
    # qwen2's any 80 layers, phi3's none
    for arch, kv, bumped in (("llama", 64, False), ("qwen2", 64, True), ("phi3", 8, False)):
        model = Model(n_layer=80, n_head=64, n_kv_head=kv, has_output=True, arch=arch)
        assert model.is_70b_class == bumped, arch
        assert (_types("q4_k_s", model)[2]["attn_v"][10] == "Q5_K") == bumped, arch
    assert _types("q4_0")[0] == "Q6_K" and _types("q8_0")[0] == "Q8_0"
    assert _types("f16")[2]["attn_v"] == ["F16"] * 32
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", LLAMA_8B).stored == "F32"
    # Phi-3's fused attn_qkv takes attn_v's rules (llama.cpp 0.3.36's quantizer: see
    # test_mixtures_of_experts_follow_llama_cpp)
    for file_type in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"):
        qkv = [tensor_type(f"blk.{i}.attn_qkv.weight", (6144, 4096), file_type, LLAMA_8B).stored
               for i in range(32)]
        assert qkv == _types(file_type)[2]["attn_v"], file_type


@pytest.mark.parametrize("file_type,width,want", [
    ("q2_k", 128, "Q4_0"), ("q3_k_m", 128, "Q4_0"), ("q4_k_s", 128, "Q5_0"),
    ("q5_k_s", 128, "Q5_1"), ("q6_k", 128, "Q8_0"), ("q4_k_m", 100, "F16"), ("q4_0", 100, "F16")])
def test_rows_that_do_not_fill_a_block_fall_back_as_llama_cpp(file_type, width, want):
    choice = tensor_type("blk.5.ffn_up.weight", (64, width), file_type, LLAMA_8B)
    assert choice.stored == want and choice.wanted != want
    out = tensor_type("output.weight", (64, width), file_type, LLAMA_8B)
    assert out.stored == ("Q8_0" if width % 32 == 0 else "F16")


def test_the_workers_count_stays_within_a_cgroup_cpu_quota(tmp_path):
    """`docker --cpus 2.5` writes "250000 100000" to cpu.max and leaves the affinity whole: the
    export starts 3 workers (the quota rounded up), not one per visible core; no quota ("max"),
    no file, or a file it cannot read: the affinity's count."""
    import os

    from qlora.export.kquants import cgroup_cpu_quota, usable_cores

    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("250000 100000\n")
    assert cgroup_cpu_quota(str(cpu_max)) == 3
    assert usable_cores(str(cpu_max)) == min(affinity, 3)
    cpu_max.write_text("50000 100000\n")  # half a CPU: one worker
    assert usable_cores(str(cpu_max)) == 1
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_quota(str(cpu_max)) is None and usable_cores(str(cpu_max)) == affinity
    cpu_max.write_text("garbled\n")
    assert usable_cores(str(cpu_max)) == affinity
    assert usable_cores(str(tmp_path / "absent")) == affinity


def test_mixtures_of_experts_follow_llama_cpp():
    """llama.cpp's rules for experts (src/llama-quant.cpp): stacked experts by their role, and at 8
    experts (Mixtral) attn_k / attn_v in Q8_0 and attn_output in Q5_K up to q4_k_m. Checked
    against llama.cpp's own quantizer on 8-layer Mixtral and Qwen3-MoE models in
    benchmarks/kquant_vs_llamacpp.py (docs/MERGE_AND_EXPORT.md)."""
    mixtral = Model(n_layer=32, n_head=32, n_kv_head=8, has_output=True, n_expert=8)
    qwen3_moe = Model(n_layer=32, n_head=32, n_kv_head=4, has_output=True, n_expert=128)

    def t(name, file_type, model, shape=(8, 4096, 4096)):
        return tensor_type(name, shape, file_type, model).stored

    more = ["Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)]
    for model in (mixtral, qwen3_moe):
        assert [t(f"blk.{i}.ffn_down_exps.weight", "q4_k_m", model) for i in range(32)] == more
        assert t("blk.3.ffn_gate_exps.weight", "q4_k_m", model) == "Q4_K"
        assert t("blk.3.ffn_up_exps.weight", "q3_k_m", model) == "Q3_K"
    for file_type in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q8_0"):
        assert t("blk.9.attn_k.weight", file_type, mixtral) == "Q8_0"
        assert t("blk.9.attn_v.weight", file_type, mixtral) == "Q8_0"
    assert t("blk.9.attn_output.weight", "q4_k_m", mixtral) == "Q5_K"
    assert t("blk.9.attn_output.weight", "q2_k", mixtral) == "Q5_K"  # not the dense Q3_K
    assert t("blk.9.attn_output.weight", "q5_k_m", mixtral) == "Q5_K"
    assert t("blk.9.attn_output.weight", "q4_0", mixtral) == "Q4_0"
    # more experts than 8: the dense rules
    assert t("blk.9.attn_k.weight", "q4_k_m", qwen3_moe) == "Q4_K"
    assert t("blk.9.attn_output.weight", "q2_k", qwen3_moe) == "Q3_K"
    assert [t(f"blk.{i}.attn_v.weight", "q4_k_m", qwen3_moe) for i in range(32)] == more
    assert t("blk.0.attn_k.weight", "f16", mixtral) == "F16"
    # an expert's rows are its input width: Qwen3-30B-A3B's down projections, 768 wide, fill
    # three Q4_K blocks; a 64-wide one falls back as a dense row does
    assert t("blk.0.ffn_down_exps.weight", "q4_k_m", qwen3_moe, (128, 2048, 768)) == "Q6_K"
    assert t("blk.5.ffn_down_exps.weight", "q4_k_m", qwen3_moe, (4, 256, 64)) == "Q5_0"
