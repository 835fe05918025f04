"""Where one QLoRA training step of ours spends its time, on the GPU machine.

    python3 benchmarks/profile_step.py --shape qwen2.5-1.5b --seq 2048 [--no-checkpointing]
        [--fast [--group]] [--ours [--graphs]] [--fused] [--out DIR]

Builds the shape with random weights (qlora.models.load.random_model, NF4 + double quant, bf16),
LoRA r=16 on all linear layers, paged 8-bit AdamW, then profiles a few steps with torch.profiler
and prints: wall time per step, the number of CUDA kernels launched per step, GPU busy time per
step (sum of kernel times: the gap to wall time is host/launch overhead), and the top kernels and
host-side ops. A Chrome trace goes to DIR/trace.json. Needs CUDA; the tests do not run it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(args):
    import bitsandbytes as bnb

    from qlora import memory
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig

    config = dict(memory.SHAPES[args.shape])
    spec = spec_from_config(config, source=args.shape)
    model = random_model(spec, QuantConfig(compute_dtype=torch.bfloat16), device="cuda")
    attach_adapters(model, AdapterConfig(r=16, alpha=32, dropout=0.05))
    model.gradient_checkpointing = args.checkpointing
    from qlora.speed import SpeedPlan, apply_speed

    # the flags' fast paths, put on as qlora train does (one apply_speed); --ours seeds the dropout
    # a mixture of experts' experts grouped as qlora train always runs them
    # (SpeedPlan.for_run): without it the profile is the reference loop over experts
    applied = apply_speed(model, SpeedPlan(fused_kernels=args.fused, fast_base=args.fast,
                                           grouped=args.fast and args.group,
                                           keep_attention=args.keep_attention,
                                           seeded_dropout=args.ours, grouped_experts=True))
    model.train()
    if args.ours:  # the step as `qlora train` runs it (benchmarks/train_step.py QloraStep)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_step import QloraStep

        ns = argparse.Namespace(device="cuda", lr=2e-4, seed=0, max_grad_norm=0.3)
        ours = QloraStep(model, ns, applied, graphs=args.graphs)
        ours.reset(args.checkpointing, args.seq)

        def our_step(ids):
            # the step takes host ids either way: staged into the graph, or pinned and copied
            loss = ours.forward_backward(ids.cpu())
            ours.optimizer_step()
            return loss

        return model, our_step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)

    def step(ids):
        loss = model(ids, labels=ids) / (ids.numel() - 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("dequant", ("dequant",)),
    ("dropout", ("dropout",)),
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("norm/swiglu/rope", ("rms", "swiglu", "rope", "rotary")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll")),
    ("optimizer", ("adam", "optimizer", "kOptimizer", "clip", "norm")),
    ("copy", ("memcpy", "memset", "copy", "cat")),
    ("elementwise", ("elementwise", "reduce", "add", "mul")),
)


def device_work(events, device_type) -> list:
    """The events of kernels and memory operations on `device_type`. Not a record_function
    range (a user annotation: the optimizer's "Optimizer.step#…"), whose event on the device
    spans its kernels: counted beside them, the paged AdamW's 17.6 ms of a Qwen3-30B-A3B step
    came twice into the profiles of 2026-12-07 (their "optimizer" 36.9 ms, and GPU busy over
    the wall time)."""
    return [e for e in events
            if e.device_type == device_type and not getattr(e, "is_user_annotation", False)]


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((k for k, keys in KINDS if any(s.lower() in name for s in keys)), "other")


def kernels_of_kind(kernels, kind: str) -> list:
    return [e for e in kernels if kind_of(e.key) == kind]


def by_kind(kernels, steps: int) -> dict:
    """GPU milliseconds and kernel launches per step for each kind of kernel (KINDS; "other")."""
    totals: dict = {}
    for e in kernels:
        kind = kind_of(e.key)
        ms, n = totals.get(kind, (0.0, 0))
        totals[kind] = (ms + e.self_device_time_total / 1e3 / steps, n + e.count / steps)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1][0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b", help="a qlora.memory.SHAPES name (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row, micro-batch 1")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing (default: on)")
    parser.add_argument("--fast", action="store_true", help="the 4-bit bases through our dequantize (SpeedPlan.fast_base)")
    parser.add_argument("--group", action="store_true", help="--fast with grouped projections")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after warm-up)")
    parser.add_argument("--ours", action="store_true", help="flattened adapters + seeded dropout")
    parser.add_argument("--graphs", action="store_true", help="--ours with the CUDA-graph step")
    parser.add_argument("--fused", action="store_true", help="fused Triton RMSNorm/SwiGLU/RoPE")
    parser.add_argument("--keep-attention", action="store_true",
                        help="each layer's attention kept for its backward (qlora train's default "
                             "where it fits)")
    parser.add_argument("--detail", type=lambda t: [k for k in t.split(",") if k], default=[],
                        help="kinds whose kernels are each listed by full name, e.g. copy,elementwise")
    parser.add_argument("--out", default=".", help="folder for trace.json")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    _, step = build(args)
    ids = torch.randint(4, 1024, (1, args.seq), device="cuda")
    for _ in range(3):  # warm-up (and compilation)
        step(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(ids)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(ids)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = device_work(events, torch.autograd.DeviceType.CUDA)
    n_kernels = sum(e.count for e in kernels) / args.steps
    gpu_busy = sum(e.self_device_time_total for e in kernels) / args.steps / 1e6
    print(f"{args.shape} seq {args.seq} checkpointing={args.checkpointing} fast={args.fast} "
          f"ours={args.ours} graphs={args.graphs} group={args.group}")
    print(f"wall {wall * 1e3:.1f} ms/step · GPU busy {gpu_busy * 1e3:.1f} ms/step · "
          f"{n_kernels:.0f} kernels/step · host-bound share {(1 - gpu_busy / wall) * 100:.0f}%")
    print("GPU time per step by kind (ms):  " + "  ".join(
        f"{kind} {ms:.1f} ({n:.0f})" for kind, (ms, n) in by_kind(kernels, args.steps).items()))
    for kind in args.detail:  # every kernel of these kinds, full name, busiest first
        print(f"--- {kind}: ms per step, launches per step, kernel")
        for e in sorted(kernels_of_kind(kernels, kind), key=lambda e: -e.self_device_time_total):
            print(f"{e.self_device_time_total / 1e3 / args.steps:8.3f} {e.count / args.steps:6.0f}  "
                  f"{e.key[:200]}")
    print(events.table(sort_by="self_cuda_time_total", row_limit=25))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(Path(args.out) / "trace.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
