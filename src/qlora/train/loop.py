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
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.adapters import seed_dropout, set_dropout_seed
from qlora.config import CONFIG_FILE_NAME, RunConfig, save_config, to_dict
from qlora.device import compute_dtype, pick_device
from qlora.errors import QloraError
from qlora.models.load import TOKENIZER_FILES
from qlora.train import checkpoint as ckpt
from qlora.train import distributed as dist_
from qlora.train.distributed import SINGLE, DistEnv
from qlora.train.metrics import (MetricsLog, Progress, gib, peak_memory_bytes, plot_losses,
                                 write_summary)
from qlora.train.optim import (build_optimizer, build_scheduler, resolve_optim, warmup_steps,
                               zero_grads)

IGNORE = -100
BEST_ADAPTER = "best_adapter"


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
        return out
    if out.exists() and not out.is_dir():
        raise QloraError(f"output_dir {out} exists and is not a directory")
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
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
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
def build_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    """The quantized base with fresh adapters (their init draws from the seeded torch RNG)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    quant = QuantConfig(method=cfg.quant, double_quant=cfg.double_quant, compute_dtype=dtype)
    model = load_model(cfg.model, quant, device=device)
    torch.manual_seed(cfg.seed)
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    attach_adapters(model, AdapterConfig(r=cfg.lora_r, alpha=alpha, dropout=cfg.lora_dropout,
                                         target_modules=targets, use_rslora=cfg.use_rslora,
                                         use_dora=cfg.use_dora))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.keep_attention = cfg.keep_attention or False
    return model


def load_data(cfg: RunConfig, tokenizer, log: Callable[[str], None] = print
              ) -> tuple[list[dict], list[dict]]:
    """Tokenized (train, validation) examples, as the config says."""
    from qlora.data import prepare, split_validation

    def one(path: str) -> list[dict]:
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


# --- signals -----------------------------------------------------------------------------------
class StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks between micro-batches; a second one kills."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked memory when it is bound for a CUDA device: `.to(device,
    non_blocking=True)` is then asynchronous, where a copy from ordinary memory waits for all the
    GPU's queued work first."""
    return t.pin_memory() if device.type == "cuda" else t


class WindowBuilder:
    """The windows of a run: `window` micro-batches (over all ranks) at a time, in each epoch's
    order; `prepare(batch)` readies each micro-batch for the device (pinning, CUDA-graph staging)."""

    def __init__(self, examples: list[dict], rows: list[list[int]], micro_batch_size: int,
                 pad_id: int, seed: int, window: int, env: DistEnv = SINGLE, lockstep: bool = False,
                 prepare: Callable[[dict], None] | None = None):
        from qlora.data import num_batches

        self.examples, self.rows, self.micro_batch_size = examples, rows, micro_batch_size
        self.pad_id, self.seed, self.window = pad_id, seed, window
        self.env, self.lockstep, self.prepare = env, lockstep, prepare
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
                                   self.pad_id)
            batch["index"] = epoch * self.per_epoch + k
            batch["weight"] = weight
            if self.prepare is not None:
                self.prepare(batch)
            batches.append(batch)
            n_input += n * weight
        # the normaliser: label tokens of the whole window (the model shifts labels by 1)
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) * b["weight"] for b in batches)
        return Window(epoch, ids, batches, n_input, n_labels)


# --- the loop ----------------------------------------------------------------------------------
def _adapter_weights_from(model, adapter_dir: Path) -> None:
    """Copy a saved adapter's tensors into the (already attached) adapters of `model`."""
    from safetensors.torch import load_file

    from qlora.adapters import ADAPTER_WEIGHTS, adapter_state_dict

    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    with torch.no_grad():
        for key, param in adapter_state_dict(model).items():
            param.copy_(saved[key].to(param.device, param.dtype))


def _save_adapter_into(model, out: Path, base_model: str) -> None:
    """The adapter files straight into `out` (save_adapter replaces a whole directory)."""
    from qlora.adapters import save_adapter

    tmp = out / ".adapter.tmp"
    save_adapter(model, tmp, base_model)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def fit(model, tokenizer, train_examples: list[dict], val_examples: list[dict], cfg: RunConfig,
        *, device: torch.device, log: Callable[[str], None] = print, progress: bool = True,
        base_model: str | None = None, stop_after_steps: int | None = None,
        env: DistEnv = SINGLE) -> TrainResult:
    """Train `model`'s adapters on `train_examples`; write everything into cfg.output_dir.

    `stop_after_steps` behaves like a Ctrl-C after that many steps (tests use it to cut a run).
    `env`: this process's place in a torchrun job (train/distributed.py); rank 0 alone writes.
    """
    from qlora.data import build_rows, num_batches

    out = Path(cfg.output_dir)
    main = env.is_main
    if not main:
        log = _quiet
    base_model = base_model or cfg.model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = build_rows(train_examples, cfg.max_seq_length, packing=cfg.packing, seed=cfg.seed)
    per_epoch = num_batches(len(rows), cfg.micro_batch_size)
    accum = cfg.gradient_accumulation_steps
    window = accum * env.world_size  # micro-batches per optimizer step, over all ranks
    steps_per_epoch = math.ceil(per_epoch / window)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup = warmup_steps(total, cfg.warmup_steps, cfg.warmup_ratio)

    optim_name, note = resolve_optim(cfg.optim, device)
    sharded = dist_.is_sharded(model)  # FSDP2 (--sharding fsdp under torchrun): distributed.py
    if sharded:
        optim_name, note = dist_.sharded_optim(optim_name)
    if note:
        log(note)
    model.train()
    optimizer = build_optimizer(model, optim_name, cfg.learning_rate, cfg.weight_decay,
                                (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                flat=not sharded)  # sharded parameters cannot share one storage
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler_type, warmup, total)
    compute_dtype = next((m.weight.dtype for m in model.modules()
                          if isinstance(m, torch.nn.Embedding)), torch.float32)
    scaler = (torch.amp.GradScaler("cuda") if compute_dtype == torch.float16
              and device.type == "cuda" else None)  # fp16 gradients underflow without scaling

    state = ckpt.TrainerState()
    torch.manual_seed(cfg.seed)  # any other randomness; LoRA dropout is seeded per micro-batch below
    if cfg.resume:
        path = ckpt.resolve_resume(out, cfg.resume)
        with dist_.full_trainables(model, load=True):  # sharded: whole tensors while loading
            state, rng = ckpt.load_checkpoint(path, model, dist_.optimizer_for_load(
                optimizer, model), scheduler)
        ckpt.set_rng_state(rng)
        if scaler is not None and state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        log(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
            f"micro-batch {state.batch_index})")
    # DDP over the adapters only; wrapped after a resume so every rank starts from the checkpoint
    ddp = dist_.wrap_ddp(model, env, device) if env.enabled and not sharded else None
    forward = ddp if ddp is not None else model
    # dropout masks drawn from (seed, micro-batch index, layer): the same on resume, and no
    # global RNG inside the layers, which a CUDA graph needs
    dropout_seed = torch.zeros((), dtype=torch.int64, device=device)
    dropout_stride = seed_dropout(model, dropout_seed)
    model.fused_kernels = cfg.fused_kernels  # before any graph is captured: the kernels go in it
    if cfg.fused_kernels and device.type == "cuda" and not sharded:
        # and the 4-bit bases through kernels/dequant.py: our Triton dequantize, the LoRA product
        # added by the base GEMM (FSDP shards the base bytes this path would read whole)
        from qlora.kernels import use_fast_path

        use_fast_path(model)
    if cfg.embedding_on_host and device.type == "cuda" and not env.enabled:  # one GPU (see config)
        try:
            freed = model.move_embedding_to_host()
        except QloraError as err:  # a speed-neutral memory saving: the run goes on without it
            log(f"input embedding left on the GPU: {err}")
            freed = 0
        if freed:
            log(f"input embedding in pinned host memory ({freed / 2**30:.2f} GiB of GPU memory "
                "freed; embedding_on_host: false keeps it on the GPU)")
    graphed = _graphed_steps(model, optimizer, cfg, env, device, scaler, log)
    if main:
        ckpt.clean_partial(out)
    metrics = MetricsLog(out, tensorboard=cfg.tensorboard, log=log,
                         keep_until_step=state.global_step if cfg.resume else None, enabled=main)
    log(f"{len(train_examples)} train examples in {len(rows)} rows, {per_epoch} micro-batches of "
        f"{cfg.micro_batch_size} per epoch, {accum} per step"
        + (f" on each of {env.world_size} ranks" if env.enabled else "")
        + f": {total} optimizer steps "
        f"({warmup} warm-up), {len(val_examples)} validation examples")
    eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
    result = TrainResult(output_dir=out, global_step=state.global_step, stopped="completed")

    def run_eval() -> dict[str, float]:
        ev = evaluate(model, val_examples, max_len=cfg.max_seq_length, batch_size=eval_bs,
                      pad_id=pad_id, device=device, packing=cfg.packing, env=env)
        record = {"split": "eval", "step": state.global_step, "loss": ev["loss"],
                  "perplexity": ev["perplexity"]}
        metrics.write(record)
        state.log_history.append(record)
        result.evals.append(record)
        improved = state.best_metric is None or ev["loss"] < state.best_metric
        if improved:
            state.best_metric, state.best_step = ev["loss"], state.global_step
            state.evals_without_improvement = 0
            from qlora.adapters import save_adapter

            with dist_.full_trainables(model):  # sharded: gathered on all ranks, rank 0 writes
                if main:
                    save_adapter(model, out / BEST_ADAPTER, base_model)
        else:
            state.evals_without_improvement += 1
        if main:
                bar.write(f"step {state.global_step}: eval loss {ev['loss']:.4f} ppl {ev['perplexity']:.3f}"
                      + (" (best)" if improved else f" (best {state.best_metric:.4f} at step "
                         f"{state.best_step})"))
        return ev

    def save(rng) -> Path:
        state.elapsed_s = elapsed_before + (time.perf_counter() - t_start)
        state.grad_scaler = scaler.state_dict() if scaler is not None else None
        if state.best_step is not None and state.best_step == state.global_step:
            state.best_checkpoint = f"{ckpt.PREFIX}{state.global_step:08d}"
        with dist_.full_trainables(model):  # sharded: whole tensors on every rank (collective)
            full_optimizer = dist_.full_optimizer(optimizer, model)
            if not main:  # rank 0 writes; the others wait until the checkpoint is whole
                dist_.barrier(env)
                return ckpt.checkpoint_dir(out) / f"{ckpt.PREFIX}{state.global_step:08d}"
            path = ckpt.save_checkpoint(out, model, full_optimizer, scheduler, state, rng,
                                        base_model)
        ckpt.rotate_checkpoints(out, cfg.save_total_limit, state.best_checkpoint)
        dist_.barrier(env)
        return path

    bar = Progress(total, state.global_step, device, enabled=progress and main)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def prepare(batch: dict) -> None:  # host work, done for a step while the GPU runs the one before
        if graphed is not None:
            batch["staged"] = graphed.stage(batch["input_ids"], batch["position_ids"],
                                            batch["labels"])
        else:
            batch["input_ids"] = pinned(batch["input_ids"], device)

    windows = WindowBuilder(train_examples, rows, cfg.micro_batch_size, pad_id, cfg.seed, window,
                            env, lockstep=sharded, prepare=prepare)
    ahead: Window | None = None  # the next step's micro-batches, built during this step
    elapsed_before, t_start = state.elapsed_s, time.perf_counter()
    tokens_this_run, window_tokens_logged, window_losses = 0, 0, []
    last_eval_step = -1
    t_log = time.perf_counter()
    boundary_rng, in_update = None, False  # for a checkpoint after an out-of-memory error
    try:
        with StopFlag() as stop:
            while state.global_step < total:
                rng_at_start = ckpt.rng_state()
                boundary_rng = rng_at_start
                here = (state.epoch, state.batch_index)
                win = ahead if ahead is not None and (ahead.epoch, ahead.ids[0]) == here \
                    else windows.build(*here)
                ahead = None
                batches, n_input, n_labels = win.batches, win.n_input, win.n_labels
                step_loss = torch.zeros((), dtype=torch.float32, device=device)
                interrupted = False
                if env.enabled:
                    # one all-reduce: the window's label and input tokens, and whether any rank
                    # was signalled (ranks stop together, at a step boundary, or they would hang)
                    n_labels, n_input, stops = dist_.all_reduce_sum(
                        env, [n_labels, n_input, float(stop.signum is not None)], device)
                    n_labels, n_input = int(n_labels), int(n_input)
                    if stops:
                        stop.signum = stop.signum or signal.SIGTERM
                        interrupted = True
                        batches = []
                for j, b in enumerate(batches):
                    if stop.signum is not None and not env.enabled:
                        interrupted = True
                        break
                    set_dropout_seed(dropout_seed, cfg.seed, b["index"], dropout_stride)
                    if graphed is not None:
                        step_loss += graphed.run(b["staged"], 1.0 / max(n_labels, 1))
                        continue
                    with dist_.sync_context(ddp, last=j == len(batches) - 1):
                        # positions and labels stay on the CPU: the model reads the document
                        # layout and label positions there, without waiting for the GPU; input_ids
                        # are pinned on CUDA (prepare), so their copy does not wait either
                        ids = b["input_ids"].to(device, non_blocking=device.type == "cuda")
                        loss_sum = forward(ids, b["position_ids"], b["labels"])
                        step_loss += loss_sum.detach() * b["weight"]  # read once per step
                        loss = loss_sum / max(n_labels, 1)
                        if env.enabled:  # DDP/FSDP average over ranks: W / N makes it a sum / N
                            loss = loss * (env.world_size * b["weight"])
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                if interrupted:
                    # the unfinished step is dropped: weights and optimizer are still those of
                    # the step boundary, and so are the RNG states saved with them
                    zero_grads(optimizer)
                    result.checkpoint = save(rng_at_start)
                    result.stopped, result.signal = "interrupted", stop.signum
                    break
                if state.global_step + 1 < total:
                    # the next step's micro-batches (padding, document offsets, page-locked copies)
                    # while the GPU runs this step's, before the optimizer step waits for the GPU
                    ahead = windows.build(*window_after(win, per_epoch))
                in_update = True  # from here until the step is counted, no consistent state
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                             if cfg.max_grad_norm > 0 else
                             torch.nn.utils.clip_grad_norm_(params, float("inf")))
                lr = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                zero_grads(optimizer)
                # read after the optimizer step is queued, not before: a read waits for the GPU,
                # and before it, clipping and the update would queue only once the GPU was idle.
                # bitsandbytes' step() has waited for the GPU already, so this read costs nothing
                step_loss = float(step_loss)
                if env.enabled:
                    step_loss = dist_.all_reduce_sum(env, [step_loss], device)[0]

                state.global_step += 1
                state.epoch, state.batch_index = window_after(win, per_epoch)
                in_update, boundary_rng = False, None  # None: the RNG state now is the boundary's
                state.tokens_seen += n_labels
                tokens_this_run += n_input
                window_tokens_logged += n_input
                loss_value = step_loss / max(n_labels, 1)
                result.step_losses[state.global_step] = loss_value
                window_losses.append(loss_value)
                bar.update(loss_value, lr, n_input)

                step = state.global_step
                if step % cfg.logging_steps == 0 or step == total:
                    now = time.perf_counter()
                    metrics.write({"split": "train", "step": step,
                                   "epoch": round(state.epoch + state.batch_index / per_epoch, 4),
                                   "loss": sum(window_losses) / len(window_losses),
                                   "lr": lr, "grad_norm": float(dist_.plain(grad_norm)),
                                   "tokens_per_s": window_tokens_logged / max(now - t_log, 1e-9),
                                   "memory_bytes": peak_memory_bytes(device)})
                    window_losses, window_tokens_logged, t_log = [], 0, now
                stop_early = False
                if val_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0)
                                     or step == total):
                    run_eval()
                    last_eval_step = step
                    patience = cfg.early_stopping_patience
                    stop_early = patience > 0 and state.evals_without_improvement >= patience
                if cfg.save_steps and step % cfg.save_steps == 0:
                    save(ckpt.rng_state())
                if stop_early:
                    bar.write(f"early stopping: no eval improvement in {cfg.early_stopping_patience}"
                              f" evaluations (best {state.best_metric:.4f} at step "
                              f"{state.best_step})")
                    result.stopped = "early_stopping"
                    break
                cut = stop_after_steps is not None and step >= stop_after_steps and step < total
                if cut:
                    stop.signum = signal.SIGINT  # as if Ctrl-C came now
                # under torchrun a signal is acted on at the next step's all-reduce, by all ranks
                if stop.signum is not None and (cut or not env.enabled):
                    result.checkpoint = save(ckpt.rng_state())
                    result.stopped, result.signal = "interrupted", stop.signum
                    break
    except torch.OutOfMemoryError as err:
        # Keep a checkpoint at the last step boundary (unless the optimizer was mid-update), then
        # the planner's advice, as a QloraError (exit code 2).
        from qlora.memory import out_of_memory_error

        zero_grads(optimizer)
        kept = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not in_update and state.global_step > 0:
            try:
                kept = save(boundary_rng if boundary_rng is not None else ckpt.rng_state())
            except Exception as save_err:  # noqa: BLE001 -- e.g. out of memory again
                log(f"could not save a checkpoint after running out of memory: {save_err}")
        kept = kept or next(iter(reversed(ckpt.list_checkpoints(out))), None)
        raise out_of_memory_error(cfg, device, err, kept, compute_dtype, env.world_size) from None
    finally:
        bar.close()
        metrics.close()

    result.global_step = state.global_step
    train_time = time.perf_counter() - t_start
    if result.stopped == "interrupted":
        log(f"interrupted at step {state.global_step}: checkpoint {result.checkpoint}; "
            f"continue with --resume latest")
    else:
        if val_examples and last_eval_step != state.global_step:
            run_eval()
        if cfg.load_best_at_end and state.best_step is not None and \
                state.best_step != state.global_step:
            with dist_.full_trainables(model, load=True):  # sharded: rank 0's copy is sharded
                if main:
                    _adapter_weights_from(model, out / BEST_ADAPTER)
            log(f"loaded the best adapter (step {state.best_step}, eval loss "
                f"{state.best_metric:.4f})")
        with dist_.full_trainables(model):
            if main:
                _save_adapter_into(model, out, base_model)
    result.best_eval_loss, result.best_step = state.best_metric, state.best_step
    last_eval = next((r for r in reversed(state.log_history) if r["split"] == "eval"), None)
    wall = state.elapsed_s if result.stopped == "interrupted" else elapsed_before + train_time
    result.summary = {
        "stopped": result.stopped, "global_step": state.global_step, "total_steps": total,
        "epochs": round(state.epoch + state.batch_index / per_epoch, 4),
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens_this_run / max(train_time, 1e-9), 1),
        "label_tokens_seen": state.tokens_seen,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory": gib(peak_memory_bytes(device)),
        "final_eval_loss": last_eval["loss"] if last_eval else None,
        "final_eval_perplexity": last_eval["perplexity"] if last_eval else None,
        "best_eval_loss": state.best_metric, "best_step": state.best_step,
        "adapter": "best" if (cfg.load_best_at_end and state.best_step is not None) else "last",
        "device": str(device), "optimizer": optim_name,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
    }
    if env.enabled:
        result.summary["world_size"] = env.world_size  # tokens_per_s is over all ranks
    if main:
        write_summary(out, result.summary)
        plot_losses(out)
    dist_.barrier(env)
    return result


def _graphed_steps(model, optimizer, cfg: RunConfig, env: DistEnv, device: torch.device, scaler,
                   log: Callable[[str], None]):
    """The CUDA-graph runner of the micro-batches (train/graphs.py), or None with the reason logged."""
    if not cfg.cuda_graphs:
        return None
    from qlora.train.graphs import GraphedSteps, unsupported_reason

    reason = unsupported_reason(model, device, cfg.max_seq_length)
    if reason is None and env.enabled:
        reason = "several processes (DDP's gradient hooks run outside a graph)"
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
    return GraphedSteps(model, grads, log=log)


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
    check_output_dir(cfg)
    device = resolve_device(cfg)
    joined = env.enabled and not torch.distributed.is_initialized()
    if env.enabled:
        device = dist_.init(env, device.type)
        if not env.is_main:
            log = _quiet
    try:
        return _train(cfg, env, device, log, progress, stop_after_steps)
    finally:
        if joined:
            dist_.shutdown(env)


def _train(cfg: RunConfig, env: DistEnv, device: torch.device, log: Callable[[str], None],
           progress: bool, stop_after_steps: int | None) -> TrainResult:
    from qlora.adapters import trainable_summary
    from qlora.models import load_tokenizer

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
    if not env.is_main:  # rank 0 tokenizes and fills the data cache; the others then read it
        dist_.barrier(env)
    train_examples, val_examples = load_data(cfg, tokenizer, log)
    if env.is_main:
        dist_.barrier(env)
    sharded = dist_.check_sharding(cfg.sharding, env, cfg.use_dora)
    # sharded: loaded (and quantized) in host memory; fully_shard then moves one block at a time
    # to the GPU and keeps this rank's shard of it, so no GPU holds the whole base
    model = build_model(cfg, torch.device("cpu") if sharded else device, dtype)
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
