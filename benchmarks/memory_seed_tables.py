"""Print docs/MEMORY.md's tables: the seeds' memory formulas next to qlora.memory.plan.

    python benchmarks/memory_seed_tables.py
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora.memory import GiB, PlanConfig, needed_bytes, plan, resolve_arch  # noqa: E402

GB = 1e9  # the seeds divide by 1e9
# the seeds' model_configs, and the real shape we plan for each
SEED_MODELS = [("1.5B", 1.5, 1536, 28, "qwen2.5-1.5b"), ("7B", 7.0, 4096, 32, "llama-2-7b"),
               ("13B", 13.0, 5120, 40, "llama-2-13b"), ("70B", 70.0, 8192, 80, "llama-2-70b")]


def seeds_qlora(params_b: float, hidden: int, layers: int, r: int = 16, modules: int = 4) -> dict:
    """The notebook's calculate_model_memory, 'QLoRA (NF4 base)' row, in GB (1e9)."""
    p = params_b * 1e9
    lora = r * 2 * hidden * layers * modules
    parts = dict(model=p * 0.5 / GB, gradients=lora * 2 / GB, optimizer=lora * 8 / GB, activations=params_b * 0.3)
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None) -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    # Settings that match the seeds' assumptions: r=16 on q,k,v,o, bf16 adapters, 32-bit paged AdamW
    # states ("LoRA x 8 bytes"), seq 2048, micro-batch 1, checkpointing on, no dropout.
    cfg = PlanConfig(r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), adapter_dtype="bf16",
                     optimizer="paged_adamw_32bit", lora_dropout=0.0, seq_len=2048, checkpointing=True)
    print("| model (planned shape) | seeds: base | ours: 4-bit base | ours: 16-bit embed+head | seeds: LoRA grads"
          " | ours: adapters+grads | seeds: optimizer | ours: optimizer | seeds: activations | ours: activations"
          " + transient (chunked / full loss) | seeds: total | ours: total (chunked / full loss) |")
    print("|" + "---|" * 13)
    for name, pb, hidden, layers, shape in SEED_MODELS:
        s = seeds_qlora(pb, hidden, layers)
        arch = resolve_arch(shape=shape)
        b = plan(arch, cfg)
        f = plan(arch, replace(cfg, loss="full"))
        act = (b.activations + b.transient) / GB
        act_f = (f.activations + f.transient) / GB
        print(f"| {name} ({shape}) | {s['model']:.2f} | {b.base / GB:.2f} | {b.embeddings / GB:.2f} "
              f"| {s['gradients']:.3f} | {(b.adapters + b.adapter_grads) / GB:.3f} | {s['optimizer']:.3f} "
              f"| {(b.optimizer + b.optimizer_paged) / GB:.3f} | {s['activations']:.2f} | {act:.2f} / {act_f:.2f} "
              f"| {s['total']:.2f} | {b.total / GB:.2f} / {f.total / GB:.2f} |")

    print("\nQuantization of the 7B base (llama-2-7b: decoder linears + bf16 embeddings/head/norms), GB = 1e9:\n")
    print("| setting | notebook says | planner: linears | planner: + 16-bit rest | bits/param of linears |")
    print("|---|---|---|---|---|")
    arch = resolve_arch(shape="llama-2-7b")
    linear_params = arch.num_layers * sum(i * o for _, i, o in arch.linears())
    for label, seeds, q in [("NF4 + double quant", "~3.5 GB, ~4.13 bits", PlanConfig(quant="nf4", double_quant=True)),
                            ("NF4, no double quant", "~3.9 GB, ~4.5 bits", PlanConfig(quant="nf4", double_quant=False)),
                            ("INT8 (LLM.int8)", "~7 GB, ~8.5 bits", PlanConfig(quant="int8"))]:
        b = plan(arch, q)
        print(f"| {label} | {seeds} | {b.base / GB:.2f} | {(b.base + b.embeddings + b.norms) / GB:.2f} "
              f"| {8 * b.base / linear_params:.3f} |")

    print("\nGPU VRAM -> largest planned shape that fits (seq 2048, micro-batch 1, checkpointing, r=16 "
          "all-linear, paged 8-bit AdamW, chunked loss; 'needed' adds x1.10 allocator slack + 0.75 GiB context):\n")
    seeds_list = {4: "1.5B-3B", 6: "3B-7B", 8: "7B comfortably", 12: "7B-13B", 16: "13B", 24: "13B-30B",
                  40: "30B-70B", 80: "70B"}
    shapes = ["qwen2.5-1.5b", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "llama-3-8b", "llama-2-13b", "llama-2-70b"]
    print("| GPU (GiB) | seeds: max model | planner: largest shape that fits at seq 2048 (needed GiB) | at seq 512 |")
    print("|---|---|---|---|")
    for gib, said in seeds_list.items():
        fit, fit512 = [], []
        for shape in shapes:
            arch = resolve_arch(shape=shape)
            need = needed_bytes(plan(arch, PlanConfig()))
            if need <= gib * GiB:
                fit.append(f"{shape} ({need / GiB:.1f})")
            if needed_bytes(plan(arch, PlanConfig(seq_len=512))) <= gib * GiB:
                fit512.append(shape)
        print(f"| {gib} | {said} | {fit[-1] if fit else 'none'} | {fit512[-1] if fit512 else 'none'} |")


if __name__ == "__main__":
    main()
