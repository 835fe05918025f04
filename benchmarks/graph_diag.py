"""Which batch layouts the CUDA-graph step captures and replays correctly (one subprocess each, so
a failed capture cannot spoil the next). On the GPU machine:

    python benchmarks/graph_diag.py [--out FILE]

Variants: batch rows × length (padded up to a multiple of 256 or not), packed or not, LoRA
dropout on or off, capture_error_mode. Each prints one JSON line: loss and gradients vs eager.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = [
    dict(name="b1-t256", b=1, t=256, packed=False, dropout=0.1),
    dict(name="b1-t256-nodrop", b=1, t=256, packed=False, dropout=0.0),
    dict(name="b2-t256", b=2, t=256, packed=False, dropout=0.1),
    dict(name="b1-t200-padded", b=1, t=200, packed=False, dropout=0.1),
    dict(name="b2-t200-padded", b=2, t=200, packed=False, dropout=0.1),
    dict(name="b1-t300-packed", b=1, t=300, packed=True, dropout=0.1),
    dict(name="b2-t200-padded-threadlocal", b=2, t=200, packed=False, dropout=0.1,
         mode="thread_local"),
    dict(name="b2-t200-padded-nockpt", b=2, t=200, packed=False, dropout=0.1, ckpt=False),
]


def run_variant(v: dict, model_dir: str) -> dict:
    from qlora.adapters import AdapterConfig, attach_adapters, seed_dropout, set_dropout_seed
    from qlora.models import load_model
    from qlora.quant import QuantConfig
    from qlora.train.graphs import GraphedSteps
    from qlora.train.optim import build_optimizer, zero_grads

    model = load_model(model_dir, QuantConfig(method="nf4", compute_dtype=torch.bfloat16), device="cuda")
    torch.manual_seed(0)
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=v["dropout"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")
    stride = seed_dropout(model, seed)
    model.gradient_checkpointing = v.get("ckpt", True)
    model.train()
    opt = build_optimizer(model, "adamw_torch", 1e-4, 0.0, (0.9, 0.999), 1e-8)
    grads = [p.grad for g in opt.param_groups for p in g["params"]]
    runner = GraphedSteps(model, grads, capture_error_mode=v.get("mode", "global"))
    g = torch.Generator().manual_seed(1)
    out = dict(variant=v["name"])
    for k in range(2):  # the second call replays the captured graph with new data
        x = torch.randint(6, 128, (v["b"], v["t"]), generator=g)
        if v["packed"]:
            cut = v["t"] // 3
            pos = torch.cat([torch.arange(cut), torch.arange(v["t"] - cut)]).expand(v["b"], -1)
        else:
            pos = torch.arange(v["t"]).expand(v["b"], -1)
        labels = x.clone()
        labels[:, :5] = -100
        n = int((labels[:, 1:] != -100).sum())
        zero_grads(opt)
        set_dropout_seed(seed, 1, k, stride)
        eager = model(x.cuda(), pos, labels)
        (eager / n).backward()
        eager = eager.detach()  # no eager autograd graph may be alive during a capture
        want = [t.clone() for t in grads]
        zero_grads(opt)
        set_dropout_seed(seed, 1, k, stride)
        got = runner(x, pos, labels, 1.0 / n).clone()
        torch.cuda.synchronize()
        out[f"loss_rel_{k}"] = abs(got.item() - eager.item()) / eager.item()
        out[f"grad_rel_{k}"] = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(want, grads))
    out["ok"] = all(out[f"loss_rel_{k}"] < 2e-3 and out[f"grad_rel_{k}"] < 3e-2 for k in range(2))
    return out


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        v, model_dir = json.loads(sys.argv[2]), sys.argv[3]
        try:
            print("RESULT " + json.dumps(run_variant(v, model_dir)), flush=True)
        except Exception as err:  # noqa: BLE001
            print("RESULT " + json.dumps(dict(variant=v["name"], ok=False,
                  error=f"{type(err).__name__}: {err}"[:600], trace=traceback.format_exc()[-2500:])))
        return 0
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    from qlora.tiny import build_tiny_model

    model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama", hidden_size=256,
                                     intermediate_size=512, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2))
    lines = []
    for v in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(v), model_dir],
                              capture_output=True, text=True, timeout=180)
        rec = next((json.loads(l[7:]) for l in done.stdout.splitlines() if l.startswith("RESULT ")),
                   dict(variant=v["name"], ok=False, error=done.stderr[-1500:]))
        print(json.dumps({k: rec[k] for k in rec if k != "trace"}), flush=True)
        lines.append(json.dumps(rec))
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
