"""Which device a command runs on, and the compute dtype that suits it."""

from __future__ import annotations

import re

import torch

from qlora.errors import QloraError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → the CUDA GPU when torch sees one, else the CPU; 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise QloraError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QloraError(f"device {name!r}: torch sees no CUDA GPU; use cpu or auto")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it (fp16 otherwise); fp32 on the CPU, which lacks fast 16-bit
    matmuls (and fp32 keeps CPU results exact for the tests)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
