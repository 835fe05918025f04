"""What two levers the step does not use would buy, at Llama-3-8B's shapes (seventh session).

    python benchmarks/levers_probe.py            # on the GPU machine; one JSON line per measurement

1. FP8 base GEMMs. The step's base GEMMs run in bf16 (dense weights dequantized from NF4). Here
   each of the four grouped shapes (q/k/v, o, gate/up, down; 2048 tokens) is timed as the step
   runs it (bf16 x·Wᵀ forward, ∂y·W backward) and as torch._scaled_mm in float8_e4m3 with one
   scale per row of each operand (bf16 out), with and without the cost of making the fp8
   operands from bf16 ones (a row's absmax, the scale, the cast); plus the relative error of
   the fp8 product against the bf16 one.
2. The dropout masks' Philox rounds. The step's LoRA-dropout kernels (kernels/lora_dropout.py)
   draw their masks with PHILOX_ROUNDS rounds; timed here with those rounds and with none, at
   q/k/v (3 adapters over 4096) and down (1 over 14336): the upper bound of what a cheaper mask
   generator could save.

Neither is a change to the step: both are figures for deciding whether to make one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TOKENS = 2048
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FP8 = torch.float8_e4m3fn


def timed_ms(fn, inner: int = 10, reps: int = 15) -> float:
    """Median milliseconds of one call, `inner` calls back to back between two events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[reps // 2]


def to_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [rows, cols] bf16 -> (fp8 rows, fp32 scale per row [rows, 1]): t ≈ fp8 · scale."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (t.float() / scale).to(FP8), scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def fp8_mm(a, a_scale, b_rows, b_scale) -> torch.Tensor:
    """a·b_rowsᵀ in bf16 from fp8 operands, each with one scale per row (b_rowsᵀ is column-major,
    as torch._scaled_mm wants its second operand)."""
    return torch._scaled_mm(a, b_rows.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1),
                            out_dtype=torch.bfloat16)


def fp8_gemms() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        x = torch.randn(TOKENS, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        dy = torch.randn(TOKENS, n, device="cuda", generator=g, dtype=torch.bfloat16)
        flops = 2 * TOKENS * n * k
        # forward y = x·Wᵀ: x's rows and W's rows, one scale each
        xq, xs = to_fp8_rows(x)
        wq, ws = to_fp8_rows(w)
        fwd_bf16 = timed_ms(lambda: x @ w.t())
        fwd_fp8 = timed_ms(lambda: fp8_mm(xq, xs, wq, ws))
        fwd_fp8_cast = timed_ms(lambda: fp8_mm(*to_fp8_rows(x), *to_fp8_rows(w)))
        err_fwd = rel_err(fp8_mm(xq, xs, wq, ws), x @ w.t())
        # backward ∂x = ∂y·W: ∂y's rows and Wᵀ's rows (W's columns), one scale each
        dyq, dys = to_fp8_rows(dy)
        wtq, wts = to_fp8_rows(w.t().contiguous())
        bwd_bf16 = timed_ms(lambda: dy @ w)
        bwd_fp8 = timed_ms(lambda: fp8_mm(dyq, dys, wtq, wts))
        err_bwd = rel_err(fp8_mm(dyq, dys, wtq, wts), dy @ w)
        emit({"probe": "fp8-gemm", "shape": name, "n": n, "k": k, "tokens": TOKENS,
              "fwd_bf16_ms": round(fwd_bf16, 4), "fwd_fp8_ms": round(fwd_fp8, 4),
              "fwd_fp8_with_casts_ms": round(fwd_fp8_cast, 4),
              "bwd_bf16_ms": round(bwd_bf16, 4), "bwd_fp8_ms": round(bwd_fp8, 4),
              "fwd_bf16_tflops": round(flops / fwd_bf16 / 1e9, 1),
              "fwd_fp8_tflops": round(flops / fwd_fp8 / 1e9, 1),
              "rel_err_fwd": round(err_fwd, 5), "rel_err_bwd": round(err_bwd, 5)})


def dropout_rounds() -> None:
    from qlora.kernels import lora_dropout
    from qlora.kernels.dropout import PHILOX_ROUNDS

    g = torch.Generator(device="cuda").manual_seed(1)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")
    for name, (n_adapters, k) in {"qkv": (3, 4096), "down": (1, 14336)}.items():
        x = torch.randn(TOKENS, k, device="cuda", generator=g, dtype=torch.bfloat16)
        adapters = [torch.randn(16, k, device="cuda", generator=g) * 0.02
                    for _ in range(n_adapters)]
        grad_h = torch.randn(TOKENS, 16 * n_adapters, device="cuda", generator=g,
                             dtype=torch.bfloat16)
        salts, scales = tuple(range(1, n_adapters + 1)), (2.0,) * n_adapters
        rec = {"probe": "dropout-rounds", "shape": name, "adapters": n_adapters, "k": k}
        for rounds in (PHILOX_ROUNDS, 0):
            lora_dropout.PHILOX_ROUNDS = rounds  # the kernels' launch reads the module's name
            rec[f"forward_ms_rounds{rounds}"] = round(timed_ms(
                lambda: lora_dropout.down_triton(x, adapters, seed, salts, scales, 0.05)), 4)
            rec[f"backward_ms_rounds{rounds}"] = round(timed_ms(
                lambda: lora_dropout.backward_triton(x, grad_h, adapters, seed, salts, scales, 0.05,
                                                     want_dx=True)), 4)
        lora_dropout.PHILOX_ROUNDS = PHILOX_ROUNDS
        copy = torch.empty_like(x)
        rec["copy_of_x_ms"] = round(timed_ms(lambda: copy.copy_(x)), 4)
        emit(rec)


def main() -> int:
    emit({"probe": "device", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__})
    for part in (fp8_gemms, dropout_rounds):
        try:
            part()
        except Exception as err:  # noqa: BLE001 - a failed part is a result; the next one runs
            emit({"probe": part.__name__, "error": f"{type(err).__name__}: {err}"[:800]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
