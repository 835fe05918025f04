"""Correctness of the GPU paths, on the GPU (CI has none): run on the device machine.

    python benchmarks/gpu_check.py  [--out results.json]

Checks, each against the real other tool on CUDA:
  1. 16-bit logits vs transformers (fp32 and bf16), each family;
  2. NF4 + double quant logits vs transformers + bitsandbytes (bf16 compute);
  3. packed rows through flash varlen attention vs the same rows through SDPA with a mask,
     and vs each document alone; flash over a shared prompt's gathered keys (fewer queries than
     keys) vs the torch reference of the same math (check_gathered_keys);
  4. loss and LoRA gradients vs transformers + peft (bf16 compute);
  5. the seeded-dropout Triton kernel vs its torch reference (bit for bit);
  6. the CUDA-graph step (train/graphs.py) vs the eager step: loss and every adapter gradient,
     unpacked and packed batches, seeded dropout, checkpointing on;
  7. the fused RMSNorm / SwiGLU / RoPE kernels (kernels/fused.py) vs decoder.py's torch code at
     Llama-3-8B shapes (outputs and gradients, fp32 and bf16, with timings), and a tiny model's
     loss and adapter gradients with fused_kernels on vs off;
  8. the dequantize kernel (kernels/dequant.py) vs bitsandbytes' (bit for bit, with timings) at a
     Llama-3-8B MLP shape and others, and a tiny model's loss and adapter gradients through the
     fast path (SpeedPlan(fast_base=True)) vs the default path;
  9. the grouped fast path (SpeedPlan(grouped=True): q/k/v and gate/up as one base GEMM)
     vs the per-projection one: a tiny NF4 llama's and qwen2's loss and adapter gradients;
 10. the LoRA-with-dropout kernels (kernels/lora_dropout.py) vs their torch composition in bf16 at
     Llama-3-8B and Qwen2.5-1.5B shapes, with both timed (and a sweep of the tile constants);
 11. the fused cross-entropy (kernels/cross_entropy.py) vs F.cross_entropy on fp32 logits: loss
     and hidden-state gradient at Llama-3-8B's vocabulary, both timed;
 12. attention windows per layer (a qwen2 windowing its second layer only): logits vs
     transformers, packed rows (each layer's varlen or dense mask) vs each document alone, greedy
     generation past the window vs transformers', and the CUDA-graph step vs the eager one;
 13. preference batches (DPO, KTO) packed into one row through flash varlen attention vs the same
     pairs in padded rows (DPO packed with each prompt once and with every sequence whole), on the fast path qlora train uses (loss and every adapter gradient),
     and `qlora train --method dpo` and `--method kto` end to end (packed, graphed, with eval
     metrics); DPO (reference forward, and precomputed), ORPO and KTO micro-batches through the
     CUDA graph of their batch loss vs eagerly (check_preference_graphed: loss, metrics,
     gradients, packed and padded).
 14. long context: the layer inputs offloaded to host memory and the MLP in sequence tiles
     (speed/offload.py, models/tiling.py) vs the plain step, eagerly and inside the CUDA-graph
     step, and at Llama-3-8B's width (4 layers, 16384 tokens): the same loss and gradients, a
     lower peak, and the planner's predicted peaks beside the measured ones.
 15. Gemma 2's capped attention through flex_attention (kernels/capped_attention.py) vs the dense
     reference at Gemma-2-9B's heads (output and q/k/v gradients, bf16, packed rows and a window),
     both timed with their peak memory; the soft-capped fused cross-entropy at Gemma's vocabulary;
     the CUDA-graph step of Gemma 2 (flex) and Gemma 3 (varlen) vs their eager steps;
 16. Phi-3's fork (FastPhi3Attention: Triton RoPE where the rotary is full, kept attention) vs
     the reference step, full and partial rotary, and its CUDA-graph step.
 17. mixtures of experts (check_moe): tiny Mixtral and Qwen3-MoE logits and router logits vs
     transformers (fp32); the grouped expert computation (speed/moe.py, torch._grouped_mm) vs the
     loop over experts (NF4 experts, LoRA, bf16): loss and every adapter gradient; the stack
     dequantize kernel (kernels/experts.py) vs the torch batch, bit for bit, at Qwen3-30B-A3B's
     and Mixtral-8x7B's expert shapes, timed beside bitsandbytes member by member; one sparse
     block's forward + backward at Qwen3-30B-A3B's shape (2048 tokens), grouped vs the loop, timed;
     the Triton grouped GEMM (kernels/experts_triton.py, the path below sm90 and in fp16/fp32)
     compiled, at Qwen3-30B-A3B's widths, balanced and unbalanced routing, fp32/bf16/fp16, vs the
     loop in fp64 (output and both gradients), and its forward + backward replayed in a CUDA
     graph under other routings, bit for bit the eager run.
Prints one JSON line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora.adapters import AdapterConfig, LoraExperts, attach_adapters  # noqa: E402
from qlora.models import load_model  # noqa: E402
from qlora.models import decoder  # noqa: E402
from qlora.quant import QuantConfig  # noqa: E402
from qlora.speed import SpeedPlan, apply_speed  # noqa: E402
from qlora.tiny import build_tiny_model  # noqa: E402

SEEDED = SpeedPlan(seeded_dropout=True)  # the reference path, LoRA dropout seeded

DEV = "cuda"
RESULTS: list[dict] = []


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def record(name: str, value: float, bound: float, **extra) -> None:
    rec = {"check": name, "value": value, "bound": bound, "ok": value <= bound, **extra}
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)


def hf(path, dtype, quant=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=DEV,
                                                **kwargs).eval()


def nf4_lora_model(path, dropout: float, dtype=torch.bfloat16):
    """NF4 base (bf16 compute) with LoRA r=8 whose B is not zero, so every adapter has a gradient.
    B is drawn as PEFT's file lays it out (an expert projection's [out, r·E], whatever layout
    LoraExperts holds), so a change of the held layout draws the same adapter."""
    model = load_model(path, QuantConfig(method="nf4", compute_dtype=dtype), device=DEV)
    torch.manual_seed(0)
    attach_adapters(model, AdapterConfig(r=8, alpha=16, dropout=dropout))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" not in name:
                continue
            owner = modules[name.rsplit(".", 2)[0]]  # "<adapter>.lora_B.weight"
            if isinstance(owner, LoraExperts):
                peft_b = torch.empty(owner.out_features, p.numel() // owner.out_features,
                                     device=p.device, dtype=p.dtype)
                owner.load_peft_b(peft_b.normal_(0, 0.05))
            else:
                p.normal_(0, 0.05)
    return model


def ids(seed=0, b=2, t=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 128, (b, t), generator=g).to(DEV)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the checks' JSON lines to this file too")
    parser.add_argument("--checks", default="", help="comma-separated substrings of the check functions' names "
                        "(e.g. dropout,graphed,kept_attention); default: every check")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    sizes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2)
    dirs = {fam: build_tiny_model(root / fam, fam, **sizes) for fam in ("llama", "qwen2", "qwen3", "mistral")}
    checks = [check_lora_dropout_kernels, check_cross_entropy, check_dropout_kernel, check_graphed_step, check_fused_kernels, check_dequant_kernel,
              check_grouped_fast_path, check_kept_attention, check_host_embedding, check_train_defaults, check_16bit, check_nf4, check_packed, check_gathered_keys, check_grads,
              check_windows, check_gemma, check_preference, check_preference_graphed,
              check_preference_train, check_long_context,
              check_flex_capped_attention, check_capped_cross_entropy, check_gemma_graphed_step,
              check_phi3_fast_path, check_moe]
    wanted = [w for w in args.checks.split(",") if w]
    checks = [c for c in checks if not wanted or any(w in c.__name__ for w in wanted)]
    for check in checks:
        try:
            check(dirs)
        except Exception as err:  # a crash is a failed check, and the others still run
            record(check.__name__, float("inf"), 0.0, error=f"{type(err).__name__}: {err}",
                   trace=traceback.format_exc()[-1500:])
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in RESULTS) + "\n")
    return 0 if all(r["ok"] for r in RESULTS) else 1


def check_16bit(dirs):
    x = ids()
    for fam, path in dirs.items():
        for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            ours = load_model(path, QuantConfig(method="none", compute_dtype=dtype), device=DEV)
            with torch.no_grad():
                record(f"16bit-{fam}-{dtype}", rel(hf(path, dtype)(x).logits, ours(x)), bound)


def check_nf4(dirs):
    x = ids(1)
    for fam, path in dirs.items():
        ours = load_model(path, QuantConfig(method="nf4", compute_dtype=torch.bfloat16), device=DEV)
        ref = hf(path, torch.bfloat16, quant="nf4")
        same = all(torch.equal(a, ours.state_dict()[k]) for k, a in ref.state_dict().items()
                   if k.endswith("proj.weight"))
        with torch.no_grad():
            record(f"nf4-{fam}", rel(ref(x).logits, ours(x)), 3e-2, bytes_equal=same)


def check_packed(dirs):
    model = load_model(dirs["llama"], QuantConfig(method="nf4", compute_dtype=torch.bfloat16), device=DEV)
    lengths = [100, 37, 119]
    docs = [ids(10 + i, 1, n)[0] for i, n in enumerate(lengths)]
    row = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n, device=DEV) for n in lengths])[None]
    plan = decoder.attention_mask(pos, 0, None)
    record("packed-uses-varlen", 0.0 if isinstance(plan, decoder.Varlen) else 1.0, 0.0)
    with torch.no_grad():
        packed = model(row, position_ids=pos)
        alone = model(docs[1][None])
        from qlora.models import attention  # where attention_mask asks for varlen

        original = attention.varlen_available
        attention.varlen_available = lambda device: False
        try:
            masked = model(row, position_ids=pos)
        finally:
            attention.varlen_available = original
    record("packed-varlen-vs-mask", rel(masked, packed), 2e-2)
    record("packed-vs-alone", rel(alone[0], packed[0, 100:137]), 2e-2)
    # the training loop passes positions and labels on the CPU; the result must not change
    labels = row.clone()
    labels[0, [0, 100, 137]] = -100
    with torch.no_grad():
        on_gpu = model(row, position_ids=pos, labels=labels)
        from_cpu = model(row, position_ids=pos.cpu(), labels=labels.cpu())
    record("packed-loss-cpu-layout-vs-gpu", abs(on_gpu.item() - from_cpu.item()) / on_gpu.item(), 1e-6)


def check_gathered_keys(dirs):
    """Flash varlen attention over a shared prompt's gathered keys (models/attention.GatheredKeys:
    a rejected completion's queries over its prompt's keys then its own, fewer queries than keys,
    the causal mask aligned to the bottom right) vs models/attention.varlen_reference, the same
    math in torch over fp32 copies of the inputs: output and q/k/v gradients, at Llama-3-8B's heads
    (32 query heads, 8 kv heads, 128 wide), bf16, 4 pairs of 512 + 512 + 512 and 4 ragged ones,
    full attention and a 256-token window; and the dense mask of the same keys through SDPA
    (gathered_keys_mask: a windowed layer's where torch's varlen takes no window), its output.
    Bound 2e-2 relative to the largest entry, as packed-varlen-vs-mask (bf16 inputs and flash's
    bf16 output against an fp32 reference)."""
    from qlora.data.preference import shared_prompt_batch
    from qlora.models.attention import (gathered_keys_mask, sdpa, varlen_attention,
                                        varlen_reference)

    g = torch.Generator().manual_seed(31)
    layouts = {"even": [(512, 512, 512)] * 4,
               "ragged": [(300, 17, 600), (5, 700, 90), (128, 128, 1), (640, 1, 333)]}
    for tag, lengths in layouts.items():
        pairs = [{"prompt": [1] * p, "chosen": [1] * c, "rejected": [1] * r}
                 for p, c, r in lengths]
        plan = shared_prompt_batch(pairs)["attention"].to(DEV)
        tokens = sum(p + c + r for p, c, r in lengths)
        for window in (None, 256):
            q, k, v = (torch.randn(1, heads, tokens, 128, generator=g).to(DEV, torch.bfloat16)
                       .requires_grad_() for heads in (32, 8, 8))
            out = varlen_attention(q, k, v, plan.with_window(window))
            grad = torch.randn(out.shape, generator=g).to(DEV, torch.bfloat16)
            out.backward(grad)
            flat = [t.detach().float()[0].transpose(0, 1).contiguous().requires_grad_()
                    for t in (q, k, v)]
            gathered = [t.index_select(0, plan.keys.index) for t in flat[1:]]
            want = varlen_reference(flat[0], *gathered, plan.cu_seqlens, plan.keys.cu_seqlens,
                                    window)
            want.backward(grad.float()[0].transpose(0, 1))
            name = f"gathered-keys-{tag}-{'window' if window else 'full'}"
            record(f"{name}-out", rel(want, out[0].transpose(0, 1)), 2e-2)
            for label, ours, ref in zip("qkv", (q, k, v), flat):
                record(f"{name}-grad-{label}", rel(ref.grad, ours.grad[0].transpose(0, 1)), 2e-2)
            dense = sdpa(q.detach(), k.detach(), v.detach(),
                         gathered_keys_mask(plan, 1, tokens, window))
            record(f"{name}-dense-mask-out", rel(want, dense[0].transpose(0, 1)), 2e-2)


def check_grads(dirs):
    from peft import LoraConfig, get_peft_model

    path = dirs["qwen2"]
    peft_model = get_peft_model(hf(path, torch.bfloat16, quant="nf4"), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    ours = load_model(path, QuantConfig(method="nf4", compute_dtype=torch.bfloat16), device=DEV)
    attach_adapters(ours, AdapterConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(5)
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                theirs[name].copy_(p)
    x = ids(3)
    peft_model.train()
    ours.train()
    ref = peft_model(input_ids=x, labels=x).loss
    ref.backward()
    loss = ours(x, labels=x) / (x.shape[0] * (x.shape[1] - 1))
    loss.backward()
    record("loss-vs-peft", abs(loss.item() - ref.item()) / ref.item(), 1e-2)
    worst = max(rel(theirs[n].grad, p.grad) for n, p in ours.named_parameters() if p.requires_grad)
    record("lora-grads-vs-peft", worst, 5e-2)


def check_windows(dirs):
    """A qwen2 whose second layer alone has a window of 64 (use_sliding_window, max_window_layers
    1), on rows longer than it."""
    from qlora.infer import GenerationOptions, generate
    from qlora.models.attention import layer_masks, varlen_takes_window

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "qwen2-windows", "qwen2", hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, use_sliding_window=True, sliding_window=64,
                            max_window_layers=1)
    x = ids(7)
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        ours = load_model(path, QuantConfig(method="none", compute_dtype=dtype), device=DEV)
        with torch.no_grad():
            record(f"windows-logits-{dtype}", rel(hf(path, dtype)(x).logits, ours(x)), bound)
    lengths = [100, 37, 119]
    docs = [ids(20 + i, 1, n)[0] for i, n in enumerate(lengths)]
    pos = torch.cat([torch.arange(n, device=DEV) for n in lengths])[None]
    masks = layer_masks(ours.spec.layer_windows, pos, 0)
    record("windows-packed-full-layer-uses-varlen", float(not isinstance(masks[0], decoder.Varlen)), 0.0,
           windowed_layer=type(masks[1]).__name__, varlen_takes_window=varlen_takes_window())
    with torch.no_grad():
        packed = ours(torch.cat(docs)[None], position_ids=pos)
        for start, doc in zip((0, 100, 137), docs):
            record(f"windows-packed-vs-alone-{len(doc)}",
                   rel(ours(doc[None])[0], packed[0, start:start + len(doc)]), 2e-2)
    fp32 = load_model(path, QuantConfig(method="none", compute_dtype=torch.float32), device=DEV)
    prompt = ids(8, 1, 80)[0].tolist()
    got = generate(fp32, prompt, GenerationOptions(max_new_tokens=48))
    out = hf(path, torch.float32).generate(torch.tensor([prompt], device=DEV), max_new_tokens=48,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)
    record("windows-greedy-vs-transformers", float(got != out[0, len(prompt):].tolist()), 0.0)
    for keep in (False, True):
        _check_graphed_step(path, keep, tag="-windows", packed=varlen_takes_window())


def check_gemma(dirs):
    """Gemma 2 and Gemma 3 (models/families/gemma.py) on the GPU: bf16 logits against
    transformers' (Gemma 2 through its eager attention, which applies the score soft-cap), and
    the step qlora train runs (Gemma's forks: grouped 4-bit projections, Triton RoPE, kept
    attention) against the reference step, NF4 + LoRA, dropout off and seeded."""
    from qlora.models.families import FAMILIES

    fast = replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True)
    for fam in ("gemma2", "gemma3_text"):
        sizes = dict(FAMILIES[fam].TINY_SIZES, hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                     sliding_window=64)
        path = build_tiny_model(Path(tempfile.mkdtemp()) / fam, fam, **sizes)
        x = ids(9)
        ours = load_model(path, QuantConfig(method="none", compute_dtype=torch.bfloat16),
                          device=DEV)
        theirs = hf(path, torch.bfloat16)
        theirs.config._attn_implementation = "eager"
        with torch.no_grad():
            record(f"gemma-logits-bf16-{fam}", rel(theirs(x).logits, ours(x)), 3e-2)
        for dropout in (0.0, 0.1):
            model = nf4_lora_model(path, dropout=dropout)
            runs = _seeded_step_runs(model, [SEEDED, fast, replace(fast, keep_attention=True)])
            _record_runs(f"gemma-fast-step-{fam}", dropout, runs[:2])
            _record_runs(f"gemma-kept-attention-{fam}", dropout, [runs[0], runs[2]])


def check_dropout_kernel(dirs):
    """The dropout kernel and its accumulating form vs the torch reference, bit for bit; and the
    kernel's ms at Llama-3-8B's hidden size (2048 tokens)."""
    from qlora.kernels.dropout import _dropout_triton, seeded_dropout_add_, seeded_dropout_reference

    # 1000·4099 ends in a partial 2048-element block; 205 is less than one slot (256)
    for suffix, shape in (("", (1000, 4099)), ("-205", (5, 41))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*shape, device=DEV, dtype=dtype)
            seed = torch.tensor(2**41 + 12345, dtype=torch.int64, device=DEV)
            a, b = _dropout_triton(x, seed, 11, 0.1), seeded_dropout_reference(x, seed, 11, 0.1)
            record(f"dropout-kernel-vs-reference-{dtype}{suffix}",
                   float((a.float() - b.float()).abs().max()), 0.0, kept=float((a != 0).float().mean()))
            out = torch.randn(*shape, device=DEV, dtype=dtype)
            want = (out.float() + seeded_dropout_reference(x.float(), seed, 11, 0.1).float()).to(dtype)
            seeded_dropout_add_(out, x, seed, 11, 0.1)
            record(f"dropout-add-kernel-vs-reference-{dtype}{suffix}",
                   float((out.float() - want.float()).abs().max()), 0.0)
    x = torch.randn(2048, 4096, device=DEV, dtype=torch.bfloat16)
    record("dropout-kernel-2048x4096-bf16-ms", _call_ms(lambda: _dropout_triton(x, seed, 3, 0.05)),
           float("inf"))


def check_graphed_step(dirs):
    """Three micro-batches (two shapes, one of them packed) through GraphedSteps vs eagerly,
    attention rerun and kept (keep_attention: the kept graph's release and backward captured)."""
    for keep in (False, True):
        _check_graphed_step(dirs["llama"], keep)


def _check_graphed_step(path, keep: bool, tag: str = "", packed: bool = True, long: bool = False,
                        grads_bound: float = 3e-2):
    """The model at `path` through GraphedSteps vs eagerly; `packed`: a packed micro-batch too;
    `long`: with the layer inputs offloaded and the MLP in tiles of 128 tokens (the padded rows
    of 256 and 512 tokens make 2 and 4 of them: captured with the step)."""
    from qlora.adapters import set_dropout_seed
    from qlora.train.graphs import GraphedSteps, pad_batch
    from qlora.train.optim import build_optimizer, zero_grads

    model = nf4_lora_model(path, dropout=0.1)
    # kept: as qlora train runs it (fused kernels, grouped projections, embedding on host)
    applied = apply_speed(model, SpeedPlan(fused_kernels=keep, fast_base=keep, grouped=keep,
                                           keep_attention=keep, seeded_dropout=True,
                                           embedding_on_host=keep, offload_activations=long,
                                           tile_mlp=128 if long else False,
                                           grouped_experts=True))  # (a mixture of experts')
    # a tied embedding (Gemma's) is the head's weight too, so it stays on the GPU
    if keep and not model.spec.tie_word_embeddings and not applied.embedding_bytes_freed:
        raise RuntimeError("the tiny model's input embedding did not move to host memory")
    tag += "-keep" if keep else ""
    seed, stride = applied.dropout_seed, applied.dropout_stride
    model.gradient_checkpointing = True
    model.train()
    opt = build_optimizer(model, "adamw_torch", 1e-4, 0.0, (0.9, 0.999), 1e-8)
    grads = [p.grad for g in opt.param_groups for p in g["params"]]
    packed_pos = torch.cat([torch.arange(100), torch.arange(77), torch.arange(123)]).view(1, -1)
    batches = [(ids(1, 2, 200).cpu(), torch.arange(200).expand(2, 200)),
               (ids(2, 1, 300).cpu(), packed_pos),
               (ids(3, 2, 200).cpu(), torch.arange(200).expand(2, 200))]
    if not packed:
        batches = batches[::2]
    runner = GraphedSteps(model, grads)
    tag += "-long" if long else ""
    for k, (x, pos) in enumerate(batches):
        labels = x.clone()
        labels[:, :5] = -100
        n = int((labels[:, 1:] != -100).sum())
        set_dropout_seed(seed, 1, k, stride)
        zero_grads(opt)
        # the eager reference on the same padded layout: the dropout masks follow the layout
        length = -(-x.shape[1] // runner.pad_to) * runner.pad_to
        px, ppos, plabels = pad_batch(x, pos, labels, length)
        # its real tokens the unpadded rows', as the graph's: a mixture of experts' aux loss
        # leaves the padding's routing out
        eager = model(px.to(DEV), ppos, plabels,
                      real_lengths=torch.full((x.shape[0],), x.shape[1]))
        (eager / n).backward()
        # the eager graph must be gone before a capture: its gradient-accumulation nodes would
        # keep the default stream and break the capture
        eager = eager.detach()
        want = [g.clone() for g in grads]
        zero_grads(opt)
        set_dropout_seed(seed, 1, k, stride)
        got = runner(x, pos, labels, 1.0 / n).clone()
        record(f"graphed-step{tag}-loss-{k}", abs(got.item() - eager.item()) / eager.item(), 2e-3,
               graphs=len(runner.graphs))
        record(f"graphed-step{tag}-grads-{k}", max(rel(a, b) for a, b in zip(want, grads)),
               grads_bound)
    if runner.failed:  # the eager fallback passed the comparisons above; a capture was wanted
        record(f"graphed-step{tag}-captured", 1.0, 0.0, error=runner.failed)


def _fwd_bwd_ms(fn, inputs, grad, reps: int = 20) -> float:
    """Median milliseconds of one forward + backward (events on the GPU's stream)."""
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(*inputs), wanted, grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[reps // 2]


def _compare_fused(name, fused_fn, ref_fn, inputs, grad, bound):
    """Max relative error (max |fused - ref| / max |ref|) of the output and each gradient."""
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    got, want = fused_fn(*inputs), ref_fn(*inputs)
    g_got = torch.autograd.grad(got, wanted, grad)
    g_want = torch.autograd.grad(want, wanted, grad)
    errors = [rel(want, got)] + [rel(b, a) for a, b in zip(g_got, g_want)]
    record(name, max(errors), bound, out=errors[0], grads=errors[1:],
           fused_ms=_fwd_bwd_ms(fused_fn, inputs, grad), torch_ms=_fwd_bwd_ms(ref_fn, inputs, grad))


def check_fused_kernels(dirs):
    """Llama-3-8B shapes at seq 2048: RMSNorm over 2048 x 4096, SwiGLU over 2048 x 14336, RoPE
    on q [1, 32, 2048, 128] and k [1, 8, 2048, 128] as Attention lays them out."""
    import torch.nn.functional as F

    from qlora.kernels import fused
    from qlora.models.spec import spec_from_config

    g = torch.Generator(device=DEV).manual_seed(0)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)

    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2**-6)):  # bf16: two roundings
        tag = str(dtype).replace("torch.", "")
        x = randn(1, 2048, 4096, dtype=dtype, scale=3.0).requires_grad_()
        norm = decoder.RMSNorm(4096, 1e-5).to(DEV, dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(4096, generator=g, device=DEV) + 0.5)
        grad = randn(1, 2048, 4096, dtype=dtype)
        for trainable in (False, True):  # QLoRA's norms are frozen: dx alone, then dx and dweight
            norm.weight.requires_grad_(trainable)
            _compare_fused(f"fused-rmsnorm-{tag}-{'dw' if trainable else 'frozen'}",
                           lambda a, w: fused.rms_norm(a, w, 1e-5), lambda a, w: norm(a),
                           [x, norm.weight], grad, bound)
        residual = randn(1, 2048, 4096, dtype=dtype).requires_grad_()
        norm.weight.requires_grad_(False)
        _compare_fused(f"fused-add-rmsnorm-{tag}",  # (sum, normed sum) stacked: both outputs
                       lambda a, r, w: torch.stack(fused.add_rms_norm(a, r, w, 1e-5)),
                       lambda a, r, w: torch.stack(fused.add_rms_norm_reference(a, r, w, 1e-5)),
                       [x, residual, norm.weight], randn(2, 1, 2048, 4096, dtype=dtype), bound)
        gate = randn(1, 2048, 14336, dtype=dtype, scale=3.0).requires_grad_()
        up = randn(1, 2048, 14336, dtype=dtype).requires_grad_()
        _compare_fused(f"fused-swiglu-{tag}", fused.swiglu, lambda a, b: F.silu(a) * b, [gate, up],
                       randn(1, 2048, 14336, dtype=dtype), bound)
        spec = spec_from_config(dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=1, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=8, rope_theta=500000.0))
        cos, sin = decoder.Rotary(spec).to(DEV)(torch.arange(2048, device=DEV)[None], dtype)
        for heads, what in ((32, "q"), (8, "k")):
            t = randn(1, 2048, heads, 128, dtype=dtype).requires_grad_()
            _compare_fused(f"fused-rope-{what}-{tag}",
                           lambda a: fused.rope(a.transpose(1, 2), cos, sin),
                           lambda a: decoder.apply_rope(a.transpose(1, 2), cos, sin), [t],
                           randn(1, heads, 2048, 128, dtype=dtype), bound)
    # the whole model: NF4 + bf16 tiny llama, checkpointing on, fused_kernels on vs off
    model = nf4_lora_model(dirs["llama"], dropout=0.0)
    model.gradient_checkpointing = True
    model.train()
    x = ids(4, 2, 256)
    runs = []
    for on in (False, True):
        apply_speed(model, SpeedPlan(fused_kernels=on))
        model.zero_grad()
        loss = model(x, labels=x) / (x.shape[0] * (x.shape[1] - 1))
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_off, grads_off), (loss_on, grads_on) = runs
    record("fused-model-loss", abs(loss_on - loss_off) / loss_off, 2e-3)
    record("fused-model-grads", max(rel(a, b) for a, b in zip(grads_off, grads_on)), 5e-2)



def _call_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one call (events on the GPU's stream), after 3 untimed calls."""
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[reps // 2]


def _quantized(shape, quant_type: str, nested: bool, dtype, seed: int = 0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    return bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64, compress_statistics=nested,
                             quant_type=quant_type).to(DEV)


def check_dequant_kernel(dirs):
    """dequantize_4bit_triton vs bitsandbytes.functional.dequantize_4bit on CUDA: max |difference|
    (bound 0) and median ms of each over 20 calls (recorded, not bounded), at Llama-3-8B's MLP
    shape (NF4, double quant, bf16); then every variant at a smaller shape; then a tiny model's
    loss and adapter gradients through the fast path vs the default path."""
    import bitsandbytes as bnb

    from qlora.kernels.dequant import dequantize_4bit_triton, packed_from_bnb

    def compare(name, param, timed=False):
        packed, state = packed_from_bnb(param), param.quant_state
        ours = dequantize_4bit_triton(packed, state.dtype)
        theirs = bnb.functional.dequantize_4bit(param.data, state)
        extra = dict(same_dtype=ours.dtype == theirs.dtype)
        if timed:  # bytes read (packed weights, absmax codes) and written
            moved = sum(t.numel() * t.element_size() for t in (param.data, state.absmax, ours))
            kernel_ms = _call_ms(lambda: dequantize_4bit_triton(packed, state.dtype))
            bnb_ms = _call_ms(lambda: bnb.functional.dequantize_4bit(param.data, state))
            extra.update(kernel_ms=kernel_ms, bnb_ms=bnb_ms, kernel_tb_s=moved / kernel_ms / 1e9,
                         bnb_tb_s=moved / bnb_ms / 1e9)
        record(name, float((ours.float() - theirs.float()).abs().max()), 0.0, **extra)

    mlp = _quantized((14336, 4096), "nf4", True, torch.bfloat16)
    compare("dequant-kernel-vs-bnb-14336x4096-nf4-nested-bf16", mlp, timed=True)
    _sweep_dequant_launch(mlp)
    for quant_type in ("nf4", "fp4"):
        for nested in (True, False):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                tag = f"{quant_type}-{'nested' if nested else 'plain'}-{str(dtype)[6:]}"
                # 1000 x 4100: the last block of 64 is partial
                compare(f"dequant-kernel-vs-bnb-1000x4100-{tag}",
                        _quantized((1000, 4100), quant_type, nested, dtype, seed=1))
    _check_fast_path_model(dirs)


def _sweep_dequant_launch(param):
    """The kernel's ms and TB/s at other (packed bytes per program, warps) than the module's
    TILE_BYTES and WARPS, each checked equal to the default's output, which is bnb's."""
    from qlora.kernels import dequant

    packed = dequant.packed_from_bnb(param)
    want = dequant.dequantize_4bit_triton(packed, torch.bfloat16)
    moved = param.data.numel() + param.quant_state.absmax.numel() + 2 * want.numel()
    default = (dequant.TILE_BYTES, dequant.WARPS)
    try:
        for tile_bytes in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                dequant.TILE_BYTES, dequant.WARPS = tile_bytes, warps
                got = dequant.dequantize_4bit_triton(packed, torch.bfloat16)
                ms = _call_ms(lambda: dequant.dequantize_4bit_triton(packed, torch.bfloat16))
                record(f"dequant-launch-{tile_bytes}-bytes-{warps}-warps",
                       float((got.float() - want.float()).abs().max()), 0.0, kernel_ms=ms,
                       kernel_tb_s=moved / ms / 1e9)
    finally:
        dequant.TILE_BYTES, dequant.WARPS = default


def _check_fast_path_model(dirs):
    """NF4 + bf16 tiny llama, checkpointing on: SpeedPlan fast_base (and grouped) on vs off,
    LoRA dropout off and seeded."""
    for dropout in (0.0, 0.1):
        model = nf4_lora_model(dirs["llama"], dropout=dropout)
        runs = _seeded_step_runs(model, (SEEDED, replace(SEEDED, fast_base=True, grouped=True)))
        _record_runs("dequant-fast-path-model", dropout, runs)


def _seeded_step_runs(model, plans):
    """(mean loss, adapter gradients) of one step with each of `plans` applied (speed.SpeedPlan,
    each with seeded_dropout), checkpointing on, LoRA dropout drawn from the same seed every time."""
    from qlora.adapters import set_dropout_seed

    x = ids(6, 2, 256)
    model.gradient_checkpointing = True
    model.train()
    runs = []
    for plan in plans:
        applied = apply_speed(model, plan)
        model.zero_grad()
        set_dropout_seed(applied.dropout_seed, 1, 0, applied.dropout_stride)
        loss = model(x, labels=x) / (x.shape[0] * (x.shape[1] - 1))
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    return runs


def _record_runs(name: str, dropout: float, runs) -> None:
    """The reference run first; the fast path's bounds (loss 2e-3, gradients 5e-2 relative)."""
    (loss_ref, grads_ref), (loss_new, grads_new) = runs
    record(f"{name}-loss-dropout{dropout}", abs(loss_new - loss_ref) / loss_ref, 2e-3)
    record(f"{name}-grads-dropout{dropout}",
           max(rel(a, b) for a, b in zip(grads_ref, grads_new)), 5e-2)


def check_grouped_fast_path(dirs):
    """NF4 + bf16 tiny llama and qwen2 (q/k/v biases), checkpointing on: SpeedPlan fast_base
    with grouped=True vs grouped=False, LoRA dropout off and seeded."""
    from qlora.speed import grouped_modules

    for fam in ("llama", "qwen2"):
        for dropout in (0.0, 0.1):
            model = nf4_lora_model(dirs[fam], dropout=dropout)
            fast = replace(SEEDED, fast_base=True)
            runs = _seeded_step_runs(model, (fast, replace(fast, grouped=True)))
            groups = grouped_modules(model)
            if groups != 2 * model.spec.num_layers:
                raise RuntimeError(f"{groups} modules grouped, expected attention and MLP of "
                                   f"each of {model.spec.num_layers} layers")
            _record_runs(f"grouped-fast-path-{fam}", dropout, runs)


def check_kept_attention(dirs):
    """keep_attention (speed/kept_attention.AttentionKeptForRerun) against the rerun, on the path
    qlora train runs (fused kernels, grouped projections), for each family: the same step, with
    attention kept in every layer and in the last one only."""
    fast = replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True)
    for fam in ("llama", "qwen2", "qwen3", "mistral"):
        for dropout in (0.0, 0.1):
            model = nf4_lora_model(dirs[fam], dropout=dropout)
            # true: every layer; 1: the last layer only (keep_attention N, where only N fit)
            runs = _seeded_step_runs(model, [replace(fast, keep_attention=k)
                                             for k in (False, True, 1)])
            _record_runs(f"kept-attention-{fam}", dropout, runs[:2])
            _record_runs(f"kept-attention-last-layer-{fam}", dropout, [runs[0], runs[2]])


def check_host_embedding(dirs):
    """The input embedding gathered from pinned host memory (kernels/embedding.py): the same step
    as with the table on the GPU, and the same rows as torch.embedding at Llama-3-8B's size."""
    from qlora.kernels.embedding import gather_rows

    model = nf4_lora_model(dirs["llama"], dropout=0.0)
    runs = _seeded_step_runs(model, (SEEDED, replace(SEEDED, embedding_on_host=True)))
    if model.model.embed_tokens.weight.device.type != "cpu":
        raise RuntimeError("embedding_on_host left the table on the GPU")
    _record_runs("host-embedding", 0.0, runs)
    table = torch.randn(128256, 4096, dtype=torch.bfloat16).pin_memory()
    token_ids = torch.randint(0, 128256, (2048,), device=DEV)
    got = gather_rows(table, token_ids)
    record("host-embedding-llama-rows", 0.0 if torch.equal(got.cpu(), table[token_ids.cpu()]) else 1.0,
           0.0)


def check_train_defaults(dirs):
    """`qlora train` end to end on the GPU with its defaults (4-bit, fused kernels, CUDA graphs,
    keep_attention where it fits, the input embedding in host memory) on the tiny llama: it
    trains, evaluates on held-out examples, says what it turned on, and writes the adapter."""
    import contextlib
    import io

    from qlora.cli import main as cli

    root = Path(tempfile.mkdtemp())
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in
            ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta") * 4]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, log = root / "run", io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = cli(["train", "--model", str(dirs["llama"]), "--data", str(root / "data.jsonl"),
                  "--output_dir", str(out), "--max_steps", "6", "--logging_steps", "1",
                  "--save_steps", "0", "--gradient_accumulation_steps", "2",
                  "--val_set_size", "4", "--eval_steps", "3"])
    text = log.getvalue()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    said = [("keep_attention: on" in text), ("input embedding in pinned host memory" in text),
            (out / "adapter_model.safetensors").exists(), "eval_loss" in json.dumps(summary)]
    record("train-defaults", 0.0 if rc == 0 and all(said) else 1.0, 0.0, rc=rc, said=said,
           log=text[-1500:])


def check_preference_train(dirs):
    """`qlora train --method dpo / kto` end to end on the GPU (CUDA graphs; KTO eagerly too, its
    reference of both halves in one forward): each step's metric sums come to the host in one
    copy (Stepper.read_metrics), the evaluation's too; every train and eval record of
    metrics.jsonl has the method's metrics, finite."""
    import contextlib
    import io
    import math

    from qlora.cli import main as cli

    root = Path(tempfile.mkdtemp())
    words = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta") * 2
    data = {"dpo": [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]} for w in words],
            "kto": [{"prompt": f"{w} = ", "completion": w.upper() if i % 2 else w[::-1],
                     "label": bool(i % 2)} for i, w in enumerate(words)]}
    for method, graphs in (("dpo", True), ("kto", True), ("kto", False)):
        path = root / f"{method}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data[method]))
        out, log = root / f"{method}-{graphs}", io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = cli(["train", "--model", str(dirs["llama"]), "--data", str(path), "--method",
                      method, "--output_dir", str(out), "--max_steps", "4", "--logging_steps",
                      "1", "--save_steps", "0", "--gradient_accumulation_steps", "2",
                      "--micro_batch_size", "2", "--val_set_size", "4", "--eval_steps", "2",
                      "--cuda_graphs", str(graphs).lower()])
        records = ([json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
                   if (out / "metrics.jsonl").exists() else [])
        names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]
        names += ["kl"] if method == "kto" else ["rewards/accuracies"]
        bad = [(r["split"], r["step"], n) for r in records for n in names
               if not math.isfinite(r.get(n, math.nan))]
        splits = sorted({r["split"] for r in records})
        ok = rc == 0 and not bad and splits == ["eval", "train"]
        record(f"preference-train-{method}-{'graphed' if graphs else 'eager'}",
               0.0 if ok else 1.0, 0.0, rc=rc, bad=bad[:6], records=len(records),
               last=records[-1] if records else None, log=log.getvalue()[-1000:])


def check_lora_dropout_kernels(dirs):
    """bf16 at 2048 tokens: q/k/v (3 adapters over 4096), gate/up (2), o (1), down (1 over 14336),
    Qwen's q/k/v over 1536 (rows not a multiple of the mask's 2048-value blocks). Each kernel vs
    the torch composition (relative error; bf16 roundings differ) and both timed; then the tile
    constants swept at the Llama q/k/v and down shapes."""
    from qlora.kernels import lora_dropout as L

    seed = torch.tensor(2**40 + 7, dtype=torch.int64, device=DEV)
    shapes = [("llama-qkv", 4096, 3), ("llama-gate-up", 4096, 2), ("llama-o", 4096, 1),
              ("llama-down", 14336, 1), ("qwen-qkv", 1536, 3)]

    def inputs(width, n, r=16):
        g = torch.Generator(device=DEV).manual_seed(width + n)
        x = torch.randn(2048, width, device=DEV, generator=g).bfloat16()
        adapters = [torch.randn(r, width, device=DEV, generator=g) * 0.02 for _ in range(n)]
        grad_h = torch.randn(2048, n * r, device=DEV, generator=g).bfloat16()
        salts, scales = tuple(11 * i + 3 for i in range(n)), (2.0,) * n
        return x, adapters, grad_h, salts, scales

    for name, width, n in shapes:
        x, a, gh, salts, scales = inputs(width, n)
        args = (seed, salts, scales, 0.05)
        pairs = {"down": (lambda: L.down_triton(x, a, *args), lambda: L.down_reference(x, a, *args)),
                 "down_grad": (lambda: torch.stack(L.backward_triton(x, gh, a, *args, True)[0]),
                               lambda: torch.stack(L.down_grad_reference(x, gh, *args))),
                 "up_grad": (lambda: L.backward_triton(x, gh, a, *args, True)[1],
                             lambda: L.up_grad_reference(gh, a, *args))}
        for kernel, (fused_fn, ref_fn) in pairs.items():
            start = time.perf_counter()
            got = fused_fn()  # the first call compiles
            torch.cuda.synchronize()
            print(json.dumps({"first-call-s": round(time.perf_counter() - start, 2), "kernel": kernel,
                              "shape": name}), flush=True)
            want = ref_fn()
            record(f"lora-dropout-{kernel}-{name}", rel(want, got), 2e-2,
                   fused_ms=_call_ms(fused_fn), composed_ms=_call_ms(ref_fn))
    sweep = []
    names = ("QW", "DOWN_ROWS", "PROGRAMS", "UP_ROWS", "GRAD_ROWS", "MAX_CHUNKS", "WARPS")
    defaults = {k: getattr(L, k) for k in names}
    variants = [{}, {"QW": 16}, {"DOWN_ROWS": 32}, {"PROGRAMS": 512}, {"UP_ROWS": 64},
                {"GRAD_ROWS": 16}, {"MAX_CHUNKS": 16}, {"WARPS": 8}]
    try:
        for change in variants:
            for k, v in {**defaults, **change}.items():
                setattr(L, k, v)
            times = {}
            for name, width, n in (shapes[0], shapes[3]):
                x, a, gh, salts, scales = inputs(width, n)
                args = (seed, salts, scales, 0.05)
                try:
                    times[name] = [round(_call_ms(f), 4) for f in (
                        lambda: L.down_triton(x, a, *args),
                        lambda: L.backward_triton(x, gh, a, *args, True))]
                except Exception as err:  # noqa: BLE001 -- a variant that does not compile
                    times[name] = f"{type(err).__name__}: {str(err)[:120]}"
            sweep.append(dict(change=change, ms=times))
            print(json.dumps(sweep[-1]), flush=True)
    finally:
        for k, v in defaults.items():
            setattr(L, k, v)
    record("lora-dropout-tile-sweep", 0.0, 0.0, sweep=sweep)


def check_cross_entropy(dirs):
    """kernels/cross_entropy.linear_cross_entropy_sum vs lm_head + F.cross_entropy on fp32 logits
    (autograd): loss and the hidden states' gradient at Llama-3-8B's head, 2048 tokens, some
    unlabelled; both timed (forward + backward)."""
    _check_fused_cross_entropy("cross-entropy", vocab=128256, hidden=4096, std=0.02, chunk=512)


def _check_fused_cross_entropy(tag: str, vocab: int, hidden: int, std: float, chunk: int,
                               softcap: float | None = None):
    """The fused loss against F.cross_entropy on the fp32 logits (capped as
    cap · tanh(logits / cap) where `softcap`), on random bf16 head weights and hidden states."""
    from qlora.kernels.cross_entropy import linear_cross_entropy_sum

    g = torch.Generator(device=DEV).manual_seed(0)
    w = (torch.randn(vocab, hidden, device=DEV, generator=g) * std).bfloat16()
    h = torch.randn(2048, hidden, device=DEV, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, vocab, (2048,), device=DEV, generator=g)
    t[::7] = -100

    def fused():
        loss = linear_cross_entropy_sum(h, w, t, chunk, softcap=softcap)
        return loss, torch.autograd.grad(loss, h)[0]

    def reference():
        logits = (h @ w.t()).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        return loss, torch.autograd.grad(loss, h)[0]

    (l1, g1), (l2, g2) = fused(), reference()
    record(f"{tag}-loss", float(abs(l1 - l2) / abs(l2)), 1e-4)
    record(f"{tag}-grad", rel(g2, g1), 2e-2, fused_ms=_call_ms(fused, reps=5),
           reference_ms=_call_ms(reference, reps=5))


def check_preference(dirs):
    """DPO and KTO micro-batches of pairs of different lengths: packed (one row, varlen) vs padded,
    through the speed layer eagerly (check_preference_graphed takes the CUDA graphs), checkpointing
    on, LoRA dropout 0 (the two layouts would draw other masks); then a DPO run and a KTO run
    (graphed: each log must say CUDA graphs on, and never off)."""
    import contextlib
    import io

    from qlora.cli import main as cli
    from qlora.data.preference import preference_batch
    from qlora.methods import PREFERENCE_METHODS
    from qlora.methods.preference import PreferenceOptions, batch_loss, packs_with_varlen

    model = nf4_lora_model(dirs["llama"], dropout=0.0)
    model.gradient_checkpointing = True
    model.train()
    apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                 keep_attention=True, seeded_dropout=True,
                                 embedding_on_host=True, cuda_graphs=False))
    record("preference-packs-with-varlen",
           0.0 if packs_with_varlen(model, torch.device(DEV)) else 1.0, 0.0)
    g = torch.Generator().manual_seed(21)

    def seq(n):
        return torch.randint(6, 128, (n,), generator=g).tolist()

    lengths = ((40, 60, 25), (90, 12, 70), (20, 100, 100), (64, 33, 5))
    pairs = [{"prompt": seq(p), "chosen": seq(c), "rejected": seq(r)} for p, c, r in lengths]
    unpaired = [{"prompt": seq(p), "completion": seq(c), "label": i % 2 == 0}
                for i, (p, c, _) in enumerate(lengths)]
    opts = PreferenceOptions(beta=0.3)
    # DPO packed both ways: each prompt once (the default) and every sequence whole
    layouts = {"dpo": ((True, True), (True, False)), "kto": ((True, True),)}
    for name, examples in (("dpo", pairs), ("kto", unpaired)):
        runs = []
        for packed, share_prompt in ((False, True),) + layouts[name]:
            model.zero_grad(set_to_none=True)
            loss, _ = batch_loss(PREFERENCE_METHODS[name], model,
                                 preference_batch(examples, 0, packed, share_prompt), opts)
            loss.backward()
            runs.append((loss.detach().float(), {n: p.grad.float().clone()
                                                 for n, p in model.named_parameters()
                                                 if p.grad is not None}))
        (loss_a, grads_a), *packed_runs = runs
        for (loss_b, grads_b), (_, share_prompt) in zip(packed_runs, layouts[name]):
            tag = f"preference-{name}-packed{'' if share_prompt else '-whole'}-vs-padded"
            record(f"{tag}-loss", rel(loss_a, loss_b), 1e-2)
            record(f"{tag}-grads", max(rel(grads_a[k], grads_b[k]) for k in grads_a), 5e-2,
                   n_grads=len(grads_a))

    root = Path(tempfile.mkdtemp())
    words = "cat dog sun moon tree fish bird rain snow wind leaf rock sand star lake hill".split()
    rows = {"dpo": [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]}
                    for w in words],
            "kto": [{"prompt": f"{w} = ", "completion": w.upper() if k % 2 else w[::-1],
                     "label": bool(k % 2)} for k, w in enumerate(words)]}
    # each eval record: DPO's reward accuracy, KTO's KL estimate (it has no pairs to rank)
    eval_metric = {"dpo": "rewards/accuracies", "kto": "kl"}
    for name in ("dpo", "kto"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        out, log = root / f"run-{name}", io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = cli(["train", "--method", name, "--model", str(dirs["llama"]),
                      "--data", str(root / f"{name}.jsonl"), "--output_dir", str(out),
                      "--max_steps", "4", "--micro_batch_size", "4", "--logging_steps", "1",
                      "--save_steps", "0", "--val_set_size", "4", "--eval_steps", "2"])
        text = log.getvalue()
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").exists() else []
        said = ["preference batches packed" in text,
                any(r.get("split") == "eval" and eval_metric[name] in r for r in records),
                (out / "adapter_model.safetensors").exists(), "CUDA graphs on" in text,
                "CUDA graphs off" not in text]  # nor a failed capture's fallback
        record(f"preference-train-{name}", 0.0 if rc == 0 and all(said) else 1.0, 0.0, rc=rc,
               said=said, log=text[-1500:])


def check_preference_graphed(dirs):
    """DPO (reference forward with the adapters off inside the graph, and precomputed reference
    log-probs), ORPO and KTO (its examples' and KL sequences' rows, both reference forwards
    inside the graph) micro-batches through GraphedSteps with the method's body vs eagerly
    (methods/preference.batch_loss), packed (varlen offsets in the graph's buffer) and padded
    (causal rows): loss, every metric sum, adapter gradients. As qlora train runs them: fused
    kernels, grouped 4-bit fast path, kept attention, host embedding, checkpointing, LoRA dropout
    0.1 seeded. Three micro-batches, two shapes: the third replays the first one's graph with
    other pairs. The eager side runs the same padded rows (graphs.pad_batch; KTO's two halves
    each as staged): the seeded masks follow the layout. Bounds as check_graphed_step's (bf16;
    flash attention's backward and the per-sequence index_add may add in other orders); the
    metrics relative to the log-probs' size (rewards are differences of log-probs)."""
    from qlora.adapters import set_dropout_seed
    from qlora.data.preference import half, pair_batch, unpaired_batch
    from qlora.methods import PREFERENCE_METHODS
    from qlora.methods.preference import (PreferenceOptions, batch_loss, packs_with_varlen,
                                          row_logps, summed_losses, unpaired_logps)
    from qlora.train.graphs import GraphedSteps, pad_batch, unsupported_reason
    from qlora.train.optim import build_optimizer, zero_grads

    def padded(batch, length):
        """`batch` with its rows padded to `length` as the staging pads them (padding: sequence
        -1, no labels). A shared prompt's batch as it is: its one row's dropout masks are the
        staged row's (the padding comes after it), and its attention plan covers its own tokens."""
        if "attention" in batch:
            return batch
        out = dict(batch)
        out["input_ids"], out["position_ids"], out["labels"] = \
            pad_batch(batch["input_ids"], batch["position_ids"], batch["labels"], length)
        seq_ids = torch.full(out["input_ids"].shape, -1, dtype=torch.long)
        seq_ids[:, :batch["sequence_ids"].shape[1]] = batch["sequence_ids"]
        out["sequence_ids"] = seq_ids
        return out

    def eager_loss(method, batch, staged, opts):
        """batch_loss over the rows as staged: a KTO batch's halves each padded to its rows'
        length (unpaired_logps over them: batch_loss's KTO path)."""
        if staged.kl is None:
            return batch_loss(method, model, padded(batch, staged.key[1]), opts)
        rows = padded(half(batch, second=False), staged.key[1])
        kl = padded(half(batch, second=True), staged.kl.key[1])
        policy, reference = unpaired_logps(model, lambda **_: row_logps(model, rows),
                                           lambda **_: row_logps(model, kl), batch["label"])
        return summed_losses(method, policy, reference, opts)

    model = nf4_lora_model(dirs["llama"], dropout=0.1)
    applied = apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                           keep_attention=True, seeded_dropout=True,
                                           embedding_on_host=True))
    model.gradient_checkpointing = True
    model.train()
    reason = unsupported_reason(model, torch.device(DEV), 512)
    record("preference-graphs-allowed", 0.0 if reason is None else 1.0, 0.0, reason=reason)
    seed, stride = applied.dropout_seed, applied.dropout_stride
    opt = build_optimizer(model, "adamw_torch", 1e-4, 0.0, (0.9, 0.999), 1e-8)
    grads = [p.grad for group in opt.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(5)

    def seq(n):
        return torch.randint(6, 128, (n,), generator=g).tolist()

    shapes = [((40, 60, 25), (90, 12, 70)), ((20, 100, 100), (64, 33, 5), (30, 30, 31)),
              ((41, 58, 27), (88, 14, 66))]  # the third: the first's padded shape again
    micro = [[{"prompt": seq(p), "chosen": seq(c), "rejected": seq(r)} for p, c, r in lengths]
             for lengths in shapes]
    for k, pairs in enumerate(micro):  # some reference log-probs, for the precomputed variant
        for e in pairs:
            e["ref"] = (-300.0 - 7 * k, -280.0 + 3 * k)
    # KTO: the prompts with their chosen (desirable) or rejected completions, both kinds in each
    unpaired = [[{"prompt": e["prompt"], "completion": e["chosen" if i % 2 else "rejected"],
                  "label": bool(i % 2)} for i, e in enumerate(pairs)] for pairs in micro]
    opts = PreferenceOptions(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    packed_ok = packs_with_varlen(model, torch.device(DEV))
    for name, precomputed in (("dpo", False), ("dpo", True), ("orpo", False), ("kto", False)):
        method = PREFERENCE_METHODS[name]
        for packed in (True, False):
            tag = f"{name}{'-precomputed' if precomputed else ''}-{'packed' if packed else 'padded'}"
            if packed and not packed_ok:
                record(f"preference-graphed-{tag}-varlen", 1.0, 0.0)
                continue
            runner = GraphedSteps(model, grads, preference=(method, opts))
            for k, pairs in enumerate(micro):
                if name == "kto":
                    batch = unpaired_batch(unpaired[k], 0, packed)
                else:
                    batch = pair_batch([dict(e, **({"ref_chosen": e["ref"][0],
                                                    "ref_rejected": e["ref"][1]}
                                                   if precomputed else {})) for e in pairs],
                                       0, packed)
                staged = runner.stage_preference(batch)
                # the eager reference over the staged rows' padded layout (padding: -1 sequences)
                zero_grads(opt)
                set_dropout_seed(seed, 1, k, stride)
                loss, metrics = eager_loss(method, batch, staged, opts)
                (loss / len(pairs)).backward()
                loss = loss.detach()  # the eager graph must be gone before a capture
                want = [x.clone() for x in grads]
                zero_grads(opt)
                set_dropout_seed(seed, 1, k, stride)
                got = runner.run(staged, 1.0 / len(pairs)).clone()
                got_metrics = {m: v.clone() for m, v in runner.metrics.items()}
                record(f"preference-graphed-{tag}-loss-{k}", abs(got.item() - loss.item())
                       / abs(loss.item()), 2e-3, graphs=len(runner.graphs),
                       **({"kl": float(metrics["kl"][0])} if "kl" in metrics else {}))
                scale = max(float(metrics[m][0].abs()) for m in ("logps/chosen", "logps/rejected"))
                worst = max((float((got_metrics[m] - v).abs().max()) / scale, m)
                            for m, v in metrics.items()) if got_metrics.keys() == metrics.keys() \
                    else (float("inf"), "names differ")
                record(f"preference-graphed-{tag}-metrics-{k}", worst[0], 2e-3, worst=worst[1])
                record(f"preference-graphed-{tag}-grads-{k}",
                       max(rel(a, b) for a, b in zip(want, grads)), 3e-2)
            if runner.failed:  # the eager fallback passed the comparisons; a capture was wanted
                record(f"preference-graphed-{tag}-captured", 1.0, 0.0, error=runner.failed)


def check_long_context(dirs):
    """Offload (speed/offload.py) and MLP tiles (models/tiling.py) on the path qlora train runs
    (fused kernels, grouped 4-bit fast path, kept attention), bf16 on the GPU:
    - the tiny llama, 512 tokens a step, tiles of 128: offload alone moves bytes and nothing else
      (its step differs from the plain one no more than the plain one from itself: flash
      attention's backward may add in another order); tiles and both within the fast path's
      bounds (loss 2e-3, gradients 5e-2 relative: a tile's GEMMs have 128 rows, not 512, and
      cuBLAS may pick kernels that round otherwise, one bf16 ulp, 4e-3, on some outputs);
    - the same through the CUDA-graph step (captured: its copies, events and tiles inside);
    - Llama-3-8B's width, 4 layers, 16384 tokens, LoRA r16 on all linears, attention rerun: the
      same bounds, and the peak allocated memory of the step lower with both than without (the
      planner's predictions for both recorded beside, for its calibration)."""
    fast = replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True, keep_attention=True)
    model = nf4_lora_model(dirs["llama"], dropout=0.0)
    plans = [fast, fast, replace(fast, offload_activations=True), replace(fast, tile_mlp=128),
             replace(fast, offload_activations=True, tile_mlp=128)]
    runs = _seeded_step_runs(model, plans)
    (loss0, grads0), (loss1, grads1) = runs[:2]
    noise = max(abs(loss1 - loss0) / loss0, max(rel(a, b) for a, b in zip(grads0, grads1)))
    loss_o, grads_o = runs[2]
    record("long-context-offload-same-step",
           max(abs(loss_o - loss0) / loss0, max(rel(a, b) for a, b in zip(grads0, grads_o))),
           2 * noise, run_to_run=noise)
    _record_runs("long-context-tiles", 0.0, [runs[0], runs[3]])
    _record_runs("long-context-offload-tiles", 0.0, [runs[0], runs[4]])
    del model
    _check_graphed_step(dirs["llama"], keep=True, long=True)
    _check_page_locked()
    _check_long_context_width()


def _check_page_locked(numel: int = 3 * 2**20 + 5):
    """speed/offload.page_locked: a host buffer of a size no power of two, registered with CUDA:
    pinned as torch sees it, and a non-blocking round trip through the GPU on a side stream
    (as offload copies) gives the values back."""
    from qlora.speed.offload import page_locked

    host = page_locked(numel, torch.bfloat16)
    src = torch.randn(numel, device=DEV).bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        host.copy_(src, non_blocking=True)
        back = host.to(DEV, non_blocking=True)
    torch.cuda.current_stream().wait_stream(stream)
    same = torch.equal(back, src)
    record("long-context-page-locked-round-trip", 0.0 if host.is_pinned() and same else 1.0, 0.0,
           pinned=host.is_pinned(), equal=same, numel=host.numel())


def _check_long_context_width(seq: int = 16384, layers: int = 4):
    from qlora import memory
    from qlora.adapters import set_dropout_seed
    from qlora.models.load import random_model
    from qlora.models.spec import NAMED_SHAPES, spec_from_config

    spec = spec_from_config(dict(NAMED_SHAPES["llama-3-8b"], num_hidden_layers=layers))
    model = random_model(spec, QuantConfig(method="nf4", compute_dtype=torch.bfloat16), device=DEV)
    torch.manual_seed(0)
    attach_adapters(model, AdapterConfig(r=16, alpha=32, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.gradient_checkpointing = True
    model.train()
    x = torch.randint(6, 30000, (1, seq), generator=torch.Generator().manual_seed(3)).to(DEV)
    plain = replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True)
    runs, peaks = [], []
    for plan in (plain, replace(plain, offload_activations=True, tile_mlp=True)):
        applied = apply_speed(model, plan)
        model.zero_grad()
        set_dropout_seed(applied.dropout_seed, 1, 0, applied.dropout_stride)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loss = model(x, labels=x) / (seq - 1)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        runs.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        del loss
    _record_runs(f"long-context-llama-width-{seq}", 0.0, runs)
    pc = memory.PlanConfig(seq_len=seq, kernels="fused", lora_dropout=0.0)
    predicted = [memory.plan(spec, cfg).allocated for cfg in
                 (pc, replace(pc, offload_activations=True, tile_mlp=True))]
    gib = [round(b / 2**30, 3) for b in peaks]
    record(f"long-context-llama-width-{seq}-peak-lower", peaks[1] / peaks[0], 0.95,
           peak_gib=gib, predicted_gib=[round(b / 2**30, 3) for b in predicted],
           note="planner predictions count the optimizer step too; only the step's peak is measured")
def check_flex_capped_attention(dirs):
    """flex_capped_attention vs models/families/gemma.capped_attention at Gemma-2-9B's heads
    (16 query heads over 8, head_dim 256, scale 256 ** -0.5, cap 50), 2048 tokens in 3 packed
    documents, full attention and a 512-token window. Truth is the dense reference in fp32 on the
    same bf16 inputs; the bound is twice the dense reference's own bf16 error against it (flex
    caps the fp32 scores, which rounds less than the reference, so it should come in under it),
    plus 1e-3 of room. Both timed (forward + backward) with their peak memory."""
    from qlora.kernels.capped_attention import flex_capped_attention, flex_layer_masks
    from qlora.models.attention import attention_mask
    from qlora.models.families.gemma import capped_attention

    g = torch.Generator(device=DEV).manual_seed(0)
    B, H, Hkv, T, D = 1, 16, 8, 2048, 256
    q, k, v = (torch.randn(B, h, T, D, device=DEV, generator=g).bfloat16() for h in (H, Hkv, Hkv))
    positions = torch.cat([torch.arange(700), torch.arange(900), torch.arange(448)])[None]
    grad = torch.randn(B, H, T, D, device=DEV, generator=g).bfloat16()
    scale, cap = 256 ** -0.5, 50.0
    for window in (None, 512):
        dense = attention_mask(positions, 0, window, DEV, dense=True)
        (flex_mask,) = flex_layer_masks((window,), positions, torch.device(DEV))

        def run(fn, dtype, mask):
            inputs = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
            out = fn(*inputs, mask, scale, cap)
            out.backward(grad.to(dtype))
            return [out.detach().float()] + [t.grad.float() for t in inputs]

        truth = run(capped_attention, torch.float32, dense)
        dense_bf16 = run(capped_attention, torch.bfloat16, dense)
        flex_bf16 = run(flex_capped_attention, torch.bfloat16, flex_mask)
        for i, part in enumerate(("out", "dq", "dk", "dv")):
            ref_err = rel(truth[i], dense_bf16[i])
            record(f"flex-capped-attention-{part}-window{window}", rel(truth[i], flex_bf16[i]),
                   2 * ref_err + 1e-3, dense_bf16_err=ref_err)
        timings = {}
        for name, fn, mask in (("flex", flex_capped_attention, flex_mask),
                               ("dense", capped_attention, dense)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(fn, torch.bfloat16, mask)
            peak = torch.cuda.max_memory_allocated() - base
            timings[name] = (_call_ms(lambda: run(fn, torch.bfloat16, mask), reps=5), peak / 2**20)
        record(f"flex-capped-attention-ms-window{window}", timings["flex"][0], float("inf"),
               dense_ms=timings["dense"][0], flex_peak_mib=timings["flex"][1],
               dense_peak_mib=timings["dense"][1])


def check_capped_cross_entropy(dirs):
    """The fused cross-entropy with Gemma's final soft-cap (30) inside its kernel vs
    F.cross_entropy on fp32 capped logits (autograd), at Gemma 2's vocabulary (256,000), 2048
    tokens: the uncapped check's bounds (check_cross_entropy), both timed."""
    _check_fused_cross_entropy("capped-cross-entropy", vocab=256000, hidden=3584, std=0.05,
                               chunk=256, softcap=30.0)


def _tiny_family(fam: str, **extra) -> Path:
    from qlora.models.families import FAMILIES

    sizes = dict(getattr(FAMILIES[fam], "TINY_SIZES", {}), hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, **extra)
    return build_tiny_model(Path(tempfile.mkdtemp()) / fam, fam, **sizes)


def check_gemma_graphed_step(dirs):
    """Gemma 2 (flex_attention's masks made inside the capture from the graph's offsets, the
    final soft-cap in the fused cross-entropy) and Gemma 3 (varlen attention with its windows)
    through GraphedSteps vs eagerly, as check_graphed_step (same bounds): packed and unpacked
    rows, with the path qlora train runs and with the reference path (Gemma 2: refused, so the
    eager step, which must equal itself)."""
    from qlora.train.graphs import unsupported_reason

    for fam in ("gemma2", "gemma3_text"):
        path = _tiny_family(fam, sliding_window=64)
        model = nf4_lora_model(path, dropout=0.0)
        apply_speed(model, replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True))
        reason = unsupported_reason(model, torch.device(DEV), 512)
        record(f"gemma-graphs-allowed-{fam}", 0.0 if reason is None else 1.0, 0.0, reason=reason)
        _check_graphed_step(path, True, tag=f"-{fam}")


def check_phi3_fast_path(dirs):
    """Phi-3's fork (FastPhi3Attention: qkv_proj a group of one, Triton RoPE where the rotary is
    full, attention kept for the rerun) vs the reference step, NF4 + LoRA, dropout off and seeded,
    for a full rotary (Phi-3, Phi-4) and a partial one (Phi-4-mini's 0.75); logits vs
    transformers in bf16; and its CUDA-graph step vs the eager one (check_graphed_step)."""
    fast = replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True)
    for tag, extra in (("full", {}), ("partial", {"partial_rotary_factor": 0.75})):
        path = _tiny_family("phi3", **extra)
        x = ids(9)
        ours = load_model(path, QuantConfig(method="none", compute_dtype=torch.bfloat16),
                          device=DEV)
        with torch.no_grad():
            record(f"phi3-logits-bf16-{tag}", rel(hf(path, torch.bfloat16)(x).logits, ours(x)), 3e-2)
        for dropout in (0.0, 0.1):
            model = nf4_lora_model(path, dropout=dropout)
            runs = _seeded_step_runs(model, [SEEDED, fast, replace(fast, keep_attention=True)])
            _record_runs(f"phi3-fast-step-{tag}", dropout, runs[:2])
            _record_runs(f"phi3-kept-attention-{tag}", dropout, [runs[0], runs[2]])
        _check_graphed_step(path, True, tag=f"-phi3-{tag}")
def check_moe(dirs):
    from qlora.kernels.experts import (dequantize_stack, dequantize_stack_triton, row_alignment,
                                       stack_rows)
    from qlora.quant import QuantizedStack

    root = Path(tempfile.mkdtemp())
    sizes = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    moe = {"mixtral": build_tiny_model(root / "mixtral", "mixtral", intermediate_size=128,
                                       num_local_experts=8, **sizes),
           "qwen3_moe": build_tiny_model(root / "qwen3_moe", "qwen3_moe", moe_intermediate_size=128,
                                         num_experts=8, num_experts_per_tok=3,
                                         output_router_logits=True, **sizes)}  # the aux loss on
    for family, path in moe.items():
        ours = load_model(path, QuantConfig(method="none", compute_dtype=torch.float32), device=DEV)
        with torch.no_grad():
            want = hf(path, torch.float32)(ids(), output_router_logits=True)
            got = ours(ids())
        record(f"moe-{family}-fp32-logits", rel(want.logits, got), 1e-5)
        record(f"moe-{family}-fp32-router-logits",
               max(rel(a, b) for a, b in zip(want.router_logits, ours.router_logits())), 1e-5)
        runs = []
        for dtype, grouped in ((torch.float32, False), (torch.bfloat16, False),
                               (torch.bfloat16, True)):
            model = nf4_lora_model(path, dropout=0.0, dtype=dtype)
            apply_speed(model, SpeedPlan(grouped_experts=grouped), log=lambda _: None)
            model.train()
            loss = model(ids(1), labels=ids(1))
            loss.backward()
            runs.append((float(loss.detach()), {n: p.grad.float() for n, p in
                                                model.named_parameters() if p.grad is not None}))
        (l32, g32), (l0, g0), (l1, g1) = runs
        # bf16 against bf16: each expert's GEMM rounds alike; the k outputs are added in fp32 by
        # the grouped path, in bf16 by the loop, and a token whose k-th and (k+1)-th router
        # probabilities are that close may take another expert, so the adapter gradients are
        # judged by their distance to the fp32 loop's: the grouped path's may exceed the bf16
        # loop's by a quarter at most (on the CPU, Qwen3-MoE top-3: 0.48 against 0.46)
        record(f"moe-{family}-grouped-loss", abs(l1 - l0) / abs(l0), 1e-2)
        grouped_error = max(rel(g32[n], g1[n]) for n in g32)
        loop_error = max(rel(g32[n], g0[n]) for n in g32)
        grouped_to_loop = max(rel(g0[n], g1[n]) for n in g0)
        record(f"moe-{family}-grouped-grads-vs-fp32", grouped_error / loop_error, 1.25,
               grouped_to_fp32=grouped_error, loop_to_fp32=loop_error,
               grouped_to_loop=grouped_to_loop, adapters=len(g0))
        _check_moe_parts(path, family, l1, g1, grouped_to_loop)
        _check_moe_graphed_step(path, family, grouped_to_loop)
    _check_triton_grouped_mm()
    for name, count, shape in (("qwen3-30b-a3b-gate-up", 256, (768, 2048)),
                               ("mixtral-8x7b-down", 8, (4096, 14336))):
        stack = QuantizedStack(count, shape, QuantConfig(), DEV)
        g = torch.Generator(device=DEV).manual_seed(0)
        for i in range(count):
            stack.set_member(i, torch.randn(shape, generator=g, device=DEV) * 0.02)
        got = dequantize_stack_triton(stack, torch.bfloat16)
        want = dequantize_stack(stack, torch.bfloat16)
        record(f"moe-stack-dequant-{name}", 0.0 if torch.equal(got, want) else 1.0, 0.0,
               kernel_ms=_call_ms(lambda: dequantize_stack_triton(stack, torch.bfloat16), reps=5),
               bnb_member_by_member_ms=_call_ms(
                   lambda: [stack.dequantize_member(i) for i in range(count)], reps=3))
        # a part of the projection as the grouped GEMM dequantizes it (kernels/experts.row_parts):
        # every other member's (the gates'), the rows from the second aligned step on
        rows = (row_alignment(shape[1], stack.blocksize, stack.nested_blocksize), shape[0])
        part = stack_rows(stack, *rows, first=0, step=2)
        got = dequantize_stack_triton(part, torch.bfloat16)
        record(f"moe-stack-dequant-{name}-rows", 0.0 if torch.equal(
            got, want[0::2, rows[0]:rows[1]]) else 1.0, 0.0, rows=list(rows),
               kernel_ms=_call_ms(lambda: dequantize_stack_triton(part, torch.bfloat16), reps=5))
        del got, want, stack, part
    _time_sparse_block()


def _check_moe_parts(path, family: str, whole_loss: float, whole_grads: dict,
                     grouped_to_loop: float):
    """The grouped step with every projection in the smallest parts of output rows
    (kernels/experts.row_parts: PART_BYTES shrunk), against each projection whole: the same dot
    products in forward, the input gradients summed over the parts in backward. torch._grouped_mm
    may pick other tiles for narrower parts, and bf16 rounding that differs by a sum's order tips
    near-tied routing, so the bounds are the grouped-vs-loop ones above: 1e-2 in the loss, the
    measured grouped-vs-loop spread in the gradients."""
    import qlora.kernels.experts as kernels

    budget = kernels.PART_BYTES
    kernels.PART_BYTES = 1
    try:
        model = nf4_lora_model(path, dropout=0.0, dtype=torch.bfloat16)
        apply_speed(model, SpeedPlan(grouped_experts=True), log=lambda _: None)
        model.train()
        loss = model(ids(1), labels=ids(1))
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        kernels.PART_BYTES = budget
    record(f"moe-{family}-parts-loss", abs(float(loss.detach()) - whole_loss) / abs(whole_loss),
           1e-2)
    record(f"moe-{family}-parts-grads", max(rel(whole_grads[n], grads[n]) for n in whole_grads),
           max(grouped_to_loop, 0.03))


def _check_triton_grouped_mm():
    """The Triton grouped GEMM (kernels/experts_triton.py, what GPUs below sm90 and fp16 run)
    compiled, at Qwen3-30B-A3B's widths: forward and both gradients against the loop over
    experts in fp64, for balanced routing and every token to the same 8 experts; then forward
    and backward captured in a CUDA graph and replayed under other routings, against eager."""
    from qlora.kernels.experts import TritonGroupedMM, looped_grouped_mm as loop

    def offsets_of(routing, tokens=512, experts=128, k=8):
        picks = (torch.rand(tokens, experts).topk(k, dim=1).indices if routing == "balanced"
                 else torch.arange(k).expand(tokens, k))
        counts = torch.bincount(picks.reshape(-1), minlength=experts)
        return counts.cumsum(0).to(torch.int32).to(DEV)

    torch.manual_seed(0)
    # fp32: sums of 2,048 products in another order, ~sqrt(K)·2^-24 of the largest; bf16/fp16:
    # one rounding of the output to nearest (half a unit: 2^-8, 2^-11 of it at most) and the fp32
    # sums' order beneath it
    bounds = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-8}
    for dtype, bound in bounds.items():
        for routing in ("balanced", "unbalanced"):
            for name, k, n in (("gate-up", 2048, 1536), ("down", 768, 2048),
                               ("lora-a", 2048, 16), ("lora-b", 16, 1536)):
                offsets = offsets_of(routing)
                a = torch.randn(int(offsets[-1]), k, device=DEV).to(dtype).requires_grad_()
                b = (torch.randn(128, n, k, device=DEV) * k**-0.5).to(dtype).requires_grad_()
                grad = torch.randn(a.shape[0], n, device=DEV).to(dtype)
                got = TritonGroupedMM.apply(a, b.transpose(1, 2), offsets)
                got_grads = torch.autograd.grad(got, [a, b], grad)
                a64 = a.detach().double().requires_grad_()
                b64 = b.detach().double().requires_grad_()
                want = loop(a64, b64.transpose(1, 2), offsets)
                want_grads = torch.autograd.grad(want, [a64, b64], grad.double())
                record(f"moe-triton-grouped-mm-{name}-{routing}-{str(dtype)[6:]}",
                       max(rel(w, g) for w, g in zip((want, *want_grads), (got, *got_grads))),
                       bound)
    for dtype in bounds:
        offsets = offsets_of("balanced")
        a = torch.randn(int(offsets[-1]), 2048, device=DEV).to(dtype).requires_grad_()
        b = (torch.randn(128, 1536, 2048, device=DEV) * 2048**-0.5).to(dtype).requires_grad_()
        grad = torch.randn(a.shape[0], 1536, device=DEV).to(dtype)

        def step():
            out = TritonGroupedMM.apply(a, b.transpose(1, 2), offsets)
            return (out, *torch.autograd.grad(out, [a, b], grad))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            held = step()
        worst = 0.0
        for routing in ("unbalanced", "balanced"):  # new offsets in place: the graph reads them
            offsets.copy_(offsets_of(routing))
            graph.replay()
            # no atomics: the replay is the eager run's arithmetic, bit for bit
            worst = max(worst, *(float((h - e).abs().max()) for h, e in zip(held, step())))
        record(f"moe-triton-grouped-mm-graph-replay-{str(dtype)[6:]}", worst, 0.0)


def _check_moe_graphed_step(path, family: str, grouped_to_loop: float):
    """The grouped MoE step through GraphedSteps vs eagerly, as check_graphed_step: the routing,
    the grouped GEMMs over device offsets and the aux loss captured. The gradients' bound is the
    dense models' 0.03 or, where larger, how far the grouped path's bf16 gradients already are
    from the loop's in this check: bf16 rounding that differs by the order of a sum tips a
    near-tied top-k choice, and a token then trains another expert's adapter (tiny Qwen3-MoE,
    top-3 of 8: 0.067 grouped against the loop, 0.034 and 0.037 graphed against eager; H200,
    2026-12-06)."""
    from qlora.train.graphs import unsupported_reason

    model = nf4_lora_model(path, dropout=0.0)
    apply_speed(model, replace(SEEDED, fused_kernels=True, fast_base=True, grouped=True,
                               grouped_experts=True))
    reason = unsupported_reason(model, torch.device(DEV), 512)
    record(f"moe-graphs-allowed-{family}", 0.0 if reason is None else 1.0, 0.0, reason=reason)
    del model
    _check_graphed_step(path, True, tag=f"-moe-{family}", grads_bound=max(3e-2, grouped_to_loop))


def _time_sparse_block():
    """One Qwen3-30B-A3B sparse block (128 experts, 8 per token, NF4, LoRA r16 on the experts)
    over 2048 tokens: forward + backward, grouped vs the loop over experts."""
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config, NAMED_SHAPES

    config = dict(NAMED_SHAPES["qwen3-30b-a3b"], num_hidden_layers=1)
    model = random_model(spec_from_config(config), QuantConfig(), device=DEV)
    attach_adapters(model, AdapterConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    block = model.model.layers[0].mlp
    x = (torch.randn(1, 2048, 2048, device=DEV) * 0.5).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn_like(x)
    outs, times = [], []
    for grouped, fused in ((False, False), (True, False), (True, True)):
        apply_speed(model, SpeedPlan(grouped_experts=grouped, fused_kernels=fused),
                    log=lambda _: None)
        model.train()

        def step():
            x.grad = None
            y = block(x)
            y.backward(dy)
            return y

        outs.append((step().detach().float(), x.grad.float().clone()))
        times.append(_call_ms(step, reps=3))
    (y0, dx0), (y1, dx1), (y2, dx2) = outs
    # bf16 throughout; the grouped path adds each token's 8 expert outputs in fp32
    record("moe-qwen3-30b-block-grouped-output", rel(y0, y1), 2e-2, loop_ms=times[0],
           grouped_ms=times[1])
    record("moe-qwen3-30b-block-grouped-input-grad", rel(dx0, dx1), 2e-2)
    # with fused_kernels: SwiGLU and the row sums by Triton (kernels/routing.py), rounding as
    # the torch path does but for the order of fp32 sums: the same bound
    record("moe-qwen3-30b-block-fused-output", rel(y0, y2), 2e-2, fused_ms=times[2])
    record("moe-qwen3-30b-block-fused-input-grad", rel(dx0, dx2), 2e-2)
    _check_routing_kernels()


def _check_routing_kernels():
    """kernels/routing.py's Triton sums against their torch references at Qwen3-30B-A3B's shape
    (2048 tokens, 8 of 128 experts each, hidden 2048, bf16 router weights). Both round each
    weighted row alike; they differ in the order of the fp32 sums (the output, a token's 8 rows:
    within a bf16 unit, 2^-8 of the largest) and in the router weights' gradient, which the
    reference sums from products rounded to bf16 (2^-9 each, a random walk over 2048 terms:
    about 2^-9 of the sum; 2e-2 as the block checks)."""
    from qlora.kernels import routing

    g = torch.Generator(device=DEV).manual_seed(0)
    n, k, h = 2048, 8, 2048
    flat = torch.randint(0, 128, (n * k,), generator=g, device=DEV)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=DEV))
    y = torch.randn(n * k, h, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
    w = torch.rand(n, k, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(n, h, generator=g, device=DEV).to(torch.bfloat16)
    _compare_fused("moe-routing-combine",
                   lambda a, b: routing.combine(a, b, order, inverse, fused=True),
                   lambda a, b: routing.combine(a, b, order, inverse), [y, w], grad, 2e-2)
    x = torch.randn(n, h, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
    rows_grad = torch.randn(n * k, h, generator=g, device=DEV).to(torch.bfloat16)
    _compare_fused("moe-routing-sorted-rows",
                   lambda a: routing.SortedRows.apply(a, order, inverse, k, True),
                   lambda a: routing.SortedRows.apply(a, order, inverse, k, False), [x],
                   rows_grad, 2**-7)


if __name__ == "__main__":
    sys.exit(main())
