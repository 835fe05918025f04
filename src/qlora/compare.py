"""`qlora compare`: the notebook's "PEFT methods comparison", with numbers measured here.

For each method (LoRA on a 16-bit base, QLoRA NF4 / FP4 / NF4 without double quant, rsLoRA r=64,
DoRA, QLoRA + DoRA, 8-bit base):

- trainable parameters of the adapters, for the demo model and for the Llama-3-8B shape;
- peak GPU memory for the Llama-3-8B shape, *predicted* by qlora.memory (seq 2048, micro-batch 1,
  checkpointing, LoRA dropout 0.05, paged 8-bit AdamW: the settings the planner is calibrated at);
- the held-out loss and exact-match accuracy on the demo task (qlora.demo: capitalise a word),
  trained on this machine's CPU with the loop `qlora train` runs, every method from the same
  random base, data, seed and schedule.

GPU columns (measured peak allocated / reserved memory and tokens/s on the device for the
Llama-3-8B shape) come from `benchmarks/measure_memory.py --methods ...` (benchmarks/device_planner_check.sh;
see docs/COMPARE.md); given that file with --gpu-results, or folded into an existing compare.json
by benchmarks/fold_planner_check.py (`fill_gpu_columns`), they are filled in and the plot's memory axis is
the measured one; otherwise they say what command fills them.
Outputs: compare.json, compare.md and compare.png (memory vs quality, ranking) in --out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from qlora.errors import QloraError
from qlora.files import replaceable, staged_file

# The PEFT methods compared (adapter and base settings; the training methods, SFT and the
# preference losses, are methods.METHODS): name -> (label, RunConfig fields). Every method:
# all seven projections, alpha 32.
PEFT_METHODS: dict[str, tuple[str, dict]] = {
    "lora-16bit": ("LoRA r=16, 16-bit base", dict(quant="none", lora_r=16)),
    "qlora-nf4": ("QLoRA NF4 r=16", dict(quant="nf4", double_quant=True, lora_r=16)),
    "qlora-fp4": ("QLoRA FP4 r=16", dict(quant="fp4", double_quant=True, lora_r=16)),
    "qlora-nf4-no-dq": ("QLoRA NF4 r=16, no double quant", dict(quant="nf4", double_quant=False, lora_r=16)),
    "rslora-r64": ("rsLoRA r=64 (NF4 base)", dict(quant="nf4", double_quant=True, lora_r=64, use_rslora=True)),
    "dora-16bit": ("DoRA r=16, 16-bit base", dict(quant="none", lora_r=16, use_dora=True)),
    "qlora-dora": ("QLoRA+DoRA r=16 (NF4)", dict(quant="nf4", double_quant=True, lora_r=16, use_dora=True)),
    "lora-8bit": ("LoRA r=16, 8-bit base", dict(quant="int8", lora_r=16)),
}
DEFAULT_STEPS = 80
GPU_SHAPE = "llama-3-8b"
GPU_SETTINGS = dict(seq_len=2048, micro_batch=1, checkpointing=True, lora_dropout=0.05,
                    optimizer="paged_adamw_8bit")
PENDING = "pending: needs the GPU"


def gpu_command(methods: list[str]) -> str:
    """The command that measures the GPU columns on the device (not run here)."""
    return ("python benchmarks/measure_memory.py --shapes llama-3-8b --seqs 2048 --checkpointing on "
            f"--ranks 16 --steps 6 --methods {' '.join(methods)} --out benchmarks/results/compare-llama-3-8b.json"
            " && qlora compare --gpu-results benchmarks/results/compare-llama-3-8b.json --out docs/compare"
            " --overwrite")


def plan_config(method: str):
    """The planner's settings for `method` on the GPU shape."""
    from qlora import memory

    f = PEFT_METHODS[method][1]
    return memory.PlanConfig(quant=f["quant"], double_quant=f.get("double_quant", True), r=f["lora_r"],
                             dora=f.get("use_dora", False), **GPU_SETTINGS)


def predicted_gpu(method: str, overrides: dict | None = None) -> dict:
    """The planner for `method` on the GPU shape; `overrides`: PlanConfig fields of the step that
    was measured (measure_memory.py's planner_overrides, e.g. the loss chunk it used)."""
    from qlora import memory

    arch = memory.resolve_arch(shape=GPU_SHAPE)
    b = memory.plan(arch, dataclasses.replace(plan_config(method), **(overrides or {})))
    return {"trainable_params": b.adapter_params, "peak_allocated_gib": round(b.allocated / memory.GiB, 2),
            "needed_gib": round(memory.needed_bytes(b) / memory.GiB, 2)}


def read_gpu_results(path: str | Path | None) -> dict[str, dict]:
    """method -> what measure_memory.py --methods measured for it (and why not, if it failed).

    Keys: peak_allocated_gib, peak_reserved_gib, tokens_per_s, trainable_params, device,
    planner_overrides; or error (failed / skipped on the GPU)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise QloraError(f"--gpu-results: {p} does not exist "
                         f"(write it with: {gpu_command(list(PEFT_METHODS))})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise QloraError(f"--gpu-results: {p} is not valid JSON (line {err.lineno}: {err.msg})") from None
    out = {}
    for rec in data.get("records", []):
        meas, method = rec.get("measured", {}), rec.get("method")
        if method not in PEFT_METHODS:
            continue
        if "peak_allocated" in meas:
            out[method] = {"peak_allocated_gib": round(meas["peak_allocated"] / 2**30, 2),
                           "peak_reserved_gib": round(meas["peak_reserved"] / 2**30, 2),
                           "tokens_per_s": meas.get("tokens_per_s"), "device": meas.get("device_name"),
                           "trainable_params": meas.get("trainable_params"),
                           "planner_overrides": {k: v for k, v in meas.get("planner_overrides", {}).items()
                                                 if k in ("kernels", "loss", "loss_chunk_tokens")}}
        elif rec.get("error") or rec.get("skipped"):
            out[method] = {"error": str(rec.get("error") or rec.get("skipped"))[:200]}
    return out


def fill_gpu_columns(result: dict, gpu: dict[str, dict], source: str | None = None) -> dict:
    """Put measured GPU figures (read_gpu_results) into a compare result, in place, and predict
    again with the planner as it is now, for the step that was measured. Methods without a
    measurement keep PENDING, or say why the GPU run failed."""
    for row in result["methods"]:
        m = gpu.get(row["method"], {})
        pred = predicted_gpu(row["method"], m.get("planner_overrides"))
        g = row["llama_3_8b"]
        g.update(trainable_params=pred["trainable_params"], predicted_peak_allocated_gib=pred["peak_allocated_gib"],
                 predicted_needed_gib=pred["needed_gib"])
        if "peak_allocated_gib" in m:
            g.update(measured_peak_allocated_gib=m["peak_allocated_gib"], measured_peak_reserved_gib=m["peak_reserved_gib"],
                     tokens_per_s=round(m["tokens_per_s"], 1) if m.get("tokens_per_s") else PENDING,
                     device=m.get("device"), measured_trainable_params=m.get("trainable_params"),
                     planner_overrides=m.get("planner_overrides"))
        else:
            why = f"failed on the GPU: {m['error']}" if "error" in m else PENDING
            g.update(measured_peak_allocated_gib=why, tokens_per_s=why if "error" in m else PENDING)
    if source:
        result["gpu_results"] = source
    return result


def train_method(method: str, base_cfg, tokenizer, train_examples, val_examples, prompts, work: Path,
                 log: Callable[[str], None]) -> dict:
    """Train one method from the shared random base; held-out loss and exact match."""
    from qlora.demo import held_out_scores
    from qlora.train.loop import fit
    from qlora.train.model import build_model
    from qlora.train.output import prepare_output_dir

    fields = PEFT_METHODS[method][1]
    cfg = dataclasses.replace(base_cfg, output_dir=str(work / method), **fields)
    device = torch.device("cpu")
    prepare_output_dir(cfg)
    model = build_model(cfg, device, torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    result = fit(model, tokenizer, train_examples, val_examples, cfg, device=device, log=lambda s: None,
                 progress=False)
    train_s = time.perf_counter() - t0
    scores = held_out_scores(model, tokenizer, val_examples, prompts, device)
    log(f"  {method:<16} {trainable:>9,} trainable  eval loss {scores['loss']:.4f}  "
        f"exact match {100 * scores['exact_match']:.1f}%  ({train_s:.0f} s)")
    return {"trainable_params": trainable, "eval_loss": scores["loss"], "exact_match": scores["exact_match"],
            "steps": result.global_step, "train_time_s": round(train_s, 1),
            "cpu_tokens_per_s": result.summary.get("tokens_per_s")}


def work_dir(out: Path) -> Path:
    """Where the methods' runs go (scratch, removed at the end): beside --out."""
    return out.parent / f".{out.name}-work"


# what compare writes in its work folder: the base, the data, the base run's folder, each run's
WORK_FOLDERS = {"base-model", "data", "run", *PEFT_METHODS}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty --out before the methods train (minutes), as the other commands refuse
    an existing output: unless told to, a previous comparison is not replaced without a word,
    and a folder that holds none is never written into; nor is the work folder beside it
    deleted unless compare wrote it."""
    if out.exists() and not out.is_dir():
        raise QloraError(f"--out {out} exists and is not a directory; give another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QloraError(f"--out {out} is not empty; pass --overwrite to replace the comparison "
                         f"in it, or give another --out")
    if not replaceable(out, lambda: (out / "compare.json").is_file()):
        raise QloraError(f"--out {out} is not empty and holds no compare.json, so it is not a "
                         f"comparison; --overwrite only replaces a previous one")
    work = work_dir(out)
    if not replaceable(work, lambda: {c.name for c in work.iterdir()} <= WORK_FOLDERS):
        raise QloraError(f"{work}, where compare of --out {out} keeps its runs, holds files "
                         f"compare did not write; choose another --out, or remove {work} yourself")


def run(out_dir: str | Path = "docs/compare", methods: list[str] | None = None, steps: int = DEFAULT_STEPS,
        model_sizes: dict | None = None, n_train: int | None = None, gpu_results: str | None = None,
        overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train every method on the demo task, predict its GPU memory, write JSON, markdown and plots
    (into a new or empty `out_dir`, or over a previous comparison with `overwrite`)."""
    from qlora import demo
    from qlora.data import encode_prompt, load_examples
    from qlora.models import load_tokenizer
    from qlora.tiny import build_tiny_model
    from qlora.train.data import load_data

    methods = methods or list(PEFT_METHODS)
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown:
        raise QloraError(f"--methods: {', '.join(unknown)} not known; choose from {', '.join(PEFT_METHODS)}")
    if steps < 1:
        raise QloraError(f"--steps must be at least 1, not {steps}")
    gpu = read_gpu_results(gpu_results)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    work = work_dir(out)
    if work.exists():
        shutil.rmtree(work)
    sizes = dict(demo.MODEL_SIZES, **(model_sizes or {}))
    torch.manual_seed(0)
    model_dir = build_tiny_model(work / "base-model", "llama", seed=0, **sizes)
    train_file, val_file = demo.write_dataset(work / "data")
    if n_train:
        lines = train_file.read_text().splitlines(keepends=True)[:n_train]
        train_file.write_text("".join(lines))
    base = demo.demo_config(model_dir, train_file, val_file, work / "run", steps)
    base = dataclasses.replace(base, eval_steps=steps, save_steps=0, logging_steps=max(1, steps))
    tokenizer = load_tokenizer(model_dir)
    train_examples, val_examples, _ = load_data(base, tokenizer, log=lambda s: None)
    raw, _ = load_examples(str(val_file))
    prompts = [encode_prompt(e, tokenizer) for e in raw]
    log(f"training {len(methods)} methods for {steps} steps each on the demo task (CPU) ...")
    rows = []
    t0 = time.perf_counter()
    for method in methods:
        cpu = train_method(method, base, tokenizer, train_examples, val_examples, prompts, work, log)
        rows.append({"method": method, "label": PEFT_METHODS[method][0], "settings": PEFT_METHODS[method][1],
                     "demo": cpu, "llama_3_8b": {"measured_peak_allocated_gib": PENDING,
                                                 "tokens_per_s": PENDING, "device": None}})
    result = {
        "task": "qlora.demo: capitalise a word; held-out words never seen in training",
        "demo_model": {"family": "llama", **sizes, "random_base": True},
        "cpu_training": {"steps": steps, "micro_batch": base.micro_batch_size, "learning_rate": base.learning_rate,
                         "lora_alpha": base.lora_alpha, "lora_dropout": base.lora_dropout, "optim": base.optim,
                         "dtype": "float32 (CPU)", "seed": base.seed, "train_examples": len(train_examples),
                         "held_out_examples": len(val_examples)},
        "gpu_prediction": {"shape": GPU_SHAPE, **GPU_SETTINGS, "predicted_by": "qlora.memory.plan"},
        "gpu_command": gpu_command(methods),
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "methods": rows,
    }
    fill_gpu_columns(result, gpu, str(gpu_results) if gpu_results else None)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "compare.json", json.dumps(result, indent=2) + "\n")
    _write(out / "compare.md", markdown(result))
    plot(result, out / "compare.png")
    shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out}/compare.json, compare.md, compare.png")
    return result


def _write(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "bitsandbytes")}


def table(result: dict) -> str:
    """The results table (markdown), best held-out loss first."""
    lines = ["| method | trainable params (demo model) | trainable params (Llama-3-8B) "
             "| predicted peak allocated, Llama-3-8B (GiB) | measured peak allocated, Llama-3-8B (GiB) "
             "| measured peak reserved (GiB) | tokens/s, Llama-3-8B | held-out eval loss (demo) | exact match (demo) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["methods"], key=lambda r: r["demo"]["eval_loss"]):
        g, d = r["llama_3_8b"], r["demo"]
        meas, tps = g["measured_peak_allocated_gib"], g["tokens_per_s"]
        res = g.get("measured_peak_reserved_gib", meas if isinstance(meas, str) else "-")
        lines.append(f"| {r['label']} | {d['trainable_params']:,} | {g['trainable_params']:,} "
                     f"| {g['predicted_peak_allocated_gib']:.2f} "
                     f"| {meas if isinstance(meas, str) else f'{meas:.2f}'} "
                     f"| {res if isinstance(res, str) else f'{res:.2f}'} "
                     f"| {tps if isinstance(tps, str) else f'{tps:,.0f}'} "
                     f"| {d['eval_loss']:.4f} | {100 * d['exact_match']:.1f}% |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    return table(result) + f"\nGPU columns: `{result['gpu_command']}`\n"


def plot(result: dict, path: Path) -> None:
    """The notebook's two panels from the measured data: memory vs quality, and the ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["methods"]
    names = [r["label"] for r in rows]
    # measured peak memory where every method has one, else the planner's prediction for all
    # (never a mix: the two would not be comparable on one axis)
    measured = all(isinstance(r["llama_3_8b"]["measured_peak_allocated_gib"], (int, float)) for r in rows)
    key = "measured_peak_allocated_gib" if measured else "predicted_peak_allocated_gib"
    mem = [r["llama_3_8b"][key] for r in rows]
    loss = [r["demo"]["eval_loss"] for r in rows]
    device = next((r["llama_3_8b"].get("device") for r in rows if r["llama_3_8b"].get("device")), None)
    how = f"measured on {device}" if measured else "predicted by qlora plan"
    colors = plt.cm.tab10(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6))
    ax1.scatter(mem, loss, s=160, c=colors, edgecolors="#2c3e50", linewidths=1.2, zorder=5)
    # methods at (nearly) the same memory and loss share one label, names listed from best loss,
    # instead of overprinting each other
    span = (max(mem) - min(mem) or 1.0, max(loss) - min(loss) or 1.0)
    groups: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: loss[i]):
        near = [g for g in groups if abs(mem[g[0]] - mem[i]) < 0.05 * span[0]
                and abs(loss[g[0]] - loss[i]) < 0.05 * span[1]]
        near[0].append(i) if near else groups.append([i])
    for g in groups:
        ax1.annotate("\n".join(names[i] for i in g), (mem[g[0]], loss[g[0]]), xytext=(9, 0),
                     textcoords="offset points", fontsize=8, va="center")
    ax1.margins(x=0.25, y=0.08)
    ax1.set_xlabel(f"peak allocated GPU memory, Llama-3-8B shape, seq 2048 (GiB, {how})")
    ax1.set_ylabel(f"held-out loss on the demo task after {result['cpu_training']['steps']} steps (lower is better)")
    ax1.set_title(f"PEFT methods: memory vs quality (measured loss, {'measured' if measured else 'predicted'} memory)")
    ax1.grid(True, alpha=0.3)
    order = sorted(range(len(rows)), key=lambda i: loss[i])
    ax2.barh(range(len(order)), [loss[i] for i in order], color=[colors[i] for i in order],
             edgecolor="#2c3e50", linewidth=0.8)
    ax2.set_yticks(range(len(order)))
    ax2.set_yticklabels([names[i] for i in order], fontsize=9)
    ax2.invert_yaxis()  # best at the top
    ax2.set_xlabel("held-out loss (demo task, CPU)")
    ax2.set_title("PEFT methods ranked by held-out loss")
    ax2.grid(True, alpha=0.3, axis="x")
    for k, i in enumerate(order):
        em = 100 * rows[i]["demo"]["exact_match"]
        tps = rows[i]["llama_3_8b"].get("tokens_per_s")
        gpu = f", {mem[i]:.1f} GiB" + (f", {tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
        ax2.text(loss[i], k, f" {loss[i]:.3f} ({em:.0f}% exact{gpu})", va="center", fontsize=8)
    ax2.set_xlim(0, max(loss) * 1.6)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
