"""How fast our k-quants (src/qlora/export/kquants.py) quantize Llama-3-8B-shaped random weights.

Phases, each written into one JSON file (--out):
1. one thread: seconds per million values of each K type (Q2_K…Q6_K) in this process, with and
   without importance weights, beside the plain search (the previous implementation's arithmetic,
   `codes(plain=True)` on 1M-value chunks as it ran) on the same values; CPU time of this process
   (time.process_time), so that other load on a shared machine does not count;
2. N workers: each K type over one decoder layer's seven matrices (218M values for the 8B shape),
   on N worker processes (what `qlora export` uses) and, with --executors processes,threads, on N
   threads, in s per million values of wall time;
3. the q4_k_m file of the whole model: its tensor list with llama.cpp's mixture (our mixtures.py),
   estimated from phase 2's rates, and with --whole-model measured (every tensor quantized on the
   workers, one ahead, as the export does; reading and writing files not included);
4. with --export DIR: a random bf16 8B checkpoint written to DIR and `export_gguf(..., "q4_k_m")`
   timed end to end (reading safetensors, quantizing, writing the GGUF), with peak host memory,
   the k-quants searched where the export's --device puts them (this script's --device, default
   cpu: the numpy workers; cuda: torch on the GPU).
5. with --tensors: single tensors of the model's real shapes (an MLP projection, attn_q, the
   embedding) through the export's worker path (submit_type on N spawned worker processes, the
   tensor handed over in mapped files) for each N of --tensor-workers: wall and CPU seconds per
   type (K types with and without importance weights), the main process's hand-off (writing the
   float32 file, reading the bytes back) timed apart; then the q4_k_m file of the whole model
   projected onto --project-cores cores: Σ over its tensors of values × the 1-worker CPU rate of
   the type the mixture gives it, / cores, plus the main process's serial work (bf16 → float32,
   hand-off, the GGUF's writes) at the rates measured here. A projection, not a measurement.
With --device cuda (or cpu, torch on the CPU: a smoke test), a device phase after phase 2: the
torch search (kquants_torch.OnDevice, what the export uses on a GPU) over the same layer, per type,
in wall s per million values from host float32 to packed bytes (the export's view) and for the
search alone on values already on the device; its bytes compared with the numpy search's on a
slice; the q4_k_m model estimated from those rates; with --whole-model, measured too.

    python benchmarks/kquant_speed.py --threads 16 --whole-model --out $OUT/kquant-speed.json
    python benchmarks/kquant_speed.py --threads 16 --device cuda --executors none --whole-model \
        --export /tmp/kq --out $OUT/kquant-speed-cuda.json                       # the GPU path
    python benchmarks/kquant_speed.py --threads 2 --out kquant-speed.json          # small machines
    python benchmarks/kquant_speed.py --threads 16 --types Q8_0,Q4_0,BF16,F16 --executors processes \
        --one-thread-rows 1024 --out $OUT/gguf-types.json     # gguf.quants' types on the workers
    python benchmarks/kquant_speed.py --types Q4_K,Q6_K,Q8_0,Q4_0,F16 --executors none --tensors \
        --tensor-workers 1,2 --out kquant-tensors.json        # per tensor, 1 and 2 workers, projected

--deadline (seconds, default 450) skips what would not finish in time, and says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora.export import kquants  # noqa: E402
from qlora.export.mixtures import Model, tensor_type  # noqa: E402

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),  # its own lm_head here (the real one ties it)
    "deep-narrow": (1024, 4096, 32, 16, 4, 128256),  # the 8B's depth and vocabulary at a quarter width
    "tiny": (256, 512, 2, 4, 2, 1024),  # a CPU smoke test of this script
}
LAYER_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tensor_list(shape: str) -> list[tuple[str, tuple[int, int]]]:
    """(GGUF name, (rows, cols)) of every matrix of the model, in file order."""
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    per_layer = {"attn_q": (hidden, hidden), "attn_k": (kv * head_dim, hidden),
                 "attn_v": (kv * head_dim, hidden), "attn_output": (hidden, hidden),
                 "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        out += [(f"blk.{i}.{role}.weight", per_layer[role]) for role in LAYER_ROLES]
    return out + [("output.weight", (vocab, hidden))]


def random_values(n: int, seed: int = 0) -> np.ndarray:
    """n float32 values ~ N(0, 0.02²), as initialised weights."""
    return (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(0.02))


def per_million(seconds: float, values: int) -> float:
    return round(seconds / values * 1e6, 4)


def one_thread(pool: np.ndarray, cols: int, fast_rows: int, plain_rows: int, types) -> dict:
    x = pool[:fast_rows * cols].reshape(fast_rows, cols)
    importance = np.random.default_rng(1).random(cols).astype(np.float32)
    out = {}
    for k in types:
        if k not in kquants.KINDS:  # gguf.quants' own (no plain search, no importance)
            t = time.process_time()
            kquants.submit_gguf(x, k).result()
            out[k] = {"fast_s_per_mvalue": per_million(time.process_time() - t, x.size)}
            print(f"one thread {k} (gguf.quants): {out[k]['fast_s_per_mvalue']} s/M values", flush=True)
            continue
        t = time.process_time()
        kquants.quantize(x, k)
        fast = time.process_time() - t
        t = time.process_time()
        kquants.quantize(x, k, importance)
        weighted = time.process_time() - t
        blocks = x[:plain_rows].reshape(-1, kquants.QK_K)
        t = time.process_time()
        plain = kquants.PACK[k](kquants.codes(blocks, k, plain=True))
        plain_s = time.process_time() - t
        same = bool(np.array_equal(plain, kquants.quantize(x[:plain_rows], k).reshape(plain.shape)))
        out[k] = {"fast_s_per_mvalue": per_million(fast, x.size),
                  "fast_with_importance_s_per_mvalue": per_million(weighted, x.size),
                  "plain_s_per_mvalue": per_million(plain_s, blocks.size),
                  "speedup": round(plain_s / blocks.size / (fast / x.size), 2),
                  "bytes_equal_plain": same}
        print(f"one thread {k}: fast {out[k]['fast_s_per_mvalue']} s/M values "
              f"(importance {out[k]['fast_with_importance_s_per_mvalue']}), plain "
              f"{out[k]['plain_s_per_mvalue']}, x{out[k]['speedup']}, equal {same}", flush=True)
    return out


def quantize_all(items, executor) -> float:
    """Wall seconds to quantize [(array, type)] on `executor` (or a kquants_torch.OnDevice),
    queued ahead as the export does."""
    def submit(x, k):
        if hasattr(executor, "device"):
            return executor.submit(x, k)
        return kquants.submit_type(x, k, None, executor)

    t = time.perf_counter()
    for _ in kquants.in_order((None, submit(x, k), x.size) for x, k in items):
        pass
    return time.perf_counter() - t


def layer_arrays(pool: np.ndarray, shape: str) -> list[np.ndarray]:
    return [pool[:r * c].reshape(r, c) for name, (r, c) in tensor_list(shape)[1:8]]


def _worker_cpu_seconds(pool) -> float:
    """utime + stime of the pool's worker processes so far (Linux /proc)."""
    total = 0
    for pid in list(getattr(pool, "_processes", {}) or {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def workers_phase(pool, shape, threads, executors, types) -> dict:
    """Wall and CPU seconds per million values of each type over one layer's matrices. The CPU
    figure (main process + workers) says how much work the parallel run costs whatever else runs
    on the machine; wall = CPU / cores only on an otherwise idle machine."""
    layer = layer_arrays(pool, shape)
    values = sum(a.size for a in layer)
    out = {"values_per_layer": values}
    for kind in executors:
        wall, cpu = {}, {}
        if kind == "processes":
            with kquants.Workers(threads) as w:
                ex = w.executor(10**9)
                quantize_all([(layer[0][:64], "Q4_K")], ex)  # start the workers first
                for k in types:
                    c0, w0 = time.process_time(), _worker_cpu_seconds(ex)
                    wall[k] = per_million(quantize_all([(a, k) for a in layer], ex), values)
                    cpu[k] = per_million(time.process_time() - c0 + _worker_cpu_seconds(ex) - w0, values)
        else:
            with ThreadPoolExecutor(threads) as ex:
                for k in types:
                    c0 = time.process_time()
                    wall[k] = per_million(quantize_all([(a, k) for a in layer], ex), values)
                    cpu[k] = per_million(time.process_time() - c0, values)
        out[kind] = wall
        out[f"{kind}_cpu"] = cpu
        print(f"{threads} {kind}: s per M values, wall {wall}, CPU {cpu}", flush=True)
    return out


def device_phase(pool, shape, device, types) -> dict:
    """The torch search on `device`: wall s per M values of each type over one layer's matrices,
    host float32 in, packed bytes out (what the export sees), and of the search alone on one
    device-resident task; bytes compared with the numpy search on a 64-row slice (with and without
    importance)."""
    import torch

    from qlora.export import kquants_torch

    layer = layer_arrays(pool, shape)
    values = sum(a.size for a in layer)
    cols = layer[0].shape[1]
    importance = np.random.default_rng(1).random(cols).astype(np.float32)
    task = pool[:min(kquants_torch.DEVICE_CHUNK_VALUES, len(pool)) // cols * cols].reshape(-1, 256)
    out = {"device": str(device), "values_per_layer": values, "chunk_values": kquants_torch.DEVICE_CHUNK_VALUES}
    with kquants_torch.OnDevice(device) as q:
        out["quantizer"] = str(q)
        quantize_all([(layer[0][:64], "Q4_K")], q)  # start up: kernels loaded, threads started
        for k in types:
            small = layer[0][:64]
            if k in kquants.KINDS:
                same = all(np.array_equal(q.submit(small, k, imp).result(), kquants.quantize(small, k, imp))
                           for imp in (None, importance))
            else:
                same = bool(np.array_equal(q.submit(small, k).result(), kquants.submit_gguf(small, k).result()))
            wall = per_million(quantize_all([(a, k) for a in layer], q), values)
            x = torch.from_numpy(task).to(q.device)
            if q.device.type == "cuda":
                torch.cuda.synchronize(q.device)
            t = time.perf_counter()
            if k in kquants.KINDS:
                kquants_torch.codes(x, k)  # ends with the codes copied to the host: synchronised
            elif k in kquants_torch.ENCODERS:
                kquants_torch.ENCODERS[k](x.reshape(-1, cols)).cpu()
            search = per_million(time.perf_counter() - t, task.size)
            if k not in kquants.KINDS and k not in kquants_torch.ENCODERS:
                search = None  # F16, Q5_0, Q5_1: gguf.quants on OnDevice's CPU threads, nothing on the device
            out[k] = {"wall_s_per_mvalue": wall, "search_s_per_mvalue": search, "bytes_equal_numpy": same}
            print(f"{q} {k}: {wall} s/M values wall, search alone {search}, bytes equal numpy {same}",
                  flush=True)
        if q.device.type == "cuda":
            out["peak_device_gib"] = round(torch.cuda.max_memory_allocated(q.device) / 2**30, 2)
    return out


def whole_model_on_device(pool, shape, device) -> dict:
    from qlora.export import kquants_torch

    items = q4_k_m_types(shape)
    with kquants_torch.OnDevice(device) as q:
        quantize_all([(pool[:64 * 256].reshape(64, 256), "Q4_K")], q)
        seconds = quantize_all([(pool[:r * c].reshape(r, c), k) for _, (r, c), k in items], q)
    return {"seconds": round(seconds, 1), "values": sum(r * c for _, (r, c), _ in items),
            "peak_rss_gib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def q4_k_m_types(shape: str) -> list[tuple[str, tuple[int, int], str]]:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    model = Model(n_layer=layers, n_head=heads, n_kv_head=kv, has_output=True)
    return [(name, dims, tensor_type(name, dims, "q4_k_m", model).stored) for name, dims in tensor_list(shape)]


def whole_model(pool, shape, threads) -> dict:
    items = q4_k_m_types(shape)
    with kquants.Workers(threads) as w:
        ex = w.executor(10**9)
        quantize_all([(pool[:64 * 256].reshape(64, 256), "Q4_K")], ex)
        seconds = quantize_all([(pool[:r * c].reshape(r, c), k) for _, (r, c), k in items], ex)
    return {"seconds": round(seconds, 1), "values": sum(r * c for _, (r, c), _ in items),
            "peak_rss_gib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_rss_gib_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def gguf_type_estimates(shape, rates: dict, source: str) -> dict:
    """Per type of gguf.quants among `rates`: seconds to encode every matrix of the model in it
    (a file of that type, its embedding and output included) at that rate."""
    values = sum(r * c for _, (r, c) in tensor_list(shape))
    return {k: {"values": values, "seconds": round(values * rate / 1e6, 1), "rate_from": source}
            for k, rate in rates.items() if k not in kquants.KINDS}


def estimate(shape, rates: dict) -> dict:
    """The q4_k_m model's quantization time from per-type rates (s per M values)."""
    by_type: dict[str, int] = {}
    for _, (r, c), k in q4_k_m_types(shape):
        by_type[k] = by_type.get(k, 0) + r * c
    seconds = sum(n * rates[k] / 1e6 for k, n in by_type.items() if k in rates)
    return {"values_by_type": by_type, "seconds": round(seconds, 1)}


def write_checkpoint(shape: str, folder: Path) -> float:
    """A random bf16 llama checkpoint of `shape` with a tiny BPE tokenizer; seconds taken."""
    import torch
    from safetensors.torch import save_file

    from qlora.tiny import build_tokenizer

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer(folder)
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16)

    layer_dims = [d for _, d in tensor_list(shape)[1:8]]

    def shard(n: int) -> dict:  # shard 0: embedding, output, final norm; shard i+1: layer i
        if n == 0:
            return {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                    "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        i = n - 1
        part = {f"model.layers.{i}.{hf[role]}.weight": rand(*dims) for role, dims in zip(LAYER_ROLES, layer_dims)}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            part[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        return part

    weight_map, total = {}, 0
    for n in range(layers + 1):  # written one at a time: host memory holds one shard
        part, name = shard(n), f"model-{n:05d}-of-{layers + 1:05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    # the metadata too, as transformers' from_pretrained reads the index (export_check.py loads it)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return time.perf_counter() - t


def export_phase(shape: str, folder: Path, threads: int, device: str) -> dict:
    from qlora.export.gguf import export_gguf

    build = write_checkpoint(shape, folder / "model")
    out = folder / "model-q4_k_m.gguf"
    if out.exists():
        out.unlink()  # a previous run's file (the export never overwrites)
    lines: list[str] = []
    t = time.perf_counter()
    export_gguf(folder / "model", out, "q4_k_m", threads=threads, log=lines.append, device=device)
    seconds = time.perf_counter() - t
    return {"checkpoint_write_s": round(build, 1), "export_s": round(seconds, 1), "device": device,
            "log": lines,
            "gguf_gib": round(out.stat().st_size / 2**30, 2),
            "peak_rss_gib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_rss_gib_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def tensor_shapes(shape: str, names: list[str]) -> dict[str, tuple[int, int]]:
    """(rows, cols) of the model's matrices named (GGUF role: ffn_up, attn_q, token_embd, …)."""
    dims = {name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]: d
            for name, d in tensor_list(shape)}
    return {n: dims[n] for n in names}


def _timed_on_workers(x: np.ndarray, k: str, importance, pool) -> dict:
    """One tensor through the export's worker path (submit_type on `pool`, mapped files): wall
    seconds of the hand-off in (the main process writing the float32 file), the encoding, the
    hand-off out (reading the bytes back), and CPU seconds of the workers and of this process."""
    c0, w0 = time.process_time(), _worker_cpu_seconds(pool)
    t0 = time.perf_counter()
    pending = kquants.submit_type(x, k, importance, pool)
    t1 = time.perf_counter()
    for _, part in pending.parts:
        part.result()
    t2 = time.perf_counter()
    pending.result()
    t3 = time.perf_counter()
    return {"wall_s": round(t3 - t0, 3), "hand_in_s": round(t1 - t0, 3), "encode_s": round(t2 - t1, 3),
            "hand_out_s": round(t3 - t2, 3), "workers_cpu_s": round(_worker_cpu_seconds(pool) - w0, 2),
            "main_cpu_s": round(time.process_time() - c0, 2)}


def tensors_phase(pool_values: np.ndarray, shape: str, names: list[str], workers: list[int],
                  types: list[str], big_types: list[str]) -> dict:
    """Each named tensor in each type (K types also with importance weights) on N spawned
    workers for N in `workers`; tensors of over 2^28 values (the embedding) only in `big_types`,
    without importance. Rates in s per M values: wall, and the workers' CPU (per core)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    out: dict = {}
    for n in workers:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            kquants.submit_type(pool_values[:64 * 4096].reshape(64, 4096), "Q4_K", None, pool).result()
            for name, (r, c) in tensor_shapes(shape, names).items():
                x = pool_values[:r * c].reshape(r, c)
                importance = np.random.default_rng(1).random(c).astype(np.float32)
                big = r * c > 1 << 28
                for k in (big_types if big else types):
                    for imp in ((None,) if big or k not in kquants.KINDS else (None, importance)):
                        key = f"{name} {k}{' importance' if imp is not None else ''} {n} workers"
                        m = _timed_on_workers(x, k, imp, pool)
                        m.update(values=x.size, workers=n, type=k, tensor=name, importance=imp is not None,
                                 wall_s_per_mvalue=per_million(m["wall_s"], x.size),
                                 workers_cpu_s_per_mvalue=per_million(m["workers_cpu_s"], x.size))
                        out[key] = m
                        print(f"{key}: {m}", flush=True)
    return out


def serial_rates(pool_values: np.ndarray) -> dict:
    """The main process's own work per value or byte, on one 14336 × 4096 tensor, best of three
    (warm): bf16 → float32 by torch (what the export did before it handed bf16 over as bits),
    writing to the workers' mapped folder, reading bytes back from it (as Pending does), in ns per
    value / ns per byte; and a worker's widening of bf16 bits (kquants.as_float32), per value."""
    import tempfile

    import torch

    x = pool_values[:min(len(pool_values), 14336 * 4096) // 4096 * 4096].reshape(-1, 4096)
    bf16 = torch.from_numpy(x).to(torch.bfloat16)
    folder = kquants._mapped_folder(x.nbytes) or tempfile.gettempdir()
    path = os.path.join(folder, "qlora-speed-probe.f32")
    back = np.empty(x.nbytes, dtype=np.uint8)

    def best(step) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return min(times)

    try:
        convert = best(lambda: bf16.float().numpy())
        bits = kquants.bf16_bits(bf16).reshape(-1, kquants.QK_K)
        chunk = kquants.CHUNK_BLOCKS  # a worker widens one chunk at a time
        widen = best(lambda: [kquants.as_float32(bits[a:a + chunk]) for a in range(0, len(bits), chunk)])
        write = best(lambda: x.tofile(path))
        read = best(lambda: kquants._read_into(path, back))
    finally:
        os.unlink(path)
    return {"bf16_to_f32_ns_per_value": round(convert / x.size * 1e9, 3),
            "worker_widen_ns_per_value": round(widen / x.size * 1e9, 3),
            "write_ns_per_byte": round(write / x.nbytes * 1e9, 4),
            "read_ns_per_byte": round(read / x.nbytes * 1e9, 4), "folder": folder,
            "torch_threads": torch.get_num_threads()}


def project(shape: str, measured: dict, serial: dict, cores: int) -> dict:
    """The q4_k_m file of the whole model on `cores` cores, from the 1-worker CPU rates (no
    importance) of the largest tensor measured per type: the encoding (and the workers' widening
    of bf16 bits) spread perfectly over the cores, plus the main process's serial work: the 2-byte
    file of bf16 bits for every value, the bytes read back and written twice (GGUFWriter's
    temporary file, then the GGUF). "sum" adds the two, "overlapped" takes the larger (the export
    reads ahead while the workers run). "serial_s_float32_handoff": the serial work as it was
    before the bits (bf16 → float32 in the main process, then a 4-byte file)."""
    rates: dict[str, tuple[int, float]] = {}
    for m in measured.values():
        if m["workers"] == 1 and not m["importance"] and m["values"] > rates.get(m["type"], (0, 0))[0]:
            rates[m["type"]] = (m["values"], m["workers_cpu_s_per_mvalue"])
    items = q4_k_m_types(shape)
    core_s, values, out_bytes = 0.0, 0, 0
    for _, (r, c), k in items:
        core_s += r * c * rates[k][1] / 1e6
        values += r * c
        out_bytes += r * c // kquants.QK_K * kquants.KINDS[k].block_bytes
    core_s += values * serial.get("worker_widen_ns_per_value", 0.0) / 1e9
    encode_s = core_s / cores
    out_s = out_bytes * (serial["read_ns_per_byte"] + 2 * serial["write_ns_per_byte"]) / 1e9
    serial_s = values * 2 * serial["write_ns_per_byte"] / 1e9 + out_s
    before_s = values * (serial["bf16_to_f32_ns_per_value"] + 4 * serial["write_ns_per_byte"]) / 1e9 + out_s
    return {"cores": cores, "core_s_per_mvalue": {k: v for k, (_, v) in rates.items()},
            "core_seconds": round(core_s, 1), "encode_s": round(encode_s, 1), "serial_s": round(serial_s, 1),
            "serial_s_float32_handoff": round(before_s, 1),
            "sum_s": round(encode_s + serial_s, 1), "overlapped_s": round(max(encode_s, serial_s), 1),
            "values": values, "out_gib": round(out_bytes / 2**30, 2),
            "note": "a projection from this machine's per-core rates, assuming perfect scaling over "
                    "the cores; not a measurement"}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "" where the system does not say."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def environment(threads: int) -> dict:
    cpu = cpu_model()
    import tempfile

    try:
        st = os.statvfs("/dev/shm")
        shm_gib = round(st.f_bavail * st.f_frsize / 2**30, 1)
    except OSError:
        shm_gib = None
    # where the worker processes' mapped files go for the largest tensor (embedding, 2 GiB)
    mapped = kquants._mapped_folder(2 * 2**30) or tempfile.gettempdir()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "dev_shm_free_gib": shm_gib, "mapped_files_for_2gib": mapped,
            "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "numpy": np.__version__, "chunk_blocks": kquants.CHUNK_BLOCKS, "argv": sys.argv[1:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=kquants.usable_cores(), help="workers (default: every core)")
    ap.add_argument("--types", default=",".join(K_TYPES),
                    help="types of phases 1 and 2 (default every K type); also Q8_0, Q4_0, BF16, F16 "
                         "(gguf.quants' own, on the same workers)")
    ap.add_argument("--executors", default="processes,threads",
                    help="processes (what the export uses), threads, both (default), or none (skip phase 2)")
    ap.add_argument("--one-thread-rows", type=int, default=256, help="rows of 4096 for phase 1's fast runs")
    ap.add_argument("--plain-rows", type=int, default=256, help="rows of 4096 for the plain search (1M values)")
    ap.add_argument("--chunk-blocks", type=int, default=kquants.CHUNK_BLOCKS,
                    help=f"super-blocks per chunk (default {kquants.CHUNK_BLOCKS}): the cache / per-call trade")
    ap.add_argument("--whole-model", action="store_true", help="phase 3 measured, not only estimated")
    ap.add_argument("--export", metavar="DIR", help="phase 4: write a random checkpoint there and export it")
    ap.add_argument("--device", help="cuda, cuda:N (or cpu: torch on the CPU): time the torch search "
                    "there, and export with --device as given (default: no torch phase, export on the "
                    "CPU's numpy workers)")
    ap.add_argument("--tensors", action="store_true", help="phase 5: single tensors on the workers, "
                    "and the q4_k_m model projected onto --project-cores")
    ap.add_argument("--tensor-names", default="ffn_up,attn_q,token_embd",
                    help="phase 5's tensors (GGUF roles; default ffn_up,attn_q,token_embd)")
    ap.add_argument("--tensor-workers", default="1,2", help="phase 5's worker counts (default 1,2)")
    ap.add_argument("--big-types", default="Q4_K,Q6_K",
                    help="phase 5's types for tensors over 2^28 values (default Q4_K,Q6_K: the "
                         "embedding's and output's in q4_k_m)")
    ap.add_argument("--project-cores", type=int, default=16, help="phase 5's projection (default 16)")
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds for everything")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    kquants.CHUNK_BLOCKS = args.chunk_blocks  # the workers get it with each task
    start = time.perf_counter()
    result = {"environment": environment(args.threads), "skipped": []}

    def save():
        result["total_s"] = round(time.perf_counter() - start, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    hidden = SHAPES[args.shape][0]
    largest = max(r * c for _, (r, c) in tensor_list(args.shape))
    pool = random_values(largest if (args.whole_model or args.tensors or args.shape == "tiny") else
                         max(r * c for _, (r, c) in tensor_list(args.shape)[1:8]))
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    result["one_thread"] = one_thread(pool, hidden, min(args.one_thread_rows, len(pool) // hidden),
                                      min(args.plain_rows, len(pool) // hidden), types)
    save()
    executors = [e.strip() for e in args.executors.split(",") if e.strip() and e.strip() != "none"]
    if executors:
        result["workers"] = workers_phase(pool, args.shape, args.threads, executors, types)
        rates = result["workers"][executors[0]]
        result["q4_k_m_estimate"] = estimate(args.shape, rates)
    else:  # phase 2 skipped: one thread's rate over the workers, as if they scaled perfectly
        rates = {k: v["fast_s_per_mvalue"] / args.threads for k, v in result["one_thread"].items()}
        result["q4_k_m_estimate"] = estimate(args.shape, rates)
        result["q4_k_m_estimate"]["note"] = f"one thread's rates / {args.threads}: perfect scaling assumed"
    if set(types) - set(kquants.KINDS):
        one = {k: v["fast_s_per_mvalue"] / args.threads for k, v in result["one_thread"].items()}
        result["gguf_types_estimate"] = {
            "one_thread_over_threads": gguf_type_estimates(args.shape, one, f"one thread / {args.threads}"),
            "measured": gguf_type_estimates(args.shape, rates, (executors or ["one thread"])[0])}
        print(f"gguf types of the whole {args.shape}: {result['gguf_types_estimate']}", flush=True)
    if not {"Q4_K", "Q6_K"} <= set(rates):
        result["q4_k_m_estimate"]["note"] = "Q4_K and Q6_K rates needed; the sum leaves out the others"
    print(f"q4_k_m of the whole {args.shape}, estimated from {(executors or ['one thread'])[0]}: "
          f"{result['q4_k_m_estimate']['seconds']} s", flush=True)
    save()
    if args.device:
        result["device_phase"] = device_phase(pool, args.shape, args.device, types)
        device_rates = {k: result["device_phase"][k]["wall_s_per_mvalue"] for k in types}
        result["q4_k_m_estimate_device"] = estimate(args.shape, device_rates)
        print(f"q4_k_m of the whole {args.shape} on {args.device}, estimated: "
              f"{result['q4_k_m_estimate_device']['seconds']} s", flush=True)
        save()
    left = args.deadline - (time.perf_counter() - start)
    if args.whole_model and args.device:
        if result["q4_k_m_estimate_device"]["seconds"] * 1.5 + 30 < left:
            result["whole_model_device"] = whole_model_on_device(pool, args.shape, args.device)
            print(f"q4_k_m of the whole {args.shape} on {args.device}, measured: "
                  f"{result['whole_model_device']}", flush=True)
        else:
            result["skipped"].append(f"whole model on {args.device}: {left:.0f} s left")
        save()
        left = args.deadline - (time.perf_counter() - start)
    elif args.whole_model:
        if result["q4_k_m_estimate"]["seconds"] * 1.5 < left:
            result["whole_model"] = whole_model(pool, args.shape, args.threads)
            print(f"q4_k_m of the whole {args.shape}, measured: {result['whole_model']}", flush=True)
        else:
            result["skipped"].append(f"whole model: estimated {result['q4_k_m_estimate']['seconds']} s, {left:.0f} s left")
        save()
    if args.tensors:
        names = [n.strip() for n in args.tensor_names.split(",") if n.strip()]
        big = [t.strip().upper() for t in args.big_types.split(",") if t.strip()]
        counts = [int(n) for n in args.tensor_workers.split(",")]
        result["serial"] = serial_rates(pool)
        result["tensors"] = tensors_phase(pool, args.shape, names, counts, types, big)
        save()
        if {"Q4_K", "Q6_K"} <= {m["type"] for m in result["tensors"].values()}:
            result["q4_k_m_projection"] = project(args.shape, result["tensors"], result["serial"],
                                                  args.project_cores)
            print(f"q4_k_m of the whole {args.shape} projected: {result['q4_k_m_projection']}", flush=True)
        save()
    del pool
    left = args.deadline - (time.perf_counter() - start)
    if args.export:
        estimated = result["q4_k_m_estimate_device" if args.device else "q4_k_m_estimate"]["seconds"]
        if estimated * 1.5 + 120 < left:
            result["export"] = export_phase(args.shape, Path(args.export), args.threads, args.device or "cpu")
            print(f"export: {result['export']}", flush=True)
        else:
            result["skipped"].append(f"export: {left:.0f} s left")
        save()
    save()
    print(f"written to {args.out} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
