"""SIGKILL at random points of a training run, resume each time: every checkpoint on disk loads,
and the finished run's losses and adapter equal those of a run never interrupted.

The points are chosen by step count (a seeded random number of steps past the last one logged in
metrics.jsonl), never by wall-clock sleeps; the test polls the file and kills as soon as the
chosen step appears, so the kill lands wherever the process happens to be then (a forward pass,
an optimizer step, the middle of writing a checkpoint or a metrics line)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.train import checkpoint as ckpt

TOTAL = 60
KILLS = 10


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory):
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("crash")
    model = build_tiny_model(root / "model", "llama")
    words = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow", "wind",
             "leaf", "rock", "sand", "star", "lake", "hill")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} = ", "completion": w.upper()}) + "\n"
                            for w in words))
    return root, model, data


def command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora.cli", "train", "--model", str(model), "--data", str(data),
            "--output_dir", str(out), "--max_steps", str(TOTAL), "--micro_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--warmup_steps", "2",
            "--logging_steps", "1", "--save_steps", "1", "--save_total_limit", "3",
            "--device", "cpu", "--quant", "none", "--gradient_checkpointing", "false",
            "--max_seq_length", "64", *extra]


def environment(root: Path) -> dict:
    return dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                QLORA_CACHE_DIR=str(root / "cache"), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def logged_steps(out: Path) -> list[int]:
    """Train steps in metrics.jsonl (a line being written right now is skipped)."""
    path = out / "metrics.jsonl"
    steps = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return steps
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("split") == "train":
            steps.append(rec["step"])
    return steps


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in recs if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def assert_checkpoints_load(out: Path) -> list[Path]:
    """Every checkpoint a resume could pick is whole: each of its files reads back."""
    found = ckpt.list_checkpoints(out)
    for path in found:
        assert ckpt.damage(path) is None, ckpt.damage(path)
        tensors = load_file(str(path / "trainable.safetensors"))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(path / name, weights_only=True)
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        assert state["global_step"] == int(path.name[len(ckpt.PREFIX):])
        load_file(str(path / "adapter" / "adapter_model.safetensors"))
        json.loads((path / "adapter" / "adapter_config.json").read_text())
    return found


def run_to_end(args: list[str], env: dict) -> None:
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sigkill_at_random_steps_then_resume_matches_an_unbroken_run(crash_inputs, tmp_path):
    root, model, data = crash_inputs
    env = environment(root)
    reference = tmp_path / "reference"
    run_to_end(command(model, data, reference), env)
    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, TOTAL + 1))

    out = tmp_path / "crashed"
    rng = random.Random(20240607)
    kills = 0
    while kills < KILLS:
        if ckpt.list_checkpoints(out):
            extra = ["--resume", "latest"]
        elif (out / "run_config.yaml").exists():
            extra = ["--overwrite", "true"]  # killed before its first checkpoint: start again
        else:
            extra = []
            if out.exists():  # killed before even the config was written: an empty start
                assert not [p for p in out.iterdir() if not p.name.startswith(".")], \
                    list(out.iterdir())
        already = max(logged_steps(out), default=0)
        target = already + rng.randint(1, 3)
        assert target < TOTAL, f"only {kills} kills fit in {TOTAL} steps"
        proc = subprocess.Popen(command(model, data, out, *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        while proc.poll() is None and max(logged_steps(out), default=0) < target:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before step {target}: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        assert_checkpoints_load(out)

    # the last resume runs to the end; the losses and the adapter are the unbroken run's
    run_to_end(command(model, data, out, "--resume", "latest"), env)
    assert_checkpoints_load(out)
    assert train_losses(out) == expected
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == TOTAL and summary["stopped"] == "completed"
