"""The least time a training step's frozen-base GEMMs take on this GPU: the floor under any
implementation that does the step's arithmetic (dense bf16 weights, cuBLAS at the step's shapes).

A QLoRA step multiplies every token by every frozen weight several times: each forward of the
decoder layers (the policy's, its checkpoint's recompute, and for DPO the reference's), and once
in backward for the input's gradient (the base is frozen: no weight gradient). Those products are
most of the step's arithmetic. This script times exactly those GEMMs, alone, with the weights
already dense in bf16 (no dequantize, no LoRA, no attention, no norms), and sums them as the step
runs them:

    floor = layers x (forwards x Σ_proj t(x @ Wᵀ) + Σ_proj t(g @ W))
            + layers x Σ_{rerun proj} t(x @ Wᵀ)       (the checkpoint's recompute)
            − t(g @ W_qkv)                              (layer 0's input gradient: nothing reads it)
            + head_forwards x t(x_head @ Eᵀ) + t(g_head @ E)

with each layer's projections grouped as qlora runs them (q/k/v one GEMM, gate/up one GEMM, o,
down), x of `tokens` rows and the LM head over `head_tokens` rows (the tokens a label is read
from). Each GEMM is timed with CUDA events over `--reps` runs after a warm-up; the median is kept.

A step that does this arithmetic in bf16 through cuBLAS cannot run faster than its floor, so
`examples / floor` bounds its examples/s on this GPU; `--against NAME=RATE` prints that bound as a
multiple of a peer's measured rate (the same shape, same GPU kind). Where the floor exceeds the
time a target asks for, no work on the rest of the step (dequantize, LoRA, attention, norms)
reaches that target; where it is below, the gap is what that work has to win.

    python benchmarks/gemm_floor.py --shape llama-3-8b --step dpo --out $OUT/gemm-floor.jsonl

Steps (prompt 512 + completions 512 + 512, 4 pairs, packed with each prompt once, as
preference_step.py runs them; seq 2048 for sft):
  dpo   tokens 4 x 1,536; decoder forwards 2 (policy, reference) and the recompute, which stops
        before each layer's down projection (nothing in backward reads its output) and, with
        attention kept for backward (qlora's default where it fits, as preference_step.py and
        train_step.py run it; `--no-keep-attention` otherwise), runs no q/k/v base GEMM either
        (only their LoRA products: speed/kept_attention.py); the head over the
        completions' 4 x 1,024 tokens: 2 forwards (policy, reference; the loss makes its
        gradient in the forward, kernels/cross_entropy.py, so nothing reruns it), 1 backward
  orpo  the same without the reference: 1 forward and the recompute, head 1 forward + 1 backward
  sft   tokens 2,048 (micro-batch 1); 1 forward and the recompute; head over every token, 1 forward
        + 1 backward
`--no-recompute` drops the checkpoint's recompute: the floor of a step that keeps every activation.
`--micro-batches K` splits the step's examples into K forwards (GEMMs of 1/K the rows, each K
times): preference_step.py's qlora-nockpt runs `--step dpo --no-recompute --micro-batches 4`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from train_step import SHAPES, is_moe

# (tokens, head tokens, decoder forwards besides the recompute, head forwards, examples) a step
STEPS = {
    "dpo": (4 * 1536, 4 * 1024, 2, 2, 4),
    "orpo": (4 * 1536, 4 * 1024, 1, 1, 4),
    "sft": (2048, 2048, 1, 1, 1),
}


def projections(shape: dict) -> list[tuple[str, int, int]]:
    """(name, out, in) of each GEMM of a decoder layer, grouped as qlora runs them."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = shape.get("head_dim") or h // nh
    return [("qkv", (nh + 2 * nkv) * hd, h), ("o", h, nh * hd), ("gate_up", 2 * i, h), ("down", h, i)]


def time_gemm(torch, a, b, reps: int) -> float:
    """Median seconds of a @ b over `reps` runs (after 3 untimed)."""
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def rerun(name: str, recompute: bool, attention_kept: bool) -> bool:
    """Whether the checkpoint's recompute runs this projection's base GEMM."""
    return recompute and name != "down" and not (attention_kept and name == "qkv")


def base_gemm_flops(shape: dict, step: str, recompute: bool, attention_kept: bool = True) -> int:
    """FLOPs of the GEMMs `floor` times, for the whole step (as its formula sums them)."""
    tokens, head_tokens, forwards, head_forwards, _ = STEPS[step]
    per_layer = sum(2 * tokens * n_out * n_in * (forwards + 1 + rerun(name, recompute, attention_kept))
                    for name, n_out, n_in in projections(shape))
    _, qkv_out, qkv_in = projections(shape)[0]
    return (shape["num_hidden_layers"] * per_layer - 2 * tokens * qkv_out * qkv_in
            + 2 * head_tokens * shape["vocab_size"] * shape["hidden_size"] * (head_forwards + 1))


def floor(shape_name: str, step: str, recompute: bool, reps: int, attention_kept: bool = True,
          micro_batches: int = 1) -> dict:
    import torch

    shape = SHAPES[shape_name]
    if is_moe(shape):
        raise SystemExit(f"--shape {shape_name}: a mixture of experts' GEMMs depend on routing; dense shapes only")
    tokens, head_tokens, forwards, head_forwards, examples = STEPS[step]
    if examples % micro_batches:
        raise SystemExit(f"--micro-batches {micro_batches}: the step's {examples} examples do not split evenly")
    rows, head_rows = tokens // micro_batches, head_tokens // micro_batches  # a forward's
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*size):
        return torch.randn(size, generator=gen, device=dev, dtype=dt) * 0.02

    per_layer = {}
    for name, n_out, n_in in projections(shape):
        w, x, g = rand(n_out, n_in), rand(rows, n_in), rand(rows, n_out)
        fwd, bwd = (micro_batches * time_gemm(torch, x, w.t(), reps),
                    micro_batches * time_gemm(torch, g, w, reps))
        per_layer[name] = dict(out=n_out, inp=n_in, forward_ms=fwd * 1e3, input_grad_ms=bwd * 1e3)
        del w, x, g
    vocab, h = shape["vocab_size"], shape["hidden_size"]
    e, x, g = rand(vocab, h), rand(head_rows, h), rand(head_rows, vocab)
    head_fwd, head_bwd = (micro_batches * time_gemm(torch, x, e.t(), reps),
                          micro_batches * time_gemm(torch, g, e, reps))
    del e, x, g
    layers = shape["num_hidden_layers"]
    reruns = {name: rerun(name, recompute, attention_kept) for name in per_layer}
    decoder_s = (layers * sum((forwards + reruns[name]) * p["forward_ms"] + p["input_grad_ms"]
                              for name, p in per_layer.items())
                 - per_layer["qkv"]["input_grad_ms"]) / 1e3
    head_s = head_forwards * head_fwd + head_bwd
    total_flops = base_gemm_flops(shape, step, recompute, attention_kept)
    floor_s = decoder_s + head_s
    return dict(shape=shape_name, step=step, recompute=recompute, attention_kept=attention_kept and recompute,
                micro_batches=micro_batches, tokens=tokens, head_tokens=head_tokens,
                decoder_forwards=forwards, head_forwards=head_forwards, examples=examples,
                per_layer=per_layer, head_forward_ms=head_fwd * 1e3, head_input_grad_ms=head_bwd * 1e3,
                floor_s=floor_s, gemm_tflops=total_flops / floor_s / 1e12,
                max_examples_per_s=examples / floor_s, device=torch.cuda.get_device_name(),
                torch=torch.__version__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3-8b", choices=[s for s in SHAPES if not is_moe(SHAPES[s])])
    ap.add_argument("--step", default="dpo", choices=list(STEPS))
    ap.add_argument("--no-recompute", action="store_true", help="the step without checkpointing's recompute")
    ap.add_argument("--keep-attention", action=argparse.BooleanOptionalAction, default=True,
                    help="with the recompute: attention kept for backward, so the rerun runs no q/k/v GEMM")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="the step's examples in this many forwards (each GEMM of 1/K the rows, K times)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--against", action="append", default=[], metavar="NAME=RATE",
                    help="a peer's measured examples/s: the floor's bound is printed as a multiple of it")
    ap.add_argument("--out", default=None, help="append the result as one JSON line here")
    args = ap.parse_args(argv)
    result = floor(args.shape, args.step, not args.no_recompute, args.reps, args.keep_attention,
                   args.micro_batches)
    for spec in args.against:
        name, _, rate = spec.partition("=")
        result.setdefault("bound_vs", {})[name] = result["max_examples_per_s"] / float(rate)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
