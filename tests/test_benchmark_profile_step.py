"""benchmarks/profile_step.py's accounting: the GPU time it sums is the kernels' alone, never a
record_function range's (the optimizer's), whose device-side event spans the same kernels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "profile_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_work_leaves_out_the_optimizers_range():
    """On the CPU the range and the ops inside it are all CPU events, as on the GPU the range's
    device event and its kernels are all CUDA ones: the range is left out, the ops kept."""
    device_work = load_script().device_work
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("Optimizer.step#PagedAdamW8bit.step"):
            a = torch.randn(64, 64)
            (a @ a).sum()
    events = prof.key_averages()
    kept = {e.key for e in device_work(events, torch.autograd.DeviceType.CPU)}
    every = {e.key for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    assert "Optimizer.step#PagedAdamW8bit.step" in every - kept
    assert {"aten::randn", "aten::mm", "aten::sum"} <= kept
