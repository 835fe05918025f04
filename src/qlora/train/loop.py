"""The training loop: a plain loop over micro-batches, torchtune style.

    for each optimizer step:
        count the label tokens of the whole accumulation window      (before any forward pass)
        for each micro-batch: loss = model(...) / tokens; backward     (model returns a SUM)
        build the next step's micro-batches                  (host work while the GPU computes)
        clip, optimizer step, schedule step; read the step's loss      (the step's one GPU wait)
        log · evaluate (+ early stopping, best adapter) · checkpoint

Exact resume: the data order depends only on (seed, epoch) (qlora.data.packing), a checkpoint is
taken at a step boundary together with the RNG states of that moment, so the steps after a resume
see the same batches, the same dropout masks and the same optimizer state as an unbroken run.

`fit` is the recipe and reads as its steps: `_set_up` (the method's batch layout, the schedule, the
optimizer, a resume, the fast paths, the objects below, gathered in a `_Run`), then per step
`_one_step` (backward, the next window, the update, the loss read and counted) and `_after_step`
(log, evaluate, checkpoint, and why the run stops, if it does), then `_finish` (a last evaluation,
the adapter, the summary). Its parts live where they are named: train/step.py (a step's
micro-batches, graphed or eager, the gradient all-reduce of data parallel runs, the fp16 scaler,
the optimizer step), train/signals.py (Ctrl-C and SIGTERM), train/early_stop.py (early stopping
and the best adapter), train/out_of_memory.py (the checkpoint kept after an out-of-memory error),
and below: the windows of micro-batches, the checkpoints at step boundaries, the evaluations, the
train records, the summary.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.config import CONFIG_FILE_NAME, RunConfig, save_config, to_dict
from qlora.device import compute_dtype, pick_device
from qlora.errors import QloraError
from qlora.files import check_writable, remove_dir
from qlora.models.generic import GenericLM
from qlora.models.load import TOKENIZER_FILES
from qlora.speed import SpeedPlan, apply_speed
from qlora.train import checkpoint as ckpt
from qlora.train import distributed as dist_
from qlora.train import early_stop
from qlora.train.distributed import SINGLE, DistEnv
from qlora.train.metrics import (MetricsLog, Progress, gib, peak_memory_bytes, plot_losses,
                                 write_summary)
from qlora.train.optim import (build_optimizer, build_scheduler, resolve_optim, warmup_steps,
                               zero_grads)
from qlora.train.out_of_memory import Boundary, keep_checkpoint
from qlora.train.signals import StopFlag
from qlora.train.step import Stepper, pinned, share_window  # noqa: F401 -- pinned: benchmarks

from qlora.models.decoder import IGNORE_INDEX as IGNORE
BEST_ADAPTER = early_stop.BEST_ADAPTER


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    stopped: str  # "completed", "early_stopping" or "interrupted"
    step_losses: dict[int, float] = field(default_factory=dict)  # this process's steps
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_eval_loss: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None  # the checkpoint written on interrupt
    summary: dict[str, Any] = field(default_factory=dict)
    signal: int | None = None


# --- resolving what the machine can do -------------------------------------------------------
def resolve_device(cfg: RunConfig) -> torch.device:
    return pick_device(cfg.device)


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    return compute_dtype(device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


# --- the output directory --------------------------------------------------------------------
def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse a non-empty output_dir unless resuming or told to overwrite (a previous run only).

    Only checks: nothing is created or deleted until the model and data have loaded."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        if cfg.resume == "latest" and not ckpt.list_checkpoints(out):
            raise QloraError(f"--resume latest: no checkpoint in {ckpt.checkpoint_dir(out)}")
        check_writable(out, "output_dir")
        return out
    if out.exists() and not out.is_dir():
        raise QloraError(f"output_dir {out} exists and is not a directory")
    check_writable(out, "output_dir")  # before the model and data load, not after
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise QloraError(f"output_dir {out} is not empty; pass --resume latest to continue "
                             f"its run, --overwrite true to replace it, or another --output_dir")
        if not (out / CONFIG_FILE_NAME).exists():
            # never delete a directory that is not a run of ours (`--output_dir ~ --overwrite`)
            raise QloraError(f"output_dir {out} is not empty and holds no {CONFIG_FILE_NAME}, so "
                             f"it is not a qlora run; --overwrite only replaces a previous run")
    return out


def prepare_output_dir(cfg: RunConfig) -> Path:
    """check_output_dir, then empty it (overwrite) and create it."""
    out = check_output_dir(cfg)
    if not cfg.resume and out.is_dir() and cfg.overwrite:
        for child in out.iterdir():
            remove_dir(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_tokenizer_files(model_dir: str | Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, out / name)
            copied.append(name)
    return copied


# --- model and data --------------------------------------------------------------------------
def build_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype, part=None):
    """The quantized base with fresh adapters (their init draws from the seeded torch RNG).
    `part`: read only these rows of each tensor (models.load.RowPart; a sharded run's rank)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    quant = QuantConfig(method=cfg.quant, double_quant=cfg.double_quant, compute_dtype=dtype)
    model = load_model(cfg.model, quant, device=device, part=part)
    torch.manual_seed(cfg.seed)
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    attach_adapters(model, AdapterConfig(r=cfg.lora_r, alpha=alpha, dropout=cfg.lora_dropout,
                                         target_modules=targets, use_rslora=cfg.use_rslora,
                                         use_dora=cfg.use_dora))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.router_aux_loss is not None and getattr(model.spec, "moe", None) is not None:
        model.aux_loss = cfg.router_aux_loss  # else config.json's output_router_logits
    return model


def generic_path_lines(model: GenericLM, cfg: RunConfig) -> list[str]:
    """What the log says about a model on the generic path: that it is, and what it costs."""
    spec = model.spec
    lines = [f"{spec.model_type} ({spec.architecture}) runs on the generic path: transformers' "
             f"own modules, its {len(spec.linears)} linear layers quantized "
             f"({cfg.quant}), our adapters on them; the speed layer does not apply"]
    for option in ("keep_attention", "offload_activations", "tile_mlp"):
        if getattr(cfg, option):
            lines.append(f"generic path: {option} acts on the native families' decoder only; "
                         "ignored")
    return lines + [f"generic path: {note}" for note in model.notes]


def load_data(cfg: RunConfig, tokenizer, log: Callable[[str], None] = print
              ) -> tuple[list[dict], list[dict]]:
    """Tokenized (train, validation) examples, as the config says."""
    from qlora.data import prepare, split_validation
    from qlora.methods import method_module

    method = method_module(cfg.method)

    def one(path: str) -> list[dict]:
        if method is not None:
            return _preference_data(path, tokenizer, cfg, method.LAYOUT, log)
        examples, report = prepare(path, tokenizer, fmt=cfg.data_format, train_on=cfg.train_on,
                                   max_len=cfg.max_seq_length, overlong=cfg.long_examples,
                                   chat_template=cfg.chat_template)
        for line in report.lines():
            log(line)
        return examples

    train = one(cfg.data)
    val: list[dict] = []
    if cfg.val_data:
        val = one(cfg.val_data)
    elif cfg.val_set_size > 0:
        frac = cfg.val_set_size if cfg.val_set_size < 1 else cfg.val_set_size / len(train)
        if frac >= 1:
            raise QloraError(f"option `val_set_size`: {cfg.val_set_size:g} examples held out of "
                             f"{len(train)} leaves none to train on")
        train, val = split_validation(train, frac, seed=cfg.seed)
    return train, val


def _preference_data(path: str, tokenizer, cfg: RunConfig, layout: str,
                     log: Callable[[str], None]) -> list[dict]:
    from qlora.data.preference import load_preference

    examples, report = load_preference(path, tokenizer, layout=layout, max_len=cfg.max_seq_length,
                                       overlong=cfg.long_examples, chat_template=cfg.chat_template)
    for line in report.lines():
        log(line)
    return examples


def preference_options(cfg: RunConfig):
    """The preference methods' knobs (qlora.methods.preference) from the run's options."""
    from qlora.methods.preference import PreferenceOptions

    return PreferenceOptions(beta=cfg.beta, loss_type=cfg.loss_type,
                             label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                             cpo_alpha=cfg.cpo_alpha, desirable_weight=cfg.desirable_weight,
                             undesirable_weight=cfg.undesirable_weight)


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples: list[dict], *, max_len: int, batch_size: int, pad_id: int,
             device: torch.device, packing: bool = True, env: DistEnv = SINGLE
             ) -> dict[str, float]:
    """Mean token loss and perplexity of `examples` (sum of losses / number of label tokens),
    without gradients. Under torchrun each rank takes every W-th batch; the sums are all-reduced."""
    from qlora.eval import loss_sums, perplexity_of

    if dist_.is_sharded(model):  # every FSDP forward is a collective: ranks run in lockstep
        total, tokens = dist_.lockstep_loss_sums(model, examples, max_len, batch_size, pad_id,
                                                 packing, env)
    else:
        total, tokens = loss_sums(model, examples, max_len, batch_size, pad_id, packing=packing,
                                  shard=(env.rank, env.world_size))
    if env.enabled:
        total, tokens = dist_.all_reduce_sum(env, [total, tokens], device)
        tokens = int(tokens)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": perplexity_of(loss), "tokens": tokens}


def evaluate_preference(model, examples: list[dict], cfg: RunConfig, *, batch_size: int,
                        pad_id: int, device: torch.device, env: DistEnv = SINGLE,
                        packed: bool = False) -> dict[str, float]:
    """The method's mean loss and TRL's metrics (rewards/*, logps/*) on held-out preference
    examples (batches `packed` or padded), without gradients; under torchrun the sums are
    all-reduced."""
    from qlora.methods import method_module
    from qlora.methods.preference import evaluate as preference_eval
    from qlora.methods.preference import metric_means

    total, count, sums = preference_eval(method_module(cfg.method), model, examples,
                                         preference_options(cfg), batch_size, pad_id,
                                         shard=(env.rank, env.world_size), packed=packed)
    if env.enabled:
        names = sorted(sums)
        flat = [total, count] + [float(x) for n in names for x in sums[n]]
        flat = dist_.all_reduce_sum(env, flat, device)
        total, count = flat[0], int(flat[1])
        sums = {n: torch.tensor(flat[2 + 2 * i:4 + 2 * i]) for i, n in enumerate(names)}
    return {"loss": total / max(count, 1), "examples": count, **metric_means(sums)}


# --- the micro-batches of a step ----------------------------------------------------------------
@dataclass
class Window:
    """One optimizer step's micro-batches (this rank's share), built on the host. Building them
    uses no RNG and no GPU, so the loop builds the next step's window while the GPU runs this one."""
    epoch: int
    ids: list[int]  # the window's micro-batch indices in the epoch, over all ranks
    batches: list[dict]
    n_input: int  # this rank's input tokens, weighted
    n_labels: int  # this rank's label tokens, weighted: the normaliser before any all-reduce


def window_after(window: Window, per_epoch: int) -> tuple[int, int]:
    """(epoch, micro-batch index) at which the step after `window` starts."""
    following = window.ids[-1] + 1
    return (window.epoch + 1, 0) if following >= per_epoch else (window.epoch, following)


class WindowBuilder:
    """The windows of a run: `window` micro-batches (over all ranks) at a time, in each epoch's
    order; `prepare(batch)` readies each micro-batch for the device (pinning, CUDA-graph staging)."""

    def __init__(self, examples: list[dict], rows: list[list[int]], micro_batch_size: int,
                 pad_id: int, seed: int, window: int, env: DistEnv = SINGLE, lockstep: bool = False,
                 prepare: Callable[[dict], None] | None = None, collate=None):
        """`collate`: the batch layout of a preference method (data/preference.py), else SFT's."""
        from qlora.data import num_batches

        self.examples, self.rows, self.micro_batch_size = examples, rows, micro_batch_size
        self.pad_id, self.seed, self.window = pad_id, seed, window
        self.env, self.lockstep, self.prepare, self.collate = env, lockstep, prepare, collate
        self.per_epoch = num_batches(len(rows), micro_batch_size)
        self._order: tuple[int, list[int]] | None = None  # one shuffle per epoch, not per step

    def order(self, epoch: int) -> list[int]:
        from qlora.data import batch_order

        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, batch_order(len(self.rows), epoch, self.seed))
        return self._order[1]

    def build(self, epoch: int, start: int) -> Window:
        from qlora.data import micro_batch

        order = self.order(epoch)
        ids = list(range(start, min(start + self.window, self.per_epoch)))
        batches, n_input = [], 0
        # this rank's share; a rank left short (last window of an epoch) pads with weight-0
        # micro-batches, so that it joins every collective (distributed.py)
        for k, weight in dist_.micro_batches(ids, self.env, lockstep=self.lockstep):
            batch, n = micro_batch(self.examples, self.rows, order, k, self.micro_batch_size,
                                   self.pad_id, self.collate)
            batch["index"] = epoch * self.per_epoch + k
            batch["weight"] = weight
            if self.prepare is not None:
                self.prepare(batch)
            batches.append(batch)
            n_input += n * weight
        n_labels = sum(loss_normaliser(b) * b["weight"] for b in batches)
        return Window(epoch, ids, batches, n_input, n_labels)


def loss_normaliser(batch: dict) -> int:
    """What a window's summed loss is divided by: its label tokens (SFT; the model shifts labels
    by 1), or its examples (a preference method's loss is a mean over examples, as TRL's)."""
    if "n_examples" in batch:
        return batch["n_examples"]
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# --- the loop ----------------------------------------------------------------------------------
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
    clock: _Clock
    saver: _Checkpoints
    evals: _Evals
    train_log: _TrainLog
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
    packing, preference_packed = _batch_layout(model, cfg, device, method, log)
    rows = build_rows(train_examples, cfg.max_seq_length, packing=packing, seed=cfg.seed)
    per_epoch = num_batches(len(rows), cfg.micro_batch_size)
    window = cfg.gradient_accumulation_steps * env.world_size  # micro-batches per step, all ranks
    total = cfg.max_steps if cfg.max_steps > 0 else \
        math.ceil(cfg.num_train_epochs * math.ceil(per_epoch / window))
    warmup = warmup_steps(total, cfg.warmup_steps, cfg.warmup_ratio)
    sharded = dist_.is_sharded(model)  # FSDP2 (--sharding fsdp under torchrun): distributed.py
    optim_name, optimizer, scheduler = _optimizer(model, cfg, device, sharded, total, warmup, log)
    dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Embedding)),
                 torch.float32)
    scaler = _fp16_scaler(dtype, device)
    state = _start_state(out, cfg, model, optimizer, scheduler, scaler, log)
    if dist_.replicated(env, sharded):  # rank 0's adapters (after a resume: the checkpoint's)
        dist_.broadcast_trainables([p for g in optimizer.param_groups for p in g["params"]], env)
    dropout_seed, dropout_stride, graphed = _apply_speed(model, optimizer, scaler, cfg, env,
                                                         device, sharded, log)
    if cfg.precompute_ref_log_probs:  # through the fast path, once it is on
        _precompute_reference(model, train_examples + val_examples, cfg, pad_id,
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
                            collate=_preference_collate(preference_packed) if method else None)
    clock = _Clock(state.elapsed_s)
    saver = _Checkpoints(out, cfg, env, model, optimizer, scheduler, scaler, base_model, clock)
    evals = _Evals(model, val_examples, cfg, env, device, pad_id, out, base_model, metrics, bar,
                   result, preference_packed)
    return _Run(model=model, cfg=cfg, env=env, device=device, log=log, out=out,
                base_model=base_model, val_examples=val_examples,
                stop_after_steps=stop_after_steps, per_epoch=per_epoch, total=total,
                optim_name=optim_name, optimizer=optimizer, dtype=dtype, state=state,
                result=result, metrics=metrics, bar=bar, stepper=stepper, windows=windows,
                clock=clock, saver=saver, evals=evals, train_log=_TrainLog(),
                boundary=Boundary())


def _batch_layout(model, cfg: RunConfig, device: torch.device, method,
                  log: Callable[[str], None]) -> tuple[bool, bool]:
    """(SFT packs its rows?, a preference method packs its micro-batches?), said in the log."""
    from qlora.methods.preference import layout_line, packs_with_varlen

    # SFT packs examples into rows; a preference micro-batch is its examples' sequences, packed
    # into one row of their own (preference_packed) or padded
    packing = cfg.packing and model.packs_documents and method is None
    preference_packed = method is not None and cfg.packing and packs_with_varlen(model, device)
    if method is not None:
        log(layout_line(preference_packed, cfg.packing))
    if cfg.packing and not packing and method is None:
        log("packing off: this model would let packed documents see each other (no position ids "
            "in its forward, or layers that carry state along a row), so each row holds one "
            "example, padded")
    return packing, preference_packed


def _plan_line(cfg: RunConfig, env: DistEnv, n_train: int, n_rows: int, per_epoch: int,
               total: int, warmup: int, n_val: int) -> str:
    """The log's line of what the run will do: examples, rows, micro-batches, steps."""
    return (f"{n_train} train examples in {n_rows} rows, {per_epoch} micro-batches of "
            f"{cfg.micro_batch_size} per epoch, {cfg.gradient_accumulation_steps} per step"
            + (f" on each of {env.world_size} ranks" if env.enabled else "")
            + f": {total} optimizer steps "
            f"({warmup} warm-up), {n_val} validation examples")


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
    run.bar.update(loss_value, lr, n_input, _bar_metrics(step_metrics))


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
    result.summary = _summary(run.cfg, run.env, state, result, run.total,
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


def _precompute_reference(model, examples: list[dict], cfg: RunConfig, pad_id: int, packed: bool,
                          device: torch.device, log: Callable[[str], None]) -> None:
    """precompute_ref_log_probs: every pair's reference log-probs in one pass, before the
    adapters are trained (the reference is the base, adapters off, so any time gives the same)."""
    from qlora.methods.preference import precompute_reference

    start = time.perf_counter()
    precompute_reference(model, examples, cfg.eval_batch_size or cfg.micro_batch_size, pad_id,
                         packed)
    log(f"reference log-probs of {len(examples)} pairs precomputed in "
        f"{time.perf_counter() - start:.1f}s: no step runs the reference forward")


def _preference_collate(packed: bool):
    from functools import partial

    from qlora.data.preference import preference_batch

    return partial(preference_batch, packed=packed)


def _bar_metrics(sums: dict) -> dict[str, float]:
    """What the progress bar shows of a preference step: reward accuracy and margin."""
    from qlora.methods.preference import metric_means

    means = metric_means(sums) if sums else {}
    short = {"rewards/accuracies": "acc", "rewards/margins": "margin"}
    return {label: means[name] for name, label in short.items() if name in means}


def _apply_speed(model, optimizer, scaler, cfg: RunConfig, env: DistEnv, device: torch.device,
                 sharded: bool, log: Callable[[str], None]):
    """Every fast path the settings ask for: (dropout seed tensor, its stride, the CUDA-graph
    runner or None). A preference method's micro-batch is captured too (its body: the method's
    batch loss, train/graphs.py)."""
    from qlora.methods import method_module

    # every fast path the settings ask for, from one place (speed/), before any graph is
    # captured: the kernels go in it. Dropout masks are drawn from (seed, micro-batch index,
    # layer): the same on resume, and no global RNG inside the layers, which a graph needs
    plan = SpeedPlan.for_run(cfg, device, sharded=sharded,
                             generic=isinstance(model, GenericLM))
    if plan.generic:
        log("speed layer off: the model runs on the generic path (transformers' own modules), "
            "so no fused kernels, no 4-bit fast path, no CUDA graphs and no host embedding; "
            "the loss reads the whole logits: expect about the speed and memory of "
            "transformers + peft")
        return None, 0, None
    applied = apply_speed(model, plan, log)
    dropout_seed, dropout_stride = applied.dropout_seed, applied.dropout_stride
    for line in long_context_lines(plan, cfg, model):
        log(line)
    method = method_module(cfg.method)
    preference = (method, preference_options(cfg)) if method is not None else None
    graphed = _graphed_steps(model, optimizer, plan, env, sharded, device, scaler, log,
                             cfg.max_seq_length, preference=preference)
    return dropout_seed, dropout_stride, graphed


def long_context_lines(plan: SpeedPlan, cfg: RunConfig, model) -> list[str]:
    """What the log says of offload and MLP tiles where they are on: both run inside the CUDA
    graph of a step (their copies and tiles are captured with it; a capture that fails falls
    back to eager steps, said in the log)."""
    lines = []
    if plan.offload_activations:
        lines.append("offload_activations: each checkpointed layer's input waits in pinned host "
                     "memory until its backward (copied on a side stream, fetched one layer ahead); "
                     "kept attention stays on the GPU")
    if plan.tile_mlp:
        tokens = model.model.layers[0].mlp.sequence_tiling.tokens
        lines.append(f"tile_mlp: the MLP runs in sequence tiles of {tokens} tokens where a "
                     f"micro-batch has more (max_seq_length {cfg.max_seq_length})")
    return lines


def _optimizer(model, cfg: RunConfig, device: torch.device, sharded: bool, total: int,
               warmup: int, log: Callable[[str], None]):
    """(the optimizer's name, the optimizer, its lr schedule), with the model in training mode."""
    optim_name, note = resolve_optim(cfg.optim, device)
    if sharded:
        optim_name, note = dist_.sharded_optim(optim_name)
    if note:
        log(note)
    model.train()
    optimizer = build_optimizer(model, optim_name, cfg.learning_rate, cfg.weight_decay,
                                (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                flat=not sharded)  # sharded parameters cannot share one storage
    return optim_name, optimizer, build_scheduler(optimizer, cfg.lr_scheduler_type, warmup, total)


def _fp16_scaler(dtype: torch.dtype, device: torch.device):
    """The loss scaler of an fp16 run on CUDA (fp16 gradients underflow without scaling), else
    None."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" \
        else None


def _start_state(out: Path, cfg: RunConfig, model, optimizer, scheduler, scaler,
                 log: Callable[[str], None]) -> ckpt.TrainerState:
    """A fresh TrainerState, or with --resume the checkpoint's: weights, optimizer, schedule,
    loss scale and the RNG states of its step boundary restored."""
    state = ckpt.TrainerState()
    torch.manual_seed(cfg.seed)  # any other randomness; LoRA dropout is seeded per micro-batch
    if cfg.resume:
        path = ckpt.resolve_resume(out, cfg.resume)
        with dist_.full_trainables(model, load=True):  # sharded: whole tensors while loading
            state, rng = ckpt.load_checkpoint(path, model, dist_.optimizer_for_load(
                optimizer, model), scheduler)
        ckpt.set_rng_state(rng)  # after the manual_seed: the checkpoint's state wins
        if scaler is not None and state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        log(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
            f"micro-batch {state.batch_index})")
    return state


def _interrupted(result: TrainResult, checkpoint: Path, signum: int | None) -> None:
    """The run stopped on a signal (or stop_after_steps), with a checkpoint to resume from."""
    result.checkpoint = checkpoint
    result.stopped, result.signal = "interrupted", signum


def _epochs(state: ckpt.TrainerState, per_epoch: int) -> float:
    """Epochs done, fractional: where the next step starts."""
    return round(state.epoch + state.batch_index / per_epoch, 4)


class _Clock:
    """The run's training time: `before` is what the runs before a resume took."""

    def __init__(self, before: float):
        self.before, self.t0 = before, time.perf_counter()

    def run_s(self) -> float:
        return time.perf_counter() - self.t0

    def total_s(self) -> float:
        return self.before + self.run_s()


class _Checkpoints:
    """A checkpoint at a step boundary: every rank gathers (a collective), rank 0 writes, then
    the old ones are rotated out (the best one stays)."""

    def __init__(self, out: Path, cfg: RunConfig, env: DistEnv, model, optimizer, scheduler,
                 scaler, base_model: str, clock: _Clock):
        self.out, self.cfg, self.env, self.model = out, cfg, env, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.base_model, self.clock = base_model, clock

    def save(self, state: ckpt.TrainerState, rng: dict) -> Path:
        """`rng`: the generator states of the boundary the data position refers to."""
        out, env = self.out, self.env
        state.elapsed_s = self.clock.total_s()
        state.grad_scaler = self.scaler.state_dict() if self.scaler is not None else None
        if state.best_step is not None and state.best_step == state.global_step:
            state.best_checkpoint = f"{ckpt.PREFIX}{state.global_step:08d}"
        with dist_.full_trainables(self.model):  # sharded: whole tensors on every rank
            full_optimizer = dist_.full_optimizer(self.optimizer, self.model)
            if not env.is_main:  # rank 0 writes; the others wait until the checkpoint is whole
                dist_.barrier(env)
                return ckpt.checkpoint_dir(out) / f"{ckpt.PREFIX}{state.global_step:08d}"
            path = ckpt.save_checkpoint(out, self.model, full_optimizer, self.scheduler, state,
                                        rng, self.base_model)
        ckpt.rotate_checkpoints(out, self.cfg.save_total_limit, state.best_checkpoint)
        dist_.barrier(env)
        return path


class _Evals:
    """An evaluation on the validation set: its record (metrics.jsonl, the state's history, the
    result), the best-adapter and early-stopping count (train/early_stop.py), its line."""

    def __init__(self, model, examples: list[dict], cfg: RunConfig, env: DistEnv,
                 device: torch.device, pad_id: int, out: Path, base_model: str,
                 metrics: MetricsLog, bar: Progress, result: TrainResult,
                 preference_packed: bool = False):
        self.model, self.examples, self.cfg = model, examples, cfg
        self.preference_packed = preference_packed
        self.env, self.device = env, device
        self.pad_id, self.out, self.base_model = pad_id, out, base_model
        self.metrics, self.bar, self.result = metrics, bar, result

    def run(self, state: ckpt.TrainerState) -> dict[str, float]:
        cfg, main = self.cfg, self.env.is_main
        batch_size = cfg.eval_batch_size or cfg.micro_batch_size
        if cfg.method != "sft":
            ev = evaluate_preference(self.model, self.examples, cfg, batch_size=batch_size,
                                     pad_id=self.pad_id, device=self.device, env=self.env,
                                     packed=self.preference_packed)
            record = {"split": "eval", "step": state.global_step,
                      **{k: v for k, v in ev.items() if k != "examples"}}
        else:
            # `evaluate` looked up in this module when called: tests replace it
            ev = evaluate(self.model, self.examples, max_len=cfg.max_seq_length,
                          batch_size=batch_size, pad_id=self.pad_id, device=self.device,
                          packing=cfg.packing, env=self.env)
            record = {"split": "eval", "step": state.global_step, "loss": ev["loss"],
                      "perplexity": ev["perplexity"]}
        self.metrics.write(record)
        state.log_history.append(record)
        self.result.evals.append(record)
        improved = early_stop.note_eval(state, ev["loss"])
        if improved:
            early_stop.save_best(self.model, self.out, self.base_model, main)
        if main:
            shown = _eval_shown(ev)
            self.bar.write(f"step {state.global_step}: eval loss {ev['loss']:.4f} {shown}"
                           + (" (best)" if improved else f" (best {state.best_metric:.4f} at step "
                              f"{state.best_step})"))
        return ev


def _eval_shown(ev: dict) -> str:
    """The eval line's second number: perplexity (SFT), reward accuracy (pairs) or margin (KTO)."""
    if "perplexity" in ev:
        return f"ppl {ev['perplexity']:.3f}"
    if "rewards/accuracies" in ev:
        return f"reward accuracy {ev['rewards/accuracies']:.3f}"
    return f"reward margin {ev.get('rewards/margins', float('nan')):.4f}"


class _TrainLog:
    """The train records of metrics.jsonl: each averages the steps since the one before."""

    def __init__(self):
        self.losses: list[float] = []
        self.tokens, self.t0 = 0, time.perf_counter()
        self.metrics: dict = {}  # a preference method's metric sums since the last record

    def add(self, loss: float, n_input: int, metrics: dict | None = None) -> None:
        from qlora.methods.preference import add_metrics

        self.losses.append(loss)
        self.tokens += n_input
        add_metrics(self.metrics, metrics or {})

    def record(self, step: int, epochs: float, lr: float, grad_norm, device: torch.device
               ) -> dict[str, Any]:
        now = time.perf_counter()
        rec = {"split": "train", "step": step, "epoch": epochs,
               "loss": sum(self.losses) / len(self.losses),
               "lr": lr, "grad_norm": float(dist_.plain(grad_norm)),
               "tokens_per_s": self.tokens / max(now - self.t0, 1e-9),
               "memory_bytes": peak_memory_bytes(device)}
        if self.metrics:
            from qlora.methods.preference import metric_means

            rec.update(metric_means(self.metrics))
        self.losses, self.tokens, self.t0, self.metrics = [], 0, now, {}
        return rec


def _summary(cfg: RunConfig, env: DistEnv, state: ckpt.TrainerState, result: TrainResult,
             total: int, epochs: float, wall: float, tokens_per_s: float, device: torch.device,
             optim_name: str, dtype: torch.dtype) -> dict[str, Any]:
    """summary.json: how the run ended and what it reached."""
    last_eval = next((r for r in reversed(state.log_history) if r["split"] == "eval"), None)
    summary = {
        "stopped": result.stopped, "global_step": state.global_step, "total_steps": total,
        "epochs": epochs,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "label_tokens_seen": state.tokens_seen,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory": gib(peak_memory_bytes(device)),
        "final_eval_loss": last_eval["loss"] if last_eval else None,
        "final_eval_perplexity": last_eval.get("perplexity") if last_eval else None,
        "best_eval_loss": state.best_metric, "best_step": state.best_step,
        "adapter": "best" if (cfg.load_best_at_end and state.best_step is not None) else "last",
        "device": str(device), "optimizer": optim_name,
        "compute_dtype": str(dtype).removeprefix("torch."),
    }
    if env.enabled:
        summary["world_size"] = env.world_size  # tokens_per_s is over all ranks
    return summary


def _graphed_steps(model, optimizer, plan: SpeedPlan, env: DistEnv, sharded: bool,
                   device: torch.device, scaler, log: Callable[[str], None], max_seq_length: int,
                   preference=None):
    """The CUDA-graph runner of the micro-batches (train/graphs.py), or None with the reason logged.
    Data parallel runs replay graphs as one process does: their one collective, the gradient
    all-reduce, comes after the micro-batches (Stepper.update). `preference`: (a preference
    method, its options), whose batch loss the graphs then hold."""
    if not plan.cuda_graphs:
        return None
    from qlora.train.graphs import GraphedSteps, unsupported_reason

    reason = unsupported_reason(model, device, max_seq_length)
    if reason is None and sharded:
        reason = "--sharding fsdp (its gathers and reduce-scatters run inside forward and backward)"
    if reason is None and scaler is not None:
        reason = "fp16 loss scaling"
    if reason is not None:
        if device.type == "cuda":
            log(f"CUDA graphs off: {reason}")
        return None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
    if any(g is None for g in grads):
        log("CUDA graphs off: the optimizer's parameters are not flattened")
        return None
    log("CUDA graphs on: each micro-batch shape is captured once (the first steps of a new "
        "shape take longer)")
    # thread_local: under torchrun, NCCL's watchdog thread queries events while a graph is
    # captured; "global" would let that call fail the capture
    return GraphedSteps(model, grads, log=log, preference=preference,
                        capture_error_mode="thread_local" if env.enabled else "global")


def _quiet(text: str) -> None:
    """The log of ranks other than 0."""


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
    from qlora.adapters import trainable_summary
    from qlora.models import load_tokenizer
    from qlora.models.spec import is_native, read_config

    dtype = resolve_dtype(cfg, device)
    # the memory planner, before anything loads: refuses a run that will not fit, or --auto_fit
    from qlora.memory import check_run

    cfg, memory_facts = check_run(cfg, device, dtype, env.world_size, log)
    optim_name, _ = resolve_optim(cfg.optim, device)
    if dist_.check_sharding(cfg.sharding, env, cfg.use_dora):
        optim_name, _ = dist_.sharded_optim(optim_name)
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
    train_examples, val_examples = load_data(cfg, tokenizer, log)
    if host_first:
        dist_.barrier(env)
    sharded = dist_.check_sharding(cfg.sharding, env, cfg.use_dora)
    if sharded and not is_native(read_config(cfg.model)[0]):
        raise QloraError("`--sharding fsdp` shards the blocks of the native families (llama, "
                         "mistral, qwen2, qwen3); a model on the generic path trains with "
                         "--sharding ddp (each GPU holds the whole 4-bit base)")
    if sharded and read_config(cfg.model)[0].get("model_type") in ("mixtral", "qwen3_moe"):
        raise QloraError("`--sharding fsdp` does not shard a mixture of experts' 4-bit expert "
                         "stacks yet (they are buffers, which FSDP replicates); train it with "
                         "--sharding ddp, or on one GPU")
    # sharded: each rank reads (and quantizes) only the rows it keeps, in host memory;
    # fully_shard then moves one block at a time to the GPU and keeps this rank's shard of it, so
    # no GPU holds the whole base
    model = build_model(cfg, torch.device("cpu") if sharded else device, dtype,
                        part=dist_.row_part(env, device) if sharded else None)
    if isinstance(model, GenericLM):
        for line in generic_path_lines(model, cfg):
            log(line)
    log(trainable_summary(model))
    if sharded:
        dist_.shard_fsdp(model, dtype, device)
    # everything loaded (and every rank has checked the output dir): only now is it touched
    dist_.barrier(env)
    if env.is_main:
        out = prepare_output_dir(cfg)
        if cfg.resume:
            _report_config_changes(out, cfg, log)
        else:
            save_config(cfg, out / CONFIG_FILE_NAME, extra=resolved)
        copy_tokenizer_files(cfg.model, out)
    dist_.barrier(env)
    result = fit(model, tokenizer, train_examples, val_examples, cfg, device=device, log=log,
                 progress=progress, stop_after_steps=stop_after_steps, env=env)
    if cfg.resume and env.is_main:
        save_config(cfg, out / CONFIG_FILE_NAME, extra=resolved)
    return result


def _report_config_changes(out: Path, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Resuming with other options is allowed (more epochs, say) but said out loud."""
    import yaml

    path = out / CONFIG_FILE_NAME
    if not path.exists():
        return
    before = yaml.safe_load(path.read_text()) or {}
    now = to_dict(cfg)
    changed = [k for k in now if k not in ("resume", "overwrite") and before.get(k) != now[k]]
    if changed:
        log("resuming with changed options: " + ", ".join(
            f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed))
