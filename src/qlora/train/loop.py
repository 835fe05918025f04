"""The training recipe: `train` (`qlora train`) loads, then `fit` runs the plain loop over
micro-batches, torchtune style.

    for each optimizer step:
        count the label tokens of the whole accumulation window      (before any forward pass)
        for each micro-batch: loss = model(...) / tokens; backward     (model returns a SUM)
        build the next step's micro-batches                  (host work while the GPU computes)
        clip, optimizer step, schedule step; read the step's loss      (the step's one GPU wait)
        log · evaluate (+ early stopping, best adapter) · checkpoint

Exact resume: the data order depends only on (seed, epoch) (qlora.data.packing), a checkpoint is
taken at a step boundary together with the RNG states of that moment, so the steps after a resume
see the same batches, the same dropout masks and the same optimizer state as an unbroken run.

`train` checks the output directory, loads the data and the model, then writes the run's files and
calls `fit`. `fit` reads as its steps: `_set_up` (the method's batch layout, the schedule, the
optimizer, a resume, the fast paths, the objects the steps use, gathered in a `_Run`), then per
step `_one_step` (backward, the next window, the update, the loss read and counted) and
`_after_step` (log, evaluate, checkpoint, and why the run stops, if it does), then `_finish` (a last
evaluation, the adapter, the summary).

The parts live in train/, each module named for what it holds: output.py (the output directory),
model.py (device, dtype, the quantized base with adapters), data.py (the tokenized examples),
method.py (what SFT or a preference method changes), optim.py (optimizer, schedule, fp16 scaler),
fast_paths.py (speed/'s plan and the CUDA-graph runner), windows.py (each step's micro-batches),
step.py (a step's compute), evaluation.py (validation), checkpoint.py (checkpoints at step
boundaries, the start state), metrics.py (train records, summary, TrainResult), signals.py (Ctrl-C
and SIGTERM), early_stop.py (early stopping, the best adapter), out_of_memory.py (the checkpoint
kept after an out-of-memory error), distributed.py (torchrun).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.config import CONFIG_FILE_NAME, RunConfig, save_config
from qlora.errors import QloraError
from qlora.train import checkpoint as ckpt
from qlora.train import distributed as dist_
from qlora.train import early_stop
from qlora.train.checkpoint import Checkpoints, start_state
from qlora.train.data import load_data
from qlora.train.distributed import SINGLE, DistEnv
from qlora.train.evaluation import Evals
from qlora.train.fast_paths import apply_fast_paths
from qlora.train.method import (bar_metrics, batch_layout, precompute_reference_log_probs,
                                preference_collate, preference_options)
from qlora.train.metrics import (Clock, MetricsLog, Progress, TrainLog, TrainResult, plot_losses,
                                 run_summary, write_summary)
from qlora.train.model import model_for_run, resolve_device, resolve_dtype
from qlora.train.optim import fp16_scaler, optim_for_run, run_optimizer, warmup_steps, zero_grads
from qlora.train.out_of_memory import Boundary, keep_checkpoint
from qlora.train.output import check_output_dir, write_run_files
from qlora.train.signals import StopFlag
from qlora.train.step import Stepper, share_window
from qlora.train.windows import Window, WindowBuilder, window_after


def train(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True,
          stop_after_steps: int | None = None) -> TrainResult:
    """`qlora train`: output dir checked, data tokenized, model loaded, adapters trained, saved.

    Under torchrun (RANK / WORLD_SIZE in the environment) every rank runs this same function:
    it joins the process group, trains its share of each step, and rank 0 writes the output."""
    import torch.distributed

    env = dist_.env_from_environ()
    dist_.check_sharding(cfg.sharding, env, cfg.use_dora)
    if not Path(cfg.model).is_dir():
        raise QloraError(f"option `model`: model directory {cfg.model} does not exist; pass "
                         "--model an existing directory in Hugging Face layout (config.json, "
                         "*.safetensors, tokenizer.json)")
    check_output_dir(cfg)
    if cfg.resume:  # a damaged checkpoint is named (and `latest` skips it) before anything loads
        ckpt.resolve_resume(cfg.output_dir, cfg.resume, log=log if env.is_main else _quiet)
    device = resolve_device(cfg)
    joined = env.enabled and not torch.distributed.is_initialized()
    if env.enabled:
        device = dist_.init(env, device.type)
        if not env.is_main:
            log = _quiet
    failed = False
    try:
        with dist_.FailureWatch(env) as watch:
            try:
                result = _train(cfg, env, device, log, progress, stop_after_steps)
            except BaseException as err:
                failed = True
                first = watch.announce(err)  # the others end at once, with this message
                if first is not None and not first.startswith(f"rank {env.rank} "):
                    watch.end_for(first)  # this error is a consequence of another rank's
                raise
        dist_.barrier(env)  # every rank's watch has stopped before any rank leaves
        return result
    finally:
        if joined:
            dist_.shutdown(env, failed=failed)


def _train(cfg: RunConfig, env: DistEnv, device: torch.device, log: Callable[[str], None],
           progress: bool, stop_after_steps: int | None) -> TrainResult:
    """`train` on this rank, once it has joined: the planner's check, the data, the model, the
    output directory's files, then `fit`."""
    from qlora.models import load_tokenizer

    dtype = resolve_dtype(cfg, device)
    # the memory planner, before anything loads: refuses a run that will not fit, or --auto_fit
    from qlora.memory import check_run

    cfg, memory_facts = check_run(cfg, device, dtype, env.world_size, log)
    optim_name, _ = optim_for_run(cfg.optim, device,
                                  dist_.check_sharding(cfg.sharding, env, cfg.use_dora))
    resolved = {"device": str(device), "compute dtype": str(dtype).removeprefix("torch."),
                "optimizer used": optim_name, **memory_facts}
    if env.enabled:
        resolved["ranks"] = env.world_size
    tokenizer = load_tokenizer(cfg.model)
    # the first rank of each host tokenizes and fills that host's data cache; the others then
    # read it (every rank passes the one barrier, before or after loading)
    host_first = env.local_rank == 0
    if not host_first:
        dist_.barrier(env)
    train_examples, val_examples, prompts = load_data(cfg, tokenizer, log)
    if host_first:
        dist_.barrier(env)
    model = model_for_run(cfg, env, device, dtype, log)
    # everything loaded (and every rank has checked the output dir): only now is it touched
    dist_.barrier(env)
    if env.is_main:
        out = write_run_files(cfg, resolved, log, prompts)
    dist_.barrier(env)
    result = fit(model, tokenizer, train_examples, val_examples, cfg, device=device, log=log,
                 progress=progress, stop_after_steps=stop_after_steps, env=env)
    if cfg.resume and env.is_main:
        save_config(cfg, out / CONFIG_FILE_NAME, extra=resolved)
    return result


def fit(model, tokenizer, train_examples: list[dict], val_examples: list[dict], cfg: RunConfig,
        *, device: torch.device, log: Callable[[str], None] = print, progress: bool = True,
        base_model: str | None = None, stop_after_steps: int | None = None,
        env: DistEnv = SINGLE) -> TrainResult:
    """Train `model`'s adapters on `train_examples`; write everything into cfg.output_dir.

    `stop_after_steps` behaves like a Ctrl-C after that many steps (tests use it to cut a run).
    `env`: this process's place in a torchrun job (train/distributed.py); rank 0 alone writes.
    """
    # --- set-up: the method, the schedule, the optimizer, a resume, the fast paths
    run = _set_up(model, tokenizer, train_examples, val_examples, cfg, device=device, log=log,
                  progress=progress, base_model=base_model or cfg.model,
                  stop_after_steps=stop_after_steps, env=env)

    # --- the steps: each window of micro-batches, then log, evaluate, checkpoint
    try:
        with StopFlag() as stop:
            while run.state.global_step < run.total:
                stepped = _one_step(run, stop)
                if stepped is None:  # a signal dropped the unfinished step; its start is saved
                    break
                grad_norm, lr = stepped
                if _after_step(run, stop, grad_norm, lr) is not None:  # early stopping, or a
                    break  # signal (or stop_after_steps) at the step boundary: saved
    except torch.OutOfMemoryError as err:
        raise _out_of_memory(run, err) from None
    finally:
        run.bar.close()
        run.metrics.close()

    # --- the end: a last evaluation, the adapter, the summary
    return _finish(run)


@dataclass
class _Run:
    """What fit's set-up made, for the steps and the end: the run's settings, its objects, and
    the counters the steps carry along."""
    model: Any
    cfg: RunConfig
    env: DistEnv
    device: torch.device
    log: Callable[[str], None]  # _quiet on ranks other than 0
    out: Path
    base_model: str
    val_examples: list[dict]
    stop_after_steps: int | None
    per_epoch: int  # micro-batches per epoch, over all ranks
    total: int  # optimizer steps of the whole run
    optim_name: str
    optimizer: Any
    dtype: torch.dtype  # the embedding's: the model's compute dtype
    state: ckpt.TrainerState
    result: TrainResult
    metrics: MetricsLog
    bar: Progress
    stepper: Stepper
    windows: WindowBuilder
    clock: Clock
    saver: Checkpoints
    evals: Evals
    train_log: TrainLog
    boundary: Boundary  # for a checkpoint after an out-of-memory error
    ahead: Window | None = None  # the next step's micro-batches, built during this step
    tokens_this_run: int = 0  # input tokens since this process started (tokens_per_s)
    last_eval_step: int = -1


def _set_up(model, tokenizer, train_examples: list[dict], val_examples: list[dict],
            cfg: RunConfig, *, device: torch.device, log: Callable[[str], None], progress: bool,
            base_model: str, stop_after_steps: int | None, env: DistEnv) -> _Run:
    """The method and its batch layout, the schedule, the optimizer, a resume, the fast paths,
    then the objects the steps use. Everything fit's loop reads is made here, in this order."""
    from qlora.data import build_rows, num_batches
    from qlora.methods import method_module

    out, main = Path(cfg.output_dir), env.is_main
    if not main:
        log = _quiet
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    method = method_module(cfg.method)  # None: SFT, the model's own loss
    packing, preference_packed = batch_layout(model, cfg, device, method, log)
    rows = build_rows(train_examples, cfg.max_seq_length, packing=packing, seed=cfg.seed)
    per_epoch = num_batches(len(rows), cfg.micro_batch_size)
    window = cfg.gradient_accumulation_steps * env.world_size  # micro-batches per step, all ranks
    total = cfg.max_steps if cfg.max_steps > 0 else \
        math.ceil(cfg.num_train_epochs * math.ceil(per_epoch / window))
    warmup = warmup_steps(total, cfg.warmup_steps, cfg.warmup_ratio)
    sharded = dist_.is_sharded(model)  # FSDP2 (--sharding fsdp under torchrun): distributed.py
    optim_name, optimizer, scheduler = run_optimizer(model, cfg, device, sharded, total, warmup, log)
    dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Embedding)),
                 torch.float32)
    scaler = fp16_scaler(dtype, device)
    state = start_state(out, cfg, model, optimizer, scheduler, scaler, log)
    if dist_.replicated(env, sharded):  # rank 0's adapters (after a resume: the checkpoint's)
        dist_.broadcast_trainables([p for g in optimizer.param_groups for p in g["params"]], env)
    dropout_seed, dropout_stride, graphed = apply_fast_paths(model, optimizer, scaler, cfg, env,
                                                             device, sharded, log)
    if cfg.precompute_ref_log_probs:  # through the fast path, once it is on
        precompute_reference_log_probs(model, train_examples + val_examples, cfg, pad_id,
                                       preference_packed, device, log)
    if main:
        ckpt.clean_partial(out)
    metrics = MetricsLog(out, tensorboard=cfg.tensorboard, log=log,
                         keep_until_step=state.global_step if cfg.resume else None, enabled=main)
    log(_plan_line(cfg, env, len(train_examples), len(rows), per_epoch, total, warmup,
                   len(val_examples)))
    result = TrainResult(output_dir=out, global_step=state.global_step, stopped="completed")
    bar = Progress(total, state.global_step, device, enabled=progress and main)
    stepper = Stepper(model, optimizer, scheduler, scaler, graphed, cfg, env, device,
                      dropout_seed, dropout_stride,
                      method=(method, preference_options(cfg)) if method else None,
                      sharded=sharded)
    windows = WindowBuilder(train_examples, rows, cfg.micro_batch_size, pad_id, cfg.seed, window,
                            env, lockstep=sharded, prepare=stepper.prepare,
                            collate=preference_collate(preference_packed) if method else None)
    clock = Clock(state.elapsed_s)
    saver = Checkpoints(out, cfg, env, model, optimizer, scheduler, scaler, base_model,
                        clock.total_s)
    evals = Evals(model, val_examples, cfg, env, device, pad_id, out, base_model, metrics, bar,
                   result, preference_packed)
    return _Run(model=model, cfg=cfg, env=env, device=device, log=log, out=out,
                base_model=base_model, val_examples=val_examples,
                stop_after_steps=stop_after_steps, per_epoch=per_epoch, total=total,
                optim_name=optim_name, optimizer=optimizer, dtype=dtype, state=state,
                result=result, metrics=metrics, bar=bar, stepper=stepper, windows=windows,
                clock=clock, saver=saver, evals=evals, train_log=TrainLog(),
                boundary=Boundary())


def _one_step(run: _Run, stop: StopFlag) -> tuple[Any, float] | None:
    """One optimizer step: its window's backward, the next window built, the update, the step's
    loss read and counted. (grad_norm, lr); None where a signal dropped the step (saved)."""
    state, env = run.state, run.env
    rng_at_start = run.boundary.step_starts()
    here = (state.epoch, state.batch_index)
    win = run.ahead if run.ahead is not None and (run.ahead.epoch, run.ahead.ids[0]) == here \
        else run.windows.build(*here)
    run.ahead = None
    n_labels, n_input, stopping = win.n_labels, win.n_input, False
    if env.enabled:
        n_labels, n_input, stopping = share_window(env, run.device, n_labels, n_input, stop)
    step_loss = None if stopping else run.stepper.backward(
        win.batches, n_labels, lambda: stop.mid_step(env.enabled))
    if step_loss is None:  # a signal: the unfinished step is dropped; weights and
        # optimizer are still those of the step boundary, and so are the RNG states
        # saved with them
        zero_grads(run.optimizer)
        _interrupted(run.result, run.saver.save(state, rng_at_start), stop.signum)
        return None
    if state.global_step + 1 < run.total:
        # the next step's micro-batches (padding, document offsets, page-locked copies)
        # while the GPU runs this step's, before the optimizer step waits for the GPU
        run.ahead = run.windows.build(*window_after(win, run.per_epoch))
    run.boundary.update_starts()  # from here until the step is counted, no consistent state
    grad_norm, lr = run.stepper.update()
    step_loss = run.stepper.read_loss(step_loss)
    step_metrics = run.stepper.read_metrics()
    _count_step(run, win, n_labels, n_input, step_loss, step_metrics, lr)
    return grad_norm, lr


def _count_step(run: _Run, win: Window, n_labels: int, n_input: int, step_loss: float,
                step_metrics: dict, lr: float) -> None:
    """The finished step in the state (the next step's position), the result, the train log
    and the progress bar."""
    state = run.state
    state.global_step += 1
    state.epoch, state.batch_index = window_after(win, run.per_epoch)
    run.boundary.step_counted()
    state.tokens_seen += n_labels
    run.tokens_this_run += n_input
    loss_value = step_loss / max(n_labels, 1)
    run.result.step_losses[state.global_step] = loss_value
    run.train_log.add(loss_value, n_input, step_metrics)
    run.bar.update(loss_value, lr, n_input, bar_metrics(step_metrics))


def _after_step(run: _Run, stop: StopFlag, grad_norm, lr: float) -> str | None:
    """After a counted step: log, evaluate, checkpoint, as the options say. Why the run stops
    here ("early_stopping" or "interrupted", with a checkpoint), or None to go on."""
    cfg, state, step = run.cfg, run.state, run.state.global_step
    if step % cfg.logging_steps == 0 or step == run.total:
        run.metrics.write(run.train_log.record(step, _epochs(state, run.per_epoch), lr, grad_norm,
                                               run.device))
    stop_early = False
    if run.val_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0)
                             or step == run.total):
        run.evals.run(state)
        run.last_eval_step = step
        stop_early = early_stop.patience_spent(state, cfg.early_stopping_patience)
    if cfg.save_steps and step % cfg.save_steps == 0:
        run.saver.save(state, ckpt.rng_state())
    if stop_early:
        run.bar.write(early_stop.stop_message(state, cfg.early_stopping_patience))
        run.result.stopped = "early_stopping"
        return run.result.stopped
    if stop.at_boundary(step, run.total, run.stop_after_steps, run.env.enabled):
        _interrupted(run.result, run.saver.save(state, ckpt.rng_state()), stop.signum)
        return run.result.stopped
    return None


def _out_of_memory(run: _Run, err: torch.OutOfMemoryError) -> QloraError:
    """A checkpoint at the last step boundary, then the planner's advice, as a QloraError
    (exit code 2)."""
    from qlora.memory import out_of_memory_error

    # under torchrun the other ranks are elsewhere (in a collective this rank will not
    # join): no checkpoint, whose save is a collective; the newest one on disk is named
    save = None if run.env.enabled else (lambda rng: run.saver.save(run.state, rng))
    kept = keep_checkpoint(run.boundary, run.state, save, run.optimizer, run.device, run.out,
                           run.log)
    return out_of_memory_error(run.cfg, run.device, err, kept, run.dtype, run.env.world_size)


def _finish(run: _Run) -> TrainResult:
    """The end: a last evaluation and the adapter to keep (unless interrupted), the summary."""
    state, result = run.state, run.result
    result.global_step = state.global_step
    train_time = run.clock.run_s()
    if result.stopped == "interrupted":
        run.log(f"interrupted at step {state.global_step}: checkpoint {result.checkpoint}; "
                f"continue with --resume latest")
    else:
        _final_adapter(run)
    result.best_eval_loss, result.best_step = state.best_metric, state.best_step
    wall = state.elapsed_s if result.stopped == "interrupted" else run.clock.before + train_time
    result.summary = run_summary(run.cfg, run.env, state, result, run.total,
                                 _epochs(state, run.per_epoch), wall,
                                 run.tokens_this_run / max(train_time, 1e-9), run.device,
                                 run.optim_name, run.dtype)
    if run.env.is_main:
        write_summary(run.out, result.summary)
        plot_losses(run.out)
    dist_.barrier(run.env)
    return result


def _final_adapter(run: _Run) -> None:
    """A last evaluation (unless the last step had one), the best adapter loaded back where
    load_best_at_end asks, and the adapter saved."""
    cfg, state, main = run.cfg, run.state, run.env.is_main
    if run.val_examples and run.last_eval_step != state.global_step:
        run.evals.run(state)
    if cfg.load_best_at_end and state.best_step is not None and \
            state.best_step != state.global_step:
        early_stop.load_best(run.model, run.out, main)
        run.log(f"loaded the best adapter (step {state.best_step}, eval loss "
                f"{state.best_metric:.4f})")
    early_stop.save_final(run.model, run.out, run.base_model, main)


def _plan_line(cfg: RunConfig, env: DistEnv, n_train: int, n_rows: int, per_epoch: int,
               total: int, warmup: int, n_val: int) -> str:
    """The log's line of what the run will do: examples, rows, micro-batches, steps."""
    return (f"{n_train} train examples in {n_rows} rows, {per_epoch} micro-batches of "
            f"{cfg.micro_batch_size} per epoch, {cfg.gradient_accumulation_steps} per step"
            + (f" on each of {env.world_size} ranks" if env.enabled else "")
            + f": {total} optimizer steps "
            f"({warmup} warm-up), {n_val} validation examples")


def _interrupted(result: TrainResult, checkpoint: Path, signum: int | None) -> None:
    """The run stopped on a signal (or stop_after_steps), with a checkpoint to resume from."""
    result.checkpoint = checkpoint
    result.stopped, result.signal = "interrupted", signum


def _epochs(state: ckpt.TrainerState, per_epoch: int) -> float:
    """Epochs done, fractional: where the next step starts."""
    return round(state.epoch + state.batch_index / per_epoch, 4)


def _quiet(text: str) -> None:
    """The log of ranks other than 0."""
