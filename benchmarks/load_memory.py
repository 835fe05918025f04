"""Peak host memory while loading: streaming quantization vs the whole model in 16 bits.

    .venv/bin/python benchmarks/load_memory.py [--hidden 1024 --layers 12 --shard 200MB]

Builds a random llama-shaped checkpoint in bf16 with shards of --shard, then, in a fresh process
each, loads it (a) with qlora.models.load_model (NF4, CPU) and (b) whole into memory with
safetensors.torch.load_file, and prints each process's peak resident memory (VmHWM, which unlike ru_maxrss does not carry over the parent's peak) beside
the checkpoint size. Runs on the CPU; nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOAD_OURS = """
import sys, torch
from qlora.models import load_model
from qlora.quant import QuantConfig
HWM = "import re; hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
exec(HWM)
before = hwm()
model = load_model(sys.argv[1], QuantConfig(method="nf4", compute_dtype=torch.bfloat16))
print(before, hwm())
"""
LOAD_WHOLE = """
import re, sys, torch
from pathlib import Path
from safetensors.torch import load_file
hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])
before = hwm()
state = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    state.update(load_file(str(f)))
print(before, hwm())
"""


def peak_rss_mib(script: str, model_dir: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", script, str(model_dir)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-2]) / 1024, int(out[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard", default="200MB")
    args = parser.parse_args()
    from qlora.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", "llama", dtype="bfloat16", max_shard_size=args.shard,
            hidden_size=args.hidden, intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 256, vocab_size=32000)
        shards = sorted(model_dir.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards) / 2**20
        largest = max(f.stat().st_size for f in shards) / 2**20
        ours = peak_rss_mib(LOAD_OURS, model_dir)
        whole = peak_rss_mib(LOAD_WHOLE, model_dir)
    result = {
        "checkpoint_mib": round(total, 1), "shards": len(shards), "largest_shard_mib": round(largest, 1),
        "qlora_load_peak_rss_mib": round(ours[1], 1), "qlora_rss_before_load_mib": round(ours[0], 1),
        "whole_load_peak_rss_mib": round(whole[1], 1), "whole_rss_before_load_mib": round(whole[0], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
