"""The Triton grouped GEMM (qlora.kernels.experts: TritonGroupedMM, kernels/experts_triton.py) run
by Triton's interpreter on the CPU, against the per-expert loop of `a[rows of e] @ b[e]` and the
padded batched matmul (padded_grouped_mm): forward, and the input and weight gradients against
autograd through the loop; fp32, bf16 and fp16; uneven groups, empty experts first, in the
middle and last, every row in one expert, rows not a multiple of BLOCK_M, widths that are not
multiples of the blocks nor of 16 bytes, b and the output's gradient as transposed views, no
rows at all. Then a tiny Qwen3-MoE's grouped step through the kernel against its reference
loop over experts.

TRITON_INTERPRET=1 must be set before triton is imported, so each check runs in a subprocess
(test_dequant_kernel.interpreted) that prints one JSON line.

Bounds, max |got − want| / max |want|:
- fp32: both round the same products and sum them in fp32, in other orders (the kernel by
  blocks of K, torch by its own): each sum's rounding error is about sqrt(K)·2^-24 of the terms'
  magnitude for these random values, 1e-7 to 1e-6 at K <= 150 (measured at most 7e-7), so 1e-5
  (the fused kernels' fp32 bound, tests/test_fused_kernels.py) passes them; a row of a wrong
  expert or a row left out is off by O(1) (`moved`: one row given to the next expert, > 10x the
  bound).
- bf16: each product of two bf16 values is exact in fp32 and both sum in fp32, so the two differ
  by the fp32 sums' difference (1e-6) and then by their single rounding to bf16 (the kernel to
  nearest as the GPU, under the interpreter too): at most one bf16 unit where the two sums
  straddle a rounding boundary, 2^-7 of the value at most. 2^-6 (two units of the largest value)
  is that with room; a wrong row is again O(1). And element by element, each bf16 output is
  within half a bf16 unit of the fp32 loop's value (plus 1e-5 of the largest for the sums'
  order): rounded to nearest, which truncation (the interpreter's own conversion) is not.
- fp16: the same as bf16 with fp16's unit, 2^-10 of the value at most: 2^-9. Its gradients are
  measured against the fp32 loop's rounded to fp16 (the bf16 argument again).
"""

from __future__ import annotations

import pytest

from test_dequant_kernel import interpreted

FP32_BOUND = 1e-5
BF16_BOUND = 2**-6
FP16_BOUND = 2**-9  # the same two units of fp16's 11-bit significand

CHECK = r"""
import json, torch
from qlora.kernels import experts
from qlora.kernels.experts import BLOCK_M, TritonGroupedMM, padded_grouped_mm
from qlora.kernels.experts import looped_grouped_mm as loop  # each expert's rows @ its weight

def past_nearest(got, exact):
    # how far past half a bf16 (fp16) unit of the exact (fp32) value each element is, beyond
    # the fp32 sums' order (1e-5 of the largest): > 0 anywhere is a result not rounded to nearest
    bits = 7 if got.dtype == torch.bfloat16 else 10  # the significand's stored bits
    got, exact = got.detach().double(), exact.detach().double()
    if exact.numel() == 0:
        return -1.0
    unit = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - bits)
    return float(((got - exact).abs() - unit / 2 - 1e-5 * exact.abs().max()).max())

def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))

# (rows of each expert, K, N, b a transposed view)
CASES = [
    ([0, 70, 0, 80, 0], 24, 40, True),  # empty first, middle, last; 150 rows: 3 tiles of 64
    ([0, 0, 150, 0], 136, 136, False),  # every row in one expert; K and N past one block
    ([3, 0, 5, 0, 2, 30], 3, 3, True),  # widths of 3 (6 or 12 bytes), groups under a tile
    ([37], 40, 24, False),  # one expert
    ([0, 0, 0], 24, 40, True),  # no rows
]
# every float torch.empty comes back NaN, so an expert the weight-gradient kernel skipped would
# show (the CPU's fresh memory is often zeros already)
real_empty = torch.empty
torch.empty = lambda *size, **kw: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                   else t)(real_empty(*size, **kw))
results = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for counts, k, n, transposed in CASES:
        g = torch.Generator().manual_seed(len(results))
        m, e = sum(counts), len(counts)
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
        a = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
        if transposed:  # the grouped step's layout: [E, N, K] weights read as [E, K, N]
            b = torch.randn(e, n, k, generator=g).to(dtype).requires_grad_()
            b_view = b.transpose(1, 2)
        else:
            b = b_view = torch.randn(e, k, n, generator=g).to(dtype).requires_grad_()
        # with b transposed, the output's gradient column-major too (a's gradient reads it with
        # unit row stride, b's with stride M along its columns)
        grad = (torch.randn(n, m, generator=g).to(dtype).t() if transposed
                else torch.randn(m, n, generator=g).to(dtype))
        got = TritonGroupedMM.apply(a, b_view, offsets)
        # the exact products rounded once: the loop in fp32 (and its gradients), then to the dtype
        a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
        exact = loop(a32, b32.transpose(1, 2) if transposed else b32, offsets)
        ga32, gb32 = torch.autograd.grad(exact, [a32, b32], grad.float())
        padded = padded_grouped_mm(a.detach(), b_view.detach(), offsets)
        ga, gb = torch.autograd.grad(got, [a, b], grad)
        if dtype == torch.float16:  # against the fp32 loop's gradients, rounded
            wa, wb = ga32.to(dtype), gb32.to(dtype)
        else:  # autograd through the loop in the dtype
            want = loop(a, b_view, offsets)
            wa, wb = torch.autograd.grad(want, [a, b], grad)
        # the bound must not pass a wrong grouping: one row moved to the next expert
        moved = None
        nonempty = [i for i, c in enumerate(counts) if c]
        if len(nonempty) > 1:
            shifted = offsets.clone()
            shifted[nonempty[0]] -= 1
            moved = rel(got, loop(a.detach().float(), b_view.detach().float(), shifted))
        results.append(dict(
            case=[str(dtype), counts, k, n, transposed],
            dtypes=[str(x.dtype) for x in (got, ga, gb)],
            shapes=[list(x.shape) for x in (got, ga, gb)] == [[m, n], [m, k], list(b.shape)],
            out=rel(got, exact.to(dtype)), padded=rel(got, padded), grad_a=rel(ga, wa),
            grad_b=rel(gb, wb), nearest=[past_nearest(x, y) for x, y in
                                         [(got, exact), (ga, ga32), (gb, gb32)]],
            grad_b_empty_zero=all(bool((gb[i] == 0).all()) for i, c in enumerate(counts) if not c),
            moved=moved))
# grouped_mm picks the kernel where torch._grouped_mm does not take the operands (fp32, and bf16
# rows of 6 bytes) and Triton runs (here under the interpreter); each case above through it
taken = []
apply = TritonGroupedMM.apply
TritonGroupedMM.apply = lambda *args: taken.append(args[0].dtype) or apply(*args)
x, w = torch.randn(10, 3), torch.randn(2, 3, 5)
offsets = torch.tensor([4, 10], dtype=torch.int32)
via = [rel(experts.grouped_mm(x, w, offsets), loop(x, w, offsets)),
       rel(experts.grouped_mm(x.bfloat16(), w.bfloat16(), offsets),
           loop(x.bfloat16().float(), w.bfloat16().float(), offsets).bfloat16())]
TritonGroupedMM.apply = apply
path = [experts.grouped_mm_path(torch.device("cpu"), torch.float32, 24),
        experts.grouped_mm_path(torch.device("cpu"), torch.bfloat16, 3),
        experts.grouped_mm_path(torch.device("cpu"), torch.bfloat16, 24)]
print(json.dumps(dict(results=results, block_m=BLOCK_M, taken=[str(t) for t in taken], via=via,
                      path=path)))
"""


def test_grouped_gemm_kernel_equals_the_loop_over_experts():
    pytest.importorskip("triton")
    r = interpreted(CHECK)
    assert r["block_m"] == 64  # the cases' 150 rows span tiles (70 and 80 rows: two each)
    assert len(r["results"]) == 15
    for c in r["results"]:
        dtype = c["case"][0]
        bound = {"torch.float32": FP32_BOUND, "torch.bfloat16": BF16_BOUND,
                 "torch.float16": FP16_BOUND}[dtype]
        assert c["dtypes"] == [dtype] * 3 and c["shapes"], c
        assert c["out"] <= bound and c["padded"] <= bound, c
        assert c["grad_a"] <= bound and c["grad_b"] <= bound, c
        assert c["grad_b_empty_zero"], c
        if dtype != "torch.float32":  # each output rounded once, to nearest (as the GPU does)
            assert max(c["nearest"]) <= 0, c
        if c["moved"] is not None:
            assert c["moved"] > 10 * bound, c
    assert r["taken"] == ["torch.float32", "torch.bfloat16"]
    assert r["via"][0] <= FP32_BOUND and r["via"][1] <= BF16_BOUND
    # torch._grouped_mm where it takes them (bf16, rows of 16-byte multiples), else the kernel
    assert r["path"] == ["triton", "triton", "torch"]


MODEL_STEP = r"""
import json, torch
from qlora.kernels import experts
from qlora.speed import SpeedPlan, apply_speed
from qlora.speed.moe import FastExperts
from test_moe import adapted, loss_and_grads, rel_err, token_batch

def refused(*args):
    raise AssertionError("the padded fallback ran")

experts.padded_grouped_mm = refused  # every grouped GEMM through the kernel (or _grouped_mm)
launches = []
apply = experts.TritonGroupedMM.apply
experts.TritonGroupedMM.apply = lambda *args: launches.append(1) or apply(*args)
ids = token_batch(6)
reference, grouped = adapted(PATH, "nf4", torch.float32), adapted(PATH, "nf4", torch.float32)
apply_speed(grouped, SpeedPlan(grouped_experts=True), log=lambda _: None)
on = all(m.grouped for m in grouped.modules() if isinstance(m, FastExperts))
want_loss, want = loss_and_grads(reference, ids)
got_loss, got = loss_and_grads(grouped, ids)
print(json.dumps(dict(
    on=on, launches=len(launches), names=sorted(want) == sorted(got),
    experts=any("experts" in n for n in got), loss=abs(got_loss - want_loss) / abs(want_loss),
    grads=max(rel_err(want[n].float(), got[n].float()) for n in want),
    refused=grouped.cuda_graphs_refused)))
"""


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from qlora.tiny import build_tiny_model
    from test_moe import MOE_VARIANTS

    family, overrides = MOE_VARIANTS["qwen3-moe"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-moe") / "qwen3-moe", family, seed=1,
                            **overrides)


def test_grouped_step_through_the_kernel_equals_the_loop_over_experts(qwen3_moe):
    """A tiny Qwen3-MoE (4-bit experts in fp32, LoRA on every projection) through the grouped
    step, every grouped GEMM by the Triton kernel (the padded fallback made to fail), forward
    and backward, against the reference loop over experts: test_moe's fp32 bounds (the same
    products summed in other orders: 1e-5 in the loss, 1e-4 in gradients carried back through
    both layers' experts and attention)."""
    pytest.importorskip("triton")
    r = interpreted(f"PATH = {str(qwen3_moe)!r}\n" + MODEL_STEP)
    assert r["on"] and r["names"] and r["experts"], r
    # one sparse layer (the other is dense: mlp_only_layers), gate_up and down: the base and two
    # LoRA products each forward (and the base's input gradient in GroupedBase's backward, which
    # calls the kernel without autograd), so at least six
    assert r["launches"] >= 6, r
    assert r["loss"] <= 1e-5 and r["grads"] <= 1e-4, r
    assert r["refused"] is None, r  # nothing read on the host: a CUDA graph may hold the step


# Built without the interpreter, through ptxas (bundled with Triton), for the GPUs the kernel is
# the experts' path on: sm80 (A100), sm86 (RTX 3090, A10), sm89 (RTX 4090, L4, L40S). Each build
# as a launch on Qwen3-30B-A3B's widths gives it: every pointer and stride 16-divisible and the
# unit strides constants (Triton's launcher specializes both), gate_up's weights as the grouped
# step passes them (a transposed view) and LoRA B's as held; the weight gradient at LoRA A's.
BUILD_FOR_GPUS = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from qlora.kernels import experts, experts_triton

GEMM = ["a_ptr", "b_ptr", "offsets_ptr", "out_ptr", "N", "stride_am", "stride_ak", "stride_be",
        "stride_bk", "stride_bn"]
GRAD = ["a_ptr", "g_ptr", "offsets_ptr", "out_ptr", "K", "N", "stride_am", "stride_ak",
        "stride_gm", "stride_gn"]

def build(kernel, names, dtype, units, constants, cc):
    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    signature = {n: "i32" for n in names}
    signature.update({n: f"*{dtype}" for n in names if n.endswith("_ptr")}, offsets_ptr="*i32")
    signature.update({n: "constexpr" for n in units})
    constants = dict(constants, **{n: 1 for n in units}, COMPILED=True,
                     PRECISION="ieee" if dtype == "fp32" else "tf32")
    attrs = {(names.index(n),): backend.parse_attr("D") for n in names if n not in units}
    built = triton.compile(ASTSource(kernel, signature, constants, attrs),
                           target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=experts.GEMM_WARPS,
                                        num_stages=experts.GEMM_STAGES))
    ttgir = built.asm["ttgir"]
    return dict(cc=cc, dtype=dtype, kernel=kernel.fn.__name__, units=units,
                cubin=len(built.asm["cubin"]), shared=built.metadata.shared,
                pipelined="async_copy_global_to_local" in ttgir)

def step(dtype):  # the reduction's values a step: 128 bytes' worth
    return experts.STEP_BYTES // {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]

results = []
for cc, dtype in ((80, "bf16"), (86, "fp16"), (89, "bf16"), (89, "fp32")):
    for units in (["stride_ak", "stride_bk"], ["stride_ak", "stride_bn"]):
        results.append(build(experts_triton.grouped_mm_kernel, GEMM, dtype, units, dict(
            K=2048, E=128, E_PAD=128, BLOCK_M=experts.BLOCK_M, BLOCK_N=experts.BLOCK_N,
            BLOCK_K=step(dtype)), cc))
    results.append(build(experts_triton.grouped_weight_grad_kernel, GRAD, dtype,
                         ["stride_ak", "stride_gn"], dict(
        BLOCK_M=step(dtype), BLOCK_K=experts.BLOCK_M, BLOCK_N=16), cc))
print(json.dumps(results))
"""

# shared memory a block may hold (KiB): sm80 163, sm86 and sm89 99 (CUDA's tuning guides)
SHARED_KIB = {80: 163, 86: 99, 89: 99}


def test_kernels_build_to_machine_code_for_the_gpus_below_sm90():
    """Both kernels compile through ptxas for sm80, sm86 and sm89 as a real launch types them,
    their loads pipelined (cp.async: the GEMM's loop overlaps its loads with the MMAs) and their
    shared memory within each GPU's per-block limit."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD_FOR_GPUS], env=env, capture_output=True,
                          text=True, timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    for built in results:
        assert built["cubin"] > 0 and built["pipelined"], built
        assert built["shared"] <= SHARED_KIB[built["cc"]] * 1024, built
