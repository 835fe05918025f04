"""The training loop: schedules against transformers, token-normalised accumulation, atomic
checkpoints, exact resume, early stopping and the choice of the best adapter."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.config import load_config
from qlora.errors import QloraError
from qlora.train import checkpoint as ckpt
from qlora.train import evaluation, fast_paths, loop
from qlora.train.model import build_model
from qlora.train.optim import build_optimizer, lr_factor, param_groups, resolve_optim


def make_cfg(run_inputs, out, **kw):
    model, data = run_inputs
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_seq_length=64,
                micro_batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=5e-3,
                warmup_steps=1, logging_steps=1, eval_steps=0, save_steps=0, device="cpu",
                gradient_checkpointing=False, packing=True,
                # double quantization of a 64-wide model takes a slow bitsandbytes CPU path
                double_quant=False)
    base.update(kw)
    return load_config(None, base)


# --- schedule and optimizer --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_transformers(kind):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    total, warmup = 37, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "constant":
        ref = get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}
        ref = make[kind](opt, warmup, total)
    theirs = []
    for _ in range(total + 3):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = [lr_factor(step, kind, warmup, total) for step in range(total + 3)]
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_paged_optimizer_falls_back_on_cpu_and_says_so():
    name, note = resolve_optim("paged_adamw_8bit", torch.device("cpu"))
    assert name == "adamw_8bit" and "CUDA" in note
    assert resolve_optim("paged_adamw_8bit", torch.device("cuda")) == ("paged_adamw_8bit", None)


def test_optimizers_step_and_magnitude_vectors_are_not_decayed():
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.randn(8, 64))
    model.lora_magnitude_vector = torch.nn.Parameter(torch.ones(8))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["weight_decay"] == 0.0
    for name in ("adamw_torch", "adamw_8bit", "paged_adamw_32bit"):
        opt = build_optimizer(model, name, 1e-2, 0.1, (0.9, 0.999), 1e-8)
        before = model.lora_A.detach().clone()
        model.lora_A.grad = torch.ones_like(model.lora_A)
        model.lora_magnitude_vector.grad = torch.zeros(8)
        opt.step()
        assert not torch.equal(before, model.lora_A), name


# --- accumulation ------------------------------------------------------------------------------
def test_accumulation_normalises_over_the_whole_window(run_inputs, tmp_path):
    """4 micro-batches of 1 row accumulated == 1 micro-batch of 4 rows: same loss, same update."""
    common = dict(max_steps=1, packing=False, lora_dropout=0.0, optim="adamw_torch",
                  warmup_steps=0, warmup_ratio=0.0,
                  lr_scheduler_type="constant")
    a = loop.train(make_cfg(run_inputs, tmp_path / "a", micro_batch_size=1,
                            gradient_accumulation_steps=4, **common), progress=False)
    b = loop.train(make_cfg(run_inputs, tmp_path / "b", micro_batch_size=4,
                            gradient_accumulation_steps=1, **common), progress=False)
    assert a.step_losses[1] == pytest.approx(b.step_losses[1], rel=1e-6)
    wa = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # it did train


# --- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_is_atomic(run_inputs, tmp_path, monkeypatch):
    cfg = make_cfg(run_inputs, tmp_path / "run", max_steps=2, save_steps=1)
    loop.train(cfg, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(cfg.output_dir)] == ["step-00000001",
                                                                        "step-00000002"]
    # a save that fails half way leaves neither a checkpoint nor a temporary directory
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(cfg.output_dir, model, opt, sched, ckpt.TrainerState(global_step=3),
                             ckpt.rng_state(), "base", save_adapter_fn=lambda *a: None)
    parent = ckpt.checkpoint_dir(cfg.output_dir)
    assert sorted(p.name for p in parent.iterdir()) == ["step-00000001", "step-00000002"]
    # a crash that kills the process mid-write leaves a dot-directory: never taken as `latest`
    partial = parent / ".step-00000003.abc"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    assert ckpt.resolve_resume(cfg.output_dir, "latest").name == "step-00000002"
    ckpt.clean_partial(cfg.output_dir)
    assert not partial.exists()


def test_rotation_keeps_newest_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        d = ckpt.checkpoint_dir(tmp_path) / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / ckpt.STATE_FILE).write_text("{}")
    ckpt.rotate_checkpoints(tmp_path, keep=2, best="step-00000002")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-00000002", "step-00000004", "step-00000005"]


def test_a_removal_cut_short_leaves_no_listed_half_checkpoint(tmp_path, monkeypatch):
    """A kill while rotation deletes a checkpoint (simulated: the deletion stops after its first
    file) must not leave a directory that is listed as a checkpoint but lacks its files."""
    import shutil

    from qlora import files

    for step in (1, 2, 3):
        d = ckpt.checkpoint_dir(tmp_path) / f"step-{step:08d}"
        d.mkdir(parents=True)
        for name in ckpt.CHECKPOINT_FILES:
            (d / name).write_text("{}")

    def killed_midway(path, ignore_errors=False):
        first = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
        first.unlink()
        raise SystemExit("killed")

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(files.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        ckpt.rotate_checkpoints(tmp_path, keep=2, best=None)
    monkeypatch.setattr(files.shutil, "rmtree", real_rmtree)
    listed = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in listed] == ["step-00000002", "step-00000003"]
    assert all((p / name).is_file() for p in listed for name in ckpt.CHECKPOINT_FILES)
    ckpt.clean_partial(tmp_path)  # what the next run does first: the hidden remains go
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == [
        "step-00000002", "step-00000003"]


def test_progress_shows_the_recent_rate_and_the_summary_peak(monkeypatch):
    """The bar's tokens/s covers the last RECENT_STEPS steps: a slow first step (graph capture)
    no longer counts once that many steps followed it. Times are given, not read from a clock."""
    from qlora.train import metrics
    from qlora.train.metrics import Progress, gib

    # the figure summary.json records comes from metrics.peak_memory_bytes: the bar shows it too
    monkeypatch.setattr(metrics, "peak_memory_bytes", lambda device: 3 * 2**30 + 123)
    bar = Progress(total=30, initial=0, device=torch.device("cpu"), enabled=False)
    t0 = bar.points[0][0]
    bar.update(1.0, 1e-4, 1000, now=t0 + 60.0)  # a first step of 60 s
    assert bar.recent_rate() == pytest.approx(1000 / 60.0)
    for i in range(1, Progress.RECENT_STEPS + 1):  # then 1000 tokens every 0.1 s
        bar.update(1.0, 1e-4, 1000, now=t0 + 60.0 + 0.1 * i)
    # exactly RECENT_STEPS steps of 1000 tokens in RECENT_STEPS * 0.1 s: 10,000 tokens/s
    assert bar.recent_rate() == pytest.approx(10_000.0)
    assert bar.tokens / (bar.points[-1][0] - t0) < 1_000  # what a mean since the start says
    assert f"peak={gib(3 * 2**30 + 123)}" in bar.bar.postfix


# --- exact resume ------------------------------------------------------------------------------
def test_resume_continues_exactly(run_inputs, tmp_path):
    """Stop at step 3 (as Ctrl-C would), resume: every later step's loss equals the unbroken run's.

    Dropout is on (the RNG state must be restored), accumulation is 2, the optimizer is the
    default (bitsandbytes 8-bit AdamW on a CPU), and the cut falls inside an epoch."""
    kw = dict(max_steps=8, lora_dropout=0.1, micro_batch_size=1, gradient_accumulation_steps=2,
              val_set_size=0.25, eval_steps=2, save_steps=4)
    full = loop.train(make_cfg(run_inputs, tmp_path / "full", **kw), progress=False)
    cut = loop.train(make_cfg(run_inputs, tmp_path / "cut", **kw), progress=False,
                     stop_after_steps=3)
    assert cut.stopped == "interrupted" and cut.global_step == 3
    resumed = loop.train(make_cfg(run_inputs, tmp_path / "cut", resume="latest", **kw),
                         progress=False)
    assert resumed.global_step == 8 and min(resumed.step_losses) == 4
    for step in range(4, 9):
        assert resumed.step_losses[step] == full.step_losses[step], step
    for step in range(1, 4):
        assert cut.step_losses[step] == full.step_losses[step]
    # metrics.jsonl of the resumed run holds each step once, with the unbroken run's values
    def train_losses(out):
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]

    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_refused_unless_resume_or_overwrite(run_inputs, tmp_path):
    out = tmp_path / "run"
    loop.train(make_cfg(run_inputs, out, max_steps=1), progress=False)
    with pytest.raises(QloraError, match="not empty.*--resume latest.*--overwrite"):
        loop.train(make_cfg(run_inputs, out, max_steps=1), progress=False)
    loop.train(make_cfg(run_inputs, out, max_steps=1, overwrite=True), progress=False)
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(QloraError, match="not a qlora run"):
        loop.train(make_cfg(run_inputs, stranger, max_steps=1, overwrite=True), progress=False)
    assert (stranger / "notes.txt").exists()


# --- early stopping and the best adapter --------------------------------------------------------
def test_early_stopping_and_best_adapter(run_inputs, tmp_path, monkeypatch):
    """Scripted eval losses 3.0, 2.0, 2.5, 2.6: patience 2 stops after the 4th eval (step 8);
    the best is the eval at step 4, and that adapter is the one left in output_dir."""
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    real_evaluate = evaluation.evaluate

    def fake_evaluate(*a, **k):
        real_evaluate(*a, **k)
        loss = next(scripted)
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": 1}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    res = loop.train(make_cfg(run_inputs, out, max_steps=20, val_set_size=0.25, eval_steps=2,
                              save_steps=2, save_total_limit=1, early_stopping_patience=2),
                     progress=False)
    assert res.stopped == "early_stopping" and res.global_step == 8
    assert (res.best_step, res.best_eval_loss) == (4, 2.0)
    # newest checkpoint plus the best one survive rotation
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000004", "step-00000008"]
    final = load_file(str(out / "adapter_model.safetensors"))
    at_best = load_file(str(out / "checkpoints/step-00000004/adapter/adapter_model.safetensors"))
    at_last = load_file(str(out / "checkpoints/step-00000008/adapter/adapter_model.safetensors"))
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], at_last[k]) for k in final)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_eval_loss"] == 2.0 and summary["stopped"] == "early_stopping"


def test_evaluation_builds_no_autograd_graph(run_inputs):
    """Eval batches of a model with trainable adapters must not keep activations for backward."""
    from qlora.data import prepare
    from qlora.models import load_tokenizer

    model_dir, data = run_inputs
    cfg = make_cfg(run_inputs, "unused")
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    examples, _ = prepare(str(data), load_tokenizer(model_dir), fmt="auto", train_on="responses",
                          max_len=64, overlong="truncate", chat_template=None, cache_dir=None,
                          cache=False)
    grad_modes = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    model.train()
    ev = evaluation.evaluate(model, examples, max_len=64, batch_size=4, pad_id=0,
                             device=torch.device("cpu"))
    assert grad_modes and not any(grad_modes)
    assert model.training  # put back as it was
    assert ev["tokens"] > 0 and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))


def test_the_graph_path_of_the_loop_trains_as_the_plain_path(run_inputs, tmp_path, monkeypatch):
    """The loop's CUDA-graph glue (each micro-batch staged one step ahead, then run with the
    window's 1/labels scale) exercised on the CPU: a real GraphedSteps whose capture has 'failed'
    runs every staged batch through its eager fallback. Losses and adapters must equal the plain
    path's, with accumulation, packing and seeded dropout."""
    from qlora.train.graphs import GraphedSteps

    def graphed(model, optimizer, plan, env, sharded, device, scaler, log, max_seq_length,
                preference=None):
        steps = GraphedSteps.__new__(GraphedSteps)  # no CUDA pool on a CPU
        steps.model, steps.device, steps.pad_to, steps.log = model, device, 16, log
        steps.preference = preference
        steps.failed = "capture not possible on the CPU (test)"
        return steps

    kw = dict(max_steps=4, lora_dropout=0.1, micro_batch_size=2, gradient_accumulation_steps=2,
              optim="adamw_torch")
    plain = loop.train(make_cfg(run_inputs, tmp_path / "plain", **kw), progress=False)
    monkeypatch.setattr(fast_paths, "graphed_steps", graphed)
    staged = loop.train(make_cfg(run_inputs, tmp_path / "staged", **kw), progress=False)
    for step in range(1, 5):
        assert staged.step_losses[step] == pytest.approx(plain.step_losses[step], rel=1e-5), step
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "staged" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)

    def grad_norms(out):  # Adam hides a wrongly scaled gradient; the logged norm does not
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["grad_norm"] for r in recs if r["split"] == "train"]

    assert grad_norms(tmp_path / "staged") == pytest.approx(grad_norms(tmp_path / "plain"), rel=1e-4)
