"""The check's reference on the CPU at a real shape, alone: peak RSS and seconds of the streamed
reference (export/reference.StreamedReference) against what check.reference_host_bytes sizes.

    python benchmarks/reference_rss.py --shape llama-3-8b --work /tmp/export-check --out OUT.json

On export_check.py's random bf16 checkpoint and random r=16 adapter (written under --work, reused
when there), a child process (so that its ru_maxrss is the reference's alone, not the
checkpoint writer's) builds the reference, runs one pass over --samples sequences of the check's
MAX_TOKENS random ids (the check's pass over its examples, at their longest), saving their logits
as the check does, then --decode-passes passes of one token each with a KV cache (what each chat
token generated after the file's reply parts from the reference's costs). JSON: seconds of each,
peak RSS (ru_maxrss), the sized bytes (reference_host_bytes, streamed, +5%) and the whole float32
model's sized bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
GIB = 2**30


def child(model_dir: Path, adapter: Path, samples: int, decode_passes: int) -> dict:
    import torch

    from qlora.export.check import MAX_TOKENS, Sample, logits_at_positions, reference_host_bytes
    from qlora.export.reference import load_check_reference
    from qlora.models.weights import read_headers

    t = time.perf_counter()
    model, _ = load_check_reference(model_dir, adapter, device="cpu", streamed=True)
    built_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    vocab = model.spec.vocab_size
    picked = [Sample(ids, [-100] + ids[1:]) for ids in
              (torch.randint(3, vocab, (MAX_TOKENS,), generator=gen).tolist() for _ in range(samples))]
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        logits_at_positions(model, picked, Path(work), "r")
        pass_s = time.perf_counter() - t
    cache = model.new_cache(1, 8 + decode_passes)
    model(torch.tensor([[5] * 8]), cache=cache)  # a prompt (one more pass)
    decode = []
    for _ in range(decode_passes):
        t = time.perf_counter()
        model(torch.tensor([[7]]), cache=cache)
        decode.append(round(time.perf_counter() - t, 2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    headers = read_headers(model_dir)
    return {"threads": torch.get_num_threads(), "build_s": round(built_s, 2),
            "pass_s": round(pass_s, 2), "samples": samples, "tokens": MAX_TOKENS,
            "decode_pass_s": decode, "peak_rss_gib": round(rss / GIB, 3),
            "sized_streamed_gib": round(reference_host_bytes(headers, "original", True, adapter,
                                                             samples) / GIB, 3),
            "sized_whole_gib": round(reference_host_bytes(headers, "original", False) / GIB, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--work", default="/tmp/export-check")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--decode-passes", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    folder = Path(args.work) / args.shape
    model_dir, adapter = folder / "model", folder / "adapter"
    if args.child:
        print(json.dumps(child(model_dir, adapter, args.samples, args.decode_passes)))
        return 0
    from export_check import ensure_checkpoint, write_adapter

    result = {"shape": args.shape, "checkpoint_write_s": ensure_checkpoint(args.shape, model_dir)}
    if not (adapter / "adapter_model.safetensors").is_file():
        result["adapter_write_s"] = write_adapter(model_dir, adapter)
    done = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child"],
                          capture_output=True, text=True)
    result["exit_code"] = done.returncode
    if done.returncode == 0:
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        result["log_tail"] = (done.stderr or done.stdout)[-2000:]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
