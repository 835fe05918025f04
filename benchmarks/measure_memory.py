"""Measure the peak GPU memory of QLoRA training steps and put the planner's prediction beside it.

For each configuration (shape x sequence length x checkpointing x rank) a fresh process builds a
random-weight model in the real shape, quantized with bitsandbytes, with LoRA adapters, runs a few
training steps and records torch.cuda.max_memory_allocated / max_memory_reserved. The planner
(qlora.memory.plan) is asked for the same settings. Output: one JSON file, one record per config.

    python benchmarks/measure_memory.py --out benchmarks/results/memory.json          # on the GPU
    python benchmarks/measure_memory.py --dry-run                                      # tiny, CPU

The training step: `build_ours` is the single place where this project's own model + step plugs
in. Until that API exists it returns None and the transformers + peft + bitsandbytes fallback
runs (autocast bf16, SDPA, peft LoRA on Linear4bit, paged 8-bit AdamW, non-reentrant
checkpointing, transformers' full fp32-logits loss); its prediction uses kernels="eager",
loss="full" accordingly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora import memory  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)


# --- PLUG IN HERE: this project's model and training step ---------------------------------------
def build_ours(shape_config: dict, run: dict, device: str):
    """Return (model, step_fn, planner_overrides) using qlora's own decoder and training step, or
    None while that API is not available. step_fn(input_ids) runs forward + backward + optimizer
    step. planner_overrides: PlanConfig fields that describe our step (e.g. kernels="fused",
    loss="chunked", loss_chunk_tokens=...)."""
    import bitsandbytes as bnb

    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig

    config = dict(shape_config)
    config.pop("_rslora", None)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    spec = spec_from_config(config, source=f"shape {config.get('model_type')}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(spec, QuantConfig(method=run["quant"], double_quant=run["double_quant"],
                                           compute_dtype=dtype), device=device)
    attach_adapters(model, AdapterConfig(r=run["r"], alpha=2 * run["r"], dropout=run["lora_dropout"],
                                         use_dora=run.get("dora", False),
                                         use_rslora=shape_config.get("_rslora", False)))
    model.gradient_checkpointing = run["checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW8bit(params, lr=1e-4) if device == "cuda"
                 else torch.optim.AdamW(params, lr=1e-4))

    def step(input_ids: torch.Tensor) -> float:
        loss = model(input_ids, labels=input_ids) / (input_ids.numel() - input_ids.shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return model, step, dict(kernels="eager", loss="chunked", loss_chunk_tokens=model.loss_chunk_tokens)


# --- fallback: transformers + peft + bitsandbytes -----------------------------------------------
def build_fallback(shape_config: dict, run: dict, device: str):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(shape_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, max_position_embeddings=max(32768, run["seq_len"]),
                                  use_cache=False, **cfg)
    # Random init straight on the device in bf16 (16 GB for 8B: fine on an 80 GB card), then each
    # decoder linear is replaced by a bitsandbytes Linear4bit quantized from that weight.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=run["double_quant"],
                                      quant_type=run["quant"], device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64,
                                             compress_statistics=run["double_quant"],
                                             quant_type=run["quant"], module=q)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                q = q.to(device)  # Params4bit.to quantizes
                assert q.weight.dtype == torch.uint8 and q.weight.quant_state is not None, name
                setattr(parent, name, q)
                del lin
    for p in model.parameters():
        p.requires_grad_(False)
    if run["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=run["r"], lora_alpha=2 * run["r"], lora_dropout=run["lora_dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:  # paged optimizers need CUDA; the dry run only checks the code path
        optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(input_ids: torch.Tensor) -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            # `.loss` only: the output (and its bf16 logits) is dropped before backward
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return model, step, dict(kernels="eager", loss="full")


# --- one configuration, in its own process ------------------------------------------------------
def measure_one(spec: dict) -> dict:
    device = spec["device"]
    shape_config = TINY if spec["shape"] == "tiny" else memory.SHAPES[spec["shape"]]
    if spec.get("method") == "rslora-r64":  # rsLoRA changes the scale only, not the memory
        shape_config = dict(shape_config, _rslora=True)
    run = spec["run"]
    torch.manual_seed(0)
    built = build_ours(shape_config, run, device)
    system = "qlora"
    if built is None:
        built, system = build_fallback(shape_config, run, device), "transformers+peft+bitsandbytes (fallback)"
    model, step, overrides = built
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() if cuda else None
    ids = torch.randint(0, shape_config["vocab_size"], (run["micro_batch"], run["seq_len"]), device=device)
    losses, t0, times = [], time.perf_counter(), []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        losses.append(step(ids))  # float(loss) synchronizes
        times.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.synchronize()
    timed = sorted(times[1:] or times)  # the first step allocates the optimizer states
    record = dict(system=system, seconds=time.perf_counter() - t0, losses=losses, planner_overrides=overrides,
                  step_times=times, tokens_per_s=run["seq_len"] * run["micro_batch"] / timed[len(timed) // 2],
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if cuda:
        record.update(static_allocated=static, peak_allocated=torch.cuda.max_memory_allocated(),
                      peak_reserved=torch.cuda.max_memory_reserved(),
                      device_name=torch.cuda.get_device_name(0),
                      device_total=torch.cuda.get_device_properties(0).total_memory)
    return record


def prediction(shape: str, run: dict, overrides: dict) -> dict:
    config = TINY if shape == "tiny" else memory.SHAPES[shape]
    arch = memory.arch_from_config(config, name=shape)
    cfg = replace(memory.PlanConfig(**run), **overrides)
    b = memory.plan(arch, cfg)
    parts = {label: n for label, n in b.parts()}
    # what exists before the first step: frozen weights + adapter masters (no grads, states, copies)
    static = b.base + b.embeddings + b.norms + b.adapter_params * memory.DTYPE_BYTES[cfg.adapter_dtype]
    return dict(allocated=b.allocated, total=b.total, reserved_estimate=b.reserved_estimate,
                static_weights=static, peak_phase=b.peak_phase, adapter_params=b.adapter_params,
                parts=parts, config=asdict(cfg))


def configurations(args) -> list[dict]:
    if args.dry_run:
        grid = [("tiny", 32, gc, r) for gc in (True, False) for r in (4,)]
    else:
        grid = list(itertools.product(args.shapes, args.seqs, [c == "on" for c in args.checkpointing], args.ranks))
    specs = []
    for shape, seq, gc, r in grid:
        for method in args.methods or [None]:
            run = dict(quant="nf4", double_quant=True, r=r, lora_dropout=args.lora_dropout, seq_len=seq,
                       micro_batch=args.micro_batch, checkpointing=gc, optimizer="paged_adamw_8bit")
            if method:  # qlora.compare's methods: their base, rank and DoRA replace the defaults
                from qlora.compare import plan_config

                pc = plan_config(method)
                run.update(quant=pc.quant, double_quant=pc.double_quant, r=pc.r, dora=pc.dora)
            specs.append(dict(shape=shape, run=run, steps=args.steps, method=method,
                              device="cpu" if args.dry_run else "cuda"))
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "llama-3-8b"])
    p.add_argument("--seqs", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=4, help="steps per config (the peak settles after step 2)")
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--methods", nargs="+", default=None,
                   help="qlora.compare method names (lora-16bit, qlora-nf4, rslora-r64, ...): one run each")
    p.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU: checks the code path only")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) in this process
    args = p.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(measure_one(json.loads(args.one))))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    gpu_total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    records = []
    for spec in configurations(args):
        label = f"{spec['shape']} seq={spec['run']['seq_len']} gc={spec['run']['checkpointing']} r={spec['run']['r']}"
        fallback = dict(kernels="eager", loss="full")
        pred = prediction(spec["shape"], spec["run"], fallback)
        rec = dict(shape=spec["shape"], run=spec["run"], predicted=pred, method=spec.get("method"))
        if gpu_total and pred["total"] > 0.97 * gpu_total:
            rec["skipped"] = f"predicted {pred['total'] / memory.GiB:.1f} GiB > this GPU"
            print(f"{label}: skipped ({rec['skipped']})", flush=True)
            records.append(rec)
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            rec["error"] = " | ".join(tail)
            print(f"{label}: failed: {rec['error']}", flush=True)
            records.append(rec)
            continue
        measured = json.loads(lines[-1][len("RESULT "):])
        if measured["planner_overrides"] != fallback:  # our own step ran: predict for it instead
            rec["predicted"] = pred = prediction(spec["shape"], spec["run"], measured["planner_overrides"])
        rec["measured"] = measured
        if "peak_allocated" in measured:
            rec["error_pct"] = 100 * (pred["allocated"] - measured["peak_allocated"]) / measured["peak_allocated"]
            print(f"{label}: measured {measured['peak_allocated'] / memory.GiB:.2f} GiB allocated "
                  f"({measured['peak_reserved'] / memory.GiB:.2f} reserved), predicted "
                  f"{pred['allocated'] / memory.GiB:.2f} ({rec['error_pct']:+.1f}%)", flush=True)
        else:
            print(f"{label}: ran {spec['steps']} steps on the CPU (losses {measured['losses']}); "
                  f"predicted {pred['allocated'] / memory.GiB:.4f} GiB", flush=True)
        records.append(rec)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__, dry_run=args.dry_run,
                versions=_versions(), device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, records=records), indent=2))
    tmp.replace(out)  # never leave a half-written file
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in records) else 1


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
