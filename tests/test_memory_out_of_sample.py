"""The planner's out-of-sample check: the planner's loss chunk is the decoder's, the device script's
configurations are new and fit, measure_memory.py runs listed configurations, and
fold_planner_check.py turns measure_memory.py output into the docs (on fabricated GPU figures, in a copy
of the docs: the real ones come from the device)."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import memory
from qlora.errors import QloraError
from qlora.memory import GiB, PlanConfig, plan, resolve_arch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need their module registered
    spec.loader.exec_module(mod)
    return mod


def _device_configs() -> list[dict]:
    text = (BENCH / "device_planner_check.sh").read_text()
    return json.loads(re.search(r"<<'JSON'\n(.*?)\nJSON\n", text, re.S)[1])


# --- the loss chunk ----------------------------------------------------------------------------------
def test_loss_chunk_follows_the_vocabulary():
    # the rule as the issue states it: Llama-3's 128256 -> 512, Qwen's 151936 -> 256
    assert memory.loss_chunk_tokens(128256) == 512 and memory.loss_chunk_tokens(151936) == 256
    assert memory.loss_chunk_tokens(32000) == 2048
    assert memory.loss_chunk_tokens(100) == 4096 and memory.loss_chunk_tokens(10**8) == 128
    arch = resolve_arch(shape="llama-3-8b")
    assert plan(arch).loss == plan(arch, PlanConfig(loss_chunk_tokens=512)).loss
    assert plan(arch).loss < plan(arch, PlanConfig(loss_chunk_tokens=1024)).loss  # an explicit chunk wins


def test_decoder_computes_the_loss_in_the_chunks_the_planner_prices():
    """A trainable lm_head (a bare model's): the rows it sees in the loss (forward and the
    recompute in backward) are at most the planner's chunk, and the chunk is reached: what the
    `chunked` 12 B x chunk x V term assumes. The frozen head's path:
    tests/test_cross_entropy.py."""
    from qlora.models.decoder import DecoderLM
    from qlora.models.spec import spec_from_config

    vocab = 2**17 + 5  # -> 2**26 // vocab = 511 -> 256 tokens
    spec = spec_from_config(dict(model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                 tie_word_embeddings=False), source="test")
    torch.manual_seed(0)
    model = DecoderLM(spec).train()
    chunk = memory.loss_chunk_tokens(vocab)
    assert model.loss_chunk_tokens == chunk == 256
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    ids = torch.randint(0, vocab, (1, 600))
    model(ids, labels=ids).backward()
    assert max(rows) == chunk and sum(rows) == 2 * 599  # each chunk: forward + recompute in backward


# --- the device script ---------------------------------------------------------------------------
def test_device_script_configurations_are_new_and_fit_an_80gb_gpu(tmp_path):
    mm = _module("measure_memory")
    calib = _module("memory_calibration")
    path = tmp_path / "configs.json"  # read_configs reads a file, as the script gives it one
    path.write_text(json.dumps(_device_configs()))
    listed = mm.read_configs(str(path))
    assert len(listed) >= 8 and len({i["shape"] for i in listed}) >= 3
    seen = {(p.shape, p.seq, p.checkpointing, p.r) for p in calib.points()}
    h100 = 85017493504  # torch.cuda.get_device_properties(0).total_memory of the H100 80GB HBM3
    needs = []
    for item in listed:
        run = item["run"]
        default_rest = all(run[k] == mm.RUN_DEFAULTS[k] for k in ("quant", "double_quant", "targets", "dora",
                                                                  "lora_dropout", "micro_batch"))
        key = (item["shape"], run["seq_len"], run["checkpointing"], run["r"])
        assert not (default_rest and key in seen), f"{item['label']} is a calibration point"
        needs.append(memory.needed_bytes(plan(resolve_arch(shape=item["shape"]), PlanConfig(**run))))
    # each fits alone; with --jobs 2 measure_memory starts a second one only when both fit
    assert max(needs) < 0.9 * h100
    from qlora.compare import PEFT_METHODS, plan_config

    arch = resolve_arch(shape="llama-3-8b")
    assert max(memory.needed_bytes(plan(arch, plan_config(m))) for m in PEFT_METHODS) < 0.5 * h100
    text = (BENCH / "device_planner_check.sh").read_text()
    assert all(m in text for m in PEFT_METHODS)  # compare's GPU columns: every method


def test_measure_memory_refuses_a_bad_config_file(tmp_path):
    mm = _module("measure_memory")
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([{"shape": "llama-3-8b", "rank": 8}]))
    with pytest.raises(QloraError, match="rank"):
        mm.read_configs(str(bad))
    bad.write_text(json.dumps([{"shape": "llama-3-8b", "quant": "nf3"}]))
    with pytest.raises(QloraError, match="--quant"):
        mm.read_configs(str(bad))


def test_measure_memory_runs_listed_configurations_two_at_a_time(tmp_path):
    configs = tmp_path / "c.json"
    configs.write_text(json.dumps([{"shape": "qwen2.5-1.5b", "r": 8, "targets": "q_proj,v_proj", "label": "a"},
                                   {"shape": "llama-3-8b", "checkpointing": False, "dora": True, "label": "b"}]))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH / "measure_memory.py"), "--dry-run", "--configs", str(configs),
                           "--jobs", "2", "--steps", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=3600)  # stops a hung run only, never a slow one
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json.loads(out.read_text())["records"]
    assert [r["label"] for r in recs] == ["a", "b"]
    a, b = recs
    assert a["run"]["targets"] == "q_proj,v_proj" and b["run"]["dora"] and not b["run"]["checkpointing"]
    for r in recs:
        assert len(r["measured"]["losses"]) == 2 and all(0 < x < 20 for x in r["measured"]["losses"])
    # q,v at r 8 on the tiny shape: 2 layers x (8 x (64 + 64) + 8 x (64 + 32)) trainable
    assert a["measured"]["trainable_params"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))


# --- folding the results into the docs ------------------------------------------------------------
def _fake_outdir(outdir: Path, error: float = 0.03) -> None:
    """measure_memory.py-shaped files with invented GPU figures: measured = predicted x (1 + error)."""
    mm = _module("measure_memory")
    from qlora.compare import PEFT_METHODS, plan_config

    meta = dict(date="2026-11-26 10:00:00", torch="2.11.0+cu130", device="NVIDIA H100 80GB HBM3", dry_run=False,
                versions={"bitsandbytes": "0.50.2"}, steps=6, warmup=2, jobs=1)

    def record(shape, run, label=None, method=None, fail=None):
        overrides = dict(kernels="eager", loss="chunked", seeded_dropout=True, flat_grads=True,
                         loss_chunk_tokens=memory.loss_chunk_tokens(
            resolve_arch(shape=shape).vocab_size))
        pred = mm.prediction(shape, run, overrides)
        rec = dict(shape=shape, run=run, predicted=pred, method=method, label=label)
        if fail:
            return dict(rec, error=fail)
        alloc = int(pred["allocated"] * (1 + error))
        rec["measured"] = dict(system="qlora", planner_overrides=overrides, peak_allocated=alloc,
                               peak_reserved=int(alloc * 1.12), tokens_per_s=1000.0 + len(run["quant"]),
                               trainable_params=pred["adapter_params"], device_name=meta["device"], losses=[1.0])
        return rec

    oos = [record(c["shape"], {**mm.RUN_DEFAULTS, **{k: v for k, v in c.items() if k in mm.RUN_DEFAULTS}},
                  label=c["label"]) for c in _device_configs()]
    oos[-1] = record(oos[-1]["shape"], oos[-1]["run"], label=oos[-1]["label"], fail="CUDA out of memory | boom")
    cmp = []
    for m in PEFT_METHODS:
        pc = plan_config(m)
        run = dict(mm.RUN_DEFAULTS, quant=pc.quant, double_quant=pc.double_quant, r=pc.r, dora=pc.dora)
        cmp.append(record("llama-3-8b", run, method=m))
    outdir.mkdir(parents=True)
    (outdir / "oos-planner.json").write_text(json.dumps(dict(meta=dict(meta, jobs=2), records=oos)))
    (outdir / "compare-llama-3-8b.json").write_text(json.dumps(dict(meta=meta, records=cmp)))
    (outdir / "oos-planner.log").write_text("log\n")


@pytest.fixture()
def repo_copy(tmp_path):
    root = tmp_path / "repo"
    for rel in ("docs/COMPARE.md", "docs/BENCHMARKS.md", "docs/compare/compare.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    return root


def test_fold_writes_the_gpu_columns_plots_and_out_of_sample_table(tmp_path, repo_copy):
    fold = _module("fold_planner_check")
    calib = _module("memory_calibration")
    from qlora.compare import PEFT_METHODS, PENDING

    outdir = tmp_path / "out"
    _fake_outdir(outdir)
    bench_before = (repo_copy / "docs/BENCHMARKS.md").read_text()
    assert fold.main([str(outdir), "--root", str(repo_copy)]) == 0
    # stored where memory_calibration reads the out-of-sample points, under dated names
    results = repo_copy / "benchmarks" / "results"
    assert (results / "2026-11-26-h100-oos-planner.json").is_file()
    assert (results / "2026-11-26-h100-compare-llama-3-8b.json").is_file()
    pts, failed = calib.out_of_sample_points(results)
    assert len(pts) == len(_device_configs()) - 1 + len(PEFT_METHODS) and len(failed) == 1
    for p in pts:  # measured = predicted x 1.03
        assert p.error_pct() == pytest.approx(100 * (1 / 1.03 - 1), abs=0.01)
    # compare: every method's GPU columns filled from the file, the CPU columns kept
    res = json.loads((repo_copy / "docs/compare/compare.json").read_text())
    before = json.loads((ROOT / "docs/compare/compare.json").read_text())
    for row, old in zip(res["methods"], before["methods"]):
        g = row["llama_3_8b"]
        assert row["demo"] == old["demo"]
        assert g["measured_peak_allocated_gib"] == pytest.approx(g["predicted_peak_allocated_gib"] * 1.03, abs=0.011)
        assert g["tokens_per_s"] > 1000 and g["device"] == "NVIDIA H100 80GB HBM3"
    doc = (repo_copy / "docs/COMPARE.md").read_text()
    table = doc[doc.index(fold.TABLE_START):doc.index(fold.TABLE_END)]
    assert PENDING not in table and table.count("\n| ") == 1 + len(PEFT_METHODS)  # header + one row each
    assert (repo_copy / "docs/compare/compare.png").read_bytes()[:4] == b"\x89PNG"
    # BENCHMARKS.md: the section after the calibration one, the rest of the file untouched
    bench = (repo_copy / "docs/BENCHMARKS.md").read_text()
    assert bench.count("## Out-of-sample planner check") == 1
    assert bench.index("## Memory planner calibration") < bench.index(fold.OOS_START)
    def without_section(text: str) -> list[str]:
        if fold.OOS_START not in text:
            return text.split()
        start, end = text.index(fold.OOS_START), text.index(fold.OOS_END) + len(fold.OOS_END)
        return (text[:start] + text[end:]).split()

    assert without_section(bench) == without_section(bench_before)
    section = bench[bench.index(fold.OOS_START):]
    assert "not measured: CUDA out of memory / boom" in section and "-2.9%" in section
    # again: replaced, not added
    assert fold.main([str(outdir), "--root", str(repo_copy)]) == 0
    assert (repo_copy / "docs/BENCHMARKS.md").read_text().count("## Out-of-sample planner check") == 1


def test_fold_refuses_a_run_without_gpu_measurements(tmp_path, repo_copy, capsys):
    fold = _module("fold_planner_check")
    outdir = tmp_path / "smoke"
    outdir.mkdir()
    for name in ("oos-planner.json", "compare-llama-3-8b.json"):
        (outdir / name).write_text(json.dumps(dict(meta={"dry_run": True}, records=[
            dict(shape="tiny", run={}, measured={"losses": [1.0]})])))
    before = {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()}
    assert fold.main([str(outdir), "--root", str(repo_copy)]) == 2
    assert "no GPU measurement" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()} == before


def test_out_of_sample_predictions_within_10_percent():
    """The stored out-of-sample measurements (benchmarks/results, written by fold_planner_check.py after
    the device run) against the planner as it is now: the issue's bar, as for the calibration."""
    calib = _module("memory_calibration")
    pts, _ = calib.out_of_sample_points()
    if not pts:
        pytest.skip("no out-of-sample GPU results stored yet (benchmarks/device_planner_check.sh, then fold_planner_check.py)")
    assert len({p.shape for p in pts}) >= 2
    for p in pts:
        assert abs(p.error_pct()) <= 10, (p.label, p.shape, p.run, p.predicted() / GiB, p.measured / GiB)
