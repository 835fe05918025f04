"""The user's whole export command on a real-shape model: time, host memory, file size, and the check.

    qlora export --gguf --model BASE --adapter ADAPTER --out OUT.gguf --type TYPE --check

run as a subprocess (`python -m qlora.cli export ...`) once per type of --types, on:
1. a random bf16 checkpoint of --shape (kquant_speed.write_checkpoint: N(0, 0.02²) weights and
   qlora.tiny's character-level tokenizer with its ChatML chat template, so the check's chat round
   trip runs; the 8B's 128,256 embedding rows beyond the tokenizer's ~100 become UNUSED tokens in
   the GGUF), written under --work and reused when it is there already;
2. a random LoRA adapter in PEFT's format, r 16 (alpha 16) on q, k, v, o, gate, up, down, lora_A
   and lora_B ~ N(0, 0.02²) with a fixed seed: ΔW ≈ 8 % of the base weights' spread, so the adapter
   changes the model and its logits stay sane. It is made by qlora.adapters itself (attach_adapters
   on the model built on the meta device, the factors then drawn on the CPU, save_adapter).

Per type (one JSON, --out, rewritten after each): wall seconds of the command, and of its parts
(export_s: until the GGUF appears, as it is renamed into place whole; check_s: the rest); host
memory, both ways:
- peak_rss_gib: os.wait4's ru_maxrss of the command: the largest single process of its tree (the
  export, its quantizer workers, llama.cpp's worker), as Linux keeps it;
- peak_tree_rss_gib_export / _check: the summed RSS of the command's process tree, polled from
  /proc every 0.2 s (shared pages count once per process; a spike shorter than a poll is missed);
peak_disk_gib_export: how far the used bytes of the output's disk rose while the export ran (same
polls), to set beside the file's size (the export needs room for that file only);
file size; and the check's JSON (OUT.check.json: agreement, mean KL, perplexities, chat round trip,
passed / failures). A check that fails still writes its JSON (the command then exits 2); both are
recorded. A random model is no test of quality: the table says whether the file computes what
base + adapter compute, on the check's built-in text unless --check-data is given.

Is a failed check our quantizer, or the random model? Two more rows answer it in the same run:
- f16: the noise floor. The merged model in 16 bits, checked the same way: whatever the
  reference (16-bit base + adapter unmerged, our engine) and llama.cpp (the merged file) differ
  by without any quantizer. A deep random network may amplify that alone past the limits, which
  are set for trained models;
- "TYPE (llama.cpp's quantizer)", the peer (--peer-quantizer, on by default where --llama-python
  imports llama_cpp): llama.cpp's own `llama_model_quantize` turns our f16 file into TYPE (each
  of --peer-types, default the types of --types it makes; no importance matrix, as ours without
  --imatrix-data), and that file is checked exactly as ours (check_gguf, same reference and
  data). Its row's "export s" is llama.cpp's quantizing. Beside it, RMS: each file's error
  against the f16 file's values over the tensors both quantizers stored in one ggml type
  (kquant_vs_llamacpp.compare; --rms-layers limits it to some blocks). Ours quantizes the merged
  float32 weights, the peer their f16 rounding: the f16 rounding (~2⁻¹² of a value) is far below
  any K type's error. Where ours fails and the peer fails alike, on the same weights, the limits
  do not fit the model, not our quantizer.
f16 is added to --types (first) when the peer needs its file.

    # GPU machine (llama-cpp-python importable from --llama-python; the default is
    # $QLORA_LLAMA_PYTHON, else this python): f16, ours and llama.cpp's q4_k_m, then q8_0
    python benchmarks/export_check.py --shape llama-3-8b --types f16,q4_k_m,q8_0 --peer-types q4_k_m \
        --rms-layers 0,31 --work /tmp/export-check --deadline 540 --out $OUT/export-check.json
    # a CPU with llama.cpp: Llama-3.2-1B's widths and depth (26 min on a busy 2-core CPU, 5 files)
    python benchmarks/export_check.py --shape llama-3.2-1b --types f16,q4_k_m,q8_0 \
        --llama-python /tmp/llamacpp-venv/bin/python --device cpu --work /tmp/ec --deadline 3000 --out ec.json
    # any CPU, no llama.cpp: the GGUF's dequantized weights run in qlora's engine
    python benchmarks/export_check.py --shape tiny --check-engine qlora --device cpu --out ec.json

--deadline (seconds for everything) skips the types that would not finish in time (a type is
started only when more time is left than the longest type so far took) and says so in the JSON.
With --check-engine qlora the GGUF is dequantized to float32 in host memory: 4 bytes per weight,
too much for an 8B on most machines; use llama.cpp there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SRC))

from kquant_speed import SHAPES, cpu_model, write_checkpoint  # noqa: E402
from kquant_vs_llamacpp import FTYPES, compare, quantize_with_llamacpp  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POLL_S = 0.2
GIB = 2**30
# the check's fields carried into the table, from OUT.check.json's "logits"
LOGIT_FIELDS = ("tokens", "agreement", "decisive_tokens", "decisive_agreement", "mean_kl", "max_kl",
                "ppl_reference", "ppl_other", "ppl_ratio")


# --- the inputs ---------------------------------------------------------------------------------
def ensure_checkpoint(shape: str, folder: Path) -> float | None:
    """The random checkpoint at `folder`; seconds taken to write it, None when it was there (the
    index is written last, so its presence means a whole checkpoint)."""
    if (folder / "model.safetensors.index.json").is_file():
        return None
    if folder.exists():
        shutil.rmtree(folder)  # a write cut short
    return round(write_checkpoint(shape, folder), 1)


def write_adapter(model_dir: Path, out: Path, r: int = 16, std: float = 0.02, seed: int = 0) -> float:
    """A random PEFT adapter for `model_dir` (module docstring, 2.); seconds taken."""
    import torch

    from qlora.adapters import AdapterConfig, LoraLinear, attach_adapters, save_adapter
    from qlora.models.load import new_decoder
    from qlora.models.spec import read_spec

    t = time.perf_counter()
    with torch.device("meta"):  # the shapes only: no 16 GB of weights for a 42M-value adapter
        model = new_decoder(read_spec(model_dir))
    attach_adapters(model, AdapterConfig(r=r, alpha=r, dropout=0.0, target_modules=list(PROJECTIONS)))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            for factor in (module.lora_A, module.lora_B):  # B non-zero: the adapter acts
                factor.to_empty(device="cpu")
                with torch.no_grad():
                    factor.weight.normal_(0.0, std, generator=gen)
    save_adapter(model, out, str(model_dir))
    return round(time.perf_counter() - t, 1)


def chat_template_note(model_dir: Path) -> str | None:
    """Which chat template the check's chat round trip will use; None: the checkpoint has none, and
    the check skips the round trip."""
    from qlora.data.templates import CHATML_TEMPLATE
    from qlora.models import load_tokenizer

    template = getattr(load_tokenizer(model_dir), "chat_template", None)
    if not template:
        return None
    name = "ChatML (qlora.tiny's tokenizer)" if template == CHATML_TEMPLATE else "the checkpoint's own"
    return f"{name}: the chat round trip runs"


# --- one command, measured ----------------------------------------------------------------------
def tree_pids(root: int) -> list[int]:
    """root and its descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass  # the task ended between the listing and the read
    return out


def tree_rss(root: int) -> int:
    """Bytes resident in root's process tree (statm's second field, in pages)."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total * os.sysconf("SC_PAGE_SIZE")


def run_measured(argv: list[str], env: dict, log_path: Path, gguf: Path, timeout: float) -> dict:
    """Run argv to its end (or kill its process group after `timeout` s): wall seconds, the
    seconds until `gguf` appeared, peak RSS (wait4's, and the polled tree sum before and after the
    file appeared), exit code."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    export_s, peaks, timed_out = None, [0, 0], False
    disk_before = disk_peak = shutil.disk_usage(gguf.parent).used
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter() - start
        if export_s is None and gguf.exists():
            export_s = now
        phase = 0 if export_s is None else 1
        peaks[phase] = max(peaks[phase], tree_rss(proc.pid))
        if phase == 0:
            disk_peak = max(disk_peak, shutil.disk_usage(gguf.parent).used)
        if now > timeout and not timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
            timed_out = True
        time.sleep(POLL_S)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return {"exit_code": proc.returncode, "timed_out": timed_out, "seconds": round(seconds, 1),
            "export_s": None if export_s is None else round(export_s, 1),
            "check_s": None if export_s is None else round(seconds - export_s, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),  # ru_maxrss: KiB on Linux
            "peak_tree_rss_gib_export": round(peaks[0] / GIB, 2),
            "peak_tree_rss_gib_check": round(peaks[1] / GIB, 2) if export_s is not None else None,
            # the most the output's disk filled while the export ran: the file's size, where the
            # export needs nothing else (other writers on that disk meanwhile count too)
            "peak_disk_gib_export": round((disk_peak - disk_before) / GIB, 3)}


def export_argv(args, model_dir: Path, adapter: Path, gguf: Path, qtype: str) -> list[str]:
    argv = [sys.executable, "-m", "qlora.cli", "export", "--gguf", "--model", str(model_dir),
            "--adapter", str(adapter), "--out", str(gguf), "--type", qtype, "--check",
            "--check-engine", args.check_engine, "--device", args.device,
            "--check-samples", str(args.check_samples)]
    if args.check_engine == "llama.cpp":
        argv += ["--llama-python", args.llama_python]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.check_data is not None:
        argv += ["--check-data", str(args.check_data)]
    return argv


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return env


def check_fields(report: dict) -> dict:
    """The parity table of OUT.check.json, flattened for the results."""
    out = {k: report["logits"][k] for k in LOGIT_FIELDS}
    out.update(passed=report["passed"], failures=report["failures"], engine=report["engine"],
               reference=report["reference"], data=report["data"], examples=report["examples"],
               limits=report["limits"], chat=report.get("chat"))
    return out


def gguf_path(args, qtype: str) -> Path:
    return Path(args.work) / args.shape / f"{args.shape}-{qtype}.gguf"


def finish(result: dict, gguf: Path, log: Path) -> None:
    """The file's size, its check's table, the log's tail when the command failed."""
    from qlora.export.check import report_path

    result["gguf_bytes"] = gguf.stat().st_size if gguf.exists() else None
    result["gguf_gib"] = round(gguf.stat().st_size / GIB, 3) if gguf.exists() else None
    if report_path(gguf).exists():
        result["check"] = check_fields(json.loads(report_path(gguf).read_text()))
    if result["exit_code"] != 0:
        result["log_tail"] = log.read_text()[-2000:]


def run_type(args, model_dir: Path, adapter: Path, qtype: str, timeout: float) -> dict:
    """One `qlora export ... --check` of `qtype`, measured, with its check's table."""
    from qlora.export.check import report_path

    gguf = gguf_path(args, qtype)
    # a previous run's outputs (the export never overwrites), and the partial file of one cut short
    for old in (gguf, report_path(gguf), *gguf.parent.glob(f".{gguf.name}.*.partial")):
        old.unlink(missing_ok=True)
    log = gguf.with_suffix(".log")
    result = {"type": qtype, "gguf": str(gguf), "log": str(log)}
    result.update(run_measured(export_argv(args, model_dir, adapter, gguf, qtype), child_env(), log,
                               gguf, timeout))
    finish(result, gguf, log)
    return result


# --- the peer: llama.cpp's quantizer on the same weights ----------------------------------------
def check_argv(args, model_dir: Path, adapter: Path, gguf: Path, qtype: str) -> list[str]:
    """The export's --check alone, on an existing file: check_gguf in this project's python (exit 2
    when a limit is passed, as `qlora export`; the report is written either way)."""
    options = {"gguf_file": str(gguf), "model_dir": str(model_dir), "qtype": qtype,
               "adapter_dir": str(adapter), "data": args.check_data, "samples": args.check_samples,
               "engine": args.check_engine, "device": args.device,
               "llama_python": args.llama_python if args.check_engine == "llama.cpp" else None}
    code = ("import json, sys\n"
            "from qlora.errors import QloraError\n"
            "from qlora.export.check import check_gguf\n"
            "try:\n    check_gguf(**json.loads(sys.argv[1]))\n"
            "except QloraError as e:\n    print(f\"error: {e}\")\n    sys.exit(2)")
    return [sys.executable, "-c", code, json.dumps(options)]


def rms_filter(layers: str):
    """Which tensors the RMS comparison reads: all, or those of the listed blocks (blk.I.*)."""
    if layers == "all":
        return lambda name: True
    keep = {f"blk.{int(i)}." for i in layers.split(",") if i.strip()}
    return lambda name: any(name.startswith(k) for k in keep)


def run_peer(args, model_dir: Path, adapter: Path, f16: Path, qtype: str, timeout: float) -> dict:
    """llama.cpp's quantizer on our F16 file to `qtype`, that file checked as ours is, and both
    files' RMS error against the F16 values (kquant_vs_llamacpp.compare)."""
    from qlora.export.check import report_path

    ours = gguf_path(args, qtype)
    gguf = ours.with_name(f"{args.shape}-{qtype}-llamacpp.gguf")
    for old in (gguf, report_path(gguf)):
        old.unlink(missing_ok=True)
    log = gguf.with_suffix(".log")
    result = {"type": qtype, "quantizer": "llama.cpp", "gguf": str(gguf), "log": str(log)}
    t = time.perf_counter()
    try:
        done = quantize_with_llamacpp(args.llama_python, f16, {qtype: gguf}, args.threads or os.cpu_count(),
                                      timeout=timeout)
    except SystemExit as e:  # its stderr's tail, as a failed export's log tail
        return {**result, "exit_code": None, "seconds": round(time.perf_counter() - t, 1), "export_s": None,
                "check_s": None, "peak_rss_gib": 0.0, "peak_tree_rss_gib_export": 0.0,
                "peak_tree_rss_gib_check": None, "gguf_gib": None, "log_tail": str(e)[-2000:]}
    result.update(llama_cpp=done["version"], quantize_rc=done["rc"][qtype],
                  quantize_s=round(time.perf_counter() - t, 1))
    result.update(run_measured(check_argv(args, model_dir, adapter, gguf, qtype), child_env(), log, gguf,
                               timeout - result["quantize_s"]))
    # the row's "export" is the quantizer's: the check's command found its file there at once
    result.update(export_s=result["quantize_s"], check_s=result["seconds"], peak_tree_rss_gib_export=0.0,
                  seconds=round(result["seconds"] + result["quantize_s"], 1))
    finish(result, gguf, log)
    if ours.exists() and gguf.exists():
        t = time.perf_counter()
        rms = compare(f16, ours, gguf, rms_filter(args.rms_layers))
        result["rms_vs_f16"] = {"layers": args.rms_layers, "seconds": round(time.perf_counter() - t, 1),
                                "tensors_of_other_types": [r for r in rms["tensors"] if "type" not in r],
                                "by_ggml_type": rms["by_ggml_type"]}
    return result


# --- the record ---------------------------------------------------------------------------------
def version_in(python: str, module: str, distribution: str) -> str | None:
    """`module`'s version as `python` imports it (its __version__, else its distribution's);
    None when it cannot import it."""
    code = (f"import importlib, importlib.metadata as m; mod = importlib.import_module({module!r}); "
            f"print(getattr(mod, '__version__', None) or m.version({distribution!r}))")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def uses_llama_cpp(args) -> bool:
    return args.check_engine == "llama.cpp" or args.peer_quantizer == "llama.cpp"


def environment(args) -> dict:
    import torch

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gguf": version_in(sys.executable, "gguf", "gguf"), "gpu": gpu_name(),
            "llama_python": args.llama_python if uses_llama_cpp(args) else None,
            "llama_cpp": (version_in(args.llama_python, "llama_cpp", "llama_cpp_python")
                          if uses_llama_cpp(args) else None),
            "argv": sys.argv[1:]}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def row_label(r: dict) -> str:
    return f"{r['type']} (llama.cpp's quantizer)" if r.get("quantizer") else r["type"]


def rms_of(r: dict, ours_rms: dict) -> float | None:
    """The file's RMS error against the F16 values over the tensors both quantizers stored in one
    type: the peer row's own comparison; ours from its peer's (same tensors); 0 for f16 itself."""
    if r["type"] == "f16":
        return 0.0
    if r.get("quantizer"):
        return (r.get("rms_vs_f16") or {}).get("by_ggml_type", {}).get("all", {}).get("rms_llamacpp")
    return ours_rms.get(r["type"])


def table(result: dict) -> str:
    """The short table printed at the end: one row per file."""
    ours_rms = {r["type"]: r["rms_vs_f16"]["by_ggml_type"].get("all", {}).get("rms_ours")
                for r in result["types"] if r.get("quantizer") and r.get("rms_vs_f16")}
    rows = [f"{'file':32}{'exit':>5}{'total s':>9}{'export s':>10}{'check s':>9}{'RSS GiB':>9}"
            f"{'tree GiB':>10}{'file GiB':>10}{'disk GiB':>10}{'agree':>8}{'sure':>8}{'mean KL':>10}{'ppl ref':>11}"
            f"{'ppl':>11}{'ppl ratio':>10}{'RMS':>10}  check"]
    for r in result["types"]:
        c = r.get("check") or {}
        tree = max(r["peak_tree_rss_gib_export"], r["peak_tree_rss_gib_check"] or 0)
        verdict = ("passed" if c.get("passed") else "FAILED: " + "; ".join(c["failures"])) if c else "no report"
        rows.append(f"{row_label(r):32}{_num(r['exit_code'], 'd'):>5}{r['seconds']:>9.1f}{_num(r['export_s'], '.1f'):>10}"
                    f"{_num(r['check_s'], '.1f'):>9}{r['peak_rss_gib']:>9.2f}{tree:>10.2f}"
                    f"{_num(r['gguf_gib'], '.2f'):>10}{_num(r.get('peak_disk_gib_export'), '.2f'):>10}"
                    f"{_num(c.get('agreement'), '.1%'):>8}"
                    f"{_num(c.get('decisive_agreement'), '.1%'):>8}{_num(c.get('mean_kl'), '.3g'):>10}"
                    f"{_num(c.get('ppl_reference'), '.4g'):>11}{_num(c.get('ppl_other'), '.4g'):>11}"
                    f"{_num(c.get('ppl_ratio'), '.4f'):>10}{_num(rms_of(r, ours_rms), '.3e'):>10}  {verdict}")
        if c:
            rows.append(f"{'':32}{chat_summary(c.get('chat'))}")
    rows += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(rows)


def chat_summary(chat: dict | None) -> str:
    from qlora.export import parity

    return parity.chat_line(chat, lambda tid: f"token {tid}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--types", default="q8_0,q4_k_m", help="file types, in order (default q8_0,q4_k_m)")
    ap.add_argument("--work", default="/tmp/export-check",
                    help="folder for WORK/SHAPE/{model,adapter,*.gguf,*.check.json,*.log}; the "
                         "checkpoint and adapter found there are reused")
    ap.add_argument("--check-engine", default="llama.cpp", choices=["llama.cpp", "qlora"],
                    help="passed to the export: llama.cpp (default) or qlora (no llama.cpp needed)")
    ap.add_argument("--llama-python", default=os.environ.get("QLORA_LLAMA_PYTHON") or sys.executable,
                    help="a python that imports llama_cpp (default $QLORA_LLAMA_PYTHON, else this one)")
    ap.add_argument("--device", default="auto", help="the export's --device (default auto: the GPU if any)")
    ap.add_argument("--threads", type=int, help="the export's --threads (default: its own, one per core)")
    ap.add_argument("--check-data", help="the export's --check-data (default: the check's built-in text)")
    ap.add_argument("--check-samples", type=int, default=8, help="the export's --check-samples (default 8)")
    ap.add_argument("--peer-quantizer", default="auto", choices=["auto", "llama.cpp", "none"],
                    help="also quantize our f16 file with llama.cpp's own quantizer (in --llama-python) "
                         "to each of --peer-types, and check that file as ours (default auto: "
                         "llama.cpp where --llama-python imports llama_cpp); adds f16 to --types")
    ap.add_argument("--peer-types", help="types for the peer quantizer (default: those of --types "
                                         f"it makes: {', '.join(FTYPES)})")
    ap.add_argument("--rms-layers", default="all",
                    help="blocks whose tensors the RMS comparison reads, e.g. 0,15,31 (default all: "
                         "~1.5 min per billion values on a busy 2-core CPU)")
    ap.add_argument("--delete-gguf", action="store_true",
                    help="delete each GGUF once checked and no later row reads it (disk: an 8B's f16 "
                         "file is 16 GB); the check's JSON and log stay")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for everything (default 540)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.peer_quantizer == "auto":
        importable = version_in(args.llama_python, "llama_cpp", "llama_cpp_python")
        args.peer_quantizer = "llama.cpp" if importable else "none"
    return args


def delete_unneeded(rows: list[dict], later: list[tuple[str, bool]]) -> None:
    """--delete-gguf: the files no later row reads (a peer reads the f16 file and ours of its type)."""
    needs = {t for t, peer in later if peer}
    needs |= {"f16"} if needs else set()
    for r in rows:
        if Path(r["gguf"]).exists() and (r.get("quantizer") or r["type"] not in needs):
            Path(r["gguf"]).unlink()
            r["gguf_deleted"] = True


def plan(args) -> tuple[list[str], list[str]]:
    """Our types in order (f16 first when the peer needs its input) and the peer's types."""
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if args.peer_quantizer == "none":
        return types, []
    if args.peer_types:
        peers = [t.strip().lower() for t in args.peer_types.split(",") if t.strip()]
        wrong = [t for t in peers if t not in FTYPES or t not in types]
        if wrong:  # a peer row reads our file of its type: the type must be among ours
            raise SystemExit(f"--peer-types {','.join(wrong)}: each must be one of --types "
                             f"({','.join(types)}) that llama.cpp's quantizer makes ({', '.join(FTYPES)})")
    else:
        peers = [t for t in types if t in FTYPES]
    if peers and "f16" not in types:
        types = ["f16", *types]
    return types, peers


def main(argv=None) -> int:
    args = parse_args(argv)
    types, peers = plan(args)  # a wrong --peer-types is refused before the checkpoint is written
    start = time.perf_counter()
    folder = Path(args.work) / args.shape
    model_dir, adapter = folder / "model", folder / "adapter"
    result = {"environment": environment(args), "shape": args.shape, "model": str(model_dir),
              "adapter": str(adapter), "types": [], "skipped": []}

    def save():
        result["total_s"] = round(time.perf_counter() - start, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    result["checkpoint_write_s"] = ensure_checkpoint(args.shape, model_dir)
    result["checkpoint_reused"] = result["checkpoint_write_s"] is None
    result["adapter_write_s"] = write_adapter(model_dir, adapter)
    result["chat_template"] = chat_template_note(model_dir)
    written = "reused" if result["checkpoint_reused"] else f"written in {result['checkpoint_write_s']} s"
    print(f"checkpoint {model_dir} ({written}), adapter {adapter}; chat template: "
          f"{result['chat_template'] or 'none: the check skips the chat round trip'}", flush=True)
    save()
    result["peer_quantizer"], result["peer_types"] = args.peer_quantizer, peers
    longest = 0.0
    items = [(t, p) for t in types for p in (False, True) if not p or t in peers]
    for i, (qtype, peer) in enumerate(items):
        label = f"{qtype} (llama.cpp's quantizer)" if peer else qtype
        left = args.deadline - (time.perf_counter() - start)
        if left <= max(longest, 1.0):
            result["skipped"].append(f"{label}: {left:.0f} s left, the longest file so far took {longest:.0f} s")
            continue
        if peer and not gguf_path(args, "f16").exists():
            result["skipped"].append(f"{label}: no f16 file to quantize")
            continue
        if peer:
            r = run_peer(args, model_dir, adapter, gguf_path(args, "f16"), qtype, timeout=left)
        else:
            r = run_type(args, model_dir, adapter, qtype, timeout=left)
        longest = max(longest, r["seconds"])
        result["types"].append(r)
        print(f"{label}: exit {r['exit_code']} after {r['seconds']} s (log {r['log']})", flush=True)
        if args.delete_gguf:
            delete_unneeded(result["types"], items[i + 1:])
        save()
    save()
    print(table(result))
    print(f"written to {args.out} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
