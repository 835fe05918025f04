"""Fast paths for the training step, each beside the plain reference it must equal.

These are functions and autograd functions over tensors; speed/ decides where the model uses
them (qlora.speed.apply_speed).
"""
