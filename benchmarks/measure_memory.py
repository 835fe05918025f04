"""Measure the peak GPU memory of QLoRA training steps and put the planner's prediction beside it.

For each configuration (shape x sequence length x checkpointing x rank) a fresh process builds a
random-weight model in the real shape, quantized with bitsandbytes, with LoRA adapters, runs a few
training steps and records torch.cuda.max_memory_allocated / max_memory_reserved. The planner
(qlora.memory.plan) is asked for the same settings. Output: one JSON file, one record per config.

    python benchmarks/measure_memory.py --out benchmarks/results/memory.json          # on the GPU
    python benchmarks/measure_memory.py --dry-run                                      # tiny, CPU
    python benchmarks/measure_memory.py --configs oos.json --jobs 2 --out oos.json     # listed configs

--configs reads a JSON list of runs ({"shape", "seq_len", "micro_batch", "checkpointing", "r",
"targets", "quant", "double_quant", "dora", "lora_dropout"}; missing keys take the defaults below).
--jobs 2 runs two configurations at once (separate processes, so each one's peak is its own; a
config starts only when the planner says both fit): for memory only, the tokens/s of such a run
is not a clean figure. The output file is rewritten after every configuration, so a run cut short
keeps what it measured; --deadline-s records the configurations it had no time for as skipped.

The training step: `build_ours`, this project's own model (qlora.models.load.random_model) and
step (forward, backward, clip, paged 8-bit AdamW); the prediction is for the loss chunk the
decoder reports. `build_fallback` (transformers + peft + bitsandbytes, full fp32-logits loss) is
kept for comparison and runs only if build_ours returns None.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
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
    loss="chunked-fused", loss_chunk_tokens=...)."""
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
    targets = run.get("targets", "all-linear")
    attach_adapters(model, AdapterConfig(r=run["r"], alpha=2 * run["r"], dropout=run["lora_dropout"],
                                         use_dora=run.get("dora", False), target_modules=targets,
                                         use_rslora=shape_config.get("_rslora", False)))
    model.gradient_checkpointing = run["checkpointing"]
    model.train()
    # the training loop's pieces: seeded LoRA dropout (speed.apply_speed, no other fast path:
    # the eager step the planner is told of), flattened adapter parameters
    from qlora.adapters import set_dropout_seed
    from qlora.speed import SpeedPlan, apply_speed
    from qlora.train.optim import build_optimizer, zero_grads

    applied = apply_speed(model, SpeedPlan(seeded_dropout=True))
    seed, stride = applied.dropout_seed, applied.dropout_stride
    optimizer = build_optimizer(model, "paged_adamw_8bit" if device == "cuda" else "adamw_torch",
                                1e-4, 0.0, (0.9, 0.999), 1e-8)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps = [0]

    def step(input_ids: torch.Tensor) -> float:
        set_dropout_seed(seed, 0, steps[0], stride)
        steps[0] += 1
        loss = model(input_ids, labels=input_ids) / (input_ids.numel() - input_ids.shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        zero_grads(optimizer)
        return float(loss)

    # the chunk the decoder really uses (None: its vocabulary rule, which the planner applies too)
    return model, step, dict(kernels="eager", loss="chunked-fused", seeded_dropout=True, flat_grads=True,
                             loss_chunk_tokens=getattr(model, "loss_chunk_tokens", None))


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
    # the first step allocates the optimizer states (and the allocator's pools): time the rest
    timed = sorted(times[spec.get("warmup", 1):] or times)
    record = dict(system=system, seconds=time.perf_counter() - t0, losses=losses, planner_overrides=overrides,
                  step_times=times, tokens_per_s=run["seq_len"] * run["micro_batch"] / timed[len(timed) // 2],
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if cuda:
        record.update(static_allocated=static, peak_allocated=torch.cuda.max_memory_allocated(),
                      peak_reserved=torch.cuda.max_memory_reserved(),
                      reserved_over_allocated=torch.cuda.max_memory_reserved() / torch.cuda.max_memory_allocated(),
                      device_name=torch.cuda.get_device_name(0),
                      device_total=torch.cuda.get_device_properties(0).total_memory)
    return record


def _arch_cfg(shape: str, run: dict, overrides: dict) -> tuple[memory.Arch, memory.PlanConfig]:
    config = TINY if shape == "tiny" else memory.SHAPES[shape]
    return memory.arch_from_config(config, name=shape), replace(memory.PlanConfig(**run), **overrides)


def prediction(shape: str, run: dict, overrides: dict) -> dict:
    arch, cfg = _arch_cfg(shape, run, overrides)
    b = memory.plan(arch, cfg)
    parts = {label: n for label, n in b.parts()}
    # what exists before the first step: frozen weights + adapter masters (no grads, states, copies)
    static = b.base + b.embeddings + b.norms + b.adapter_params * memory.DTYPE_BYTES[cfg.adapter_dtype]
    return dict(allocated=b.allocated, total=b.total, reserved_estimate=b.reserved_estimate,
                static_weights=static, peak_phase=b.peak_phase, adapter_params=b.adapter_params,
                parts=parts, config=asdict(cfg))


RUN_DEFAULTS = dict(quant="nf4", double_quant=True, r=16, targets="all-linear", dora=False, lora_dropout=0.05,
                    seq_len=2048, micro_batch=1, checkpointing=True, optimizer="paged_adamw_8bit")
DRY_RUN_SEQ = 32  # --dry-run: every configuration in the tiny shape, rows of at most this many tokens


def read_configs(path: str) -> list[dict]:
    """The runs listed in a --configs file, each completed with RUN_DEFAULTS."""
    from qlora.errors import QloraError

    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QloraError(f"--configs {path}: cannot read a JSON list of runs ({err})") from None
    if not isinstance(items, list):
        raise QloraError(f"--configs {path}: expected a JSON list of runs, got {type(items).__name__}")
    out = []
    for k, item in enumerate(items):
        unknown = set(item) - set(RUN_DEFAULTS) - {"shape", "label"}
        if "shape" not in item or unknown:
            raise QloraError(f"--configs {path}: run {k} needs a 'shape' and only keys of "
                             f"{', '.join(RUN_DEFAULTS)}, label (unknown: {', '.join(sorted(unknown)) or '-'})")
        run = {**RUN_DEFAULTS, **{key: v for key, v in item.items() if key in RUN_DEFAULTS}}
        if isinstance(run["targets"], list):
            run["targets"] = ",".join(run["targets"])
        memory.PlanConfig(**run).validate()  # a bad value fails here, not on the GPU
        if item["shape"] not in memory.SHAPES and item["shape"] != "tiny":
            raise QloraError(f"--configs {path}: run {k}: shape {item['shape']!r} not in qlora.memory.SHAPES")
        out.append(dict(shape=item["shape"], run=run, label=item.get("label")))
    return out


def configurations(args) -> list[dict]:
    if args.configs:
        listed = read_configs(args.configs)
    elif args.dry_run:
        listed = [dict(shape="tiny", run=dict(RUN_DEFAULTS, r=4, checkpointing=c == "on")) for c in args.checkpointing]
    else:
        listed = [dict(shape=shape, run=dict(RUN_DEFAULTS, seq_len=seq, checkpointing=gc, r=r))
                  for shape, seq, gc, r in itertools.product(args.shapes, args.seqs,
                                                             [c == "on" for c in args.checkpointing], args.ranks)]
    specs = []
    for item in listed:
        for method in args.methods or [None]:
            run = dict(item["run"])
            if not args.configs:
                run.update(micro_batch=args.micro_batch, lora_dropout=args.lora_dropout)
            if method:  # qlora.compare's methods: their base, rank and DoRA replace the defaults
                from qlora.compare import plan_config

                pc = plan_config(method)
                run.update(quant=pc.quant, double_quant=pc.double_quant, r=pc.r, dora=pc.dora)
            shape = item["shape"]
            if args.dry_run:  # the code path only: tiny shape, short rows, on the CPU
                shape, run["seq_len"] = "tiny", min(run["seq_len"], DRY_RUN_SEQ)
            specs.append(dict(shape=shape, run=run, steps=args.steps, warmup=args.warmup, method=method,
                              label=item.get("label"), device="cpu" if args.dry_run else "cuda"))
    return specs


def _label(spec: dict) -> str:
    run = spec["run"]
    text = f"{spec['shape']} seq={run['seq_len']} gc={run['checkpointing']} r={run['r']}"
    extra = [f"{k}={run[k]}" for k in ("micro_batch", "quant", "targets", "dora", "lora_dropout")
             if run.get(k, RUN_DEFAULTS[k]) != RUN_DEFAULTS[k]]
    name = spec.get("method") or spec.get("label")
    return " ".join([text, *extra]) + (f" [{name}]" if name else "")


def run_spec(spec: dict, timeout_s: float | None) -> dict:
    """One configuration in a fresh process: the record (measured, or why not)."""
    # our own step: chunked loss, the decoder's chunk rule; replaced below by what the run reports
    ours = dict(kernels="eager", loss="chunked-fused")
    pred = prediction(spec["shape"], spec["run"], ours)
    rec = dict(shape=spec["shape"], run=spec["run"], predicted=pred, method=spec.get("method"),
               label=spec.get("label"))
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF":
                                                      os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {timeout_s:.0f} s"
        return rec
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        rec["error"] = " | ".join(tail) or f"exit code {proc.returncode}"
        return rec
    measured = json.loads(lines[-1][len("RESULT "):])
    if measured["planner_overrides"] != ours:  # predict for the step that actually ran
        rec["predicted"] = pred = prediction(spec["shape"], spec["run"], measured["planner_overrides"])
    rec["measured"] = measured
    if "peak_allocated" in measured:
        rec["error_pct"] = 100 * (pred["allocated"] - measured["peak_allocated"]) / measured["peak_allocated"]
    return rec


def _report(label: str, rec: dict) -> str:
    if "skipped" in rec:
        return f"{label}: skipped ({rec['skipped']})"
    if "error" in rec:
        return f"{label}: failed: {rec['error']}"
    m, pred = rec["measured"], rec["predicted"]
    if "peak_allocated" in m:
        return (f"{label}: measured {m['peak_allocated'] / memory.GiB:.2f} GiB allocated "
                f"({m['peak_reserved'] / memory.GiB:.2f} reserved), predicted "
                f"{pred['allocated'] / memory.GiB:.2f} ({rec['error_pct']:+.1f}%), "
                f"{m['tokens_per_s']:,.0f} tokens/s")
    return (f"{label}: ran {len(m['losses'])} steps on the CPU (losses {[round(x, 3) for x in m['losses']]}); "
            f"predicted {pred['allocated'] / memory.GiB:.4f} GiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "llama-3-8b"])
    p.add_argument("--seqs", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--configs", help="JSON list of runs to measure instead of the grid above")
    p.add_argument("--steps", type=int, default=4, help="steps per config (the peak settles after step 2)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the tokens/s median")
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--methods", nargs="+", default=None,
                   help="qlora.compare method names (lora-16bit, qlora-nf4, rslora-r64, ...): one run each")
    p.add_argument("--jobs", type=int, default=1, help="configurations at once (memory only: spoils tokens/s)")
    p.add_argument("--timeout-s", type=float, default=None, help="give up on one configuration after this")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no configuration after this many seconds; the rest are recorded as skipped")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU: checks the code path only")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) in this process
    args = p.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(measure_one(json.loads(args.one))))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    if args.jobs < 1 or args.steps < 1 or args.warmup < 0:
        print("--jobs and --steps must be at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    try:
        specs = configurations(args)
    except Exception as err:  # QloraError from a bad --configs file, or a bad method name
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu_total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__, dry_run=args.dry_run,
                versions=_versions(), jobs=args.jobs, steps=args.steps, warmup=args.warmup,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict | None] = [None] * len(specs)
    lock = threading.Condition()
    in_use = [0]  # predicted GPU bytes of the configurations running now (jobs > 1)
    t0 = time.perf_counter()

    def save() -> None:
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(dict(meta=meta, records=[r for r in records if r is not None]), indent=2))
        tmp.replace(out)  # never leave a half-written file

    def work(k: int) -> None:
        spec = specs[k]
        label = _label(spec)
        need = memory.needed_bytes(memory.plan(*_arch_cfg(spec["shape"], spec["run"], {})))
        rec = None
        if gpu_total and need > 0.97 * gpu_total:
            rec = dict(shape=spec["shape"], run=spec["run"], method=spec.get("method"), label=spec.get("label"),
                       skipped=f"planner says it needs {need / memory.GiB:.1f} GiB > this GPU")
        with lock:  # wait until the GPU has room for it beside the ones running (jobs > 1)
            while rec is None and in_use[0] and gpu_total and in_use[0] + need > 0.9 * gpu_total:
                lock.wait()
            if rec is None and args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
                rec = dict(shape=spec["shape"], run=spec["run"], method=spec.get("method"),
                           label=spec.get("label"), skipped=f"no time left (--deadline-s {args.deadline_s:g})")
            if rec is None:
                in_use[0] += need
        if rec is None:
            try:
                rec = run_spec(spec, args.timeout_s)
            finally:
                with lock:
                    in_use[0] -= need
                    lock.notify_all()
        with lock:
            records[k] = rec
            print(_report(label, rec), flush=True)
            save()

    if args.jobs == 1:
        for k in range(len(specs)):
            work(k)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(work, range(len(specs))))
    save()
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
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
