"""`qlora train` end to end on a tiny model: the output directory, the adapter in peft, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qlora.cli import main
from qlora.config import CONFIG_FILE_NAME, load_config

OUTPUT_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                "tokenizer_config.json", CONFIG_FILE_NAME, "prompt_format.json", "metrics.jsonl",
                "loss.png", "summary.json"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_model(root / "model", "qwen2", hidden_size=128, intermediate_size=256)
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w}
            for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta",
                      "lambda", "zeta", "iota", "rho")]
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, data


def test_train_command_writes_a_complete_run_that_peft_loads(inputs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.adapters import load_adapter
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    root, model_dir, data = inputs
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("quant: none\nlora_r: 8\nlora_alpha: 16\nlearning_rate: 1e-2\n"
                        "val_set_size: 0.25\neval_steps: 2\nsave_steps: 2\nlogging_steps: 1\n")
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--config", str(cfg_file),
               "--output_dir", str(out), "--max_steps", "4", "--micro_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--lora_dropout", "0", "--device", "cpu",
               "--gradient_checkpointing", "false", "--max_seq_length", "256"])
    assert rc == 0, capsys.readouterr().err
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-00000004" / "adapter" / "adapter_config.json").is_file()
    # how training rendered its prompts, found from the run's adapters (generate's default)
    from qlora.train.output import read_prompt_format

    record, where = read_prompt_format(out / "checkpoints" / "step-00000004" / "adapter")
    assert where == (out / "prompt_format.json").resolve()
    assert record == {"data_format": "alpaca", "chat_template": False, "chat_template_option": None}
    saved = load_config(out / CONFIG_FILE_NAME)
    assert (saved.lora_r, saved.max_steps, saved.quant, saved.learning_rate) == (8, 4, "none", 1e-2)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("wall_time_s", "tokens_per_s", "peak_memory_bytes", "final_eval_loss",
                "best_eval_loss"):
        assert summary[key] is not None, key
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]

    # peft puts the adapter onto the transformers model and gets our logits
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 12, 60, 61]])
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_logits = hf(ids).logits
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    ours_model = load_model(model_dir, QuantConfig(method="none", compute_dtype=torch.float32))
    load_adapter(ours_model, out)
    with torch.no_grad():
        ours = ours_model(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs, base_logits, atol=1e-3)  # the adapter learned something


def test_bad_option_refused_before_anything_loads(inputs, tmp_path, capsys):
    root, model_dir, data = inputs
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out),
               "--lr_scheduler_type", "cosine_with_restarts"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lr_scheduler_type" in err and "cosine_with_restarts" in err and "linear" in err
    assert not out.exists()
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--lora-rank", "8"])
    assert rc == 2 and "lora_r" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(inputs, tmp_path):
    root, model_dir, data = inputs
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qlora.cli", "train", "--model", str(model_dir), "--data",
            str(data), "--output_dir", str(out), "--max_steps", "400", "--micro_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--device", "cpu",
            "--gradient_checkpointing", "false", "--double_quant", "false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    metrics = out / "metrics.jsonl"
    # no deadline: wait for two logged steps however slow the machine (a run that ends first
    # fails below, on its exit status)
    while proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=3600)  # stops a hung run only, never a slow one
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "--resume latest" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].startswith("step-")
    step = int(ckpts[0].split("-")[1])
    assert 1 <= step < 400
    rc = main(["train", "--config", str(out / CONFIG_FILE_NAME), "--resume", "latest",
               "--max_steps", str(step + 2)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == step + 2 and summary["stopped"] == "completed"
    assert (out / "adapter_model.safetensors").is_file()


def test_unusable_data_leaves_no_output_dir(inputs, tmp_path, capsys):
    root, model_dir, data = inputs
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(empty), "--output_dir", str(out)])
    assert rc == 2 and "empty.jsonl" in capsys.readouterr().err
    assert not out.exists()
