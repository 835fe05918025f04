"""Several GPUs, in one run: 1 -> 2 (-> 4) GPU scaling with the loss curves beside it, loss-curve
equality through the CLI, sharded training of a model larger than one (memory-capped) GPU. Every
part runs in child processes under a timeout; a failure is written down as that part's result and
the next part runs.

  (b) scaling: tokens/s at 1, 2 and (where the host has them) 4 GPUs, data parallel with the
      graphed step (qlora.train.loop.fit, as `qlora train` runs it), Llama-3-8B shape with random
      weights (random_model), seq 2048, micro-batch 1, NF4 + double quant, LoRA r16 all-linear,
      checkpointing, paged 8-bit AdamW; the same global batch everywhere (accumulation G / N on N
      GPUs, G the most GPUs measured), so the N-GPU loss and grad-norm curves (30 steps) must equal
      the 1-GPU one: their largest relative difference is reported (target <= 1e-3); per-GPU peak
      memory; whether the CUDA-graph step was on
  (a) loss curves through the real `qlora train` CLI under torchrun: 1 process x accumulation 2 vs
      2 ranks x accumulation 1 (data parallel and FSDP), 30 optimizer steps, small random llama
  (c) each GPU capped (torch.cuda.set_per_process_memory_fraction) below the 4-bit model's size
      (Llama-2-7B shape): 1 GPU runs out of memory loading it; 2 GPUs with --sharding fsdp train

Results: one JSON line per measurement in OUT/results.jsonl; child logs in OUT/logs/.
  python benchmarks/multi_gpu.py --out $OUT/multi_gpu                # b and a, under 9 minutes
  python benchmarks/multi_gpu.py --out $OUT/mg_c --parts c --budget 300
  python benchmarks/multi_gpu.py --out /tmp/mg --smoke              # CPU, gloo, tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
HERE = Path(__file__).resolve()


def emit(out: Path, rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec}
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def child_env(smoke: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NO_MULTICAST, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["OMP_NUM_THREADS"] = "1"
    return env


def launch(args, nproc: int, cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """`cmd` (python args) in 1 process, or under torchrun with `nproc` ranks; (rc, log tail)."""
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        try:
            rc = subprocess.run([sys.executable, *cmd], env=child_env(args.smoke), stdout=fh,
                                stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text(errors="replace")
    return rc, text[-1500:]


def last_error(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if "Error" in ln or "error:" in ln]
    return (lines[-1] if lines else tail.strip().splitlines()[-1] if tail.strip() else "")[-400:]


# --- (a) loss curves through the CLI ------------------------------------------------------------
def part_a(args, out: Path, deadline: float) -> None:
    import random

    from qlora.tiny import build_tiny_model

    work = out / "a"
    overrides = {} if args.smoke else dict(hidden_size=512, intermediate_size=1408,
                                           num_hidden_layers=4, num_attention_heads=8,
                                           num_key_value_heads=4)
    model = build_tiny_model(work / "model", "llama", **overrides)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"prompt": " ".join("".join(rng.choice(letters) for _ in range(5)) for _ in range(8)) + " = ",
             "completion": "".join(rng.choice(letters) for _ in range(20))} for _ in range(64)]
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", str(model), "--data", str(data), "--max_seq_length", "128",
              "--micro_batch_size", "2", "--max_steps", "30", "--learning_rate", "2e-3",
              "--warmup_steps", "2", "--logging_steps", "1", "--eval_steps", "0",
              "--save_steps", "0", "--val_set_size", "0", "--lora_dropout", "0",
              "--optim", "adamw_torch", "--seed", "0", "--packing", "false",
              "--gradient_checkpointing", "true"] + (["--device", "cpu"] if args.smoke else [])
    runs = {"1rank_accum2": (1, ["--gradient_accumulation_steps", "2"]),
            "2rank_dp_accum1": (2, ["--gradient_accumulation_steps", "1", "--sharding", "ddp"]),
            "2rank_fsdp_accum1": (2, ["--gradient_accumulation_steps", "1", "--sharding", "fsdp"])}
    curves = {}
    for name, (nproc, extra) in runs.items():
        run_dir = work / name
        rc, tail = launch(args, nproc, ["-m", "qlora.cli", *common, *extra, "--output_dir",
                                        str(run_dir)], out / "logs" / f"a_{name}.log",
                          min(120, deadline - time.time()))
        if rc != 0:
            emit(out, {"part": "a", "run": name, "ok": False, "rc": rc, "error": last_error(tail)})
            continue
        recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r["loss"] for r in recs if r["split"] == "train"]
        summary = json.loads((run_dir / "summary.json").read_text())
        said = (out / "logs" / f"a_{name}.log").read_text(errors="replace")
        emit(out, {"part": "a", "run": name, "ok": True, "ranks": nproc, "losses": curves[name],
                   "compute_dtype": summary.get("compute_dtype"), "device": summary.get("device"),
                   "keep_attention_on": "keep_attention: on" in said,
                   "cuda_graphs_on": "CUDA graphs on" in said})
    ref = curves.get("1rank_accum2")
    for name in ("2rank_dp_accum1", "2rank_fsdp_accum1"):
        if ref and name in curves and len(curves[name]) == len(ref):
            rel = max(abs(a - b) / abs(b) for a, b in zip(curves[name], ref))
            emit(out, {"part": "a", "compare": f"{name} vs 1rank_accum2", "steps": len(ref),
                       "max_rel_diff": rel})


# --- workers (run inside the child processes) --------------------------------------------------
def _spec(shape: str):
    from qlora import memory
    from qlora.models.spec import spec_from_config

    if shape == "tiny":
        config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "vocab_size": 128, "tie_word_embeddings": False}
    else:
        config = dict(memory.SHAPES[shape])
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("max_position_embeddings", 8192)
    return spec_from_config(config, source=f"shape {shape}")


def _cpu_model_quantized_on(spec, quant, device):
    """random_model's weights, each linear drawn and quantized on `device` and moved to host
    memory at once: the GPU never holds more than one layer (a sharded run's loading)."""
    import torch

    from qlora.models.decoder import DecoderLM
    from qlora.models.load import BLOCK_LINEAR, _set_tensor
    from qlora.models.weights import replace_keeping_bias
    from qlora.models.decoder import Rotary
    from qlora.quant import quantize_linear

    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        model = DecoderLM(spec)
    for name, module in list(model.named_modules()):
        if BLOCK_LINEAR.match(name):
            w = torch.randn(module.weight.shape, generator=gen, device=device,
                            dtype=quant.compute_dtype) * 0.02
            replace_keeping_bias(model, name, quantize_linear(w, None, quant, device).to("cpu"))
            del w
    for key, param in list(model.named_parameters()):
        if param.device.type == "meta":
            value = (torch.ones(param.shape, dtype=quant.compute_dtype) if key.endswith("norm.weight")
                     else torch.randn(param.shape, dtype=quant.compute_dtype) * 0.02)
            _set_tensor(model, key, value, Path("<random>"))
    model.model.rotary_emb = Rotary(spec)
    model.tie_weights()
    model.quant = quant
    return model.eval()


def worker(args) -> int:
    """One rank of part b (--mode dp) or c (--mode single | fsdp): build, train with the real
    loop (qlora.train.loop.fit), write this rank's facts."""
    import types

    import torch

    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.config import load_config
    from qlora.models.load import random_model
    from qlora.quant import QuantConfig
    from qlora.train import distributed as dist_
    from qlora.train import loop

    env = dist_.env_from_environ()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rec = {"part": args.part, "mode": args.mode, "rank": env.rank, "ranks": env.world_size,
           "shape": args.shape, "seq": args.seq}
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, device)
        rec["cap_gib"] = args.cap_gib
    if env.enabled:
        dist_.init(env, device.type)
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = QuantConfig(method="nf4", double_quant=True, compute_dtype=dtype)
    spec = _spec(args.shape)
    t0 = time.time()
    try:
        if args.mode == "fsdp":
            model = _cpu_model_quantized_on(spec, quant, device)
        else:
            model = random_model(spec, quant, device=device)
        torch.manual_seed(0)
        attach_adapters(model, AdapterConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0))
        model.gradient_checkpointing = True
        if args.mode == "fsdp":
            dist_.shard_fsdp(model, dtype, device)
        rec["load_s"] = round(time.time() - t0, 1)
        if cuda:
            rec["after_load_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
        g = torch.Generator().manual_seed(1)
        # the same examples on every GPU count: the global batch is accum x ranks everywhere
        global_batch = args.accum * env.world_size
        examples = [{"input_ids": ids, "labels": ids} for ids in
                    torch.randint(0, spec.vocab_size, (args.steps * global_batch + 4, args.seq),
                                  generator=g).tolist()]
        cfg = load_config(None, dict(
            model="<random>", data="<random>", output_dir=str(Path(args.out) / f"run-{args.part}-{args.mode}-{env.world_size}"),
            overwrite=True, max_seq_length=args.seq, micro_batch_size=1,
            gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=2e-4,
            warmup_steps=0, logging_steps=1, eval_steps=0,
            save_steps=0, val_set_size=0, packing=False, optim="adamw_torch" if args.mode == "fsdp"
            else "paged_adamw_8bit" if cuda else "adamw_8bit", sharding="fsdp" if args.mode == "fsdp" else "ddp",
            device=device.type, lora_r=args.lora_r, gradient_checkpointing=True))
        if env.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        dist_.barrier(env)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        said: list[str] = []
        res = loop.fit(model, types.SimpleNamespace(pad_token_id=0), examples, [], cfg,
                       device=device, progress=False, env=env, log=said.append)
        losses = [res.step_losses[k] for k in sorted(res.step_losses)]
        rec.update(ok=True, accum=args.accum, losses=losses,
                   finite=all(math.isfinite(x) for x in losses))
        if env.is_main:
            recs = [json.loads(ln) for ln in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in recs if r["split"] == "train"]
            rec["grad_norms"] = [r["grad_norm"] for r in train]
            tps = [r["tokens_per_s"] for r in train][min(5, len(train) // 2):]  # after captures
            rec["tokens_per_s"] = sorted(tps)[len(tps) // 2] if tps else None  # all ranks
            rec["cuda_graphs_on"] = any("CUDA graphs on" in line for line in said) and not any(
                "CUDA graphs off" in line for line in said)
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            rec["reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    except torch.OutOfMemoryError as err:
        rec.update(ok=False, oom=True, error=str(err).splitlines()[0][:300])
    except Exception as err:  # noqa: BLE001 -- written down as this run's result
        rec.update(ok=False, oom="out of memory" in str(err).lower(),
                   error=f"{type(err).__name__}: {str(err)[:300]}")
    (Path(args.out) / f"rank-{args.part}-{args.mode}-{env.world_size}-{env.rank}.json").write_text(
        json.dumps(rec))
    dist_.shutdown(env)
    return 0


def run_workers(args, out: Path, part: str, mode: str, nproc: int, timeout: float, **kw) -> dict:
    """Rank 0's record (or {} when it failed); every rank's record is emitted."""
    cmd = [str(HERE), "--worker", "--out", str(out), "--part", part, "--mode", mode,
           *[a for k, v in kw.items() for a in (f"--{k}", str(v))]] + (["--smoke"] if args.smoke else [])
    rc, tail = launch(args, nproc, cmd, out / "logs" / f"{part}_{mode}_{nproc}.log", timeout)
    got = []
    for r in range(nproc):
        f = out / f"rank-{part}-{mode}-{nproc}-{r}.json"
        if f.exists():
            got.append(json.loads(f.read_text()))
            emit(out, got[-1])
    if len(got) < nproc:
        emit(out, {"part": part, "mode": mode, "ranks": nproc, "ok": False, "rc": rc,
                   "error": "timed out" if rc is None else last_error(tail)})
    return got[0] if got and got[0].get("rank") == 0 and got[0].get("ok") else {}


def max_rel_diff(got: list[float], want: list[float]) -> float | None:
    if not got or len(got) != len(want):
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want))


def part_b(args, out: Path, deadline: float) -> None:
    """Scaling at the same global batch: tokens/s and the curves of each GPU count against one."""
    import torch

    have = 2 if args.smoke else torch.cuda.device_count()
    counts = [n for n in (1, 2, 4) if n <= have]
    most = counts[-1]
    shape, seq, steps = ("tiny", 64, 8) if args.smoke else ("llama-3-8b", 2048, 30)
    emit(out, {"part": "b", "gpu_counts": counts, "global_batch": most, "steps": steps})
    runs = {}
    for n in counts:
        runs[n] = run_workers(args, out, "b", "dp", n, min(170, deadline - time.time()),
                              shape=shape, seq=seq, steps=steps, lora_r=16, accum=most // n)
    one = runs.get(1)
    for n in counts[1:]:
        if not (one and runs[n]):
            continue
        rec = {"part": "b", "compare": f"{n} GPUs (accum {most // n}) vs 1 GPU (accum {most})",
               "max_rel_diff_loss": max_rel_diff(runs[n]["losses"], one["losses"]),
               "max_rel_diff_grad_norm": max_rel_diff(runs[n].get("grad_norms"),
                                                      one.get("grad_norms", [])),
               "target": 1e-3, "tokens_per_s": runs[n].get("tokens_per_s"),
               "tokens_per_s_1gpu": one.get("tokens_per_s")}
        if rec["tokens_per_s"] and rec["tokens_per_s_1gpu"]:
            rec["speedup"] = round(rec["tokens_per_s"] / rec["tokens_per_s_1gpu"], 3)
        emit(out, rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.jsonl and logs/")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    p.add_argument("--parts", default="b,a", help="which parts to run (see above), comma-separated")
    p.add_argument("--budget", type=float, default=480, help="seconds for all parts")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default="b", help=argparse.SUPPRESS)  # worker: its part
    p.add_argument("--mode", default="dp", help=argparse.SUPPRESS)  # worker: dp, single or fsdp
    p.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)  # worker: per rank
    p.add_argument("--shape", default="llama-3-8b", help=argparse.SUPPRESS)  # worker: set by the driver
    p.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)  # worker: set by the driver
    p.add_argument("--steps", type=int, default=8, help=argparse.SUPPRESS)  # worker: set by the driver
    p.add_argument("--lora_r", type=int, default=16, help=argparse.SUPPRESS)  # worker: set by the driver
    p.add_argument("--cap_gib", type=float, default=0.0, help=argparse.SUPPRESS)  # worker: part (c)'s cap
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_MULTICAST)
    start = time.time()
    deadline = start + args.budget
    parts = args.parts.split(",")
    emit(out, {"part": "env", "smoke": args.smoke, "python": sys.version.split()[0],
               **{k: os.environ.get(k) for k in NO_MULTICAST}})
    if "b" in parts:
        try:
            part_b(args, out, deadline)
        except Exception as err:  # noqa: BLE001
            emit(out, {"part": "b", "ok": False, "error": f"{type(err).__name__}: {err}"[:400]})
    if "a" in parts:
        try:
            part_a(args, out, min(deadline, time.time() + 200))
        except Exception as err:  # noqa: BLE001
            emit(out, {"part": "a", "ok": False, "error": f"{type(err).__name__}: {err}"[:400]})
    if "c" in parts:
        # a cap below the 4-bit model (weights + quant state + bf16 embeddings/head), over the
        # planner's per-GPU figure for 2-GPU FSDP (qlora plan --shape llama-2-7b --gpus 2 --sharding fsdp)
        shape, seq, steps, r = ("tiny", 64, 4, 8) if args.smoke else ("llama-2-7b", 512, 4, 8)
        from qlora import memory

        b = memory.plan(memory.resolve_arch(shape="llama-2-7b"), memory.PlanConfig(seq_len=512, r=8))
        model_gib = (b.base + b.embeddings + b.norms) / 2**30
        cap = round(0.97 * model_gib, 2)  # below the 4-bit model; 0.9 left FSDP no room to train
        emit(out, {"part": "c", "model_4bit_gib": round(model_gib, 3), "cap_gib": cap,
                   "note": "no memory cap on CPU (smoke)" if args.smoke else ""})
        run_workers(args, out, "c", "single", 1, min(90, deadline - time.time()),
                    shape=shape, seq=seq, steps=steps, lora_r=r, cap_gib=cap)
        run_workers(args, out, "c", "fsdp", 2, min(180, deadline - time.time()),
                    shape=shape, seq=seq, steps=steps, lora_r=r, cap_gib=cap)
    emit(out, {"part": "done", "wall_s": round(time.time() - start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
