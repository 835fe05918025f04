"""Peak host memory while loading a 4-bit model: qlora's streaming loader beside transformers'.

    .venv/bin/python benchmarks/load_memory.py [--hidden 1024 --layers 12 --shard 200MB]

Builds a random llama-shaped checkpoint in bf16 with shards of --shard, then, in a fresh process
each, loads it (a) with qlora.models.load_model (NF4 + double quant, CPU) and (b) with transformers'
from_pretrained + BitsAndBytesConfig (the same quantization), and prints each process's peak resident memory (VmHWM, which unlike ru_maxrss does not carry over the parent's peak) beside
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
import bitsandbytes
from qlora.models import load_model
from qlora.quant import QuantConfig
HWM = "import re; hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
exec(HWM)
before = hwm()
model = load_model(sys.argv[1], QuantConfig(method="nf4", compute_dtype=torch.bfloat16))
print(before, hwm())
"""
LOAD_TRANSFORMERS = """
import re, sys, torch
hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])
import bitsandbytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
before = hwm()
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config,
                                             dtype=torch.bfloat16, device_map="cpu")
print(before, hwm())
"""
IMPORT_ONLY = """
import re, sys, torch
hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])
import bitsandbytes, bitsandbytes.functional as F
from qlora.models import load_model
before = hwm()
F.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), compress_statistics=True)  # bnb's CPU runtime
print(before, hwm())
"""


def peak_rss_mib(script: str, model_dir: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", script, str(model_dir)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-2]) / 1024, int(out[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random llama checkpoint")
    parser.add_argument("--layers", type=int, default=12, help="its number of decoder layers")
    parser.add_argument("--shard", default="50MB", help="its safetensors shard size (save_pretrained's max_shard_size)")
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
        theirs = peak_rss_mib(LOAD_TRANSFORMERS, model_dir)
        runtime = peak_rss_mib(IMPORT_ONLY, model_dir)
    result = {
        "checkpoint_mib": round(total, 1), "shards": len(shards), "largest_shard_mib": round(largest, 1),
        "qlora_load_peak_rss_mib": round(ours[1], 1), "qlora_rss_before_load_mib": round(ours[0], 1),
        "transformers_bnb_load_peak_rss_mib": round(theirs[1], 1),
        "transformers_rss_before_load_mib": round(theirs[0], 1),
        "qlora_load_increase_mib": round(ours[1] - ours[0], 1),
        "transformers_load_increase_mib": round(theirs[1] - theirs[0], 1),
        "bnb_cpu_runtime_first_quantize_mib": round(runtime[1] - runtime[0], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
