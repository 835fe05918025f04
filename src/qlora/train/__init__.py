"""Training: the loop, the optimizer and schedule, checkpoints, and what a run reports."""

from qlora.train.evaluation import evaluate
from qlora.train.loop import fit, train
from qlora.train.metrics import TrainResult

__all__ = ["TrainResult", "evaluate", "fit", "train"]
