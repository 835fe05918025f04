"""Every bad input gets one line: a QloraError (exit code 2, no traceback) that names the file,
line or option and what to do, raised before slow work where it can be, leaving nothing
half-written behind.

Table-driven: each case builds its bad input in a fresh directory, runs the real entry point
(`qlora.cli.main`), and checks the message and that the output path is absent or unchanged.
One tiny model and one short training run (with checkpoints and an adapter) are shared."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from qlora.cli import main

WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain")
OTHER_BASE = "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(model dir, data file, a finished run with checkpoints at steps 1, 2, 3)."""
    from qlora.config import load_config
    from qlora.tiny import build_tiny_model
    from qlora.train import train

    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_tiny_model(root / "model", "llama")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} = ", "completion": w.upper()}) + "\n"
                            for w in WORDS))
    os.environ.setdefault("QLORA_CACHE_DIR", str(root / "cache"))
    cfg = load_config(None, dict(
        model=str(model), data=str(data), output_dir=str(root / "run"), max_seq_length=64,
        micro_batch_size=2, gradient_accumulation_steps=1, max_steps=3, learning_rate=5e-3,
        warmup_steps=0, logging_steps=1, save_steps=1, save_total_limit=5, device="cpu",
        gradient_checkpointing=False, double_quant=False, quant="none"))
    train(cfg, log=lambda s: None, progress=False)
    return model, data, root / "run"


@dataclass
class Case:
    name: str
    # (tmp dir, model, data, run) -> (argv, output path that must stay absent or unchanged)
    build: Callable[[Path, Path, Path, Path], tuple[list[str], Path | None]]
    expect: tuple[str, ...]  # substrings of the message (file / line / option, and the fix)
    rc: int = 2
    stream: str = "err"
    env: dict = field(default_factory=dict)


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out),
            "--device", "cpu", "--max_steps", "1", "--quant", "none", "--double_quant", "false",
            "--gradient_checkpointing", "false", "--max_seq_length", "64", *extra]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def a_file(tmp: Path) -> Path:
    return write(tmp / "afile", "not a folder\n")


def model_copy(tmp: Path, model: Path, edit: Callable[[Path], None]) -> Path:
    dst = tmp / "model-copy"
    shutil.copytree(model, dst)
    edit(dst)
    return dst


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def set_model_type(d: Path, model_type: str) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(cfg))


def remote_code_only(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="my_lm", auto_map={"AutoModelForCausalLM": "modeling_my_lm.MyLM"})
    (d / "config.json").write_text(json.dumps(cfg))


def other_base_adapter(tmp: Path, run: Path) -> Path:
    adapter = tmp / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, adapter / name)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = OTHER_BASE
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def broken_adapter(tmp: Path, run: Path) -> Path:
    """A copy of the run's adapter whose adapter_config.json was cut short."""
    adapter = tmp / "adapter"
    adapter.mkdir()
    shutil.copy(run / "adapter_model.safetensors", adapter)
    write(adapter / "adapter_config.json", '{"r": 8,')
    return adapter


def truncated_adapter(tmp: Path, run: Path) -> Path:
    """A copy of the run's adapter whose adapter_model.safetensors was cut short."""
    adapter = tmp / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, adapter / name)
    truncate(adapter / "adapter_model.safetensors")
    return adapter


def run_copy(tmp: Path, run: Path, damage: Callable[[Path], None] | None = None) -> Path:
    dst = tmp / "run"
    shutil.copytree(run, dst)
    if damage is not None:
        damage(dst / "checkpoints" / "step-00000003")
    return dst


def resume_args(run: Path, *extra) -> list[str]:
    return ["train", "--config", str(run / "run_config.yaml"), "--output_dir", str(run),
            "--max_steps", "3", *extra]


CASES = [
    # --- unwritable output paths: refused before anything loads -------------------------------
    Case("train output_dir under a file",
         lambda t, m, d, r: (train_args(m, d, a_file(t) / "sub"), a_file(t) / "sub"),
         ("output_dir", "afile", "is a file, not a directory")),
    Case("train output_dir in a read-only folder",  # os.access patched below (root ignores chmod)
         lambda t, m, d, r: (train_args(m, d, t / "ro" / "run"), t / "ro" / "run"),
         ("output_dir", "no write permission", "ro")),
    Case("export --out under a file",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(m), "--out",
                              str(a_file(t) / "m.gguf")], None),
         ("--out", "afile", "not a directory")),
    Case("merge --out under a file",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(r), "--out",
                              str(a_file(t) / "merged")], None),
         ("--out", "afile", "not a directory")),
    Case("merge --out in a read-only folder",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(r), "--out",
                              str(t / "ro" / "merged")], t / "ro" / "merged"),
         ("--out", "no write permission")),
    # --- data files ------------------------------------------------------------------------------
    Case("data not UTF-8",
         lambda t, m, d, r: (train_args(m, write(t / "latin1.jsonl", b'{"prompt": "a", '
                             b'"completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n'),
                             t / "out"), t / "out"),
         ("latin1.jsonl line 2", "byte offset", "re-encode", "UTF-8")),
    Case("csv not UTF-8",
         lambda t, m, d, r: (train_args(m, write(t / "d.csv", b"prompt,completion\n"
                             b"\xff\xfeab,cd\n"), t / "out"), t / "out"),
         ("d.csv line 2", "UTF-8")),
    Case("malformed JSON lines",
         lambda t, m, d, r: (train_args(m, write(t / "bad.jsonl", '{"prompt": "a",\n{oops}\n'),
                             t / "out"), t / "out"),
         ("bad.jsonl line 1: not valid JSON", "bad.jsonl line 2")),
    Case("missing fields",
         lambda t, m, d, r: (train_args(m, write(t / "alp.jsonl", "".join(json.dumps(
             {"instruction": "x", "output": "y"} if i == 0 else {"instruction": "x", "input": "z",
                                                                 "output": None}) + "\n"
             for i in range(3))), t / "out", "--max_seq_length", "256"), None),
         ("alp.jsonl", "2 examples: missing 'output'", "lines 2, 3"), rc=0, stream="out"),
    Case("empty data file",
         lambda t, m, d, r: (train_args(m, write(t / "empty.jsonl", ""), t / "out"), t / "out"),
         ("empty.jsonl", "is empty")),
    Case("empty responses only",
         lambda t, m, d, r: (train_args(m, write(t / "e.jsonl", "".join(
             json.dumps({"prompt": w, "completion": " "}) + "\n" for w in WORDS)), t / "out"),
             t / "out"),
         ("e.jsonl", "no usable examples", "empty 'completion'")),
    Case("over-long samples dropped, none left",
         lambda t, m, d, r: (train_args(m, write(t / "long.jsonl", "".join(
             json.dumps({"prompt": w * 40, "completion": "x"}) + "\n" for w in WORDS)), t / "out",
             "--long_examples", "drop"), t / "out"),
         ("long.jsonl", "longer than max_len=64", "dropped")),
    Case("preference pairs trained as plain fine-tuning",
         lambda t, m, d, r: (train_args(m, write(t / "prefs.jsonl", "".join(json.dumps(
             {"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w}) + "\n" for w in WORDS)),
             t / "out"), t / "out"),
         ("prefs.jsonl", "preference pairs", "--method dpo", "orpo", "simpo", "kto",
          "--data_format")),
    Case("unpaired preferences (KTO rows) trained as plain fine-tuning",
         lambda t, m, d, r: (train_args(m, write(t / "kto.jsonl", "".join(json.dumps(
             {"prompt": f"{w} = ", "completion": w.upper() if i % 2 else w, "label": bool(i % 2)})
             + "\n" for i, w in enumerate(WORDS))), t / "out"), t / "out"),
         ("kto.jsonl", "unpaired preferences", "--method kto",
          "--data_format prompt_completion")),
    Case("data file not found",
         lambda t, m, d, r: (train_args(m, t / "nope.jsonl", t / "out"), t / "out"),
         ("nope.jsonl", "not found")),
    # --- models --------------------------------------------------------------------------------
    Case("--model folder that does not exist",
         lambda t, m, d, r: (train_args(t / "no-such-model", d, t / "out"), t / "out"),
         ("no-such-model", "does not exist")),
    Case("generate --model folder that does not exist",
         lambda t, m, d, r: (["generate", "--model", str(t / "gone"), "--device", "cpu", "hi"],
                             None),
         ("gone", "does not exist")),
    Case("truncated model shard",
         lambda t, m, d, r: (train_args(model_copy(t, m, lambda x: truncate(
             x / "model.safetensors")), d, t / "out"), t / "out"),
         ("model.safetensors", "truncated", "download it again")),
    Case("a model that exists only as remote code",
         lambda t, m, d, r: (train_args(model_copy(t, m, remote_code_only), d, t / "out"),
                             t / "out"),
         ("config.json", "'my_lm'", "auto_map", "never runs remote code")),
    Case("config.json of another architecture than its weights",
         lambda t, m, d, r: (train_args(model_copy(t, m, lambda x: set_model_type(x, "gpt2")),
                                        d, t / "out"), t / "out"),
         ("model.embed_tokens.weight", "gpt2", "config.json")),
    Case("export of an unsupported family",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(model_copy(
             t, m, lambda x: set_model_type(x, "phi"))), "--out", str(t / "m.gguf")],
             t / "m.gguf"),
         ("config.json", "'phi'")),
    # --- options and config files ---------------------------------------------------------------
    Case("bad YAML key",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--config", str(write(
             t / "run.yaml", "lora_rank: 8\n"))), t / "out"),
         ("lora_rank", "run.yaml", "lora_r")),
    Case("bad YAML type",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--config", str(write(
             t / "run.yaml", "lora_r: eight\n"))), t / "out"),
         ("lora_r", "run.yaml", "'eight'")),
    Case("YAML syntax error",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--config", str(write(
             t / "run.yaml", "lora_r: 8\n  bad: [\n"))), t / "out"),
         ("run.yaml", "line", "not valid YAML")),
    Case("out-of-range value",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--learning_rate", "-1"), t / "out"),
         ("learning_rate", "out of range")),
    Case("unknown train flag",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--lora-rank", "8"), t / "out"),
         ("lora_rank", "lora_r")),
    Case("bad choice",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--lr_scheduler_type", "zigzag"),
                             t / "out"),
         ("lr_scheduler_type", "zigzag", "cosine")),
    Case("resume and overwrite together",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--resume", "latest", "--overwrite",
                                        "true"), t / "out"),
         ("resume", "overwrite")),
    # --- inputs read only after the output is written: refused before it is ------------------
    Case("merge --check-data file that does not exist",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(r), "--out",
                              str(t / "merged"), "--device", "cpu", "--check-data",
                              str(t / "nope.jsonl")], t / "merged"),
         ("--check-data", "nope.jsonl", "no such file")),
    Case("export --check-data file that does not exist",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(m), "--out", str(t / "m.gguf"),
                              "--device", "cpu", "--check-engine", "qlora", "--check-data",
                              str(t / "nope.jsonl")], t / "m.gguf"),
         ("--check-data", "nope.jsonl", "no such file")),
    # --- existing outputs ------------------------------------------------------------------------
    Case("existing non-empty output_dir",
         lambda t, m, d, r: (train_args(m, d, write(t / "out" / "keep.txt", "mine").parent),
                             t / "out"),
         ("output_dir", "not empty", "--resume latest", "--overwrite")),
    Case("overwrite of a folder that is not a run",
         lambda t, m, d, r: (train_args(m, d, write(t / "out" / "keep.txt", "mine").parent,
                                        "--overwrite", "true"), t / "out"),
         ("not a qlora run",)),
    Case("merge --out exists",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(r), "--out",
                              str(write(t / "merged" / "x", "x").parent)], t / "merged"),
         ("merged", "exists", "new --out path")),
    Case("export --out exists",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(m), "--out",
                              str(write(t / "m.gguf", "old"))], t / "m.gguf"),
         ("m.gguf", "exists")),
    Case("eval --report exists",
         lambda t, m, d, r: (["eval", "--model", str(m), "--data", str(d), "--device", "cpu",
                              "--report", str(write(t / "report.json", "{}"))], t / "report.json"),
         ("--report", "report.json", "exists", "new --report path")),
    # --- resuming ------------------------------------------------------------------------------
    Case("--resume latest with no checkpoint",
         lambda t, m, d, r: (train_args(m, d, write(t / "out" / "run_config.yaml", "x: 1\n").parent,
                                        "--resume", "latest"), t / "out"),
         ("--resume latest", "no checkpoint")),
    Case("--resume DIR with a truncated trainable.safetensors",
         lambda t, m, d, r: (lambda run: (resume_args(run, "--resume", str(
             run / "checkpoints" / "step-00000003")), run))(
             run_copy(t, r, lambda c: truncate(c / "trainable.safetensors"))),
         ("step-00000003", "trainable.safetensors", "truncated", "remove", "rm -r")),
    Case("--resume DIR with a broken trainer_state.json",
         lambda t, m, d, r: (lambda run: (resume_args(run, "--resume", str(
             run / "checkpoints" / "step-00000003")), run))(
             run_copy(t, r, lambda c: write(c / "trainer_state.json", '{"global_step": 3,'))),
         ("step-00000003", "trainer_state.json", "remove")),
    Case("--resume latest skips a truncated newest checkpoint",
         lambda t, m, d, r: (resume_args(run_copy(t, r, lambda c: truncate(
             c / "trainable.safetensors", 7)), "--resume", "latest"), None),
         ("damaged checkpoint step-00000003", "trainable.safetensors",
          "resuming from step-00000002"), rc=0, stream="out"),
    Case("--resume latest skips a broken trainer_state.json",
         lambda t, m, d, r: (resume_args(run_copy(t, r, lambda c: write(
             c / "trainer_state.json", "{")), "--resume", "latest"), None),
         ("damaged checkpoint step-00000003", "trainer_state.json",
          "resuming from step-00000002"), rc=0, stream="out"),
    # --- an adapter of another base: every command refuses it the same way -------------------
    Case("generate with an adapter of another base",
         lambda t, m, d, r: (["generate", "--model", str(m), "--adapter",
                              str(other_base_adapter(t, r)), "--device", "cpu", "hi"], None),
         (OTHER_BASE, "base_model_name_or_path", "--ignore-base-name")),
    Case("chat with an adapter of another base",
         lambda t, m, d, r: (["chat", "--model", str(m), "--adapter",
                              str(other_base_adapter(t, r)), "--device", "cpu"], None),
         (OTHER_BASE, "base_model_name_or_path", "--ignore-base-name")),
    Case("eval with an adapter of another base",
         lambda t, m, d, r: (["eval", "--model", str(m), "--adapter",
                              str(other_base_adapter(t, r)), "--data", str(d), "--device", "cpu",
                              "--report", str(t / "report.json")], t / "report.json"),
         (OTHER_BASE, "base_model_name_or_path", "--ignore-base-name")),
    Case("merge with an adapter of another base",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter",
                              str(other_base_adapter(t, r)), "--out", str(t / "merged")],
                             t / "merged"),
         (OTHER_BASE, "base_model_name_or_path", "--ignore-base-name")),
    Case("export with an adapter of another base",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(m), "--adapter",
                              str(other_base_adapter(t, r)), "--out", str(t / "m.gguf")],
                             t / "m.gguf"),
         (OTHER_BASE, "base_model_name_or_path", "--ignore-base-name")),
    # --- adapter directories: every command names the folder and what is wrong with it --------
    Case("generate with an adapter_config.json that is not JSON",
         lambda t, m, d, r: (["generate", "--model", str(m), "--adapter",
                              str(broken_adapter(t, r)), "--device", "cpu", "hi"], None),
         ("adapter_config.json", "not valid JSON", "save the adapter again")),
    Case("merge with an adapter_config.json that is not JSON",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(broken_adapter(t, r)),
                              "--out", str(t / "merged")], t / "merged"),
         ("adapter_config.json", "not valid JSON", "save the adapter again")),
    Case("generate with a truncated adapter_model.safetensors",
         lambda t, m, d, r: (["generate", "--model", str(m), "--adapter",
                              str(truncated_adapter(t, r)), "--device", "cpu", "hi"], None),
         ("adapter/adapter_model.safetensors", "damaged or not a safetensors file",
          "save the adapter again")),
    Case("merge with a truncated adapter_model.safetensors",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(truncated_adapter(t, r)),
                              "--out", str(t / "merged")], t / "merged"),
         ("adapter/adapter_model.safetensors", "damaged or not a safetensors file",
          "save the adapter again")),
    Case("export with a truncated adapter_model.safetensors",
         lambda t, m, d, r: (["export", "--gguf", "--model", str(m), "--adapter",
                              str(truncated_adapter(t, r)), "--out", str(t / "m.gguf")],
                             t / "m.gguf"),
         ("adapter/adapter_model.safetensors", "damaged or not a safetensors file",
          "save the adapter again")),
    Case("merge --adapter folder that does not exist",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(t / "gone"), "--out",
                              str(t / "merged")], t / "merged"),
         ("adapter directory", "gone", "does not exist", "--adapter")),
    Case("merge --adapter a model folder, not an adapter",
         lambda t, m, d, r: (["merge", "--model", str(m), "--adapter", str(m), "--out",
                              str(t / "merged")], t / "merged"),
         ("is not an adapter directory", "adapter_config.json", "output_dir")),
    # --- tokenizer and chat template ------------------------------------------------------------
    Case("a tokenizer.json that is not JSON",
         lambda t, m, d, r: (train_args(model_copy(t, m, lambda x: truncate(x / "tokenizer.json")),
                                        d, t / "out"), t / "out"),
         ("tokenizer.json", "not valid JSON", "tokenizer files")),
    Case("--chat_template file not found, with data that needs none",
         lambda t, m, d, r: (train_args(m, d, t / "out", "--chat_template", "mine.jinja"),
                             t / "out"),
         ("chat_template", "mine.jinja", "not found")),
    # --- prompts files ---------------------------------------------------------------------------
    Case("prompts file with a bad JSON line",
         lambda t, m, d, r: (["generate", "--model", str(m), "--device", "cpu", "--prompts-file",
                              str(write(t / "p.jsonl", '{"prompt": "a"}\n{"prompt": \n'))], None),
         ("p.jsonl line 2", "not valid JSON")),
    Case("prompts file not UTF-8",
         lambda t, m, d, r: (["generate", "--model", str(m), "--device", "cpu", "--prompts-file",
                              str(write(t / "p.txt", b"hello\n\xe9t\xe9\n"))], None),
         ("p.txt line 2", "UTF-8")),
]


def snapshot(path: Path | None):
    """What is at `path`: None when absent, else every file with its bytes."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case, shared, tmp_path, capsys, monkeypatch):
    model, data, run = shared
    if "read-only" in case.name:
        real = os.access
        ro = tmp_path / "ro"
        ro.mkdir()
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == ro
                            else real(p, mode, *a, **k))
    argv, output = case.build(tmp_path, model, data, run)
    before = snapshot(output)
    rc = main(argv)
    captured = capsys.readouterr()
    text = captured.err if case.stream == "err" else captured.out
    assert rc == case.rc, captured.err[-2000:]
    for part in case.expect:
        assert part in text, f"{part!r} not in {text!r}"
    if case.rc == 2:
        lines = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    if output is not None:
        assert snapshot(output) == before, f"{output} was changed"
    # nothing half-written: no temporary (.partial / .tmp) files anywhere in the case's folder
    left = [p for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".tmp", ".merge"))
            and "cache" not in p.parts]
    assert not left, left


def test_as_many_classes_as_promised():
    assert len(CASES) >= 25


def test_unknown_flag_of_other_commands_names_it(shared, capsys):
    model, _, _ = shared
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model), "--bogus-flag", "hi"])
    assert exc.value.code == 2 and "--bogus-flag" in capsys.readouterr().err


def test_ignore_base_name_lets_generate_run(shared, tmp_path, capsys):
    model, _, run = shared
    adapter = other_base_adapter(tmp_path, run)
    rc = main(["generate", "--model", str(model), "--adapter", str(adapter), "--device", "cpu",
               "--quant", "none", "--max-new-tokens", "2", "--ignore-base-name", "hi"])
    assert rc == 0, capsys.readouterr().err


def test_q4_k_m_fallback_is_logged_per_role(shared, tmp_path, capsys):
    model, _, _ = shared
    out = tmp_path / "m.gguf"
    assert main(["export", "--gguf", "--model", str(model), "--out", str(out),
                 "--type", "q4_k_m"]) == 0
    err = capsys.readouterr().err
    # llama.cpp's fallbacks: Q4_K → Q5_0, Q6_K (layer 1's ffn_down, the output) → Q8_0; one line
    # per role and type
    notes = [ln for ln in err.splitlines() if " stored as " in ln]
    keys = [(ln.split(" tensor")[0].split()[-1], ln.split(" stored as ")[1].split()[0]) for ln in notes]
    assert len(keys) == len(set(keys)) and ("ffn_down.weight", "Q8_0") in keys, err
    assert "1 ffn_down.weight tensor stored as Q8_0 instead of Q6_K: row length 128 is not a " \
        "multiple of 256" in err
    assert "2 attn_q.weight tensors stored as Q5_0 instead of Q4_K: row length 64 is not a " \
        "multiple of 256" in err
    assert out.is_file()


def test_greedy_empty_answer_is_explained(shared, capsys, monkeypatch):
    """A model whose first greedy token is its end-of-turn token prints an empty answer: say so."""
    import qlora.chat

    model, _, _ = shared

    def first_token_is_eos(model, ids, opts):
        yield opts.eos_token_ids[-1]

    monkeypatch.setattr(qlora.chat, "stream", first_token_is_eos)
    assert main(["generate", "--model", str(model), "--device", "cpu", "--quant", "none",
                 "hi"]) == 0
    err = capsys.readouterr().err
    assert "end-of-turn token first" in err and "greedy" in err

    import io

    session = qlora.chat.ChatSession(None, _tok(model), None,
                                     qlora.infer.GenerationOptions(eos_token_ids=(2,)))
    session.model = _Stub()
    out = io.StringIO()
    qlora.chat.run_chat(session, stdin=io.StringIO("hello\n/exit\n"), out=out)
    assert "end-of-turn token first" in out.getvalue()


class _Stub:
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def _tok(model):
    from qlora.models import load_tokenizer

    return load_tokenizer(model)
