"""Time one QLoRA training step (forward, backward, optimizer step) for several systems side by side.

Every system runs in its own subprocess on the same GPU, on the same random-weight checkpoint (real
shapes), with the same data, seed and LoRA configuration, so memory peaks don't mix and a crash of one
system is recorded as that system's result instead of stopping the run.

Systems
  hf        transformers + peft + bitsandbytes exactly as the seeds set it up: BitsAndBytesConfig(nf4,
            double quant, bf16 compute), prepare_model_for_kbit_training(use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}), LoraConfig(r=16, alpha=32,
            dropout=0.05, every linear of the block: the seven projections, Phi-3's four fused ones),
            get_peft_model, bitsandbytes PagedAdamW8bit, lr 2e-4,
            bf16 autocast and grad-norm clipping at 0.3 as the seeds' Trainer (bf16=True, max_grad_norm=0.3).
            attn_implementation sdpa, but eager for Gemma 2 (--hf-attn auto: transformers' sdpa
            drops Gemma 2's attention soft-cap).
  hf+liger  the same with liger-kernel's patches applied before the model is built (RoPE, RMSNorm,
            SwiGLU, fused linear cross-entropy).
  unsloth   Unsloth's FastLanguageModel, same LoRA config, use_gradient_checkpointing="unsloth"
            (a family Unsloth has no module for, such as phi3, goes to its FastModel inside).
  unsloth-nocompile
            "unsloth" with its per-layer compile off (UNSLOTH_BLOCK_COMPILE=0 in its worker,
            before unsloth is imported): what a torch 2.11 user falls back to on Gemma 2, whose
            compiled layer fails in inductor. Unsloth's Triton kernels still run, eagerly, as on
            torch 2.10 and older; its compiled loss and attention stay. Expected slower than
            Unsloth compiled (not yet measured), so reported beside it, never instead. Not in the default --systems.
  qlora     this project as `qlora train` runs it (QloraStep below): flattened adapters, seeded
            LoRA dropout, RMSNorm, SwiGLU and RoPE as the Triton kernels of qlora.kernels.fused,
            the 4-bit bases through qlora.speed.use_fast_path (our Triton dequantize, the LoRA
            product accumulated by the base GEMM), forward+backward replayed as a CUDA graph
            (causal SDPA for one-document rows); with and without checkpointing. With
            checkpointing, each layer's attention kept for its backward (keep_attention, on where
            the plan fits, as here on an 80 GB GPU; --keep-attention N: the last N layers only,
            what qlora train keeps where only N fit). Every layer checkpointed: keep_activations
            off, where qlora train by default leaves out of the checkpoint as many layers as
            its memory plan fits (on an 80 GB GPU at seq 2048, nearly every one); qlora-keepacts
            measures that.
            A model of a family with no native module (stablelm-2-1.6b) runs on the generic path
            as qlora train runs it: transformers' modules, no speed layer, no CUDA graph.
  qlora-keepacts  "qlora" with the last --keep-activations N layers not checkpointed (every
                  activation kept, no rerun: what qlora train's keep_activations picks where N
                  more layers' activations fit); opt-in
  qlora-nokeep    "qlora" with keep_attention off: attention rerun with the layer (what qlora train
                  picks where keeping it fits in no layer)
  qlora-eager     the same without the CUDA graph
  qlora-triton-experts
                  "qlora" with the experts' grouped GEMMs on the Triton kernel
                  (kernels/experts_triton.py), as GPUs below sm90 and fp16 run them, where an
                  sm90 GPU in bf16 takes torch._grouped_mm; opt-in
  qlora-ungrouped "qlora" with SpeedPlan(grouped=False): one base GEMM per projection (what
                  "qlora" was until 2026-11-25 23:10; the results of 2026-11-25 22:19 and 23:01
                  named the grouped one "qlora-grouped")
  qlora-bnb       "qlora" with the 4-bit bases through bitsandbytes' own matmul (the step before
                  SpeedPlan.fast_base; results of 2026-11-25 named it "qlora", and "qlora-fast" the other)
  qlora-unfused   RunConfig fused_kernels: false: torch RMSNorm, SwiGLU and RoPE, bitsandbytes'
                  matmul (the results of 2026-11-25 20:17 named "qlora-fused" the fused one)
  qlora-old       the model stepped the plain way (per-matrix optimizer, torch's dropout RNG)

Mixture-of-experts shapes (mixtral-8x7b, qwen3-30b-a3b; tiny-mixtral, tiny-qwen3-moe on a CPU):
  LoRA r16 on attention and on the experts (qlora: all-linear; hf: peft's target_parameters
  mlp.experts.gate_up_proj / down_proj, the transformers 5 layout; unsloth: its own MoE targets),
  LoRA dropout 0 for every system (PEFT's LoRA on expert parameters refuses any other), the
  router frozen. The checkpoint is written shard by shard in the Hub's per-expert layout without
  building the model (Mixtral-8x7B: 93 GB on disk, Qwen3-30B-A3B: 61 GB). transformers +
  bitsandbytes keeps the experts in bf16 (it quantizes Linear layers only), so the seeds' stack
  needs 87 GiB of experts for Mixtral and 54 GiB for Qwen3-30B-A3B before the first step; qlora
  holds each expert's weights in NF4 and runs them as grouped GEMMs (speed/moe.py), without
  CUDA graphs.

Usage (on the GPU machine; see docs/BENCHMARKS.md for the exact commands used):
  python benchmarks/train_step.py --shapes qwen2.5-1.5b --seqs 2048,8192 --out results/
Each finished (system, shape, config) appends one JSON line to OUT/results.jsonl as it completes, so a
run that is cut off still leaves what it measured.

FLOP count (per optimizer step, written out in step_flops below and in docs/BENCHMARKS.md):
  N_lin  = weights of the seven projections of all layers, N_head = vocab x hidden (the LM head matmul),
  N_lora = LoRA A and B weights, T = micro_batch x seq tokens, ckpt = 1 with gradient checkpointing.
  dense  = 2(N_lin+N_head)T forward + 2(N_lin+N_head)T input-gradient (the base is frozen: no
           weight-gradient) + ckpt * 2 N_lin T recompute of the decoder layers
  lora   = 2 N_lora T (forward + input-grad + weight-grad + ckpt * recompute)
  attn   = (1 + 2 + ckpt) * 2 * mb * seq^2 * n_heads * head_dim * n_layers
           (forward QK^T and PV at 4 T^2 d each, halved for the causal mask; backward twice the forward)
  MFU    = (dense + lora + attn) / step_time / 989e12   (H100 SXM dense bf16 peak)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

H100_BF16_PEAK = 989e12
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3's block holds q/k/v and gate/up as one linear each: every linear of it, as PEFT names them
PHI3_LINEARS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SYSTEMS = ["hf", "hf+liger", "unsloth", "qlora", "qlora-nokeep", "qlora-eager", "qlora-old",
           "qlora-bnb", "qlora-unfused"]
# named in --systems only: not part of the default run
OPT_IN_SYSTEMS = ["unsloth-nocompile", "qlora-ungrouped", "qlora-keepacts",
                  "qlora-triton-experts"]

def _named_shape(name: str) -> dict:
    """A shape of qlora.models.spec.NAMED_SHAPES (this checkout's, uninstalled)."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from qlora.models.spec import NAMED_SHAPES

    return dict(NAMED_SHAPES[name])


def lora_targets(shape: dict) -> list[str]:
    """Every linear of a block (LoRA on all linears, the same names for every system)."""
    return PHI3_LINEARS if shape["model_type"] == "phi3" else SEVEN


def hf_attention(shape: dict, asked: str) -> str:
    """The seeds' stack's attn_implementation: `asked`, but "auto" is transformers' eager for
    Gemma 2, whose scores are soft-capped (transformers' sdpa drops the cap: another model, not
    the one trained), and sdpa for the rest."""
    if asked != "auto":
        return asked
    return "eager" if shape["model_type"] == "gemma2" else "sdpa"


# Real shapes, random weights.
SHAPES = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
    ),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
    ),
    # the families' shapes (real config.json values) are the planner's: qlora.models.spec.NAMED_SHAPES
    **{name: _named_shape(name) for name in ("gemma-2-9b", "phi-4", "mistral-nemo-12b", "gemma-3-1b",
                                             "stablelm-2-1.6b", "mixtral-8x7b",
                                             "qwen3-30b-a3b")},
    # Qwen3-30B-A3B's first 24 of its 48 layers, for the seeds' stack on an 80 GB card: peft's
    # prepare_model_for_kbit_training casts its bf16 experts to fp32, 108 GiB at 48 layers
    # (out of memory on an H100 80GB), 54 GiB at 24; every system runs the same 24 layers
    "qwen3-30b-a3b-24-layers": dict(_named_shape("qwen3-30b-a3b"), num_hidden_layers=24),
    # for a CPU smoke test of this script only
    "tiny-mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
        rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=4096, num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "tiny-qwen3-moe": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=512, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=4096, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
    # the same, of the families with blocks of their own and of the generic path
    "tiny-gemma2": dict(
        model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=16, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    "tiny-phi3": dict(
        model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
        max_position_embeddings=4096, original_max_position_embeddings=4096,
    ),
    "tiny-stablelm": dict(
        model_type="stablelm", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False,
        max_position_embeddings=4096, partial_rotary_factor=0.25, use_qkv_bias=True,
    ),
}


# ----------------------------------------------------------------------------- FLOPs

def step_flops(shape: dict, seq: int, mb: int, ckpt: bool, r: int = 16) -> dict:
    """FLOPs of one QLoRA training step, by term (see the module docstring)."""
    h, i, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = shape.get("head_dim") or h // nh  # Gemma's and Mistral Nemo's differ from h / nh
    q, kv = nh * hd, nkv * hd
    if is_moe(shape):  # the experts a token runs through: top_k of them, each a SwiGLU MLP
        k, ie = shape["num_experts_per_tok"], shape.get("moe_intermediate_size", i)
        i = k * ie
    # (in, out) of the seven projections (Phi-3's fused qkv_proj and gate_up_proj: the same
    # weights in two matrices, but LoRA's A is one per fused linear)
    projs = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    n_lin = n_layers * sum(a * b for a, b in projs)
    if shape["model_type"] == "phi3":
        projs = [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
    n_head = shape["vocab_size"] * h
    n_lora = n_layers * sum(r * (a + b) for a, b in projs)
    t = mb * seq
    c = 1 if ckpt else 0
    dense = 2 * (n_lin + n_head) * t * 2 + c * 2 * n_lin * t
    lora = 2 * n_lora * t * (3 + c)
    attn = (3 + c) * 2 * mb * seq * seq * q * n_layers
    return dict(n_lin=n_lin, n_head=n_head, n_lora=n_lora, dense=dense, lora=lora, attn=attn,
                total=dense + lora + attn)


# ----------------------------------------------------------------------------- model files

def is_moe(shape: dict) -> bool:
    return shape["model_type"] in ("mixtral", "qwen3_moe")


def make_moe_model_dir(shape_name: str, out_dir: Path, device: str) -> dict:
    """A mixture of experts' random bf16 checkpoint in the Hub's per-expert layout, written layer
    by layer (one shard each, normal(0, 0.02) drawn on the device): the model is never built, so
    a 47B one is written by a GPU of 80 GB and a host of 128 GB."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from qlora.models.families.moe_config import hub_expert_key

    spec = dict(SHAPES[shape_name])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               initializer_range=0.02, dtype="bfloat16", use_cache=False, **spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    t0, total, weight_map = time.time(), 0, {}

    def rand(*shape, std=0.02):
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * std).cpu()

    h, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    experts = cfg.num_local_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shards = [{"model.embed_tokens.weight": rand(cfg.vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": rand(cfg.vocab_size, h)}]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        t = {f"{p}.self_attn.q_proj.weight": rand(cfg.num_attention_heads * hd, h),
             f"{p}.self_attn.k_proj.weight": rand(cfg.num_key_value_heads * hd, h),
             f"{p}.self_attn.v_proj.weight": rand(cfg.num_key_value_heads * hd, h),
             f"{p}.self_attn.o_proj.weight": rand(h, cfg.num_attention_heads * hd),
             f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        if model_type == "qwen3_moe":
            t[f"{p}.self_attn.q_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
            t[f"{p}.self_attn.k_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
        block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
        t[f"{p}.{block}.gate.weight"] = rand(experts, h)
        for e in range(experts):
            t[hub_expert_key(model_type, p, "gate_up_proj", e, 0)] = rand(inter, h)
            t[hub_expert_key(model_type, p, "gate_up_proj", e, 1)] = rand(inter, h)
            t[hub_expert_key(model_type, p, "down_proj", e, 0)] = rand(h, inter)
        shards.append(t)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        total += sum(x.nbytes for x in tensors.values())
        weight_map.update({k: name for k in tensors})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(str(out_dir))
    _write_tokenizer(out_dir)
    return dict(shape=shape_name, n_params=total // 2, build_s=round(time.time() - t0, 1))


def make_model_dir(shape_name: str, out_dir: Path, device: str) -> dict:
    """Random bf16 weights in the real shape, written once; every system loads these files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_moe(SHAPES[shape_name]):
        return make_moe_model_dir(shape_name, out_dir, device)
    spec = dict(SHAPES[shape_name])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               initializer_range=0.02, dtype="bfloat16", use_cache=False, **spec)
    torch.manual_seed(0)
    t0 = time.time()
    # Built directly on the device: transformers' normal(0, 0.02) init runs there in a second or two
    # where the CPU would take minutes for 8B parameters.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if model_type == "qwen2":
        # Qwen2's q/k/v biases start at zero; give them values as a trained model has.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out_dir))
    _write_tokenizer(out_dir)
    return dict(shape=shape_name, n_params=n_params, build_s=round(time.time() - t0, 1))


def _write_tokenizer(out_dir: Path) -> None:
    # Unsloth's loader wants a tokenizer beside the weights; the data are random ids, so any will do.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- systems
# Each setup returns (model, trainable params, loss_fn(ids, ckpt) -> mean token loss, autocast?).

def _bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _lora_config(args, moe: bool = False):
    from peft import LoraConfig

    if moe:  # attention's Linear layers, and the experts' 3D parameters (no dropout there)
        return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=SEVEN[:4], task_type="CAUSAL_LM",
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=lora_targets(SHAPES[args.shape]), task_type="CAUSAL_LM")


def setup_hf(model_dir: str, args, liger: bool = False, peft: bool = True):
    """`peft=False`: the model before get_peft_model (preference_step.py hands it to TRL's
    trainer with the LoRA config, as the trainer then puts the adapter on itself)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    if liger:
        # Liger patches the transformers classes, so it must run before the model is built.
        import liger_kernel.transformers as liger

        model_type = AutoConfig.from_pretrained(model_dir).model_type
        getattr(liger, f"apply_liger_kernel_to_{model_type}")()  # llama, qwen2, gemma2, phi3, ...
    quant = _bnb_config() if args.device == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, device_map={"": 0} if args.device == "cuda" else None,
        dtype=torch.bfloat16, attn_implementation=hf_attention(SHAPES[args.shape], args.hf_attn))
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not peft:
        return model, [], None, True
    torch.manual_seed(args.seed)
    model = get_peft_model(model, _lora_config(args, is_moe(SHAPES[args.shape])))
    model.train()

    def loss_fn(ids, ckpt):
        assert ckpt, "the seeds' stack always trains with gradient checkpointing"
        return model(input_ids=ids, labels=ids).loss

    return model, [p for p in model.parameters() if p.requires_grad], loss_fn, True


# Unsloth's switch for the torch.compile region it wraps around each decoder layer in training
# (unsloth/models/_block_compile.py, on by default for FastLanguageModel from torch 2.11). Its
# Triton kernels run inside that region, and torch 2.11's inductor fails on Gemma 2's layer
# (decompose_triton_kernel_wrapper_functional); with it off they run eagerly, as before 2.11.
UNSLOTH_LAYER_COMPILE_OFF = {"UNSLOTH_BLOCK_COMPILE": "0"}


def setup_unsloth(model_dir: str, args, compile_layers: bool = True):
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not compile_layers:
        # read when Unsloth wraps the layers and on every call: set before it is imported
        os.environ.update(UNSLOTH_LAYER_COMPILE_OFF)
    import unsloth  # noqa: F401  (must come before transformers to patch it)
    import torch
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max(args.seqs), dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True, fix_tokenizer=False)
    dropout = 0.0 if is_moe(SHAPES[args.shape]) else args.lora_dropout
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=dropout, bias="none",
        target_modules=lora_targets(SHAPES[args.shape]), use_gradient_checkpointing="unsloth",
        random_state=args.seed)
    FastLanguageModel.for_training(model)

    def loss_fn(ids, ckpt):
        assert ckpt
        return model(input_ids=ids, labels=ids).loss

    return model, [p for p in model.parameters() if p.requires_grad], loss_fn, True


# ============================================================================= run_qlora
# THIS PROJECT. Written against the contracts in docs/ARCHITECTURE.md while qlora.models is being
# written in parallel: adjust here when the API lands (the gradient-checkpointing switch especially).

def _set_qlora_checkpointing(model, on: bool) -> str:
    """Turn our gradient checkpointing on/off through whichever switch DecoderLM exposes."""
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(on)
        return "set_gradient_checkpointing"
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = on
        return "attribute gradient_checkpointing"
    raise RuntimeError("DecoderLM exposes no gradient-checkpointing switch "
                       "(set_gradient_checkpointing(on) or .gradient_checkpointing)")


class QloraStep:
    """This project's own step, as `qlora train` runs it: adapters flattened into one optimizer
    parameter (paged 8-bit AdamW), LoRA dropout seeded per micro-batch, and (variant "qlora") the
    forward+backward replayed as a CUDA graph (qlora.train.graphs); "qlora-eager" without graphs."""

    def __init__(self, model, args, applied, graphs: bool, plan=None, auto_keep: bool = False):
        """`applied`: what qlora.speed.apply_speed returned for the model (the seeded dropout);
        None on the generic path, whose LoRA dropout draws from the global RNG. `plan`: the
        SpeedPlan it applied, which each configuration's auto choices start from."""
        self.model, self.args, self.use_graphs = model, args, graphs and args.device == "cuda"
        self.seed, self.stride = (None, 0) if applied is None else (applied.dropout_seed,
                                                                     applied.dropout_stride)
        self.plan, self.auto_keep = plan, auto_keep
        self.opt = self.graphs = None
    def replan(self, seq: int, ckpt: bool) -> dict:
        """Where offload, MLP tiles or kept attention are `auto`: what qlora train picks for this
        sequence length (memory.long_context_choice, then memory.attention_layers_that_fit),
        applied to the model. Returns what was chosen, for the record."""
        from dataclasses import replace

        from qlora import memory
        from qlora.speed import apply_speed

        auto_offload, auto_tiles = self.args.offload_activations == "auto", self.args.tile_mlp == "auto"
        if self.plan is None or not (auto_offload or auto_tiles or self.auto_keep):
            return {}
        arch = memory.arch_from_config(SHAPES[self.args.shape], name=self.args.shape)
        gpu_bytes = _plan_gpu_bytes(self.args)
        pc = memory.PlanConfig(r=self.args.lora_r, lora_dropout=self.args.lora_dropout, seq_len=seq,
                               micro_batch=self.args.mb, checkpointing=ckpt, kernels="fused",
                               embedding_on_host=self.plan.embedding_on_host,
                               offload_activations=self.plan.offload_activations,
                               tile_mlp=self.plan.tile_mlp)
        pc = memory.long_context_choice(arch, pc, gpu_bytes, auto_offload, auto_tiles)
        keep = self.plan.keep_attention
        if self.auto_keep:
            n = memory.attention_layers_that_fit(arch, pc, gpu_bytes)
            keep = True if n == arch.num_layers else n or False
        plan = replace(self.plan, offload_activations=pc.offload_activations,
                       tile_mlp=pc.tile_mlp, keep_attention=keep)
        applied = apply_speed(self.model, plan)
        self.seed, self.stride = applied.dropout_seed, applied.dropout_stride
        return {"planned_for_gib": round(gpu_bytes / 2**30, 2),
                "planned_peak_alloc_gib": round(memory.plan(arch, replace(
                    pc, keep_attention=keep)).allocated / 2**30, 3)}

    def reset(self, ckpt: bool, seq: int):
        """A fresh optimizer (and graphs, where the model's step can be captured: not Gemma's,
        as qlora train decides it) for a configuration."""
        import torch
        from qlora.train.graphs import GraphedSteps, unsupported_reason
        from qlora.train.optim import build_optimizer

        _set_qlora_checkpointing(self.model, ckpt)
        self.opt = self.graphs = None
        name = "paged_adamw_8bit" if self.args.device == "cuda" else "adamw_torch"
        self.opt = build_optimizer(self.model, name, self.args.lr, 0.001, (0.9, 0.999), 1e-8)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.no_graphs_reason = (unsupported_reason(self.model, torch.device(self.args.device), seq)
                                 if self.use_graphs else None)
        if self.use_graphs and self.no_graphs_reason is None:
            self.graphs = GraphedSteps(self.model, [p.grad for p in self.params])
        self.index = 0
        return self.opt

    def forward_backward(self, ids):
        """The loop's micro-batch: staged on the host (train.graphs.GraphedSteps.stage; eagerly,
        input_ids page-locked), then copied without waiting for the GPU and run. The loop stages
        a step's micro-batches during the step before; the harness syncs around this call, so
        here the staging is timed as part of the step."""
        import torch
        from qlora.adapters import set_dropout_seed
        from qlora.train.step import pinned

        device = torch.device(self.args.device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        staged = (self.graphs.stage(ids, torch.arange(ids.shape[1]).expand_as(ids), ids)
                  if self.graphs is not None else pinned(ids, device))
        if self.seed is not None:
            set_dropout_seed(self.seed, self.args.seed, self.index, self.stride)
        self.index += 1
        if self.graphs is not None:
            return self.graphs.run(staged, 1.0 / n) / n
        loss = self.model(staged.to(device, non_blocking=device.type == "cuda"), labels=ids) / n
        loss.backward()
        return loss

    def optimizer_step(self):
        import torch
        from qlora.train.optim import zero_grads

        torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.opt.step()
        zero_grads(self.opt)


def run_qlora(model_dir: str, args, variant: str = "qlora"):
    """Load this project's model with NF4 + double quant, attach LoRA, return the training closure."""
    import torch
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    from qlora.models import GenericLM

    quant = QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    if args.random_weights:  # drawn and quantized on the device, no files
        from qlora.models.load import random_model
        from qlora.models.spec import spec_from_config

        model = random_model(spec_from_config(dict(SHAPES[args.shape]), name=args.shape), quant,
                             device=args.device, seed=args.seed)
    else:
        model = load_model(model_dir, quant, device=args.device)
    torch.manual_seed(args.seed)
    moe = is_moe(SHAPES[args.shape])  # attention and the experts; dropout 0 as for the others
    attach_adapters(model, AdapterConfig(r=args.lora_r, alpha=args.lora_alpha,
                                         dropout=0.0 if moe else args.lora_dropout,
                                         target_modules="all-linear" if moe
                                         else lora_targets(SHAPES[args.shape])))
    if isinstance(model, GenericLM):
        # the generic path (a family with no native module): transformers' own modules, no speed
        # layer, as qlora train runs it (SpeedPlan.for_run(generic=True): apply_speed not called,
        # LoRA dropout from the global RNG, no CUDA graph); the loop's flat optimizer
        model.train()
        return model, [p for p in model.parameters() if p.requires_grad], QloraStep(
            model, args, None, graphs=False), False
    if variant == "qlora-triton-experts":
        # torch._grouped_mm declined, so grouped_mm takes the Triton kernel as below sm90
        from qlora.kernels import experts

        experts.grouped_mm_runs = lambda a, b: False
        variant = "qlora"
    if variant in ("qlora", "qlora-nokeep", "qlora-eager", "qlora-unfused", "qlora-bnb",
                   "qlora-ungrouped", "qlora-keepacts"):
        model.train()
        from qlora.speed import SpeedPlan, apply_speed

        # the fast paths as qlora train puts them on a model (speed.SpeedPlan.for_run), each
        # variant leaving one out; applied before the graphs capture the step
        fast = (variant in ("qlora", "qlora-nokeep", "qlora-eager", "qlora-ungrouped",
                            "qlora-keepacts") and args.device == "cuda")
        keep = args.keep_attention if variant != "qlora-nokeep" else False
        plan = SpeedPlan(fused_kernels=variant != "qlora-unfused", fast_base=fast,
                         grouped=fast and variant != "qlora-ungrouped",
                         keep_attention=False if keep == "auto" else keep,
                         keep_activations=(args.keep_activations if variant == "qlora-keepacts"
                                           else False),
                         seeded_dropout=True, embedding_on_host=fast, grouped_experts=moe,
                         # a mixture of experts' too, where its experts read nothing on the
                         # host (FastMoeLM.cuda_graphs_refused says which do)
                         cuda_graphs=variant != "qlora-eager",
                         offload_activations=args.offload_activations == "true",
                         tile_mlp=_tile_mlp(args.tile_mlp) or False)
        applied = apply_speed(model, plan)
        step = QloraStep(model, args, applied, graphs=plan.cuda_graphs, plan=plan,
                         auto_keep=keep == "auto")
        return model, [p for p in model.parameters() if p.requires_grad], step, False
    model.train()

    def loss_fn(ids, ckpt):
        _set_qlora_checkpointing(model, ckpt)
        # DecoderLM returns the SUM of token losses (HF shift convention); divide by label count.
        n = ids.shape[0] * (ids.shape[1] - 1)
        return model(ids, position_ids=None, labels=ids) / n

    return model, [p for p in model.parameters() if p.requires_grad], loss_fn, False
# ============================================================================= /run_qlora


def setup_system(system: str, model_dir: str, args):
    if system == "hf":
        return setup_hf(model_dir, args)
    if system == "hf+liger":
        return setup_hf(model_dir, args, liger=True)
    if system == "unsloth":
        return setup_unsloth(model_dir, args)
    if system == "unsloth-nocompile":
        return setup_unsloth(model_dir, args, compile_layers=False)
    if system.startswith("qlora"):
        return run_qlora(model_dir, args, variant=system)
    raise ValueError(system)


# ----------------------------------------------------------------------------- worker

def _tile_mlp(text: str) -> bool | int | None:
    """--tile-mlp: true / false / a number of tokens; None for auto."""
    return {"true": True, "false": False, "auto": None}.get(text.lower(), None) \
        if not text.isdigit() else int(text)


def _plan_gpu_bytes(args) -> int:
    """The GPU size qlora's auto choices plan for: --plan-gpu-memory, else the cap, else the
    device's memory."""
    import torch
    from qlora.memory import parse_size

    if args.plan_gpu_memory:
        return parse_size(args.plan_gpu_memory, "--plan-gpu-memory")
    if args.memory_cap_gib is not None:
        return int(args.memory_cap_gib * 2**30)
    return torch.cuda.get_device_properties(0).total_memory


def configs_for(system: str, seqs: list[int], ckpt_off: bool) -> list[tuple[int, bool]]:
    out = []
    for s in seqs:
        out.append((s, True))
        if system.startswith("qlora") and ckpt_off:
            out.append((s, False))
    return out


def _optimizer(params, args):
    import torch

    if args.device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.001)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.001)


def batches(seed: int, seq: int, mb: int, n: int, data_vocab: int):
    """The same random token ids for every system: ids from a small sub-vocabulary, so the loss has
    somewhere to go (the model can learn the unigram distribution) and trends are comparable."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + seq)
    return [torch.randint(4, data_vocab, (mb, seq), generator=g) for _ in range(n)]


def gpu_busy_ms(forward_backward, optimizer_step, ids, steps: int = 2) -> float:
    """GPU time per step: the sum of the CUDA kernels' durations over `steps` steps (torch's
    profiler), without the gaps in which the GPU waits for the host. A host-bound step's wall
    time is longer; this is what a faster host could bring it down to."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward_backward(ids)
            optimizer_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return round(sum(e.self_device_time_total for e in kernels) / steps / 1e3, 2)


def emit(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    short = {k: rec[k] for k in ("system", "shape", "seq", "ckpt", "tokens_per_s", "peak_alloc_gib",
                                 "peak_reserved_gib", "mfu", "loss_first", "loss_last", "gpu_busy_ms",
                                 "error") if k in rec}
    print("RESULT", json.dumps(short), flush=True)


def worker(args) -> int:
    import torch

    cuda = args.device == "cuda"
    if cuda and args.memory_cap_gib is not None:
        # before anything is allocated: every system runs under the same cap
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    shape = SHAPES[args.shape]
    base = dict(system=args.system, shape=args.shape, mb=args.mb)
    if args.memory_cap_gib:
        base["memory_cap_gib"] = args.memory_cap_gib
    t0 = time.time()
    model, params, loss_fn, autocast = setup_system(args.system, args.model_dir, args)
    load_s = time.time() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    after_load = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    n_trainable = sum(p.numel() for p in params)
    # in host memory: a mixture of experts' adapters are GiBs (2.4 for Qwen3-30B-A3B at r 16), and a
    # GPU copy would count against --memory-cap-gib as no training run holds it
    init_state = [p.detach().to("cpu", copy=True) for p in params]
    print(f"[{args.system}] loaded in {load_s:.1f}s, {after_load:.2f} GiB allocated, "
          f"{n_trainable:,} trainable", flush=True)

    for seq, ckpt in configs_for(args.system, args.seqs, args.qlora_ckpt_off):
        n_steps = args.long_steps if seq >= args.long_from else args.steps
        rec = dict(base, seq=seq, ckpt=ckpt, steps=n_steps, warmup=args.warmup, load_s=round(load_s, 1),
                   alloc_after_load_gib=round(after_load, 3), trainable_params=n_trainable,
                   memory_cap_gib=args.memory_cap_gib, init_state="host")
        opt = ours = None
        try:
            # Every config starts from the same adapter weights and a fresh optimizer.
            with torch.no_grad():
                for p, s in zip(params, init_state):
                    p.copy_(s)
                    p.grad = None
            torch.manual_seed(args.seed)
            ours = loss_fn if isinstance(loss_fn, QloraStep) else None
            if ours is not None:
                rec.update(ours.replan(seq, ckpt))
            opt = ours.reset(ckpt, seq) if ours is not None else _optimizer(params, args)
            if ours is not None:
                rec["step"] = "cuda-graphs" if ours.graphs is not None else "eager-flat"
                if ours.no_graphs_reason:
                    rec["no_graphs_reason"] = ours.no_graphs_reason
                rec["keep_attention"] = getattr(model, "keep_attention", False) if ckpt else False
                rec["keep_activations"] = (getattr(model, "keep_activations", False) if ckpt
                                           else False)
                rec["path"] = "generic" if type(model).__name__ == "GenericLM" else "native"
                if rec["path"] == "native":
                    tiling = getattr(model.model.layers[0].mlp, "sequence_tiling", None)
                    rec["offload_activations"] = model.layer_input_offload is not None and ckpt
                    if rec["offload_activations"]:
                        # as qlora train refuses it before loading: an offload whose pinned
                        # buffers the host cannot hold is
                        # this config's error in seconds, not host memory run out mid-step
                        from qlora import memory
                        memory.check_host_offload(
                            memory.arch_from_config(shape, name=args.shape),
                            memory.PlanConfig(seq_len=seq, micro_batch=args.mb, checkpointing=True,
                                              offload_activations=True), chosen_by_plan=False)
                    rec["tile_mlp"] = tiling.tokens if tiling is not None else False
            if args.system.startswith("hf"):
                rec["attn_implementation"] = hf_attention(shape, args.hf_attn)
            data = batches(args.seed, seq, args.mb, n_steps, min(args.data_vocab, shape["vocab_size"]))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, losses, opt_times = [], [], []
            warmup_peak = warmup_reserved = 0

            def forward_backward(ids):
                if ours is not None:
                    return ours.forward_backward(ids)
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(ids, ckpt)
                loss.backward()
                return loss

            def optimizer_step():
                if ours is not None:
                    ours.optimizer_step()
                else:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            for step in range(n_steps):
                ids = data[step].to(args.device, non_blocking=False) if ours is None else data[step]
                sync()
                t = time.perf_counter()
                loss = forward_backward(ids)
                # one extra sync splits the step into forward+backward and clip+optimizer
                sync()
                t_mid = time.perf_counter()
                optimizer_step()
                sync()
                t_end = time.perf_counter()
                times.append(t_end - t)
                opt_times.append(t_end - t_mid)
                if cuda and step == args.warmup - 1:
                    # what the warm-up steps (loading, a graph's capture) left as the peak; then
                    # the peak of the steady steps alone
                    warmup_peak = torch.cuda.max_memory_allocated()
                    warmup_reserved = torch.cuda.max_memory_reserved()
                    torch.cuda.reset_peak_memory_stats()
                losses.append(float(loss.detach().float()))
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"loss is {losses[-1]} at step {step + 1}")
            timed = times[args.warmup:]
            med = statistics.median(timed)
            fl = step_flops(shape, seq, args.mb, ckpt, args.lora_r)
            rec.update(
                step_s_median=round(med, 5), step_s_min=round(min(timed), 5), step_s_max=round(max(timed), 5),
                opt_s_median=round(statistics.median(opt_times[args.warmup:]), 5),
                tokens_per_s=round(args.mb * seq / med, 1),
                peak_alloc_gib=round(max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30, 3)
                if cuda else None,
                peak_alloc_steady_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                peak_reserved_gib=round(max(warmup_reserved, torch.cuda.max_memory_reserved()) / 2**30, 3)
                if cuda else None,
                flops_per_step=fl["total"], mfu=round(fl["total"] / med / H100_BF16_PEAK, 4),
                loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                losses=[round(x, 4) for x in losses], step_times=[round(x, 4) for x in times])
            if ours is not None and ours.graphs is not None and ours.graphs.failed:
                # the capture failed and the steps above ran eagerly (GraphedSteps.run)
                rec["step"], rec["graphs_failed"] = "eager-flat", ours.graphs.failed[:1500]
            if cuda and args.gpu_busy:  # after the figures above: the profiler slows the host
                rec["gpu_busy_ms"] = gpu_busy_ms(forward_backward, optimizer_step, data[-1] if ours is not None
                                                 else data[-1].to(args.device))
        except Exception as e:  # noqa: BLE001 — a failed config is a result, not a crash
            oom = isinstance(e, torch.OutOfMemoryError)
            rec["error"] = ("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:1500]
            if not oom:
                rec["traceback"] = traceback.format_exc()[-3000:]
        finally:
            del opt
            if ours is not None:
                ours.opt = ours.graphs = None
            for p in params:
                p.grad = None
            if cuda:
                torch.cuda.empty_cache()
        emit(Path(args.results), rec)
    return 0


# ----------------------------------------------------------------------------- parent

def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "unsloth",
                 "unsloth-zoo", "triton", "trl", "torchao", "cut-cross-entropy", "xformers", "qlora"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict:
    import platform

    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), packages=package_versions())
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        if device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as e:  # noqa: BLE001
        env["torch_error"] = repr(e)
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable: {e!r}"
    return env


def _run_child(cmd: list[str], log_path: Path, timeout: float, env=None, cwd=None) -> tuple[int | None, str]:
    """Run cmd in its own process group, tee its output into the log; return (rc or None on timeout, tail)."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=env, cwd=cwd)
        tail: list[str] = []
        deadline = time.time() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        rc = None
        while True:
            left = deadline - time.time()
            if left <= 0:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                log.write(f"!! killed after {timeout:.0f}s\n")
                break
            if sel.select(timeout=min(left, 1.0)):
                line = p.stdout.readline()
                if line == "":
                    rc = p.wait()
                    break
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                tail = (tail + [line])[-40:]
        return rc, "".join(tail)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-1.5b,llama-3-8b")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--mb", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="steps per config (loss reported after these)")
    ap.add_argument("--long-steps", type=int, default=30, help="steps for seq >= --long-from")
    ap.add_argument("--long-from", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each config")
    ap.add_argument("--qlora-ckpt-off", action=argparse.BooleanOptionalAction, default=True,
                    help="also run qlora without gradient checkpointing")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-grad-norm", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-vocab", type=int, default=1024, help="token ids are drawn from [4, data_vocab)")
    ap.add_argument("--hf-attn", default="auto",
                    help="attn_implementation for hf / hf+liger; auto: eager for Gemma 2 (its "
                         "soft-capped scores, which transformers' sdpa drops), else sdpa")
    ap.add_argument("--gpu-busy", action=argparse.BooleanOptionalAction, default=True,
                    help="after the timed steps, profile two more for the GPU time per step "
                         "(gpu_busy_ms: kernel time, without the GPU's waits for the host)")
    ap.add_argument("--keep-attention", type=_keep_attention, default=True,
                    help="layers whose attention qlora keeps for backward: all (default), the "
                         "last N (what qlora train picks where only N fit), or auto (as qlora "
                         "train picks it for each sequence length, see --plan-gpu-memory)")
    ap.add_argument("--keep-activations", type=int, default=0,
                    help="qlora-keepacts: the last N layers not checkpointed (every activation "
                         "kept, no rerun; qlora train's keep_activations)")
    ap.add_argument("--offload-activations", default="false", choices=("auto", "true", "false"),
                    help="qlora: the checkpointed layer inputs in pinned host memory; auto: as "
                         "qlora train picks it for each sequence length")
    ap.add_argument("--tile-mlp", default="false",
                    help="qlora: the MLP in sequence tiles: true, false, N tokens per tile, or auto")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="every system's worker caps PyTorch's allocator at this many GiB "
                         "(torch.cuda.set_per_process_memory_fraction): a smaller GPU's memory")
    ap.add_argument("--plan-gpu-memory", default=None,
                    help="the GPU size qlora's auto choices plan for, e.g. 24GB (default: the "
                         "memory cap, else the device's memory)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/run")
    ap.add_argument("--model-root", default=None, help="where the random checkpoints go (default: a tmp dir)")
    ap.add_argument("--worker-timeout", type=float, default=600)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds for the whole run; later work skipped")
    # internal
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--random-weights", action="store_true",
                    help="qlora systems only: random weights drawn and quantized on the GPU "
                         "(qlora.models.random_model), no checkpoint written (a 30B one is 61 GB)")
    ap.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seqs = [int(s) for s in str(args.seqs).split(",")]
    return args


def _keep_attention(text: str) -> bool | int | str:
    return True if text == "all" else text if text == "auto" else int(text)


def worker_argv(script: str, args, names: list[str], **kw) -> list[str]:
    """The command of a worker process: `script` with `args`' values of `names` and its
    --keep-attention, then `kw` as options (True: a bare flag). preference_step.py's too."""
    argv = [sys.executable, os.path.abspath(script)]
    for k in names:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    argv += ["--keep-attention", "all" if args.keep_attention is True else str(args.keep_attention)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def _child_argv(args, **kw) -> list[str]:
    keep = ["mb", "steps", "long_steps", "long_from", "warmup", "lora_r", "lora_alpha", "lora_dropout", "lr",
            "max_grad_norm", "seed", "data_vocab", "hf_attn", "device", "offload_activations", "tile_mlp",
            "keep_activations"]
    argv = worker_argv(__file__, args, keep, **kw) + ["--seqs", ",".join(map(str, args.seqs))]
    argv.append("--qlora-ckpt-off" if args.qlora_ckpt_off else "--no-qlora-ckpt-off")
    argv.append("--gpu-busy" if args.gpu_busy else "--no-gpu-busy")
    if args.random_weights:
        argv.append("--random-weights")
    if args.memory_cap_gib is not None:
        argv += ["--memory-cap-gib", str(args.memory_cap_gib)]
    if args.plan_gpu_memory:
        argv += ["--plan-gpu-memory", args.plan_gpu_memory]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_model:
        info = make_model_dir(args.shape, Path(args.model_dir), args.device)
        print("MODEL", json.dumps(info), flush=True)
        return 0
    if args.worker:
        return worker(args)

    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS + OPT_IN_SYSTEMS]
    if unknown:  # before any checkpoint is written: a typo would cost the run's device minutes
        print(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS + OPT_IN_SYSTEMS)}",
              file=sys.stderr)
        return 2
    if "qlora-keepacts" in systems and (args.offload_activations != "false"
                                        or args.tile_mlp != "false"):
        print("qlora-keepacts: --keep-activations excludes --offload-activations and --tile-mlp "
              "(as qlora train refuses them together)", file=sys.stderr)
        return 2
    if args.random_weights and any(not s.startswith("qlora") for s in systems):
        print("--random-weights: qlora systems only (the others read a checkpoint)", file=sys.stderr)
        return 2
    run = Run.start(args)
    results, left = run.results, run.left

    def error_records(system, shape, msg):
        for seq, ckpt in configs_for(system, args.seqs, args.qlora_ckpt_off):
            emit(results, dict(system=system, shape=shape, mb=args.mb, seq=seq, ckpt=ckpt, error=msg))

    for shape in args.shapes.split(","):
        model_dir = run.model_root / shape
        if not args.random_weights and not (model_dir / "config.json").exists():
            rc, tail = run.make_model(shape, model_dir)
            if rc != 0:
                for system in systems:
                    error_records(system, shape, f"could not build the random checkpoint: rc={rc}\n{tail[-1500:]}")
                continue
        for system in systems:
            if left() < 20:
                error_records(system, shape, "skipped: the run's --deadline was reached")
                continue
            before = _done(results)
            rc, tail = run.child(
                _child_argv(args, worker=True, system=system, shape=shape, model_dir=model_dir, results=results),
                args.worker_timeout)
            done = _done(results) - before
            for seq, ckpt in configs_for(system, args.seqs, args.qlora_ckpt_off):
                if (system, shape, seq, ckpt) not in done:
                    why = "timed out" if rc is None else f"worker exited with rc={rc}"
                    emit(results, dict(system=system, shape=shape, mb=args.mb, seq=seq, ckpt=ckpt,
                                       error=f"{why}\n{_last_error(tail)}"))
        run.drop_model(model_dir)
    run.finish()
    print_table(results)
    print(f"total {time.time() - run.started:.0f}s", flush=True)
    return 0


class Run:
    """One benchmark run's harness, shared with preference_step.py: its output folder (results,
    log, env.json), where the random checkpoints and the workers' working folder go, the workers'
    environment (this project's src on PYTHONPATH), and the time left before --deadline."""

    def __init__(self, args, started: float):
        self.args, self.started = args, started
        out = Path(args.out).resolve()  # the workers run in their own working folder
        out.mkdir(parents=True, exist_ok=True)
        self.results, self.log = out / "results.jsonl", out / "log.txt"
        env = environment(args.device)
        env["argv"] = sys.argv
        (out / "env.json").write_text(json.dumps(env, indent=1))
        print("ENV", json.dumps(env), flush=True)
        self.model_root = Path(args.model_root or tempfile.mkdtemp(prefix="bench-models-"))
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-work-"))  # Unsloth writes its compile cache into cwd
        self.child_env = dict(os.environ)
        src = str(Path(__file__).resolve().parent.parent / "src")  # this project's package, uninstalled
        self.child_env["PYTHONPATH"] = src + os.pathsep + self.child_env.get("PYTHONPATH", "")
        self.child_env.setdefault("PYTHONUNBUFFERED", "1")

    @classmethod
    def start(cls, args) -> "Run":
        return cls(args, time.time())

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.started)

    def make_model(self, shape: str, model_dir: Path) -> tuple[int | None, str]:
        """The shape's random checkpoint written to `model_dir` (train_step.py --make-model)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--make-model", "--shape", shape,
               "--model-dir", str(model_dir), "--device", self.args.device]
        return _run_child(cmd, self.log, max(self.left(), 1), env=self.child_env)

    def child(self, cmd: list[str], timeout: float) -> tuple[int | None, str]:
        """A worker, in the working folder, for at most `timeout` and the time left."""
        return _run_child(cmd, self.log, min(timeout, self.left()), env=self.child_env,
                          cwd=str(self.workdir))

    def drop_model(self, model_dir: Path) -> None:
        if not self.args.model_root:  # an 8B checkpoint is 16 GB: a machine's runs would fill its disk
            shutil.rmtree(model_dir, ignore_errors=True)

    def finish(self) -> None:
        for made in ([] if self.args.model_root else [self.model_root]) + [self.workdir]:  # and any half-built one
            shutil.rmtree(made, ignore_errors=True)


def read_records(results: Path) -> list[dict]:
    """The records of results.jsonl so far (none before the first)."""
    if not results.exists():
        return []
    return [json.loads(x) for x in results.read_text().splitlines() if x.strip()]


def _done(results: Path) -> set:
    return {(r["system"], r["shape"], r["seq"], r["ckpt"]) for r in read_records(results)}


def _last_error(tail: str) -> str:
    lines = [x for x in tail.splitlines() if x.strip()]
    return "\n".join(lines[-12:])[-1500:]


def print_table(results: Path) -> None:
    recs = read_records(results)
    if not recs:
        return
    print(f"\n{'system':10} {'shape':13} {'seq':>5} {'ckpt':>4} {'step s':>8} {'tok/s':>8} {'alloc':>6} "
          f"{'resv':>6} {'MFU':>6} {'loss0':>7} {'lossN':>7} {'GPU ms':>7}")
    for r in recs:
        head = f"{r['system']:10} {r['shape']:13} {r['seq']:>5} {'on' if r['ckpt'] else 'off':>4}"
        if "error" in r:
            print(head, "ERROR", r["error"].splitlines()[0][:100])
        else:
            print(head, f"{r['step_s_median']:8.3f} {r['tokens_per_s']:8.0f} {r['peak_alloc_gib'] or 0:6.2f} "
                        f"{r['peak_reserved_gib'] or 0:6.2f} {r['mfu']:6.3f} {r['loss_first']:7.3f} "
                        f"{r['loss_last']:7.3f} {r.get('gpu_busy_ms', float('nan')):7.1f}")


if __name__ == "__main__":
    sys.exit(main())
