"""What a run reports: metrics.jsonl (its train records averaged by TrainLog), optional TensorBoard,
the loss-curve PNG, summary.json, the bar, and the TrainResult that train() returns."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.config import RunConfig
from qlora.files import staged_file
from qlora.train import distributed as dist_
from qlora.train.checkpoint import TrainerState
from qlora.train.distributed import DistEnv

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"



class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (and TensorBoard scalars when asked)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False,
                 log: Callable[[str], None] = print, keep_until_step: int | None = None,
                 enabled: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.tb = None
        self.enabled = enabled  # False on ranks other than 0 of a distributed run: writes nothing
        if not enabled:
            return
        if keep_until_step is not None and self.path.exists():
            # resuming: records written after the checkpoint we resume from will be written again
            kept = [ln for ln, rec in _records(self.path.read_text())
                    if rec.get("step", 0) <= keep_until_step]
            with staged_file(self.path) as tmp:  # a kill now leaves the old file, not half
                tmp.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log("tensorboard is not installed (pip install tensorboard): "
                    "metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [rec for _, rec in _records(path.read_text())]


def _records(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of metrics.jsonl; a torn last line (the process was killed while writing
    it) is dropped, not fatal."""
    out = []
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((ln, rec))
    return out


def plot_losses(out_dir: str | Path) -> Path | None:
    """Train loss (per logged step) and eval loss against the optimizer step, as a PNG; a
    preference run adds a panel of its reward accuracy and margin, train and eval."""
    records = read_metrics(out_dir)
    if not _curve(records, "train", "loss") and not _curve(records, "eval", "loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig = loss_figure(records)
    path = Path(out_dir) / PLOT_FILE
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _curve(records: list[dict], split: str, name: str) -> list[tuple[int, float]]:
    return [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]


def loss_figure(records: list[dict]):
    """The figure plot_losses saves (matplotlib's Agg backend already chosen)."""
    import matplotlib.pyplot as plt

    preference = any("rewards/margins" in r for r in records)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4),
                             dpi=100, squeeze=False)
    ax = axes[0][0]
    for split, style in (("train", "-"), ("eval", "o-")):
        points = _curve(records, split, "loss")
        if points:
            ax.plot(*zip(*points), style, label=f"{split} loss", lw=1.2 if split == "train" else 1.5)
    ax.set_xlabel("optimizer step")
    # a preference loss is a mean over examples (pairs), SFT's over tokens
    ax.set_ylabel("loss (per example)" if preference else "loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        _reward_panel(axes[0][1], records)
    fig.tight_layout()
    return fig


def _reward_panel(ax, records: list[dict]) -> None:
    """Reward accuracy (left axis) and margin (right axis) of the train and eval records."""
    margin_ax = ax.twinx()
    for split, style in (("train", "-"), ("eval", "o-")):
        accuracy = _curve(records, split, "rewards/accuracies")
        margin = _curve(records, split, "rewards/margins")
        if accuracy:
            ax.plot(*zip(*accuracy), style, color="tab:blue", label=f"{split} reward accuracy")
        if margin:
            margin_ax.plot(*zip(*margin), style, color="tab:orange",
                           label=f"{split} reward margin")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward accuracy")
    ax.set_ylim(-0.02, 1.02)
    margin_ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    lines = ax.get_lines() + margin_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
    except (ImportError, OSError):
        return 0


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.0f}MiB"


class Progress:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and memory (ETA from tqdm).

    tokens/s is the rate over the last RECENT_STEPS steps, not the mean since the start: the first
    steps carry graph capture and compilation, which a mean would drag along to the end of the
    run. The memory shown is the peak that summary.json records (peak_memory_bytes)."""

    RECENT_STEPS = 10

    def __init__(self, total: int, initial: int, device: torch.device, enabled: bool = True):
        from collections import deque

        from tqdm.auto import tqdm

        self.device = device
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                        dynamic_ncols=True, disable=not enabled, file=sys.stderr)
        self.tokens = 0
        # (time, tokens so far) at the start and after each of the last RECENT_STEPS steps
        self.points = deque([(time.perf_counter(), 0)], maxlen=self.RECENT_STEPS + 1)

    def update(self, loss: float, lr: float, tokens: int, extra: dict[str, float] | None = None,
               now: float | None = None) -> None:
        """`extra`: more values to show after the loss (a preference run's reward accuracy)."""
        self.tokens += tokens
        self.points.append((time.perf_counter() if now is None else now, self.tokens))
        shown = "".join(f" {name}={value:.3f}" for name, value in (extra or {}).items())
        self.bar.set_postfix_str(
            f"loss={loss:.4f}{shown} lr={lr:.2e} tok/s={self.recent_rate():,.0f} "
            f"peak={gib(peak_memory_bytes(self.device))}", refresh=False)
        self.bar.update(1)

    def recent_rate(self) -> float:
        """Tokens per second over the steps the window holds."""
        (t_first, n_first), (t_last, n_last) = self.points[0], self.points[-1]
        return (n_last - n_first) / max(t_last - t_first, 1e-9)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


@dataclass
class TrainResult:
    """What `train` and `fit` return: how the run ended, its losses and evaluations, summary.json."""
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


class Clock:
    """The run's training time: `before` is what the runs before a resume took."""

    def __init__(self, before: float):
        self.before, self.t0 = before, time.perf_counter()

    def run_s(self) -> float:
        return time.perf_counter() - self.t0

    def total_s(self) -> float:
        return self.before + self.run_s()


class TrainLog:
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


def run_summary(cfg: RunConfig, env: DistEnv, state: TrainerState, result: TrainResult,
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
