"""Evaluation on the validation set: the mean token loss and perplexity (SFT) or a preference
method's loss and metrics, without gradients and summed over the ranks; and `Evals`, a run's
evaluation with its record, the best adapter and early-stopping count, and its log line."""

from __future__ import annotations

from pathlib import Path

import torch

from qlora.config import RunConfig
from qlora.train import checkpoint as ckpt
from qlora.train import distributed as dist_
from qlora.train import early_stop
from qlora.train.distributed import SINGLE, DistEnv
from qlora.train.method import preference_options
from qlora.train.metrics import MetricsLog, Progress, TrainResult


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
    sums = dist_.metric_sums_on_host(env, sums, device)
    if env.enabled:
        total, count = dist_.all_reduce_sum(env, [total, count], device)
        count = int(count)
    return {"loss": total / max(count, 1), "examples": count, **metric_means(sums)}


class Evals:
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
