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
`--family` builds another family (phi3: its fused attn_qkv; mixtral / qwen3_moe: stacked experts,
`--experts` of them, `--intermediate` each) with `--layers` layers, where the mixtures' per-layer
rules show; every tensor the two files store in different types is listed ("types differ").

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
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
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


def dequantized(tensor) -> np.ndarray:
    """A GGUFReader tensor's values as flat float32 (the reader maps the file: one tensor in memory)."""
    from gguf.quants import dequantize

    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32).ravel()


def compare(source: Path, ours: Path, theirs: Path, keep=lambda name: True) -> dict:
    """Per tensor (of those `keep` names) that both quantized files stored in one type: RMS errors
    against the source file's values; the totals per ggml type and over all of them ("all"). One
    tensor at a time, so that an 8B's three files need not fit in memory."""
    from gguf import GGUFReader

    ours_t = {t.name: t for t in GGUFReader(str(ours)).tensors}
    theirs_t = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    rows, by_type = [], {}
    for tensor in GGUFReader(str(source)).tensors:
        name = tensor.name
        if name not in ours_t or name not in theirs_t or not keep(name) or tensor.n_elements < 256:
            continue
        t_ours, t_theirs = int(ours_t[name].tensor_type), int(theirs_t[name].tensor_type)
        if t_ours == t_theirs and t_ours in (0, 1):  # F32 / F16 on both sides: nothing to compare
            continue
        if t_ours != t_theirs:
            rows.append({"tensor": name, "ours_type": t_ours, "llamacpp_type": t_theirs})
            continue
        src = dequantized(tensor)
        sq_ours = float(np.sum((dequantized(ours_t[name]) - src) ** 2, dtype=np.float64))
        sq_theirs = float(np.sum((dequantized(theirs_t[name]) - src) ** 2, dtype=np.float64))
        e_ours, e_theirs = (sq_ours / src.size) ** 0.5, (sq_theirs / src.size) ** 0.5
        rows.append({"tensor": name, "type": t_ours, "rms_ours": e_ours, "rms_llamacpp": e_theirs,
                     "ratio": e_ours / e_theirs if e_theirs else float("nan")})
        for key in (str(t_ours), "all"):
            tot = by_type.setdefault(key, [0.0, 0.0, 0])
            tot[0] += sq_ours
            tot[1] += sq_theirs
            tot[2] += src.size
    totals = {t: {"values": n, "rms_ours": (a / n) ** 0.5, "rms_llamacpp": (b / n) ** 0.5,
                  "ratio": (a / b) ** 0.5 if b else float("nan")}
              for t, (a, b, n) in by_type.items()}
    return {"tensors": rows, "by_ggml_type": totals}


def quantize_with_llamacpp(llama_python: str, source: Path, outputs: dict[str, Path], threads: int,
                           timeout: float | None = None) -> dict:
    """llama.cpp's quantizer (the --worker role, run by `llama_python`) on the F16 file `source`,
    once per type name -> output path; its version and return codes. SystemExit when it fails or
    runs past `timeout` seconds (then killed)."""
    job_file = Path(next(iter(outputs.values()))).with_suffix(".job.json")
    job_file.write_text(json.dumps({"source": str(source), "threads": threads,
                                    "outputs": {q: str(p) for q, p in outputs.items()}}))
    try:
        proc = subprocess.run([llama_python, __file__, "--worker", str(job_file)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"llama.cpp's quantizer ran past {timeout:.0f} s and was stopped") from None
    finally:
        job_file.unlink()
    result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result is None:
        raise SystemExit(f"llama.cpp's quantizer failed:\n{proc.stderr[-3000:]}")
    return result


def family_sizes(args) -> dict:
    """A mixture of experts' expert count and width (the dense families need none)."""
    if args.family == "mixtral":
        return {"num_local_experts": args.experts}
    if args.family == "qwen3_moe":
        return {"num_experts": args.experts, "moe_intermediate_size": args.intermediate,
                "head_dim": args.hidden // args.heads}
    return {}


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a python that can import llama_cpp (default: this one)")
    ap.add_argument("--types", default=",".join(q for q in FTYPES if q not in ("q8_0", "q4_0")))
    ap.add_argument("--dist", default="normal,t4", help="normal and/or t4")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8, help="mixtral / qwen3_moe: experts a layer")
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
                root / f"model-{dist}", args.family, dtype="float16", hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers,
                **family_sizes(args))
            if dist == "t4":
                heavy_tails(model_dir, seed=1)
            f16 = export_gguf(model_dir, root / f"{dist}-f16.gguf", "f16")
            ours = {q: export_gguf(model_dir, root / f"{dist}-ours-{q}.gguf", q, threads=args.threads)
                    for q in types}
            theirs = {q: root / f"{dist}-llamacpp-{q}.gguf" for q in types}
            result = quantize_with_llamacpp(args.llama_python, f16, theirs, args.threads)
            for q in types:
                row = {"dist": dist, "type": q, "llamacpp": result["version"], "rc": result["rc"][q],
                       **compare(f16, ours[q], theirs[q])}
                report["runs"].append(row)
                tot = ", ".join(f"ggml {t}: ours {v['rms_ours']:.3e} / llama.cpp {v['rms_llamacpp']:.3e}"
                                f" = {v['ratio']:.4f}" for t, v in sorted(row["by_ggml_type"].items()))
                print(f"{dist:6} {q:7} {tot}", flush=True)
                for r in row["tensors"]:
                    if "ours_type" in r:
                        print(f"    types differ: {r['tensor']}: ours {type_name(r['ours_type'])}, "
                              f"llama.cpp {type_name(r['llamacpp_type'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
