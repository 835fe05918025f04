"""The grouped expert GEMMs of a mixture of experts (src/qlora/kernels/experts.py) at
Qwen3-30B-A3B's shapes, by each path grouped_mm can take: torch._grouped_mm (where it takes the
case: bf16, rows of 16-byte multiples, sm90+), the Triton kernel (TritonGroupedMM: exact rows,
nothing read on the host) and the padded batched matmul (padded_grouped_mm: every expert's rows
padded to the largest group).

The four GEMMs of a sparse layer, E = 128 experts, top-k 8, hidden 2048, expert intermediate 768,
LoRA rank 16, at --tokens 2048 (M = 16,384 rows sorted by expert), b as the grouped step passes
it (speed/moe.py):
  gate_up  a [M, 2048] x b [E, 2048, 1536]  (the dense weights' transposed view; frozen)
  down     a [M, 768]  x b [E, 768, 2048]   (transposed view; frozen)
  lora_a   a [M, 2048] x b [E, 2048, 16]    (LoRA A's transposed view; trained)
  lora_b   a [M, 16]   x b [E, 16, 1536]    (LoRA B as held, Bᵀ; trained)
Routing balanced (each token's k experts drawn at random) or unbalanced (every token to the same
k experts: the padded path's worst case, E/k x the rows), in bf16 and fp16. For each case and
path, one JSON line (stdout, and appended to --out): forward ms and forward + backward ms (CUDA
events, the median of --reps after --warmup runs; backward as training runs it: the input's
gradient, and the weight's for the LoRA factors), the peak memory each allocates beyond its
inputs (torch.cuda.max_memory_allocated's rise, MiB), and the output's max |diff| / max |ref|
against the per-expert loop (each expert's rows times its weight, in fp32 on the same inputs).

    python benchmarks/grouped_gemm.py --out $OUT/grouped-gemm.jsonl
    python benchmarks/grouped_gemm.py --dtypes bf16 --routings unbalanced --gemms gate_up
    TRITON_INTERPRET=1 python benchmarks/grouped_gemm.py --device cpu --tokens 16 --experts 4 \
        --top-k 2 --hidden 64 --intermediate 48 --reps 1 --warmup 0    # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora.kernels.experts import (TritonGroupedMM, grouped_mm_runs,  # noqa: E402
                                   looped_grouped_mm, padded_grouped_mm)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = ("torch", "triton", "padded")
GEMMS = ("gate_up", "down", "lora_a", "lora_b")
ROUTINGS = ("balanced", "unbalanced")


def routing_offsets(kind: str, tokens: int, experts: int, k: int, device) -> torch.Tensor:
    """int32 [E]: where each expert's rows end once the tokens' k choices are sorted by expert."""
    if kind == "balanced":
        choices = torch.rand(tokens, experts, device=device).topk(k, dim=1).indices
    else:  # every token to the same k experts
        choices = torch.arange(k, device=device).expand(tokens, k)
    counts = torch.bincount(choices.reshape(-1), minlength=experts)
    return torch.cumsum(counts, 0).to(torch.int32)


def operands(gemm: str, args, rows: int, dtype: torch.dtype, device):
    """(a, b, b_trained): a [M, K] and b [E, K, N] laid out as the grouped step passes them."""
    e, h, i, r = args.experts, args.hidden, args.intermediate, args.rank
    scale = {"gate_up": h, "down": i, "lora_a": h, "lora_b": r}[gemm] ** -0.5
    shapes = {  # (K of a, b as made, transposed to [E, K, N]?, trained)
        "gate_up": (h, (e, 2 * i, h), True, False),
        "down": (i, (e, h, i), True, False),
        "lora_a": (h, (e, r, h), True, True),
        "lora_b": (r, (e, r, 2 * i), False, True),
    }
    k, b_shape, transposed, trained = shapes[gemm]
    a = torch.randn(rows, k, device=device).to(dtype)
    b = (torch.randn(b_shape, device=device) * scale).to(dtype)
    return a, (b.transpose(1, 2) if transposed else b), trained


def loop_reference(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return looped_grouped_mm(a.float(), b.float(), offsets)


def run_path(path: str, a, b, offsets) -> torch.Tensor:
    if path == "torch":
        return torch._grouped_mm(a, b, offs=offsets)
    if path == "triton":
        return TritonGroupedMM.apply(a, b, offsets)
    return padded_grouped_mm(a, b, offsets)


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)


def measure(fn, timer: Timer, warmup: int, reps: int, device) -> tuple[float, float | None]:
    """(median ms, peak MiB allocated beyond what was allocated before) of fn()."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = [timer(fn) for _ in range(reps)]
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
    return statistics.median(times), peak


def bench_case(args, gemm: str, routing: str, dtype_name: str, device) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows = args.tokens * args.top_k
    torch.manual_seed(args.seed)
    offsets = routing_offsets(routing, args.tokens, args.experts, args.top_k, device)
    a, b, trained = operands(gemm, args, rows, dtype, device)
    grad = torch.randn(rows, b.shape[2], device=device).to(dtype)
    ref = loop_reference(a, b, offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    common = dict(gemm=gemm, routing=routing, dtype=dtype_name, M=rows, K=a.shape[1],
                  N=b.shape[2], E=b.shape[0], largest_group=int(counts.max()),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__)
    timer = Timer(device)
    records = []
    for path in args.paths:
        record = dict(common, path=path)
        if path == "torch" and not grouped_mm_runs(a, b):
            records.append(dict(record, skipped="torch._grouped_mm does not take these "
                                                "(bf16, rows of 16-byte multiples, sm90+)"))
            continue
        a_in = a.detach().requires_grad_()
        b_in = b.detach().requires_grad_(trained)
        wanted = [a_in, b_in] if trained else [a_in]
        try:
            with torch.no_grad():
                out = run_path(path, a, b, offsets)
            diff = float((out.float() - ref).abs().max() / ref.abs().max())
            del out

            def forward():
                with torch.no_grad():
                    run_path(path, a, b, offsets)

            def forward_backward():
                torch.autograd.grad(run_path(path, a_in, b_in, offsets), wanted, grad)

            fwd_ms, fwd_mib = measure(forward, timer, args.warmup, args.reps, device)
            both_ms, both_mib = measure(forward_backward, timer, args.warmup, args.reps, device)
        except RuntimeError as error:  # out of memory, or a path that refuses the case
            records.append(dict(record, error=f"{type(error).__name__}: {str(error)[:300]}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        records.append(dict(record, forward_ms=round(fwd_ms, 4),
                            forward_backward_ms=round(both_ms, 4),
                            peak_forward_mib=None if fwd_mib is None else round(fwd_mib, 1),
                            peak_forward_backward_mib=None if both_mib is None
                            else round(both_mib, 1),
                            b_grad=trained, max_rel_diff=diff))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768, help="each expert's")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--dtypes", default="bf16,fp16", help=f"of {','.join(DTYPES)}")
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--gemms", default=",".join(GEMMS))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--reps", type=int, default=20, help="timed runs (the median is kept)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="append one JSON line a case here")
    args = ap.parse_args(argv)
    lists = {"dtypes": DTYPES, "routings": ROUTINGS, "gemms": GEMMS, "paths": PATHS}
    for name, allowed in lists.items():
        values = getattr(args, name).split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            ap.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, name, values)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (--device cpu with TRITON_INTERPRET=1 runs a smoke test)")
    out = open(args.out, "a") if args.out else None
    try:
        for dtype_name in args.dtypes:
            for routing in args.routings:
                for gemm in args.gemms:
                    for record in bench_case(args, gemm, routing, dtype_name, device):
                        line = json.dumps(record)
                        print(line, flush=True)
                        if out:
                            out.write(line + "\n")
                            out.flush()
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
