"""Probe: the LoRA-dropout ∂A kernel's row chunks (kernels/lora_dropout.py MAX_CHUNKS: 8 gives
128 programs at K = 4096) timed in the Llama-3-8B graph step at 2048 tokens, as qlora train runs
it. Sixth session, H100: 8, 16 and 32 chunks within the run's noise (180.1, 180.1, 180.3 ms).

    python benchmarks/grad_chunks_probe.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main():
    from profile_step import build
    from qlora.kernels import lora_dropout as L

    args = argparse.Namespace(shape="llama-3-8b", seq=2048, checkpointing=True, fast=True, group=True,
                              ours=True, graphs=True, fused=True, keep_attention=True, steps=1, out=".")
    model, step = build(args)
    model.move_embedding_to_host()
    ids = torch.randint(4, 1024, (1, 2048), device="cuda")
    for chunks in (8, 16, 32, 8):
        L.MAX_CHUNKS = chunks
        _, step = build_step(model)
        for _ in range(3):
            step(ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            step(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"grad-chunks: MAX_CHUNKS {chunks}: "
              f"{1e3 * times[len(times) // 2]:.2f} ms/step median, {1e3 * times[0]:.2f} min", flush=True)


def build_step(model):
    """A fresh QloraStep (new graphs: the kernels' launch shapes are captured)."""
    from train_step import QloraStep

    ns = argparse.Namespace(device="cuda", lr=2e-4, seed=0, max_grad_norm=0.3)
    ours = QloraStep(model, ns, graphs=True)
    ours.reset(True)

    def our_step(ids):
        loss = ours.forward_backward(ids.cpu())
        ours.optimizer_step()
        return loss

    return model, our_step


if __name__ == "__main__":
    main()
