"""Attention forward+backward at one shape: the eager step's causal SDPA against the graph step's
varlen (flash) path, as qlora.models.decoder calls them. Prints one JSON line per variant.

    python benchmarks/attention_bench.py [--heads 32 --kv-heads 8 --seq 2048 --head-dim 128 --layers 32]

Why: the CUDA-graph step sends every batch through varlen attention (one graph for packed and
unpacked rows); this tells what that costs against SDPA's causal kernel on one-document rows.
Needs CUDA.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    from qlora.models import decoder

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="per-step figure = per-call × layers")
    args = ap.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    print(json.dumps(dict(torch=torch.__version__, varlen_signature=str(inspect.signature(varlen_attn)),
                          varlen_takes_gqa=decoder._varlen_takes_gqa())))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(heads):  # the projections' layout [B, T, H, D] seen as [B, H, T, D], as the model does
        t = torch.randn(1, args.seq, heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        return t.transpose(1, 2).requires_grad_(True)

    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    grad = torch.randn(1, args.heads, args.seq, args.head_dim, device="cuda", dtype=torch.bfloat16,
                       generator=gen)
    plan = decoder.Varlen(torch.tensor([0, args.seq], dtype=torch.int32, device="cuda"), args.seq)
    variants = {"sdpa-causal": "causal", "varlen-1doc": plan}
    outs = {}
    for name, mask in variants.items():
        def fwd(mask=mask):
            return decoder.sdpa(q, k, v, mask)

        def fwd_bwd(mask=mask):
            q.grad = k.grad = v.grad = None
            decoder.sdpa(q, k, v, mask).backward(grad)

        with torch.no_grad():
            outs[name] = fwd().float()
        f, fb = time_ms(lambda: fwd()), time_ms(fwd_bwd)
        print(json.dumps(dict(variant=name, fwd_ms=round(f, 3), fwd_bwd_ms=round(fb, 3),
                              per_step_ms_ckpt=round((2 * f + (fb - f)) * args.layers, 1))))
    diff = (outs["sdpa-causal"] - outs["varlen-1doc"]).abs().max().item()
    print(json.dumps(dict(check="varlen == sdpa causal", max_abs_diff=diff)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
