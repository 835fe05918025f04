"""Where the LoRA-dropout forward kernel's time goes (run on the device; fifth session).

    python benchmarks/lora_dropout_variants.py

At Llama-3-8B's q/k/v (2048 × 4096, 3 adapters, r = 16) and down_proj input (2048 × 14336, 1
adapter), times the module's kernel (kernels/lora_dropout.down_triton), a plain copy of x, and a
per-slot kernel in three modes: 0 the products by tl.dot, 1 by CUDA-core multiply and sum, 2 no
product at all (x's tile loaded, masked and summed: what drawing the masks costs), over a few tile
shapes. Prints one JSON line per variant: [median ms, max relative error against the reference].
`per_slot` is the module's forward kernel (lora_dropout_triton.lora_dropout_down) with a MODE
switch and without its edge masks: a study copy, kept beside the figures docs/BENCHMARKS.md quotes.
"""

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_check import _call_ms  # noqa: E402  (this folder is on the path: a script's own)
from qlora.kernels import lora_dropout as L  # noqa: E402
from qlora.kernels.lora_dropout_triton import pick, slot_bits  # noqa: E402


@triton.jit
def per_slot(x_ptr, a0, a1, a2, out_ptr, seed_ptr, salt0, salt1, salt2, threshold, rows_n, width,
             per_row, tiles, tiles_per_split, r, N: tl.constexpr, R: tl.constexpr,
             BM: tl.constexpr, QW: tl.constexpr, MODE: tl.constexpr, ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    row_ok = rows < rows_n
    rank = tl.arange(0, R)
    t = tl.arange(0, QW)
    seed = tl.load(seed_ptr)
    acc0 = tl.zeros([BM, R], dtype=tl.float32)
    acc1 = tl.zeros([BM, R], dtype=tl.float32)
    acc2 = tl.zeros([BM, R], dtype=tl.float32)
    tile = split * tiles_per_split
    end = tl.minimum(tile + tiles_per_split, tiles)
    while tile < end:
        j, q0 = tile // (256 // QW), (tile % (256 // QW)) * QW
        counters = (rows * per_row + j)[:, None] * 256 + q0 + t[None, :]
        for i in tl.static_range(N):
            l0, l1, l2, l3 = tl.randint4x(seed + pick(i, salt0, salt1, salt2), counters,
                                          n_rounds=ROUNDS)
            for slot in tl.static_range(8):
                cols = j * 2048 + slot * 256 + q0 + t
                x = tl.load(x_ptr + rows[:, None] * width + cols[None, :], mask=row_ok[:, None],
                            other=0.0)
                kept = tl.where(slot_bits(l0, l1, l2, l3, slot) >= threshold, x, 0.0).to(x.dtype)
                if MODE == 2:
                    product = tl.zeros([BM, R], dtype=tl.float32) + tl.sum(
                        kept.to(tl.float32), axis=1)[:, None]
                else:
                    a = tl.load(pick(i, a0, a1, a2) + rank[None, :] * width + cols[:, None])
                    if MODE == 0:
                        product = tl.dot(kept, a.to(x.dtype))
                    else:
                        product = tl.sum(kept.to(tl.float32)[:, :, None] * a[None, :, :], axis=1)
                if i == 0:
                    acc0 += product
                elif i == 1:
                    acc1 += product
                else:
                    acc2 += product
        tile += 1
    for i in tl.static_range(N):
        tl.store(out_ptr + (split * rows_n + rows[:, None]) * (N * r) + i * r + rank[None, :],
                 pick(i, acc0, acc1, acc2), mask=row_ok[:, None])


def main() -> None:
    dev, p = "cuda", 0.05
    seed = torch.tensor(12345, dtype=torch.int64, device=dev)
    for name, width, n in (("qkv", 4096, 3), ("down", 14336, 1)):
        x = torch.randn(2048, width, device=dev).bfloat16()
        adapters = [torch.randn(16, width, device=dev) * 0.02 for _ in range(n)]
        salts, scales = tuple(11 * i + 3 for i in range(n)), (2.0,) * n
        want = L.down_reference(x, adapters, seed, salts, scales, p).float()
        print(json.dumps({f"{name}-module": _call_ms(
            lambda: L.down_triton(x, adapters, seed, salts, scales, p))}), flush=True)
        print(json.dumps({f"{name}-copy-of-x": _call_ms(lambda: x.clone())}), flush=True)
        padded, salt_args = adapters + [adapters[0]] * (3 - n), list(salts) + [0] * (3 - n)
        for mode in (0, 1, 2):
            for rows, qw, warps, programs in ((64, 32, 8, 512), (32, 32, 4, 512), (64, 64, 8, 512),
                                              (128, 32, 8, 512), (64, 32, 4, 1024), (16, 32, 4, 512)):
                if mode == 1 and rows * qw * 16 > 32768:
                    continue
                tiles = width // 2048 * (256 // qw)
                splits = max(1, min(tiles, -(-programs // (2048 // rows))))
                per = -(-tiles // splits)
                splits = -(-tiles // per)
                part = torch.empty(splits, 2048, n * 16, device=dev)

                def go():
                    per_slot[(2048 // rows, splits)](
                        x, *padded, part, seed, *salt_args, round(p * 65536), 2048, width,
                        width // 2048, tiles, per, 16, N=n, R=16, BM=rows, QW=qw, MODE=mode,
                        ROUNDS=7, num_warps=warps)
                    return part.sum(0)

                err = None
                if mode != 2:
                    got = go() * (2.0 / (1 - p))
                    err = float((got - want).abs().max() / want.abs().max())
                key = f"{name}-mode{mode}-rows{rows}-qw{qw}-warps{warps}-programs{programs}"
                print(json.dumps({key: [round(_call_ms(go), 4), err]}), flush=True)


if __name__ == "__main__":
    main()
