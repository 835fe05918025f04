"""The `qlora` command: train · eval · generate · chat · merge · export · plan · bench · demo.

Each sub-command parses its options here and calls one function of the module that does the job.
"""

from __future__ import annotations

import argparse
import sys

from qlora.errors import QloraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo(sub)
    add_train(sub)
    add_generate(sub)
    add_chat(sub)
    add_eval(sub)
    add_merge(sub)
    add_export(sub)
    add_plan(sub)
    return parser


# --- demo ---------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a bundled task, end to end, on the CPU")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from qlora.demo import run

    run(out_dir=args.out)


# --- train --------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune adapters on a data file")
    p.set_defaults(func=lambda args: _not_yet("train"))


# --- generate -----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with base (+ adapter)")
    p.set_defaults(func=lambda args: _not_yet("generate"))


# --- chat ---------------------------------------------------------------------------------------
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with base (+ adapter)")
    p.set_defaults(func=lambda args: _not_yet("chat"))


# --- eval ---------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and generation metrics on a data file")
    p.set_defaults(func=lambda args: _not_yet("eval"))


# --- merge --------------------------------------------------------------------------------------
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into a 16-bit Hugging Face checkpoint")
    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="new output directory (must not exist)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default bf16)")
    p.add_argument("--base", default="original", choices=["original", "nf4"],
                   help="fold into the 16-bit original weights (default) or into their NF4 round "
                        "trip, the weights QLoRA training saw (see docs/MERGE_AND_EXPORT.md)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="merge even if the adapter's base_model_name_or_path names another model")
    p.set_defaults(func=run_merge)


def run_merge(args) -> None:
    from qlora.merge import describe, merge_adapter

    print(f"adapter: {describe(args.adapter)}")
    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, base=args.base,
                        max_shard_size=args.max_shard_size, ignore_base_name=args.ignore_base_name)
    print(f"merged checkpoint written to {out}")


# --- export -------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp")
    p.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the one format)")
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    p.add_argument("--adapter", help="adapter directory (PEFT format), merged in first")
    p.add_argument("--out", required=True, help="new .gguf file (must not exist)")
    p.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
                   help="tensor type (default f16)")
    p.add_argument("--base", default="original", choices=["original", "nf4"],
                   help="with --adapter: merge base, as for `qlora merge`")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="with --adapter: merge even if the adapter names another base model")
    p.set_defaults(func=run_export)


def run_export(args) -> None:
    from qlora.export.gguf import describe, export_gguf

    out = export_gguf(args.model, args.out, qtype=args.type, adapter_dir=args.adapter,
                      merge_base=args.base, ignore_base_name=args.ignore_base_name)
    print(f"GGUF written to {out}: {describe(out)}")


# --- plan ---------------------------------------------------------------------------------------
def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak GPU memory of a run, and whether it fits",
                       description="Predict the peak GPU memory of a training step, part by part, "
                                   "from config.json sizes alone (no GPU, no weights).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (reads its config.json)")
    src.add_argument("--config-json", help="a config.json file")
    src.add_argument("--shape", help="a named shape, e.g. llama-3-8b, qwen2.5-1.5b, llama-2-70b")
    p.add_argument("--quant", default="nf4", help="nf4 | fp4 | int8 | none (default nf4)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all-linear", help="all-linear or e.g. q_proj,v_proj")
    p.add_argument("--dora", action="store_true", help="DoRA adapters")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--adapter-dtype", default="fp32", help="adapter master weights: fp32 | bf16")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--optimizer", default="paged_adamw_8bit",
                   help="paged_adamw_8bit | paged_adamw_32bit | adamw_8bit | adamw_torch")
    p.add_argument("--kernels", default="eager", help="eager (autograd over PyTorch ops) | fused")
    p.add_argument("--loss", default="chunked", help="chunked cross entropy | full (fp32 logits)")
    p.add_argument("--gpu-memory", help="GPU size, e.g. 24GB (GB = GiB here); default: the detected GPU")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--sharding", default="ddp", help="ddp | fsdp (with --gpus > 1)")
    p.add_argument("--auto-fit", action="store_true", help="also print the largest micro-batch that fits")
    p.set_defaults(func=run_plan)


def run_plan(args) -> None:
    from qlora import memory

    arch = memory.resolve_arch(args.model, args.config_json, args.shape)
    cfg = memory.PlanConfig(
        quant=args.quant, double_quant=args.double_quant, r=args.r, targets=args.targets, dora=args.dora,
        lora_dropout=args.lora_dropout, adapter_dtype=args.adapter_dtype, seq_len=args.seq_len,
        micro_batch=args.micro_batch, checkpointing=args.checkpointing,
        offload_activations=args.offload_activations, optimizer=args.optimizer, kernels=args.kernels,
        loss=args.loss, gpus=args.gpus, sharding=args.sharding)
    b = memory.plan(arch, cfg)
    gpu_bytes, gpu_name = _plan_gpu_bytes(args, memory)  # a bad --gpu-memory fails before the table
    targets = memory.target_names(cfg.targets)
    print(f"{arch.name}: {arch.num_params() / 1e9:.2f}B params · {cfg.quant}"
          f"{' + double quant' if cfg.double_quant and cfg.quant in ('nf4', 'fp4') else ''} · "
          f"{'DoRA' if cfg.dora else 'LoRA'} r={cfg.r} on {len(targets)} projections · "
          f"seq {cfg.seq_len} x micro-batch {cfg.micro_batch} · checkpointing "
          f"{'on' if cfg.checkpointing else 'off'} · {cfg.optimizer} · {cfg.gpus} GPU(s)"
          + (f" {cfg.sharding}" if cfg.gpus > 1 else ""))
    print(memory.format_table(b))
    print("calibration on a GPU is pending: the activation and workspace terms are derived, not measured")
    if gpu_bytes is None:
        print("no --gpu-memory given and no GPU detected: not checking whether it fits")
        return
    need = memory.needed_bytes(b)
    if memory.fits(b, gpu_bytes):
        print(f"fits on {gpu_name}: needs ~{need / memory.GiB:.1f} of {gpu_bytes / memory.GiB:.1f} GiB")
    else:
        print(f"does NOT fit on {gpu_name}: needs ~{need / memory.GiB:.1f} of {gpu_bytes / memory.GiB:.1f} GiB")
        for advice in memory.advise(arch, cfg, gpu_bytes):
            if advice.changes:
                print(f"  fits with {advice.text}: ~{memory.needed_bytes(advice.breakdown) / memory.GiB:.1f} GiB")
            else:
                print(f"  {advice.text}")
    if args.auto_fit:
        best = memory.auto_fit(arch, cfg, gpu_bytes)
        if best is None:
            print("auto-fit: nothing fits, even at micro-batch 1 with checkpointing")
        else:
            print(f"auto-fit: --micro-batch {best.micro_batch} "
                  f"--{'' if best.checkpointing else 'no-'}checkpointing")


def _plan_gpu_bytes(args, memory):
    if args.gpu_memory:
        return memory.parse_size(args.gpu_memory), f"a {args.gpu_memory} GPU"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"{props.name} ({props.total_memory / memory.GiB:.0f} GiB)"
    except ImportError:
        pass
    return None, None


def _not_yet(name: str) -> None:
    raise QloraError(f"`qlora {name}` is not available in this build yet")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
