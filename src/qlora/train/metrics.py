"""What a run reports: metrics.jsonl, optional TensorBoard, the loss-curve PNG, summary.json, the bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"

from qlora.files import staged_file


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
