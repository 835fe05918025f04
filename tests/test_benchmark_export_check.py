"""benchmarks/export_check.py: the user's `qlora export ... --check`, measured in a subprocess.

The GPU figures come from the device (docs/BENCHMARKS.md). Here, on the CPU with the tiny shape
and the check in qlora's own engine: the record holds the command's measures and the check's
table, whose numbers are check.py's own (recomputed here on the same file); the random adapter the
script writes is one PEFT loads, and it changes the model exactly as our engine's base + adapter
does. Where llama-cpp-python is importable (this python, or $QLORA_LLAMA_PYTHON), the same
through llama.cpp, with llama.cpp's own quantizer as the peer: its file checked as ours is, and the
RMS errors against the f16 file those of kquant_vs_llamacpp.compare.
"""

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from qlora.export.check import check_gguf, find_llama_python  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "export_check.py"


def _bench():
    spec = importlib.util.spec_from_file_location("export_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(work: Path, *extra: str) -> dict:
    out = work / "result.json"
    peer = [] if "--peer-quantizer" in extra else ["--peer-quantizer", "none"]
    assert _bench().main(["--shape", "tiny", "--device", "cpu", "--threads", "1", "--work", str(work),
                          "--out", str(out), *peer, *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def qlora_engine(tmp_path_factory):
    work = tmp_path_factory.mktemp("export-check")
    return work, _run(work, "--types", "q8_0", "--check-engine", "qlora")


def test_the_record_holds_the_commands_measures(qlora_engine):
    _, result = qlora_engine
    env = result["environment"]
    assert env["cpu_count"] == os.cpu_count() and env["torch"] == torch.__version__
    assert env["gguf"] == importlib.metadata.version("gguf") and env["llama_cpp"] is None
    # times are wall-clock, rounded to 0.1 s: only their presence and order are asserted
    assert result["checkpoint_write_s"] >= 0 and not result["checkpoint_reused"]
    assert result["chat_template"].startswith("ChatML") and result["skipped"] == []
    [r] = result["types"]
    assert r["type"] == "q8_0" and r["exit_code"] == 0 and not r["timed_out"]
    assert 0 <= r["export_s"] <= r["seconds"]
    assert r["check_s"] == pytest.approx(r["seconds"] - r["export_s"], abs=0.11)  # each rounded to 0.1
    # a python that has imported torch holds more than 0.1 GiB: these are the child's, not zero
    assert min(r["peak_rss_gib"], r["peak_tree_rss_gib_export"], r["peak_tree_rss_gib_check"]) > 0.1
    assert r["gguf_bytes"] == Path(r["gguf"]).stat().st_size
    # the disk's rise while the export ran: other writers on a shared machine make it any size
    assert r["peak_disk_gib_export"] >= 0
    assert "GGUF written to" in Path(r["log"]).read_text()


def test_the_table_is_what_check_py_reports_on_that_file(qlora_engine):
    work, result = qlora_engine
    [r] = result["types"]
    saved = json.loads(Path(r["gguf"]).with_suffix(".check.json").read_text())
    again = check_gguf(r["gguf"], result["model"], "q8_0", adapter_dir=result["adapter"], engine="qlora",
                       device="cpu", log=lambda _: None)
    for report in (saved, again):
        assert r["check"]["tokens"] == report["logits"]["tokens"] > 100  # the built-in text
        assert r["check"]["agreement"] == report["logits"]["agreement"]
        # the same file and data in another process: CPU kernels may sum in another order
        assert r["check"]["mean_kl"] == pytest.approx(report["logits"]["mean_kl"], rel=1e-3, abs=1e-9)
        assert r["check"]["ppl_other"] == pytest.approx(report["logits"]["ppl_other"], rel=1e-5)
        assert r["check"]["passed"] == report["passed"]
    assert r["check"]["chat"]["template_same"] and r["check"]["chat"]["prompt_tokens_same"]
    assert r["check"]["reference"] == "the 16-bit base + adapter in qlora"


def test_the_adapter_loads_in_peft_and_changes_the_model_as_ours_does(qlora_engine):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora.export.reference import load_reference

    _, result = qlora_engine
    adapter = Path(result["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and sorted(config["target_modules"]) == sorted(_bench().PROJECTIONS)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(factors) == 2 * 7 * 2 and all(t.abs().max() > 0 for t in factors.values())
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
    hf = AutoModelForCausalLM.from_pretrained(result["model"], dtype=torch.float32)
    with torch.no_grad():
        base = hf(ids).logits
        adapted = PeftModel.from_pretrained(hf, adapter)(ids).logits
        ours = load_reference(result["model"], adapter, device="cpu")[0](ids)
    # float32 both, the same bf16 weights: only the order of float32 sums may differ
    torch.testing.assert_close(ours, adapted, atol=1e-4, rtol=1e-4)
    assert (adapted - base).abs().max() > 100 * 1e-4  # the adapter acts, far above that tolerance


def test_the_deadline_skips_and_says_so(qlora_engine):
    work, _ = qlora_engine
    result = _run(work, "--types", "q8_0,q4_k_m", "--check-engine", "qlora", "--deadline", "0")
    assert result["checkpoint_reused"] and result["types"] == []
    assert [s.split(":")[0] for s in result["skipped"]] == ["q8_0", "q4_k_m"]


@pytest.mark.skipif(find_llama_python() is None, reason="llama-cpp-python is not importable here "
                    "(pip install llama-cpp-python, or set QLORA_LLAMA_PYTHON to a python that has it)")
def test_the_check_in_llama_cpp_beside_llama_cpps_quantizer(tmp_path):
    result = _run(tmp_path, "--types", "q4_k_m", "--llama-python", find_llama_python(),
                  "--peer-quantizer", "llama.cpp")
    assert result["environment"]["llama_cpp"]  # its version, as that python imports it
    # the peer quantizes our f16 file: f16 comes first, then ours and the peer's of the same type
    assert [(r["type"], r.get("quantizer")) for r in result["types"]] == [
        ("f16", None), ("q4_k_m", None), ("q4_k_m", "llama.cpp")]
    f16, ours, peer = result["types"]
    for r in result["types"]:
        saved = json.loads(Path(r["gguf"]).with_suffix(".check.json").read_text())
        assert r["exit_code"] == (0 if saved["passed"] else 2)  # as `qlora export` exits
        assert r["check"]["engine"] == saved["engine"] and saved["engine"].startswith("llama.cpp")
        assert r["check"]["agreement"] == saved["logits"]["agreement"]
        # our file's chat template and tokenizer, as llama.cpp reads them, are the reference's
        assert r["check"]["chat"]["template_same"] and r["check"]["chat"]["prompt_tokens_same"]
    assert peer["quantize_rc"] == 0 and peer["export_s"] == peer["quantize_s"]
    assert peer["check"]["tokens"] == ours["check"]["tokens"]  # the same data, the same reference
    rms = _bench().compare(Path(f16["gguf"]), Path(ours["gguf"]), Path(peer["gguf"]))["by_ggml_type"]
    assert peer["rms_vs_f16"]["by_ggml_type"] == json.loads(json.dumps(rms))
    # both quantizers search the same K formats on the same values: their errors are alike (our
    # quantizer is within a few % of llama.cpp's per tensor, docs/MERGE_AND_EXPORT.md), and nonzero
    assert 0 < rms["all"]["rms_ours"] < 1.1 * rms["all"]["rms_llamacpp"]


def test_delete_gguf_keeps_what_a_later_peer_reads(tmp_path):
    bench = _bench()
    rows = []
    for name, peer in (("f16", None), ("q4_k_m", None), ("q4_k_m", "llama.cpp"), ("q8_0", None)):
        path = tmp_path / f"{name}-{peer}.gguf"
        path.write_bytes(b"GGUF")
        rows.append({"type": name, "quantizer": peer, "gguf": str(path)})
    # after our q4_k_m, llama.cpp's q4_k_m still reads the f16 file and ours
    bench.delete_unneeded(rows[:2], [("q4_k_m", True), ("q8_0", False)])
    assert all(Path(r["gguf"]).exists() for r in rows)
    bench.delete_unneeded(rows[:3], [("q8_0", False)])
    assert [Path(r["gguf"]).exists() for r in rows] == [False, False, False, True]
    assert all(r["gguf_deleted"] for r in rows[:3])


def test_the_table_shows_a_peer_quantizer_that_failed():
    """A peer whose llama.cpp quantizer failed has no exit code (run_peer's row): the table says
    '-' for it, and shows the rest, rather than failing to format None at the end of the run."""
    row = {"type": "q4_k_m", "quantizer": "llama.cpp", "exit_code": None, "seconds": 1.5,
           "export_s": None, "check_s": None, "peak_rss_gib": 0.0, "peak_tree_rss_gib_export": 0.0,
           "peak_tree_rss_gib_check": None, "gguf_gib": None}
    [_, line] = _bench().table({"types": [row], "skipped": []}).splitlines()
    assert line.startswith("q4_k_m (llama.cpp's quantizer)") and line.split()[3] == "-"
    assert line.endswith("no report")


def test_peer_types_must_be_among_the_types():
    """--peer-types names files ours are compared with: a type not among --types (or one llama.cpp's
    quantizer does not make here) is refused by name, not dropped; by default every type of
    --types it makes, f16 first for its input."""
    from argparse import Namespace

    bench = _bench()
    args = Namespace(types="q4_k_m,bf16,q8_0", peer_quantizer="llama.cpp", peer_types=None)
    assert bench.plan(args) == (["f16", "q4_k_m", "bf16", "q8_0"], ["q4_k_m", "q8_0"])
    for wrong in ("q6_k", "bf16"):
        with pytest.raises(SystemExit, match=f"--peer-types {wrong}: each must be one of --types"):
            bench.plan(Namespace(types="q4_k_m,bf16", peer_quantizer="llama.cpp", peer_types=wrong))
