"""Fold the out-of-sample planner check and `qlora compare`'s GPU columns (the OUTDIR of
benchmarks/device_planner_check.sh) into the repository.

    python benchmarks/fold_planner_check.py OUTDIR                    # store, then write the docs
    python benchmarks/fold_planner_check.py OUTDIR --print            # only print what it would write

1. Stores OUTDIR's JSON and logs in benchmarks/results/ as <date>-<gpu>-compare-llama-3-8b.json and
   <date>-<gpu>-oos-planner.json (names memory_calibration.out_of_sample_points() reads, and
   test_memory.py then holds within 10%).
2. `qlora compare`'s GPU columns: fills docs/compare/compare.json's measured peak allocated /
   reserved memory and tokens/s per method (the CPU columns are kept as they are), predicts again
   with the planner as it is now, rewrites compare.md and compare.png (memory vs quality, ranking:
   from the measured memory) and the results table of docs/COMPARE.md (between its markers).
3. docs/BENCHMARKS.md, section "Out-of-sample planner check" (between its markers, inserted after
   the "Memory planner calibration" section the first time): predicted vs measured peak allocated
   of every configuration, the error, reserved / allocated, and what the allocator slack factor
   (qlora.memory.RESERVED_FACTOR) should be by these measurements.

Nothing is written when a file is missing or has no GPU measurement at all (a CPU smoke run).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_calibration as calib  # noqa: E402

from qlora import compare, memory  # noqa: E402
from qlora.errors import QloraError  # noqa: E402
from qlora.files import staged_file  # noqa: E402

COMPARE_FILE, OOS_FILE = "compare-llama-3-8b.json", "oos-planner.json"
OOS_START = "<!-- out-of-sample planner check: written by benchmarks/fold_planner_check.py -->"
OOS_END = "<!-- end of out-of-sample planner check -->"
TABLE_START = "<!-- compare results table: written by qlora compare / benchmarks/fold_planner_check.py -->"
TABLE_END = "<!-- end of compare results table -->"
WITHIN = 10.0  # percent: the bar


def _write(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise QloraError(f"{path} does not exist: run benchmarks/device_planner_check.sh OUTDIR on the GPU first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QloraError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def _measured_any(data: dict) -> bool:
    return any("peak_allocated" in r.get("measured", {}) for r in data.get("records", []))


def stored_name(data: dict, kind: str) -> str:
    """<date>-<gpu>-<kind>: e.g. 2026-11-26-h100-oos-planner.json."""
    meta = data.get("meta", {})
    date = str(meta.get("date", "undated"))[:10]
    gpu = re.search(r"(h100|h200|a100|l40s?|rtx\s*\d+|\d{4,})", str(meta.get("device", "")).lower())
    return f"{date}-{(gpu[1].replace(' ', '') if gpu else 'gpu')}-{kind}"


def splice(text: str, start: str, end: str, body: str, after_heading: str | None = None) -> str:
    """Replace what lies between the markers with body; without markers, insert the marked body
    before the first '## ' heading that follows `after_heading` (or at the end)."""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        return text[:i] + block + text[j:]
    if start in text or end in text:
        raise QloraError(f"only one of the markers {start!r} / {end!r} is present: fix the file by hand")
    at = len(text)
    if after_heading and after_heading in text:
        nxt = text.find("\n## ", text.index(after_heading) + len(after_heading))
        at = nxt + 1 if nxt >= 0 else len(text)
    before = text[:at].rstrip("\n") + "\n\n"
    rest = text[at:]
    return before + block + "\n" + ("\n" + rest if rest else "")


# --- the out-of-sample table ---------------------------------------------------------------------
def _settings(run: dict) -> str:
    bits = [f"seq {run['seq_len']}", f"mb {run.get('micro_batch', 1)}", "ckpt" if run["checkpointing"] else "no ckpt",
            f"r {run['r']}"]
    if run.get("quant", "nf4") != "nf4" or not run.get("double_quant", True):
        bits.append({"none": "16-bit base", "int8": "8-bit base"}.get(run.get("quant"), run.get("quant", "nf4"))
                    + ("" if run.get("double_quant", True) or run.get("quant") in ("none", "int8") else ", no DQ"))
    if run.get("targets", "all-linear") != "all-linear":
        bits.append(str(run["targets"]).replace("_proj", ""))
    if run.get("dora"):
        bits.append("DoRA")
    if run.get("lora_dropout", 0.05) != 0.05:
        bits.append(f"dropout {run['lora_dropout']:g}")
    return ", ".join(bits)


def slack_summary(points: list[calib.Point]) -> dict:
    """reserved / allocated over the points that recorded both, and the factor they call for."""
    ratios = [p.reserved / p.measured for p in points if p.reserved]
    if not ratios:
        return {}
    worst = max(ratios)
    return {"n": len(ratios), "min": min(ratios), "max": worst,
            "median": sorted(ratios)[len(ratios) // 2],
            # the smallest 0.05 step that covers every measured run
            "factor": -(-round(worst * 100) // 5) * 5 / 100,
            "extra_gib_max": max((p.reserved - p.measured) / memory.GiB for p in points if p.reserved)}


def oos_section(points: list[calib.Point], failed: list[calib.Failed], metas: dict[str, dict],
                calibration: list[calib.Point]) -> str:
    g = memory.GiB
    meta = next(iter(metas.values()), {})
    versions = meta.get("versions", {})
    lines = [
        "## Out-of-sample planner check",
        "",
        "The planner was adjusted after seeing the 19 calibration points above, so they show that it can be",
        "fitted, not that it predicts. These configurations were measured afterwards, with the planner",
        "frozen, and none of them is one of the 19 (other shapes — Mistral-7B, Qwen2.5-7B —, other",
        "sequence lengths and micro-batches, ranks 8 and 32, q/v-only targets, DoRA, 16-bit, 8-bit and",
        "FP4 bases, no dropout). The prediction is `qlora.memory.plan` as committed, for the step that",
        "ran (its loss chunk as the decoder chose it for the vocabulary).",
        "",
        f"- **Device**: {meta.get('device', '?')}, {meta.get('date', '?')[:10]}. **Versions**: torch "
        f"{meta.get('torch', '?')}, bitsandbytes {versions.get('bitsandbytes', '?')}.",
        "- **Command**: `bash benchmarks/device_planner_check.sh OUTDIR`, then `python benchmarks/fold_planner_check.py "
        "OUTDIR`. What runs: `benchmarks/measure_memory.py` (this project's step on a random-weight model "
        "in the real shape: forward, backward, clip, paged 8-bit AdamW; one process per configuration; "
        f"{meta.get('steps', '?')} steps). The out-of-sample set ran two processes at a time (each "
        "measures its own peak); the compare set one at a time.",
        f"- **Files**: {', '.join(f'`benchmarks/results/{n}`' for n in metas)}.",
        "",
        "| source | shape | settings | loss chunk | measured peak allocated GiB | predicted GiB | error "
        "| measured peak reserved GiB | reserved / allocated | peak phase (planner) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        phase = memory.plan(memory.resolve_arch(shape=p.shape), p.config()).peak_phase
        src = "compare: " + p.label if p.source.endswith(COMPARE_FILE) else p.label or "out of sample"
        res = f"{p.reserved / g:.2f} | {p.reserved / p.measured:.2f}" if p.reserved else "- | -"
        lines.append(f"| {src} | {p.shape} | {_settings(p.run)} | {p.loss_chunk_tokens} | {p.measured / g:.2f} "
                     f"| {p.predicted() / g:.2f} | {p.error_pct():+.1f}% | {res} | {phase} |")
    for f in failed:
        src = "compare: " + f.label if f.source.endswith(COMPARE_FILE) else f.label or "out of sample"
        lines.append(f"| {src} | {f.shape} | {_settings(f.run)} | - | not measured: {f.why.replace('|', '/')} "
                     "| - | - | - | - | - |")
    errs = [abs(p.error_pct()) for p in points]
    within = sum(e <= WITHIN for e in errs)
    lines += ["", f"{len(points)} configurations measured, {len(failed)} not; largest error "
                  f"{max(errs):.1f}%, {within} of {len(points)} within {WITHIN:.0f}%."]
    slack = slack_summary(points + calibration)
    if slack:
        lines += ["", f"**Allocator slack.** Reserved / allocated over the {slack['n']} runs that recorded both "
                      f"(these and the calibration JSON): {slack['min']:.2f}–{slack['max']:.2f}, median "
                      f"{slack['median']:.2f}; reserved exceeds allocated by at most {slack['extra_gib_max']:.2f} GiB. "
                      f"The advice's factor (`qlora.memory.RESERVED_FACTOR`, {memory.RESERVED_FACTOR:.2f} when "
                      f"this was written) that covers every one of them: {slack['factor']:.2f}."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="the OUTDIR of benchmarks/device_planner_check.sh")
    ap.add_argument("--root", default=str(ROOT), help="repository root to write into (default: this one)")
    ap.add_argument("--print", action="store_true", help="print the tables, write nothing")
    args = ap.parse_args(argv)
    try:
        return fold(Path(args.outdir), Path(args.root), dry=args.print)
    except QloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def fold(outdir: Path, root: Path, dry: bool = False) -> int:
    data = {kind: _load(outdir / kind) for kind in (COMPARE_FILE, OOS_FILE)}
    empty = [k for k, d in data.items() if not _measured_any(d)]
    if empty:
        raise QloraError(f"{', '.join(str(outdir / k) for k in empty)}: no GPU measurement in it "
                         "(a --smoke run, or every configuration failed): nothing folded")
    results = root / "benchmarks" / "results"
    names = {kind: stored_name(d, kind) for kind, d in data.items()}
    # 1. store the raw results (and their logs) where memory_calibration reads them
    if not dry:
        for kind, name in names.items():
            _write(results / name, json.dumps(data[kind], indent=2) + "\n")
            log = (outdir / kind).with_suffix(".log")
            if log.is_file():
                shutil.copyfile(log, results / Path(name).with_suffix(".log"))
        env = outdir / "env.txt"
        if env.is_file():
            shutil.copyfile(env, results / names[OOS_FILE].replace("oos-planner.json", "planner-check-env.txt"))
        src_dir = results
    else:
        src_dir = outdir
    # 2. compare's GPU columns
    cmp_json = root / "docs" / "compare" / "compare.json"
    result = _load(cmp_json)
    gpu = compare.read_gpu_results(src_dir / (names[COMPARE_FILE] if not dry else COMPARE_FILE))
    compare.fill_gpu_columns(result, gpu, f"benchmarks/results/{names[COMPARE_FILE]}")
    result["gpu_measurement"] = {k: data[COMPARE_FILE]["meta"].get(k) for k in
                                 ("date", "device", "torch", "versions", "steps", "warmup")}
    table = compare.table(result)
    # 3. the out-of-sample table
    pts, failed = [], []
    for kind in (OOS_FILE, COMPARE_FILE):
        p, f = calib.read_measure_records(src_dir / (names[kind] if not dry else kind))
        for point in p + f:
            point.source = names[kind]
        pts, failed = pts + p, failed + f
    section = oos_section(pts, failed, {names[k]: data[k]["meta"] for k in (OOS_FILE, COMPARE_FILE)},
                          calib.points(results))
    if dry:
        print(table)
        print(section)
        return 0
    out = cmp_json.parent
    _write(cmp_json, json.dumps(result, indent=2) + "\n")
    _write(out / "compare.md", compare.markdown(result))
    compare.plot(result, out / "compare.png")
    doc = root / "docs" / "COMPARE.md"
    _write(doc, splice(doc.read_text(), TABLE_START, TABLE_END, table, "## Results"))
    bench = root / "docs" / "BENCHMARKS.md"
    _write(bench, splice(bench.read_text(), OOS_START, OOS_END, section, "## Memory planner calibration"))
    print(section)
    slack = slack_summary(pts + calib.points(results))
    print(f"wrote {cmp_json}, compare.md, compare.png, {doc} (table), {bench} (out-of-sample section); "
          f"stored {', '.join(names.values())} in {results}")
    if slack:
        print(f"reserved/allocated {slack['min']:.2f}-{slack['max']:.2f}: set qlora.memory.RESERVED_FACTOR = "
              f"{slack['factor']:.2f} (now {memory.RESERVED_FACTOR:.2f}) and update docs/MEMORY.md")
    print("by hand: the prose of docs/COMPARE.md ('Reading it') and docs/MEMORY.md's status line")
    return 0


if __name__ == "__main__":
    sys.exit(main())
