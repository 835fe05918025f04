"""The planner beside every peak-memory measurement stored in benchmarks/results.

    python benchmarks/memory_calibration.py            # markdown table for docs/BENCHMARKS.md

Two sources, both this project's own training step on the H100 (forward, backward, clip, paged
8-bit AdamW step; bf16, LoRA r on all seven projections, dropout 0.05, micro-batch 1):

- measure_memory.py (random_model, loss_chunk_tokens 1024): the `*-memory-*.log` / `.json` files.
- train_step.py's "qlora" system (load_model from a random checkpoint): the `*.jsonl` files. Those
  runs predate commit 49b38ac, when DecoderLM's loss_chunk_tokens was still 4096, and the script
  keeps an fp32 clone of the adapters (`init_state`) on the GPU for the whole run, so the
  prediction adds 4 B per adapter parameter for them.

tests/test_memory.py asserts every point stays within 10%.
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

    def config(self) -> memory.PlanConfig:
        return memory.PlanConfig(r=self.r, seq_len=self.seq, checkpointing=self.checkpointing,
                                 lora_dropout=0.05, micro_batch=1, optimizer="paged_adamw_8bit",
                                 loss_chunk_tokens=self.loss_chunk_tokens)

    def predicted(self) -> int:
        b = memory.plan(memory.resolve_arch(shape=self.shape), self.config())
        return b.allocated + self.extra_bytes_per_param * b.adapter_params

    def error_pct(self) -> float:
        return 100 * (self.predicted() - self.measured) / self.measured


def points(results: Path = RESULTS) -> list[Point]:
    out: list[Point] = []
    line = re.compile(r"(\S+) seq=(\d+) gc=(True|False) r=(\d+): measured ([\d.]+) GiB")
    for path in sorted(results.glob("*-memory-*.log")):
        for text in path.read_text().splitlines():
            m = line.match(text)
            if m:  # the log prints GiB with 2 decimals: +-0.005 GiB, well inside the 10% bar
                out.append(Point(path.name, m[1], int(m[2]), m[3] == "True", int(m[4]),
                                 round(float(m[5]) * memory.GiB), 1024))
    for path in sorted(results.glob("*-memory-*.json")):
        for rec in json.loads(path.read_text())["records"]:
            meas = rec.get("measured", {})
            if "peak_allocated" in meas:
                run = rec["run"]
                out.append(Point(path.name, rec["shape"], run["seq_len"], run["checkpointing"], run["r"],
                                 meas["peak_allocated"], meas["planner_overrides"]["loss_chunk_tokens"]))
    seen = set()
    for path in sorted(results.glob("*.jsonl")):
        for text in path.read_text().splitlines():
            rec = json.loads(text)
            if rec.get("system") != "qlora" or rec.get("peak_alloc_gib") is None:
                continue
            key = (rec["shape"], rec["seq"], rec["ckpt"], rec["peak_alloc_gib"])
            if key in seen:  # train_step.py's emit() writes each record twice
                continue
            seen.add(key)
            out.append(Point(path.name, rec["shape"], rec["seq"], rec["ckpt"], 16,
                             round(rec["peak_alloc_gib"] * memory.GiB), SPEED_RUN_CHUNK, extra_bytes_per_param=4))
    return out


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


if __name__ == "__main__":
    print(table(points()))
