"""`qlora compare` on a tiny model: two methods, a few steps; outputs and sane numbers."""

import dataclasses
import json
import math

import pytest

from qlora.cli import main
from qlora.compare import PEFT_METHODS, PENDING, run

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    return out, run(out_dir=out, methods=["qlora-nf4", "qlora-dora"], steps=3, model_sizes=SIZES, n_train=64,
                    log=lambda s: None)


def _peft_trainable(method: str, sizes: dict) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = PEFT_METHODS[method][1]
    with torch.device("meta"):  # shapes only: the 8B layer is never materialised
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, **sizes))
        peft = get_peft_model(model, LoraConfig(
            r=fields["lora_r"], lora_alpha=32, use_dora=fields.get("use_dora", False),
            use_rslora=fields.get("use_rslora", False),
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_compare_writes_json_markdown_and_plot(result):
    out, res = result
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text()) == res
    assert not (out.parent / ".out-work").exists()  # scratch runs removed
    md = (out / "compare.md").read_text()
    for r in res["methods"]:
        assert r["label"] in md
    assert PENDING in md and "measure_memory.py" in md


def test_compare_numbers_are_sane(result):
    _, res = result
    assert [r["method"] for r in res["methods"]] == ["qlora-nf4", "qlora-dora"]
    for r in res["methods"]:
        d, g = r["demo"], r["llama_3_8b"]
        assert d["trainable_params"] == _peft_trainable(r["method"], SIZES), r["method"]
        assert math.isfinite(d["eval_loss"]) and 0 < d["eval_loss"] < 10
        assert 0.0 <= d["exact_match"] <= 1.0 and d["steps"] == 3
        # Llama-3-8B, r=16, seven projections: 41,943,040 LoRA params (+ DoRA magnitudes)
        assert g["trainable_params"] == _peft_trainable(r["method"], dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
            num_key_value_heads=8)) * 32
        assert 5 < g["predicted_peak_allocated_gib"] < 20
        assert g["measured_peak_allocated_gib"] == PENDING and g["tokens_per_s"] == PENDING
    nf4, dora = res["methods"]
    assert dora["demo"]["trainable_params"] > nf4["demo"]["trainable_params"]


def test_compare_refuses_unknown_methods(capsys):
    assert main(["compare", "--methods", "lora", "--steps", "1"]) == 2
    assert "not known" in capsys.readouterr().err


def test_gpu_columns_filled_from_measure_memory_output(result, tmp_path):
    """A measure_memory.py --methods file (figures invented here) fills the GPU columns, predicts
    again for the loss chunk that ran, and a method that failed on the GPU says so."""
    import copy

    from qlora import memory
    from qlora.compare import fill_gpu_columns, plan_config, read_gpu_results, table

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"records": [
        {"method": "qlora-nf4", "measured": {"peak_allocated": 7 * 2**30, "peak_reserved": 8 * 2**30,
                                             "tokens_per_s": 4321.0, "device_name": "H100", "trainable_params": 1,
                                             "planner_overrides": {"kernels": "eager", "loss": "chunked",
                                                                   "loss_chunk_tokens": 1024}}},
        {"method": "qlora-dora", "error": "CUDA out of memory | x"}]}))
    res = fill_gpu_columns(copy.deepcopy(result[1]), read_gpu_results(path))
    nf4, dora = (r["llama_3_8b"] for r in res["methods"])
    assert nf4["measured_peak_allocated_gib"] == 7.0 and nf4["measured_peak_reserved_gib"] == 8.0
    assert nf4["tokens_per_s"] == 4321.0
    chunk_1024 = memory.plan(memory.resolve_arch(shape="llama-3-8b"),  # the loss that ran
                             dataclasses.replace(plan_config("qlora-nf4"), loss="chunked",
                                                 loss_chunk_tokens=1024))
    assert nf4["predicted_peak_allocated_gib"] == round(chunk_1024.allocated / 2**30, 2)
    assert dora["measured_peak_allocated_gib"].startswith("failed on the GPU: CUDA out of memory")
    md = table(res)
    assert "4,321" in md and "7.00" in md and "failed on the GPU" in md and PENDING not in md


def test_the_8bit_base_does_not_flood_the_log(tmp_path, caplog):
    """bitsandbytes logs its fp32 -> fp16 cast note on every int8 matmul with fp32 inputs (140
    lines for compare's two tiny steps): silenced where qlora sets up bitsandbytes (quant.py),
    so neither compare nor any other 8-bit forward (eval, generate, chat) prints it."""
    import logging

    import torch

    from qlora.quant import QuantConfig, quantize_linear

    with caplog.at_level(logging.WARNING):
        run(out_dir=tmp_path / "out", methods=["lora-8bit"], steps=2, model_sizes=SIZES,
            n_train=16, log=lambda s: None)
        layer = quantize_linear(torch.randn(16, 32), None, QuantConfig(
            method="int8", compute_dtype=torch.float32), "cpu").eval()
        with torch.no_grad():
            for _ in range(3):
                layer(torch.randn(4, 32))
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]


def test_overwrite_replaces_a_previous_comparison(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    argv = ["compare", "--out", str(out), "--methods", "qlora-nf4", "--steps", "1"]
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert (out / "compare.json").read_text() == "{}"
    res = run(out_dir=out, methods=["qlora-nf4"], steps=1, model_sizes=SIZES, n_train=16,
              overwrite=True, log=lambda s: None)
    assert json.loads((out / "compare.json").read_text()) == res


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_compare_refuses_a_non_empty_out_that_is_no_comparison(overwrite, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["compare", "--out", str(out), "--methods", "qlora-nf4", "--steps", "1", *overwrite]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expect = ("holds no compare.json", "--overwrite only replaces") if overwrite else (
        "not empty", "--overwrite", "another --out")
    for part in ("--out", str(out), *expect):
        assert part in err, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / ".mine-work").exists()  # refused before any training


def test_a_work_folder_compare_did_not_write_is_refused(tmp_path, capsys):
    """compare deletes and rewrites its work folder beside --out (.NAME-work): one holding files
    it does not write is refused before any training, and left as it was."""
    work = tmp_path / ".out-work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    argv = ["compare", "--out", str(tmp_path / "out"), "--methods", "qlora-nf4", "--steps", "1"]
    assert main(argv) == 2 and "holds files compare did not write" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
