"""The planner beside every peak-memory measurement stored in benchmarks/results.

    python benchmarks/memory_calibration.py                   # markdown table for docs/BENCHMARKS.md
    python benchmarks/memory_calibration.py --out-of-sample   # the out-of-sample points instead

Two sources, both this project's own training step on the H100 (forward, backward, clip, paged
8-bit AdamW step; bf16, LoRA r on all seven projections, dropout 0.05, micro-batch 1):

- measure_memory.py (random_model, loss_chunk_tokens 1024): the `*-memory-*.log` / `.json` files.
- train_step.py's "qlora" system (load_model from a random checkpoint): the `*.jsonl` files. Those
  runs predate commit 49b38ac, when DecoderLM's loss_chunk_tokens was still 4096, and the script
  kept an fp32 clone of the adapters (`init_state`) on the GPU for the whole run, so the
  prediction adds 4 B per adapter parameter for them (not for records marked init_state "host":
  the script keeps the clone in host memory since).

Out of sample (configurations measured after the model was last changed, none of them among the
points above: `python benchmarks/memory_calibration.py --out-of-sample`): `*-oos-planner.json` and `*-compare-llama-3-8b.json`, written by
benchmarks/device_planner_check.sh and stored by benchmarks/fold_planner_check.py. `out_of_sample_points()` reads
them; they are not in `points()`, so the calibration table stays the set the model was fitted to.

tests/test_memory.py asserts every point (both sets) stays within 10%.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora import memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPEED_RUN_CHUNK = 4096  # DecoderLM.loss_chunk_tokens before commit 49b38ac


@dataclass
class Point:
    source: str  # file name under benchmarks/results
    shape: str
    seq: int
    checkpointing: bool
    r: int
    measured: int  # bytes, torch.cuda.max_memory_allocated
    loss_chunk_tokens: int
    extra_bytes_per_param: int = 0  # what the measuring script keeps besides the step
    run: dict | None = None  # out of sample: every PlanConfig field of the run (quant, targets, ...)
    reserved: int | None = None  # bytes, torch.cuda.max_memory_reserved, where recorded
    label: str = ""

    seeded_dropout: bool = False  # the stored runs before 2026-11-25 19:40 used torch's dropout
    # the stored runs before 2026-11-25 19:22 set per-parameter gradients to None after each step;
    # a run marked flat_grads kept them in the optimizer's flat buffer (train/optim.flatten_group)
    flat_grads: bool = False
    # the planner's loss of the step measured: "chunked" (checkpointed chunks) for every run before
    # kernels/cross_entropy.py; read from a record's planner_overrides where it has them
    loss: str = "chunked"

    def config(self) -> memory.PlanConfig:
        if self.run is not None:
            return memory.PlanConfig(**{**self.run, "loss_chunk_tokens": self.loss_chunk_tokens,
                                        "seeded_dropout": self.seeded_dropout, "loss": self.loss,
                                        "flat_grads": self.flat_grads})
        return memory.PlanConfig(r=self.r, seq_len=self.seq, checkpointing=self.checkpointing,
                                 lora_dropout=0.05, micro_batch=1, optimizer="paged_adamw_8bit",
                                 loss_chunk_tokens=self.loss_chunk_tokens,
                                 seeded_dropout=self.seeded_dropout, loss=self.loss,
                                 flat_grads=self.flat_grads)

    def predicted(self) -> int:
        b = memory.plan(memory.resolve_arch(shape=self.shape), self.config())
        return b.allocated + self.extra_bytes_per_param * b.adapter_params

    def error_pct(self) -> float:
        return 100 * (self.predicted() - self.measured) / self.measured


def points(results: Path = RESULTS) -> list[Point]:
    out: list[Point] = []
    line = re.compile(r"(\S+) seq=(\d+) gc=(True|False) r=(\d+): measured ([\d.]+) GiB(?: allocated \(([\d.]+) reserved)?")
    for path in sorted(results.glob("*-memory-*.log")):
        for text in path.read_text().splitlines():
            m = line.match(text)
            if m:  # the log prints GiB with 2 decimals: +-0.005 GiB, well inside the 10% bar
                out.append(Point(path.name, m[1], int(m[2]), m[3] == "True", int(m[4]),
                                 round(float(m[5]) * memory.GiB), 1024,
                                 reserved=round(float(m[6]) * memory.GiB) if m[6] else None))
    for path in sorted(results.glob("*-memory-*.json")):
        for rec in json.loads(path.read_text())["records"]:
            meas = rec.get("measured", {})
            if "peak_allocated" in meas:
                run = rec["run"]
                out.append(Point(path.name, rec["shape"], run["seq_len"], run["checkpointing"], run["r"],
                                 meas["peak_allocated"], meas["planner_overrides"]["loss_chunk_tokens"],
                                 reserved=meas.get("peak_reserved"),
                                 seeded_dropout=bool(meas["planner_overrides"].get("seeded_dropout")),
                                 loss=meas["planner_overrides"].get("loss", "chunked"),
                                 flat_grads=bool(meas["planner_overrides"].get("flat_grads"))))
    seen = set()
    for path in sorted(results.glob("*.jsonl")):
        for text in path.read_text().splitlines():
            rec = json.loads(text)
            if rec.get("system") != "qlora" or rec.get("peak_alloc_gib") is None:
                continue
            if rec.get("step") == "cuda-graphs":  # a captured step: not the step the planner models
                continue
            key = (rec["shape"], rec["seq"], rec["ckpt"], rec["peak_alloc_gib"])
            if key in seen:  # train_step.py's emit() writes each record twice
                continue
            seen.add(key)
            out.append(Point(path.name, rec["shape"], rec["seq"], rec["ckpt"], 16,
                             round(rec["peak_alloc_gib"] * memory.GiB), SPEED_RUN_CHUNK,
                             extra_bytes_per_param=0 if rec.get("init_state") == "host" else 4,
                             flat_grads=rec.get("init_state") == "host"))
    return out


OUT_OF_SAMPLE_GLOBS = ("*-oos-planner.json", "*-compare-llama-3-8b.json")


@dataclass
class Failed:
    """An out-of-sample configuration that did not give a measurement, and why."""

    source: str
    shape: str
    run: dict
    label: str
    why: str


def read_measure_records(path: Path, label_from_method: bool = True) -> tuple[list[Point], list[Failed]]:
    """Points (and failures) of one measure_memory.py output file, each with its full run config."""
    pts, failed = [], []
    for rec in json.loads(path.read_text()).get("records", []):
        run = {k: v for k, v in rec["run"].items() if k in memory.PlanConfig.__dataclass_fields__}
        label = rec.get("label") or (rec.get("method") if label_from_method else None) or ""
        meas = rec.get("measured", {})
        if "peak_allocated" in meas:
            chunk = meas.get("planner_overrides", {}).get("loss_chunk_tokens")
            chunk = chunk or memory.loss_chunk_tokens(memory.resolve_arch(shape=rec["shape"]).vocab_size)
            seeded = bool(meas.get("planner_overrides", {}).get("seeded_dropout", False))
            flat = bool(meas.get("planner_overrides", {}).get("flat_grads", False))
            run.pop("seeded_dropout", None)
            run.pop("flat_grads", None)
            run.pop("loss", None)
            pts.append(Point(path.name, rec["shape"], run["seq_len"], run["checkpointing"], run["r"],
                             meas["peak_allocated"], chunk, run=run, reserved=meas.get("peak_reserved"),
                             label=label, seeded_dropout=seeded, flat_grads=flat,
                             loss=meas.get("planner_overrides", {}).get("loss", "chunked")))
        elif rec.get("shape") != "tiny":  # a CPU dry run measures no memory: neither point nor failure
            why = rec.get("error") or rec.get("skipped") or "no GPU measurement"
            failed.append(Failed(path.name, rec["shape"], run, label, str(why)))
    return pts, failed


def out_of_sample_points(results: Path = RESULTS) -> tuple[list[Point], list[Failed]]:
    pts, failed = [], []
    for pattern in OUT_OF_SAMPLE_GLOBS:
        for path in sorted(results.glob(pattern)):
            p, f = read_measure_records(path)
            pts += p
            failed += f
    return pts, failed


def table(pts: list[Point]) -> str:
    g = memory.GiB
    rows = ["| source | shape | seq | checkpointing | r | loss chunk | measured peak allocated GiB "
            "| predicted GiB | error | peak phase (planner) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        b = memory.plan(memory.resolve_arch(shape=p.shape), p.config())
        rows.append(f"| {p.source} | {p.shape} | {p.seq} | {'on' if p.checkpointing else 'off'} | {p.r} "
                    f"| {p.loss_chunk_tokens} | {p.measured / g:.2f} | {p.predicted() / g:.2f} "
                    f"| {p.error_pct():+.1f}% | {b.peak_phase} |")
    worst = max(abs(p.error_pct()) for p in pts)
    rows.append(f"\n{len(pts)} points, largest error {worst:.1f}%.")
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS), help="folder of stored measurements (default: %(default)s)")
    ap.add_argument("--out-of-sample", action="store_true",
                    help="the out-of-sample points (*-oos-planner.json, *-compare-llama-3-8b.json) instead")
    args = ap.parse_args(argv)
    if args.out_of_sample:
        pts, failed = out_of_sample_points(Path(args.results))
        print(table(pts))
        for f in failed:
            print(f"not measured: {f.source} {f.label or f.shape}: {f.why}")
    else:
        print(table(points(Path(args.results))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
