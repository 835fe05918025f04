"""Training: the loop, the optimizer and schedule, checkpoints, and what a run reports."""

from qlora.train.loop import TrainResult, evaluate, fit, train

__all__ = ["TrainResult", "evaluate", "fit", "train"]
