"""Our k-quants against llama.cpp's own quantizer, on the same weights: RMS error per tensor.

A one-layer Llama with real widths (default TinyLlama-1.1B's: hidden 2048, MLP 5632, 32 heads over
4; `--hidden`/`--intermediate`/`--heads`/`--kv-heads` for others), its weights stored in float16 so
that both quantizers start from the very same values:
  1. our exporter writes the F16 GGUF (llama.cpp's input) and each K type (`qlora.export.export_gguf`);
  2. llama.cpp (llama-cpp-python's `llama_model_quantize`, in its own virtualenv, as a subprocess)
     quantizes that F16 file to each K type, without an importance matrix, as ours runs here;
  3. both files are read back with the gguf package; every tensor that both stored in the same
     ggml type is dequantized by `gguf.quants.dequantize` and compared with the F16 source:
     RMS(dequantized - source) for ours and for llama.cpp, and their ratio.
Weights: `--dist normal` (transformers' init, N(0, 0.02²)) or `t4` (Student's t with 4 degrees of
freedom, scaled to the same spread: heavy tails, as trained weights have).

    python -m venv /tmp/llamacpp-venv   # then build llama-cpp-python there (llamacpp_check.py says how)
    .venv/bin/python benchmarks/kquant_vs_llamacpp.py --llama-python /tmp/llamacpp-venv/bin/python \
        --json benchmarks/results/DATE-cpu-kquant-vs-llamacpp.json

This file runs in two roles, as llamacpp_check.py: the driver (project venv) and, with `--worker`,
the llama.cpp side (only llama_cpp imported). Not imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# our type names and llama.cpp's file types (llama_ftype) for them
FTYPES = {"q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
          "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def worker(job_file: str) -> None:
    """llama.cpp's side: quantize job["source"] into each job["outputs"] (type name -> path)."""
    import llama_cpp

    job = json.loads(Path(job_file).read_text())
    done = {}
    for qtype, out in job["outputs"].items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, FTYPES[qtype])
        params.nthread = job["threads"]
        rc = llama_cpp.llama_model_quantize(job["source"].encode(), out.encode(), params)
        done[qtype] = rc
    print("RESULT", json.dumps({"version": llama_cpp.__version__, "rc": done}), flush=True)


def heavy_tails(model_dir: Path, seed: int) -> None:
    """Every 2-D weight redrawn from Student's t (4 degrees of freedom), scaled to std 0.02."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for file in model_dir.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, t in tensors.items():
            if t.dim() == 2:
                normal = torch.randn(t.shape, generator=g, dtype=torch.float64)
                chi2 = torch.randn((4, *t.shape), generator=g, dtype=torch.float64).pow(2).sum(0)
                draw = normal / (chi2 / 4).sqrt()  # t with 4 dof: variance 2
                tensors[name] = (draw * 0.02 / 2 ** 0.5).to(t.dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})


def tensors_of(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """name -> (ggml type, values as float32) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        out[t.name] = (int(t.tensor_type), dequantize(t.data, t.tensor_type).astype(np.float32).ravel())
    return out


def compare(source: dict, ours: dict, theirs: dict) -> dict:
    """Per tensor both stored in one type: RMS errors against the source; the type's totals."""
    rows, by_type = [], {}
    for name, (typ, src) in source.items():
        if name not in ours or name not in theirs or src.size < 256:
            continue
        (t_ours, q_ours), (t_theirs, q_theirs) = ours[name], theirs[name]
        if t_ours == t_theirs and t_ours in (0, 1):  # F32 / F16 on both sides: nothing to compare
            continue
        if t_ours != t_theirs:
            rows.append({"tensor": name, "ours_type": t_ours, "llamacpp_type": t_theirs})
            continue
        e_ours = float(np.sqrt(np.mean((q_ours - src) ** 2)))
        e_theirs = float(np.sqrt(np.mean((q_theirs - src) ** 2)))
        rows.append({"tensor": name, "type": t_ours, "rms_ours": e_ours, "rms_llamacpp": e_theirs,
                     "ratio": e_ours / e_theirs if e_theirs else float("nan")})
        tot = by_type.setdefault(t_ours, [0.0, 0.0, 0])
        tot[0] += float(np.sum((q_ours - src) ** 2))
        tot[1] += float(np.sum((q_theirs - src) ** 2))
        tot[2] += src.size
    totals = {str(t): {"values": n, "rms_ours": (a / n) ** 0.5, "rms_llamacpp": (b / n) ** 0.5,
                       "ratio": (a / b) ** 0.5 if b else float("nan")}
              for t, (a, b, n) in by_type.items()}
    return {"tensors": rows, "by_ggml_type": totals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a python that can import llama_cpp (default: this one)")
    ap.add_argument("--types", default=",".join(FTYPES))
    ap.add_argument("--dist", default="normal,t4", help="normal and/or t4")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    from qlora.export.gguf import export_gguf
    from qlora.tiny import build_tiny_model

    types = args.types.split(",")
    report = {"argv": sys.argv[1:], "runs": []}
    with tempfile.TemporaryDirectory(prefix="kquant_vs_llamacpp.") as tmp:
        root = Path(tmp)
        for dist in args.dist.split(","):
            model_dir = build_tiny_model(
                root / f"model-{dist}", "llama", dtype="float16", hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, num_hidden_layers=1)
            if dist == "t4":
                heavy_tails(model_dir, seed=1)
            f16 = export_gguf(model_dir, root / f"{dist}-f16.gguf", "f16")
            ours = {q: export_gguf(model_dir, root / f"{dist}-ours-{q}.gguf", q, threads=args.threads)
                    for q in types}
            job = {"source": str(f16), "threads": args.threads,
                   "outputs": {q: str(root / f"{dist}-llamacpp-{q}.gguf") for q in types}}
            (root / "job.json").write_text(json.dumps(job))
            proc = subprocess.run([args.llama_python, __file__, "--worker", str(root / "job.json")],
                                  capture_output=True, text=True)
            result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")),
                          None)
            if result is None:
                raise SystemExit(f"llama.cpp's quantizer failed:\n{proc.stderr[-3000:]}")
            source = tensors_of(f16)
            for q in types:
                row = {"dist": dist, "type": q, "llamacpp": result["version"], "rc": result["rc"][q],
                       **compare(source, tensors_of(ours[q]), tensors_of(Path(job["outputs"][q])))}
                report["runs"].append(row)
                tot = ", ".join(f"ggml {t}: ours {v['rms_ours']:.3e} / llama.cpp {v['rms_llamacpp']:.3e}"
                                f" = {v['ratio']:.4f}" for t, v in sorted(row["by_ggml_type"].items()))
                print(f"{dist:6} {q:7} {tot}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
