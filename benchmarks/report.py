"""Turn benchmark results (JSON lines from train_step.py) into the markdown table and the plot.

  python benchmarks/report.py benchmarks/results/*.jsonl --plot docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["hf", "hf+liger", "unsloth", "unsloth-nocompile", "qlora", "qlora-nokeep", "qlora-fast",
         "qlora-bnb", "qlora-fused", "qlora-unfused", "qlora-eager", "qlora-old"]


def load(paths: list[str], renames: list[str] = ()) -> list[dict]:
    """Records of the result files. A rename "PART:old=new,old=new" gives the systems of the files
    whose path contains PART today's names (the script's variants were renamed between runs)."""
    recs = []
    for p in paths:
        names = {}
        for spec in renames:
            part, _, pairs = spec.partition(":")
            if part in p:
                names.update(pair.split("=", 1) for pair in pairs.split(","))
        for line in Path(p).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                r = json.loads(line)
                r["system"] = names.get(r["system"], r["system"])
                recs.append(r)
    return recs


def config_name(r: dict) -> str:
    return f"{r['shape']}\nseq {r['seq']}"


def series_name(r: dict) -> str:
    return r["system"] + ("" if r["ckpt"] else " (no ckpt)")


def table(recs: list[dict]) -> str:
    """One row per result. "× hf" compares tokens/s, which count the seeds' stack's waits on its
    host's CPU; "× hf, GPU time" compares kernel time per step (gpu_busy_ms), which does not."""
    rows = ["| shape | seq | ckpt | system | step s (median) | tokens/s | × hf | GPU ms per step "
            "| × hf, GPU time | peak alloc GiB | peak reserved GiB | MFU | loss step 1 | loss last (step) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hf = {(r["shape"], r["seq"]): r for r in recs if r["system"] == "hf" and "error" not in r}
    key = lambda r: (r["shape"], r["seq"], ORDER.index(r["system"]), not r["ckpt"])  # noqa: E731
    for r in sorted(recs, key=key):
        head = f"| {r['shape']} | {r['seq']} | {'on' if r['ckpt'] else 'off'} | {r['system']} "
        if "error" in r:
            err = r["error"].splitlines()[0].replace("|", "/")
            if err.startswith("OOM"):
                err = "out of GPU memory: " + err.split("out of memory. ")[-1].split(". ")[0]
            elif not err.startswith("skipped"):
                err = "failed: " + err[:120]
            rows.append(head + f"| — | — | — | — | — | — | — | — | — | {err} |")
            continue
        b = hf.get((r["shape"], r["seq"]), {})
        rel = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "—"
        gpu = r.get("gpu_busy_ms")
        gpu_rel = f"{b['gpu_busy_ms'] / gpu:.2f}" if gpu and b.get("gpu_busy_ms") else "—"
        # the summary lines a run prints (RESULT ...) carry tokens/s but not the step time
        step = r.get("step_s_median") or r.get("mb", 1) * r["seq"] / r["tokens_per_s"]
        rows.append(head + f"| {step:.3f} | {r['tokens_per_s']:,.0f} | {rel} "
                    f"| {f'{gpu:.1f}' if gpu else '—'} | {gpu_rel} | {r['peak_alloc_gib']:.2f} "
                    f"| {r['peak_reserved_gib']:.2f} | {100 * r['mfu']:.1f}% | {r['loss_first']:.4f} "
                    f"| {r['loss_last']:.4f} ({r.get('steps', '?')}) |")
    return "\n".join(rows)


def plot(recs: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = []
    for r in recs:
        c = config_name(r)
        if c not in configs:
            configs.append(c)
    configs.sort()
    names = [s + t for s in ORDER for t in ("", " (no ckpt)")]
    systems = [s for s in names if any(series_name(r) == s for r in recs)]
    fig, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    width = 0.8 / len(systems)
    for j, s in enumerate(systems):
        tps, mem = [], []
        for c in configs:
            r = next((r for r in recs if series_name(r) == s and config_name(r) == c), None)
            ok = r is not None and "error" not in r
            tps.append(r["tokens_per_s"] if ok else 0)
            mem.append(r["peak_reserved_gib"] if ok else 0)
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(configs))]
        axes[0].bar(xs, tps, width, label=s)
        axes[1].bar(xs, mem, width, label=s)
        for x, v, c in zip(xs, tps, configs):
            r = next((r for r in recs if series_name(r) == s and config_name(r) == c), None)
            if r is not None and "error" in r:
                for ax in axes:
                    ax.text(x, 0, "OOM" if r["error"].startswith("OOM") else "not run", rotation=90,
                            ha="center", va="bottom", fontsize=7)
    axes[0].set_ylabel("tokens / s")
    axes[1].set_ylabel("peak reserved GPU memory (GiB)")
    axes[0].set_title("QLoRA training step, one H100 80GB: NF4+DQ base, LoRA r=16 on 7 projections, micro-batch 1,\n"
                      "gradient checkpointing on unless marked (no ckpt)", fontsize=10)
    axes[1].set_xticks(range(len(configs)))
    axes[1].set_xticklabels(configs)
    axes[0].legend()
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.jsonl files written by train_step.py")
    ap.add_argument("--plot", help="also draw tokens/s and peak reserved memory per system into this PNG")
    ap.add_argument("--rename", action="append", default=[], metavar="PART:old=new,...",
                    help="systems of the files whose path contains PART, by today's names")
    args = ap.parse_args()
    recs = load(args.results, args.rename)
    print(table(recs))
    if args.plot:
        plot(recs, args.plot)


if __name__ == "__main__":
    main()
