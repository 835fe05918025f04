"""One optimizer step's compute, as the training loop (train/loop.py) runs it:

    backward(window)   each micro-batch's forward and backward, through the CUDA graph when one
                       was captured (train/graphs.py), else eagerly (through the fp16 loss scaler
                       when there is one); no communication between ranks in here
    update()           data parallel: the gradients summed over the ranks (one all-reduce of the
                       flat buffers); then unscale, clip, optimizer step, schedule step, zeroed
                       gradients
    read_loss(loss)    the step's summed loss as a float: the step's one wait for the GPU
    read_metrics()     a preference step's metric sums, copied to the host together

and, under torchrun, `share_window`: the one all-reduce at the start of a step.
"""

from __future__ import annotations

import signal
from typing import Callable

import torch

from qlora.adapters import set_dropout_seed
from qlora.config import RunConfig
from qlora.methods.preference import add_metrics, batch_loss
from qlora.train import distributed as dist_
from qlora.train.distributed import DistEnv
from qlora.train.optim import zero_grads


def share_window(env: DistEnv, device: torch.device, n_labels: int, n_input: int, stop
                 ) -> tuple[int, int, bool]:
    """(label tokens, input tokens, stop?) of the window over all ranks, in one all-reduce.

    The label tokens of all ranks are the loss's normaliser. The stop flag travels with them
    because ranks must stop together, at a step boundary, or the others would hang in the next
    collective; a rank that was not signalled itself stops as if it had had a SIGTERM."""
    n_labels, n_input, stops = dist_.all_reduce_sum(
        env, [n_labels, n_input, float(stop.signum is not None)], device)
    if stops:
        stop.signum = stop.signum or signal.SIGTERM
    return int(n_labels), int(n_input), bool(stops)


class Stepper:
    """The forward/backward of a window's micro-batches and the optimizer step after them.

    `graphed`: the CUDA-graph runner (train/graphs.py; a preference method's body where
    `method` is one) or None for eager stepping. `sharded`: the
    model is FSDP2's (train/distributed.py), which reduce-scatters and averages gradients inside
    each backward; otherwise, under torchrun, `update` sums the flat gradient buffers itself."""

    def __init__(self, model, optimizer, scheduler, scaler, graphed, cfg: RunConfig,
                 env: DistEnv, device: torch.device, dropout_seed, dropout_stride: int,
                 method=None, sharded: bool = False):
        """`method`: (a preference method's module, its PreferenceOptions), or None for SFT."""
        self.model, self.method = model, method
        self.metrics: dict = {}  # the step's preference metric sums (methods/preference.py)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.graphed, self.env, self.device = graphed, env, device
        self.replicated = dist_.replicated(env, sharded)
        # FSDP averages over the ranks what the ranks back up: W / N makes its mean a sum / N
        self.rank_factor = env.world_size if sharded else 1
        self.seed, self.max_grad_norm = cfg.seed, cfg.max_grad_norm
        self.dropout_seed, self.dropout_stride = dropout_seed, dropout_stride
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def prepare(self, batch: dict) -> None:
        """Host work on a micro-batch, done for a step while the GPU runs the one before."""
        if self.graphed is not None and self.method is not None:
            batch["staged"] = self.graphed.stage_preference(batch)
        elif self.graphed is not None:
            batch["staged"] = self.graphed.stage(batch["input_ids"], batch["position_ids"],
                                                 batch["labels"], batch["real_lengths"])
        else:
            batch["input_ids"] = pinned(batch["input_ids"], self.device)
            batch["real_lengths"] = pinned(batch["real_lengths"], self.device)

    def backward(self, batches: list[dict], n_labels: int, stop_now: Callable[[], bool]
                 ) -> torch.Tensor | None:
        """Gradients of the window's loss (sum over its label tokens / `n_labels`); returns the
        summed loss on the device (not read here, which would wait for the GPU), or None when
        `stop_now()` said to stop before a micro-batch."""
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for b in batches:
            if stop_now():
                return None
            # the micro-batch's dropout masks: a function of its place in the data order alone
            # (no seed on the generic path: its dropout draws from the global RNG)
            if self.dropout_seed is not None:
                set_dropout_seed(self.dropout_seed, self.seed, b["index"], self.dropout_stride)
            # the one-process scale 1 / N (N: label tokens of the global window); a weight-0
            # micro-batch (a short rank's padding) adds nothing
            scale = b["weight"] / max(n_labels, 1)
            if self.graphed is not None:
                step_loss += self.graphed.run(b["staged"], scale) * b["weight"]
                if self.method is not None:  # overwritten by the next replay: added up here
                    self._add_metrics(self.graphed.metrics, b["weight"])
            else:
                self._eager(b, scale, step_loss)
        return step_loss

    def _eager(self, b: dict, scale: float, step_loss: torch.Tensor) -> None:
        device = self.device
        # positions and labels stay on the CPU: the model reads the document layout and label
        # positions there, without waiting for the GPU; input_ids are pinned on CUDA (prepare),
        # so their copy does not wait either
        if self.method is not None:
            loss_sum = self._preference(b)
        else:
            ids = b["input_ids"].to(device, non_blocking=device.type == "cuda")
            # real_lengths: what a mixture of experts' router loss counts (make_batch's padding not)
            loss_sum = self.model(ids, b["position_ids"], b["labels"],
                                  real_lengths=b["real_lengths"])
        step_loss += loss_sum.detach() * b["weight"]  # read once per step
        loss = loss_sum * (scale * self.rank_factor)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _preference(self, b: dict) -> torch.Tensor:
        """A preference micro-batch's summed loss; its metrics are added to the step's."""
        method, opts = self.method
        loss_sum, metrics = batch_loss(method, self.model, b, opts)
        self._add_metrics(metrics, b["weight"])
        return loss_sum

    def _add_metrics(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        """A micro-batch's metric sums, weighed as its loss is, into the step's."""
        add_metrics(self.metrics, {k: v * weight for k, v in metrics.items()})

    def read_metrics(self) -> dict[str, torch.Tensor]:
        """The step's preference metric sums over all ranks, on the host (empty for SFT), then
        reset: one copy from the device, after read_loss has waited for the GPU; the bar and the
        train log then read them without a wait each."""
        metrics, self.metrics = self.metrics, {}
        return dist_.metric_sums_on_host(self.env, metrics, self.device)

    def update(self) -> tuple[torch.Tensor, float]:
        """Sum the gradients over the ranks (data parallel), clip, step the optimizer and the
        schedule: (gradient norm before clipping, the lr the step used). The norm stays a tensor;
        reading it would wait for the GPU."""
        optimizer, scaler = self.optimizer, self.scaler
        if self.replicated:  # the step's one gradient exchange; every rank then steps alike
            dist_.all_reduce_grads([p.grad for p in self.params], self.env)
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        # no clipping still computes the norm, for the log
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        zero_grads(optimizer)
        return grad_norm, lr

    def read_loss(self, step_loss: torch.Tensor) -> float:
        """The window's summed loss over all ranks. Read after the optimizer step is queued, not
        before: a read waits for the GPU, and before it, clipping and the update would queue only
        once the GPU was idle. bitsandbytes' step() has waited for the GPU already, so this read
        costs nothing."""
        loss = float(step_loss)
        if self.env.enabled:
            loss = dist_.all_reduce_sum(self.env, [loss], self.device)[0]
        return loss


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked memory when it is bound for a CUDA device: `.to(device,
    non_blocking=True)` is then asynchronous, where a copy from ordinary memory waits for all the
    GPU's queued work first."""
    return t.pin_memory() if device.type == "cuda" else t
