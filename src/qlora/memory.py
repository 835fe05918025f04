"""Predict the peak GPU memory of a QLoRA training step, part by part, without a GPU or weights.

Everything here is arithmetic on an architecture (config.json sizes) and the run's settings.
The model of a step is:

    peak allocated = static + max(
        end of forward:  saved activations + max(logits/loss, backward of one layer) + workspace,
        optimizer step:  step temporaries)
    static         = quantized base + 16-bit embeddings/head + norms + adapters + their grads
                     + optimizer states that live in PyTorch's allocator

Paged optimizer states (bitsandbytes `paged_*`, tensors of >= 1e5 elements) live in CUDA managed
memory: they take GPU memory but never show in `torch.cuda.max_memory_allocated`, so they are a
separate part. The CUDA context is not allocated memory either; `reserved_estimate` and
`needed_bytes` add the allocator's slack and the context as advice for "does it fit".

The activation terms are derived for a LLaMA block (llama, mistral, qwen2, qwen3) computed in bf16
with SDPA flash/efficient attention; each term says which tensor autograd keeps and why.
Calibrated against H100 measurements of this project's step (benchmarks/measure_memory.py,
docs/BENCHMARKS.md); docs/MEMORY.md lists what is derived and what is still an estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from qlora.errors import QloraError
from qlora.kernels.experts import expert_chunks
from qlora.models.families.moe_config import EXPERT_PROJECTIONS
from qlora.models.spec import KNOWN_BLOCK_LINEARS as PROJECTIONS  # every family's, in layer order
from qlora.models.spec import NAMED_SHAPES as SHAPES  # (benchmarks read memory.SHAPES)
from qlora.models.generic import GenericSpec, LinearLayer
from qlora.models.generic import spec_from_config as generic_spec_from_config
from qlora.models.families import FAMILIES
from qlora.models.spec import (GEMMA_TYPES, ArchSpec, attention_layers_kept, is_native,
                               spec_from_config, spec_from_shape)
from qlora.quant import FOUR_BIT_METHODS, METHODS as QUANT_METHODS

GiB = 1024**3
MiB = 1024**2

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (and at least 512), and
# memory_allocated counts the rounded blocks. Matters only for the many tiny quant-state tensors.
ALLOC_GRANULE = 512
# Advice only, not part of allocated memory: the allocator's cached-but-free slack
# (reserved / allocated) and the CUDA context + kernels (about 0.5-1 GiB on an H100 with torch 2.x).
# RESERVED_FACTOR: measured max_memory_reserved / max_memory_allocated over 24 H100 runs
# (calibration, out-of-sample and compare sets, 2026-11-25): 1.02-1.29, median 1.09. 1.30 covers
# every one (docs/BENCHMARKS.md, "Out-of-sample planner check"; benchmarks/fold_planner_check.py prints
# it again from the stored runs): the advice errs towards "does not fit".
RESERVED_FACTOR = 1.30
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# cuBLAS takes a workspace through the caching allocator per handle: 32 MiB on Hopper with
# CUDA 12; the forward thread and the autograd thread each hold a handle.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch")
SHARDING = ("ddp", "fsdp")
KERNELS = ("eager", "fused")
# chunked-fused: the decoder's chunks with a frozen lm_head (every LoRA run), the hidden states'
# gradient made in forward (kernels/cross_entropy.py); chunked: its chunks checkpointed and
# recomputed in backward (a trainable lm_head, and every run measured before 2026-11-26);
# full: transformers'.
LOSSES = ("chunked-fused", "chunked", "full")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# a mixture of experts' expert projections as target names (adapters.EXPERT_TARGETS)
EXPERT_TARGETS = tuple(f"experts.{p}" for p in EXPERT_PROJECTIONS)
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# --- architecture -------------------------------------------------------------------------------
# The planner's architecture record is the model layer's ArchSpec (models/spec.py); a named shape
# (`qlora plan --shape`) is one of models/spec.NAMED_SHAPES.


def arch_from_config(config: dict, name: str = "model", source: str = "config.json") -> ArchSpec:
    """The ArchSpec of a config.json dict, read by the model layer's own parser (models/spec.py),
    which refuses unknown families; what is missing is named."""
    try:
        return spec_from_config(config, source=source, name=name)
    except KeyError as err:
        raise QloraError(f"{source}: missing {err.args[0]!r}, needed to plan memory") from None


def resolve_arch(model_dir: str | None = None, config_json: str | None = None,
                 shape: str | None = None) -> ArchSpec | GenericSpec:
    """Exactly one of: a model directory, a config.json path, a named shape. A model that is not
    of a native family gives a GenericSpec, which plan() estimates coarsely."""
    given = [x for x in (model_dir, config_json, shape) if x]
    if len(given) != 1:
        raise QloraError("give exactly one of --model DIR, --config-json FILE, --shape NAME")
    if shape:
        if shape.lower() not in SHAPES:
            raise QloraError(f"--shape {shape!r} is not known; known shapes: {', '.join(SHAPES)}")
        if not is_native(SHAPES[shape.lower()]):  # a generic-path shape (stablelm-2-1.6b)
            return generic_spec_from_config(SHAPES[shape.lower()], source=f"shape {shape.lower()}",
                                            name=shape.lower())
        return spec_from_shape(shape)
    path = Path(config_json) if config_json else Path(model_dir) / "config.json"
    if not path.is_file():
        what = "--config-json" if config_json else "--model"
        raise QloraError(f"{what}: {path} does not exist (expected a Hugging Face config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QloraError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    name = Path(model_dir).name if model_dir else path.parent.name or path.stem
    if isinstance(config, dict) and not is_native(config):
        # the generic path: the model transformers builds, empty, read for its layers and sizes
        return generic_spec_from_config(config, source=str(path), name=name)
    return arch_from_config(config, name=name, source=str(path))


# --- the run's settings -------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanConfig:
    quant: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    blocksize: int = 64
    r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    dora: bool = False
    lora_dropout: float = 0.05  # AdapterConfig's default; > 0 keeps a dropped copy of each target's input
    # masks drawn from a seed and recomputed in backward (qlora train, kernels/dropout.py): none is
    # kept; False: torch's dropout, which keeps one (the step of the stored calibration runs)
    seeded_dropout: bool = True
    # the adapters' gradients in one flat buffer per group (train/optim.flatten_group), made with
    # the optimizer and zeroed in place, so alive in every phase of the step (one GPU or data
    # parallel; FSDP's are per shard); False: made in backward and set to None after each step
    # (the step of the stored calibration runs)
    flat_grads: bool = True
    adapter_dtype: str = "fp32"  # master weights (PEFT keeps fp32); compute is bf16
    nonquant_dtype: str = "bf16"  # embeddings, head, norms; "fp32" = prepare_model_for_kbit_training
    seq_len: int = 2048
    micro_batch: int = 1
    checkpointing: bool = True
    # with checkpointing, each layer's saved input in pinned host memory until its backward
    # (speed/offload.py): two of them on the GPU at a time
    offload_activations: bool = False
    # the MLP in sequence tiles (models/tiling.py): True in tiles of the default size
    # (models.tiling.default_tile_tokens), N in tiles of N tokens, False whole
    tile_mlp: bool | int = False
    # with checkpointing: attention kept from forward to backward, not rerun
    # (models/decoder.AttentionKeptForRerun; qlora train's keep_attention): true in every layer,
    # a number N in the last N
    keep_attention: bool | int = False
    # the frozen input embedding (untied) in pinned host memory (qlora train's embedding_on_host)
    embedding_on_host: bool = False
    optimizer: str = "paged_adamw_8bit"
    kernels: str = "eager"  # eager = autograd over PyTorch ops (HF/our reference); fused = kernels/fused.py's Triton kernels
    loss: str = "chunked-fused"  # chunked cross entropy (see LOSSES), or full fp32 logits (transformers')
    loss_chunk_tokens: int | None = None  # None: the decoder's rule for the vocabulary (loss_chunk_tokens())
    gpus: int = 1
    sharding: str = "ddp"
    alloc_rounding: bool = True
    # sft, or a preference method (qlora.methods): two sequences per example (chosen and
    # rejected; KTO: the example and its KL row), and for dpo / kto a reference forward, unless
    # DPO's reference log-probs are precomputed before training
    method: str = "sft"
    reference_precomputed: bool = False

    def validate(self, targets: bool = True) -> None:
        """`targets`: check the target names against the native decoder's projections (a
        generic model's are checked against its own layers, generic_targets)."""
        def bad(option: str, value, choices) -> QloraError:
            return QloraError(f"{option} {value!r} is not valid; choose one of: {', '.join(map(str, choices))}")

        if self.quant not in QUANT_METHODS:
            raise bad("--quant", self.quant, QUANT_METHODS)
        if self.optimizer not in OPTIMIZERS:
            raise bad("--optimizer", self.optimizer, OPTIMIZERS)
        if self.sharding not in SHARDING:
            raise bad("--sharding", self.sharding, SHARDING)
        if self.kernels not in KERNELS:
            raise bad("--kernels", self.kernels, KERNELS)
        if self.loss not in LOSSES:
            raise bad("--loss", self.loss, LOSSES)
        if self.adapter_dtype not in DTYPE_BYTES:
            raise bad("--adapter-dtype", self.adapter_dtype, DTYPE_BYTES)
        if self.nonquant_dtype not in DTYPE_BYTES:
            raise bad("nonquant_dtype", self.nonquant_dtype, DTYPE_BYTES)
        chunk = () if self.loss_chunk_tokens is None else (("loss_chunk_tokens", self.loss_chunk_tokens),)
        for option, value in (("--r", self.r), ("--seq-len", self.seq_len), ("--micro-batch", self.micro_batch),
                              ("--gpus", self.gpus), *chunk):
            if not isinstance(value, int) or value < 1:
                raise QloraError(f"{option} must be a positive whole number, not {value!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QloraError(f"blocksize {self.blocksize} is not one bitsandbytes supports (64 is the default)")
        tile = self.tile_mlp
        if not isinstance(tile, bool) and (not isinstance(tile, int) or tile < 1):
            raise QloraError(f"--tile-mlp takes a number of tokens per tile (1 or more), not {tile!r}")
        keep = self.keep_attention
        if not isinstance(keep, bool) and (not isinstance(keep, int) or keep < 0):
            raise QloraError(f"--keep-attention takes a number of layers (0 or more), not {keep!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise QloraError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if targets:
            target_names(self.targets)


def target_names(targets: str | tuple[str, ...] | list[str],
                 arch: ArchSpec | None = None) -> tuple[str, ...]:
    """'all-linear' (PEFT's meaning: every projection, never lm_head) or a list of projection names;
    with `arch`, those of its block (a family's own linears: phi3's qkv_proj, gate_up_proj)."""
    present = PROJECTIONS if arch is None else arch.block_linears()
    if arch is not None and arch.moe is not None:  # a mixture of experts' dense MLPs take none
        present = tuple(n for n in present if n not in MLP_LINEARS)
    if isinstance(targets, str):
        if targets == "all-linear":
            return present
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = tuple(targets)
    unknown = [t for t in names if t not in PROJECTIONS and t not in EXPERT_TARGETS]
    if unknown or not names:
        raise QloraError(f"--targets: {', '.join(unknown) or '(empty)'} not known; use all-linear or a "
                         f"comma-separated list of {', '.join(PROJECTIONS)}")
    return tuple(t for t in present if t in names)  # de-duplicated, in layer order


def expert_targets(targets: str | tuple[str, ...] | list[str], arch: ArchSpec) -> tuple[str, ...]:
    """The expert projections (gate_up_proj, down_proj) the adapters cover: every one under
    all-linear, else those named `experts.<projection>`; none without experts."""
    if arch.moe is None:
        return ()
    if isinstance(targets, str):
        if targets == "all-linear":
            return EXPERT_PROJECTIONS
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return tuple(p for p in EXPERT_PROJECTIONS if f"experts.{p}" in targets)


def expert_stack_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """One sparse layer's experts and router: each expert's gate, up and down weight quantized on
    its own (quant.QuantizedStack: each part of every member in one tensor, code books shared),
    the router [E, H] in 16 bits."""
    rnd, total = cfg.alloc_rounding, 0
    for name, (experts, n_out, n_in) in arch.expert_shapes().items():
        parts = 2 if name == "gate_up_proj" else 1  # gate and up: two members an expert
        members = experts * parts
        sizes = quantized_linear_tensors(n_out // parts, n_in, cfg.quant, cfg.double_quant,
                                         cfg.blocksize)
        shared = {16 * 4, 256 * 4} if cfg.quant in FOUR_BIT_METHODS else set()
        total += sum(_alloc(s if s in shared else s * members, rnd) for s in sizes)
    return total + _alloc(2 * arch.moe.num_experts * arch.hidden_size, rnd)


def expert_adapter_tensors(arch: ArchSpec, cfg: PlanConfig) -> list[int]:
    """Element counts of one sparse layer's expert adapters: PEFT's lora_A [r·E, in] and
    lora_B [out, r·E] per targeted projection."""
    shapes = arch.expert_shapes()
    sizes = []
    for name in expert_targets(cfg.targets, arch):
        experts, n_out, n_in = shapes[name]
        sizes += [cfg.r * experts * n_in, n_out * cfg.r * experts]
    return sizes


def routed_activation_terms(arch: ArchSpec, cfg: PlanConfig) -> dict[str, float]:
    """Bytes per token a sparse layer keeps for backward in the grouped computation
    (speed/moe.py), in place of the dense MLP's terms. Each token is k rows whatever the routing:
    all tokens to the same experts (the worst case of an unbalanced router) keeps exactly what a
    balanced one keeps, since the grouped GEMMs take rows sorted by expert, not padded per
    expert (tests/test_moe.py counts both)."""
    moe, h = arch.moe, arch.hidden_size
    k, i, e = moe.top_k, moe.expert_intermediate_size, moe.num_experts
    targets = expert_targets(cfg.targets, arch)
    t: dict[str, float] = {}
    # the router: softmax keeps its fp32 output, top_k its indices, renormalising its values
    # and their sum (the logits' linear keeps nothing: the router is frozen)
    t["router softmax, top-k"] = 4 * e + 8 * k + (4 * k + 4 if moe.renormalize else 0)
    # the sort: the rows' token index, the sorted weights' index, the way back
    t["sort indices (int64)"] = 3 * 8 * k
    if "gate_up_proj" in targets:  # the sorted rows, read by gate_up's LoRA A
        t["routed rows (k per token)"] = 2 * k * h
    t["experts' gate, up outputs"] = 2 * k * 2 * i
    t["silu(gate)"] = 2 * k * i
    if "down_proj" in targets:
        t["experts' down_proj input"] = 2 * k * i
    t["experts' LoRA A outputs"] = sum(2 * k * cfg.r for _ in targets)
    # each row's output, kept to multiply by its router weight (which depends on the hidden
    # state), and that weight (fp32 in Mixtral, the hidden dtype in Qwen3-MoE)
    t["expert outputs, router weights"] = 2 * k * h + (2 if moe.weights_in_hidden_dtype else 4) * k
    return t


def routed_weight_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """Bytes a sparse layer's graph keeps whatever its tokens: the grouped GEMMs' bf16 copies of
    the expert adapters (PEFT's factors made contiguous per expert) and the group offsets."""
    shapes, rnd = arch.expert_shapes(), cfg.alloc_rounding
    targets = expert_targets(cfg.targets, arch)
    copies = sum(_alloc(2 * e * cfg.r * n_in, rnd) + _alloc(2 * e * n_out * cfg.r, rnd)
                 for name, (e, n_out, n_in) in shapes.items() if name in targets)
    return copies + (_alloc(4 * arch.moe.num_experts, rnd) if targets else 0)


def expert_run_elements(arch: ArchSpec) -> int:
    """Weights of the largest run of experts the grouped GEMM dequantizes at once
    (kernels/experts.expert_chunks: a projection's experts in runs of at most EXPERT_CHUNK_BYTES
    in bf16, or one expert alone); 0 without sparse layers."""
    if arch.moe is None or not arch.moe.num_sparse_layers:
        return 0
    return max((stop - start) * o * i for e, o, i in arch.expert_shapes().values()
               for start, stop in expert_chunks(e, 2 * o * i))


# --- pieces -------------------------------------------------------------------------------------
def _alloc(nbytes: int, rounding: bool) -> int:
    """Bytes one tensor of nbytes takes in the CUDA caching allocator (rounded to 512)."""
    if not rounding or nbytes == 0:
        return nbytes
    return max(ALLOC_GRANULE, -(-nbytes // ALLOC_GRANULE) * ALLOC_GRANULE)


def quantized_linear_tensors(n_out: int, n_in: int, quant: str, double_quant: bool = True,
                             blocksize: int = 64) -> list[int]:
    """Byte sizes of the tensors bitsandbytes keeps for one quantized weight (no bias).

    4-bit (bitsandbytes.functional.quantize_4bit): two 4-bit codes per uint8, [ceil(n/2), 1];
    one absmax per block of `blocksize` values: fp32, or with double quant uint8 codes of
    (absmax - mean) plus the nested state: fp32 mean (`offset`), one fp32 absmax per 256 blocks
    and its own 256-entry fp32 code book. The 16-entry fp32 NF4/FP4 code book is kept per weight.
    int8 (LLM.int8, int8_vectorwise_quant): int8 weight + one fp32 scale per output row.
    """
    n = n_out * n_in
    if quant == "none":
        return [2 * n]
    if quant == "int8":
        return [n, 4 * n_out]
    blocks = -(-n // blocksize)
    sizes = [(n + 1) // 2, 16 * 4]  # packed codes, code book
    if double_quant:
        sizes += [blocks, 4, 4 * -(-blocks // 256), 256 * 4]  # uint8 absmax, offset, absmax2, code2
    else:
        sizes += [4 * blocks]
    return sizes


def adapter_tensors(arch: ArchSpec, cfg: PlanConfig) -> list[int]:
    """Element counts of every trainable tensor: lora_A [r, in], lora_B [out, r], DoRA magnitude [out]."""
    targets = target_names(cfg.targets, arch)
    sizes = []
    for name, n_in, n_out in arch.linears():
        if name in targets:
            sizes += [cfg.r * n_in, n_out * cfg.r] + ([n_out] if cfg.dora else [])
    experts = expert_adapter_tensors(arch, cfg) * (arch.moe.num_sparse_layers if arch.moe else 0)
    return sizes * arch.num_layers + experts


def adapter_param_count(arch: ArchSpec, cfg: PlanConfig) -> int:
    return sum(adapter_tensors(arch, cfg))


def optimizer_state_bytes(numels: list[int], cfg: PlanConfig) -> tuple[int, int, int]:
    """(bytes in the PyTorch allocator, bytes in CUDA managed memory, step temporaries)."""
    pbytes = DTYPE_BYTES[cfg.adapter_dtype]
    rnd = cfg.alloc_rounding
    if cfg.optimizer == "adamw_torch":
        # exp_avg and exp_avg_sq in the parameter's dtype; the foreach step makes one temporary
        # list the size of the parameters (sqrt(exp_avg_sq) + eps) while the rest is in place.
        states = sum(2 * _alloc(n * pbytes, rnd) for n in numels)
        return states, 0, sum(_alloc(n * pbytes, rnd) for n in numels)
    paged = cfg.optimizer.startswith("paged_")
    eight_bit = cfg.optimizer.endswith("8bit")
    in_alloc = in_managed = 0
    for n in numels:
        # bitsandbytes: tensors under min_8bit_size=4096 elements get fp32 states; states of
        # tensors of >= 1e5 elements are paged (get_state_buffer) when the optimizer is paged.
        if eight_bit and n >= 4096:
            state, extra = n, 2 * _alloc(4 * -(-n // 256), rnd)  # uint8 state + fp32 absmax per 256
        else:
            state, extra = 4 * n, 0
        if paged and n >= 1e5:
            in_managed += 2 * state
        else:
            in_alloc += 2 * _alloc(state, rnd)
        in_alloc += extra
    return in_alloc, in_managed, 0  # bitsandbytes updates in place: no step temporaries


# the families whose peaks were measured on the GPU (docs/MEMORY.md): Llama's block
CALIBRATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# --- what each family's step computes in torch whatever the kernels (speed/fast_decoder.py) ------
def torch_norms(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the norms run as torch ops (keeping an fp32 copy of their input): eager kernels
    (fused: the Triton RMSNorm, Gemma's (1 + w) form too, speed/fast_decoder.FastGemmaRMSNorm)."""
    return cfg.kernels == "eager"


def torch_activation(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the MLP's activation runs in torch (its output kept for the product's backward):
    eager kernels, or Gemma's GeGLU, which the fused SwiGLU does not serve (Phi-3's gate_up_proj
    output is what the packed SwiGLU kernel reads: speed/fast_decoder.FastPhi3MLP)."""
    return cfg.kernels == "eager" or arch.model_type in GEMMA_TYPES


def attention_softcap(arch: ArchSpec) -> float | None:
    """Gemma 2's score soft-cap: flash attention cannot apply it (capped_scores_in_torch)."""
    if arch.model_type not in GEMMA_TYPES:
        return None
    return FAMILIES[arch.model_type].settings(arch.raw).attn_softcap


def capped_scores_in_torch(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether Gemma 2's capped attention runs in torch over dense [heads, T, T] scores
    (models/families/gemma.capped_attention): eager kernels. With fused kernels it goes through
    flex_attention (kernels/capped_attention.py), which keeps what flash attention keeps."""
    return attention_softcap(arch) is not None and cfg.kernels == "eager"


def repeats_kv_heads(arch: ArchSpec) -> bool:
    """Whether attention saves k and v copied to every query head (grouped kv heads only): SDPA
    without enable_gqa (torch < 2.5). Packed rows' varlen attention hands grouped heads to the
    kernel (models/attention.varlen_attention), so it never does."""
    if arch.num_kv_heads == arch.num_heads:
        return False
    from qlora.models.decoder import sdpa_takes_gqa

    return not sdpa_takes_gqa()


def final_softcap(arch: ArchSpec) -> float | None:
    """Gemma's output logit soft-cap: the fused cross-entropy applies it inside its kernel
    (FastDecoderLM.final_softcap); the reference chunked loss keeps tanh's output too
    (loss_peak_bytes)."""
    if arch.model_type not in GEMMA_TYPES:
        return None
    return FAMILIES[arch.model_type].settings(arch.raw).final_softcap


def capped_attention_bytes_per_token(arch: ArchSpec, seq_len: int) -> int:
    """What Gemma 2's capped attention keeps per token of a row of `seq_len` tokens: q, and k
    and v repeated to every head (the matmuls keep their operands), each query's row of scores
    three times (tanh's bf16 output, the fp32 softmax, its bf16 probabilities that the second
    matmul keeps: 2 + 4 + 2 bytes a score) and masked_fill's bool mask (1 byte a score)."""
    q = arch.num_heads * arch.head_dim
    return 2 * 3 * q + (8 * arch.num_heads + 1) * seq_len


def layer_activation_terms(arch: ArchSpec, cfg: PlanConfig, dropout_mask_bytes: int = 1) -> dict[str, float]:
    """Bytes per token that autograd keeps for one decoder layer, term by term (bf16 = 2 bytes).

    A LLaMA block as qlora.models.decoder computes it: x -> RMSNorm -> q,k,v -> RoPE -> SDPA -> o
    -> +x -> RMSNorm -> gate,up -> silu(gate)*up -> down -> +. The frozen 4-bit matmul keeps no
    input (bitsandbytes' MatMul4Bit saves only the packed weight; the input gradient needs the
    weight alone, dequantized again in backward) and the dequantized weight is never saved; an
    input is kept only because the LoRA A of the projections that read it needs it for its weight
    gradient. With LoRA dropout that is the dropped copy, so the normed input itself is kept by
    no one. tests/test_memory.py checks this sum against the tensors autograd saves on the CPU.

    dropout_mask_bytes: 1 on CUDA (native_dropout keeps a bool mask); the CPU's dropout keeps a
    noise tensor in the input dtype (2).
    """
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    eager_norms = torch_norms(arch, cfg)
    targets = target_names(cfg.targets, arch)
    inputs = {name: n_in for name, n_in, _ in arch.linears()}
    outputs = {name: n_out for name, _, n_out in arch.linears()}
    # dropout's copies are what LoRA A reads, and kept for its gradient -- except on the fast path,
    # which draws the masks inside the products and keeps the undropped input, as without dropout
    dropout = cfg.lora_dropout > 0 and not fast_path(cfg)
    t: dict[str, float] = {}
    # RMSNorm, twice (Gemma: four, before and after attention and MLP). Eager (x.float(); x *
    # rsqrt(mean(x^2) + eps); w * x.to(bf16)) keeps the fp32 copy of its input and the fp32 rstd
    # per token; a fused kernel keeps the bf16 input + rstd.
    norms = 4 if arch.model_type in GEMMA_TYPES else 2
    t[f"norm inputs ({norms} norms)"] = norms * ((4 if eager_norms else 2) * h + 4)
    # The normed hidden state read by q,k,v and, in the MLP, by gate,up: one tensor each, shared,
    # kept for LoRA A's weight gradient -- unless every reader targets dropout's copy instead.
    attn_readers = [n for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if n in targets]
    mlp_readers = [n for n in ("gate_proj", "up_proj", "gate_up_proj") if n in targets]
    if attn_readers and not dropout:
        t["attention input (normed)"] = 2 * h
    if mlp_readers and not dropout:
        t["MLP input (normed)"] = 2 * h
    if arch.qk_norm:  # qwen3, gemma3: per-head RMSNorm of q and k, same rule as above
        t["q/k norm inputs"] = (4 if eager_norms else 2) * (q + kv) + 4 * (arch.num_heads + arch.num_kv_heads)
    # SDPA (flash/efficient) keeps q and k after RoPE, v, its output and a fp32 logsumexp per
    # head. Where the attention takes no grouped kv heads, the decoder repeats k and v to all
    # heads (repeat_interleave) before it, so the kept k and v have nh heads (repeats_kv_heads).
    # RoPE is a linear map: its backward needs cos/sin only.
    capped = capped_scores_in_torch(arch, cfg)
    if capped:
        # Gemma 2: no SDPA; capped_attention keeps what capped_attention_bytes_per_token says
        # (fused kernels: flex_attention, which keeps what SDPA keeps, below)
        t["q, k/v repeated, scores (capped, in torch)"] = capped_attention_bytes_per_token(
            arch, cfg.seq_len)
    elif arch.model_type == "phi3" and cfg.kernels == "eager":
        # Phi-3: q and k rotated into new tensors, v a view of the fused qkv_proj output, whose
        # whole storage SDPA's saved v then keeps (Phi3Attention; its fork copies v out)
        t["q, k (after RoPE)"] = 2 * (q + kv)
        t["qkv_proj output (kept whole by v's view)"] = 2 * (q + 2 * kv)
    elif not repeats_kv_heads(arch):  # SDPA (varlen) shares the kv heads: k and v stay small
        t["q, k, v (after RoPE)"] = 2 * (q + 2 * kv)
    else:
        t["q, k, v (after RoPE, k/v repeated to all heads)"] = 2 * 3 * q
    # The output, [B, T, H, D] in memory, is also o_proj's input (transpose + reshape is a view):
    # kept by SDPA; the capped attention's last matmul keeps its operands, not its output, which
    # o_proj's LoRA A keeps then (unless it reads dropout's copy).
    if not capped:
        t["attention output (= o_proj input)"] = 2 * q
        t["attention logsumexp (fp32)"] = 4 * arch.num_heads
    elif "o_proj" in targets and not dropout:
        t["o_proj input"] = 2 * q
    # MLP: gate and up outputs (silu's input, the product's other factor; Phi-3's one gate_up
    # output); silu(gate) (Gemma: gelu(gate)) kept by torch's autograd for the product's backward
    # (a fused SwiGLU recomputes it); the product is down_proj's input, kept for its LoRA A unless
    # dropout's copy is kept instead. (Terms named "MLP: ..." are kept inside the MLP: sequence
    # tiles, mlp_tile_tokens, bound them.)
    t["MLP: gate, up outputs"] = 2 * 2 * i
    if torch_activation(arch, cfg):
        t["MLP: activation(gate)"] = 2 * i
    if "down_proj" in targets and not dropout:
        t["MLP: down_proj input"] = 2 * i
    # LoRA: lora_B's weight gradient needs lora_A's output [tokens, r] per target.
    attn = [name for name in targets if name not in MLP_LINEARS]
    mlp = [name for name in targets if name in MLP_LINEARS]
    for prefix, names in (("", attn), ("MLP: ", mlp)):
        if not names:
            continue
        t[prefix + "LoRA A outputs"] = sum(2 * cfg.r for _ in names)
        if dropout:
            # Dropout per target: the dropped bf16 copy of the input (kept by lora_A) and the
            # mask (kept by dropout's backward).
            mask = 0 if cfg.seeded_dropout else dropout_mask_bytes
            t[prefix + "LoRA dropout copies + masks"] = sum((2 + mask) * inputs[n] for n in names)
        if cfg.dora:
            # DoRA (qlora.adapters): (scale - 1) * base and scale * lora keep the base output and
            # the LoRA output for the magnitude's gradient: 2 x out per target.
            t[prefix + "DoRA base + LoRA outputs"] = sum(2 * 2 * outputs[n] for n in names)
    if arch.moe is not None and arch.moe.num_sparse_layers:
        # a sparse layer's (every layer counted as one: an overestimate for dense layers of a
        # mixture of experts, which Mixtral and Qwen3-30B-A3B do not have): the routed terms
        # replace the dense MLP's, its adapters' included
        for name in [n for n in t if n.startswith("MLP")]:
            t.pop(name)
        t.update(routed_activation_terms(arch, cfg))
    return t


MLP_LINEARS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


def mlp_tile_tokens(arch: ArchSpec, cfg: PlanConfig) -> int | None:
    """Tokens per MLP tile (models/tiling.py), or None: whole (off, or no more tokens than a
    tile, where the tiled MLP runs whole)."""
    if not cfg.tile_mlp:
        return None
    from qlora.models.tiling import default_tile_tokens

    tile = default_tile_tokens(arch.intermediate_size) if cfg.tile_mlp is True else cfg.tile_mlp
    return tile if step_tokens(cfg) > tile else None


def split_mlp_terms(terms: dict[str, float]) -> tuple[float, float]:
    """(per-token bytes outside the MLP's inside, per-token bytes inside it) of
    layer_activation_terms."""
    inside = sum(n for name, n in terms.items() if name.startswith("MLP: "))
    return sum(terms.values()) - inside, inside


def offload_applies(cfg: PlanConfig) -> bool:
    """Whether the checkpointed layer inputs go to host memory: asked for, with checkpointing."""
    return cfg.offload_activations and cfg.checkpointing


def host_offload_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """The offloaded layer inputs' bytes: every layer's but the last. Pinned at exactly this size
    (speed/offload.page_locked registers plain memory; torch's pinned allocator would round each
    layer's buffer up to a power of two: 4 GiB for Llama-3-8B's 3 GiB at 393,216 tokens)."""
    return (arch.num_layers - 1) * step_tokens(cfg) * 2 * arch.hidden_size if offload_applies(cfg) else 0


def host_available_bytes() -> int | None:
    """The host memory free for a new allocation (MemAvailable of /proc/meminfo), or None where
    the system does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_offload(arch: ArchSpec, cfg: PlanConfig, chosen_by_plan: bool) -> None:
    """Refuse, before loading, an offload whose pinned buffers the host cannot hold: pinned memory
    is never swapped, so the run would fail when its buffers grow in the first step, or push the
    rest of the machine out of memory. A tenth of what is available is left for the rest of the
    run's host memory (its data, the loader, Python)."""
    if isinstance(arch, GenericSpec):  # offload is ignored on the generic path
        return
    need, available = host_offload_bytes(arch, cfg), host_available_bytes()
    if not need or available is None:
        return
    layers = arch.num_layers - 1
    if need <= 0.9 * available:
        return
    why = (" (the memory plan turned it on: the run does not fit the GPU without it)"
           if chosen_by_plan else "")
    raise QloraError(
        f"offload_activations needs ~{_gib(need):.1f} GiB of pinned host memory{why}: the inputs of "
        f"{layers} layers x {step_tokens(cfg)} tokens x {arch.hidden_size} x 2 bytes, and "
        f"this machine has {_gib(available):.1f} GiB available (MemAvailable in /proc/meminfo). "
        "Shorten max_seq_length, lower per_device_train_batch_size, or free host memory")


def kept_attention_bytes_per_token(arch: ArchSpec, seq_len: int, repeated_kv: bool = False) -> int:
    """What attention's backward reads, kept per token and layer by keep_attention: RoPE'd q and k,
    v (a copy, not a view of the grouped projection output), the output (bf16), and the fp32
    log-sum-exp of each head: flash's, and flex_attention's for Gemma 2's capped scores (dense
    capped scores are never kept: keeps_attention). `seq_len` does not change it (O(T) a row).
    `repeated_kv`: k and v copied to every query head first (repeats_kv_heads)."""
    q = arch.num_heads * arch.head_dim
    kv = q if repeated_kv else arch.num_kv_heads * arch.head_dim
    return 2 * (q + 2 * kv + q) + 4 * arch.num_heads


def keeps_attention(arch: ArchSpec | GenericSpec, cfg: PlanConfig) -> bool:
    """Whether the speed layer can keep this model's attention for backward: not on the generic
    path (no speed layer), nor Gemma 2's capped scores where they run dense in torch (eager
    kernels: [heads, T, T] a layer, speed/fast_decoder.FastGemmaAttention keeps none of it)."""
    return not isinstance(arch, GenericSpec) and not capped_scores_in_torch(arch, cfg)


def kept_attention_layers(arch: ArchSpec | GenericSpec, cfg: PlanConfig) -> int:
    """Layers whose attention is kept for backward: keep_attention's count, with checkpointing
    (none where the model cannot keep it: keeps_attention)."""
    if not keeps_attention(arch, cfg) or not cfg.checkpointing:
        return 0
    return attention_layers_kept(cfg.keep_attention, arch.num_layers)


def long_context_choice(arch: ArchSpec | GenericSpec, cfg: PlanConfig, gpu_bytes: int,
                        offload_auto: bool = True, tile_auto: bool = True) -> PlanConfig:
    """`cfg` with offload and MLP tiles decided where they are left to the plan (`*_auto`): the
    first of none, tiles, offload, both that fits `gpu_bytes`, with attention recomputed in every
    layer (kept attention gets what is left, after). Tiles before offload: their saving is
    measured on an H100 (Llama-3-8B at 32k tokens in 15.8 GiB; this plan: 15.7), they
    take no pinned host memory (offload: 7.75 GiB at 32k) and no PCIe traffic, and offload was
    no faster where both ran (32k: 6,329 tokens/s with it and tiles, 6,327 with tiles alone;
    16k: 2% slower). Where nothing fits, both where left to
    the plan (the error and its advice then start from there). Neither applies to the generic
    path (no speed layer), nor offload without checkpointing; a tile longer than the step's
    tokens changes nothing, so it is not chosen."""
    if isinstance(arch, GenericSpec):
        return replace(cfg, offload_activations=cfg.offload_activations and not offload_auto,
                       tile_mlp=cfg.tile_mlp if not tile_auto else False)
    offloads = [False, True] if offload_auto and cfg.checkpointing else [cfg.offload_activations]
    tiles = [False, True] if tile_auto else [cfg.tile_mlp]
    base = replace(cfg, keep_attention=False)
    candidates = [(o, t) for o in offloads for t in tiles]  # none, tiles, offload, both
    for offload, tile in candidates:
        trial = replace(base, offload_activations=offload, tile_mlp=tile)
        if tile is True and mlp_tile_tokens(arch, trial) is None and len(tiles) > 1:
            continue
        if fits(plan(arch, trial), gpu_bytes):
            return replace(cfg, offload_activations=offload, tile_mlp=tile)
    tile = tiles[-1]
    if tile_auto and mlp_tile_tokens(arch, replace(base, tile_mlp=tile)) is None:
        tile = False
    return replace(cfg, offload_activations=offloads[-1], tile_mlp=tile)


def attention_layers_that_fit(arch: ArchSpec | GenericSpec, cfg: PlanConfig, gpu_bytes: int) -> int:
    """The most layers that can keep their attention with the plan still fitting `gpu_bytes` (0
    without checkpointing, for a model that cannot keep it, or where even none fits). The plan
    grows with the count: bisected."""
    if not keeps_attention(arch, cfg) or not cfg.checkpointing:
        return 0
    return _largest_that_fits(arch, cfg, gpu_bytes, "keep_attention", 0, arch.num_layers)


def _largest_that_fits(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, field_name: str, low: int,
                       high: int) -> int:
    """The largest value of `field_name` in [low, high] whose plan fits, for a plan that grows
    with it and fits at `low`: bisected."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(plan(arch, replace(cfg, **{field_name: mid})), gpu_bytes):
            low = mid
        else:
            high = mid - 1
    return low


def embedding_in_host_memory(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the input embedding sits in pinned host memory: asked for, not the head's weight
    too (tied), and not sharded (each data parallel rank moves its whole copy, as one GPU does;
    FSDP shards the embedding instead)."""
    return cfg.embedding_on_host and not arch.tie_word_embeddings and (
        cfg.gpus == 1 or cfg.sharding == "ddp")


def fast_path(cfg: PlanConfig) -> bool:
    """Whether the step runs kernels/lora.py's LoRA products over 4-bit bases (qlora train on CUDA
    with fused kernels: kernels.use_fast_path, grouped projections, seeded dropout drawn inside
    the products by kernels/lora_dropout.py)."""
    return cfg.kernels == "fused" and cfg.quant in FOUR_BIT_METHODS and (
        cfg.seeded_dropout or cfg.lora_dropout == 0)


# the projections the fast path may run as one LoRA group (q/k/v and gate/up read one input each);
# Phi-3's block has them fused already (qkv_proj, gate_up_proj): each its own group of one
GROUPABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fast_path_groups(targets) -> list[tuple[str, ...]]:
    """The block's targets as the fast path runs them: q/k/v and gate/up as one LoRA group where
    all their members are targets (adapters.groupable), every other target alone."""
    groups = [g for g in GROUPABLE if all(n in targets for n in g)]
    grouped = {n for g in groups for n in g}
    return groups + [(n,) for n in targets if n not in grouped]


def layer_weight_terms(arch: ArchSpec, cfg: PlanConfig) -> dict[str, int]:
    """Bytes per layer (not per token) that autograd keeps while the layer's graph exists.

    F.linear(x, A) keeps A for x's gradient; with fp32 masters that A is the bf16 copy made by
    `.to(x.dtype)` in the forward, so each layer's graph holds bf16 copies of its adapters. With
    checkpointing only the layer being recomputed has a graph; without, every layer does.
    DoRA with dropout computes the base output of the dropped input with the dequantized weight,
    which F.linear then keeps (2 B/weight per target).
    """
    rnd = cfg.alloc_rounding
    targets = target_names(cfg.targets, arch)
    t: dict[str, int] = {}
    if cfg.adapter_dtype == "fp32" and fast_path(cfg):
        # kernels/lora.py keeps per group the scaled bf16 stack of its A's (none with dropout:
        # the kernels read the fp32 masters) and its B's cast into one block-diagonal
        # [Σ out, n·r] matrix, zeros included
        shape = {name: (n_in, n_out) for name, n_in, n_out in arch.linears()}
        t["bf16 adapter copies (A stack, B block diagonal)"] = sum(
            (0 if cfg.lora_dropout > 0 else _alloc(2 * cfg.r * len(g) * shape[g[0]][0], rnd))
            + _alloc(2 * cfg.r * len(g) * sum(shape[n][1] for n in g), rnd)
            for g in _fast_path_groups([n for n in shape if n in targets]))
    elif cfg.adapter_dtype == "fp32":
        t["bf16 adapter copies"] = sum(_alloc(2 * cfg.r * n_in, rnd) + _alloc(2 * cfg.r * n_out, rnd)
                                       for name, n_in, n_out in arch.linears() if name in targets)
    if arch.moe is not None and arch.moe.num_sparse_layers:
        t["experts: bf16 adapter copies, group offsets"] = routed_weight_bytes(arch, cfg)
    if cfg.dora and cfg.lora_dropout > 0:
        t["DoRA: dequantized weights kept by the dropped-input matmul"] = sum(
            _alloc(2 * n_in * n_out, rnd) for name, n_in, n_out in arch.linears() if name in targets)
    if arch.model_type in GEMMA_TYPES and torch_norms(arch, cfg):
        # GemmaRMSNorm's scale, (1 + w) in fp32, made each forward and kept by the product for
        # the input's gradient: the block's four norms and Gemma 3's q/k norms (the fused
        # kernel adds the 1 in registers)
        sizes = arch.norm_sizes()[: len(arch.norm_sizes()) // arch.num_layers]
        t["Gemma norm scales (1 + w, fp32)"] = sum(_alloc(4 * n, rnd) for n in sizes)
    return t


def backward_working_bytes_per_token(arch: ArchSpec, cfg: PlanConfig) -> float:
    """Gradients alive while one layer runs backward (estimate, an upper bound).

    The gradient of the residual stream coming in and going out (2 x bf16 h) and, at the MLP's
    peak, the gradients of silu(gate), of up and of gate (3 x bf16 I) while the layer's saved
    tensors are still counted in full. Gemma 2's capped attention adds, at its backward, the
    gradients of a row of scores in flight (estimate: the probabilities' bf16 gradient, softmax's
    fp32 gradient and the capped scores' bf16 gradient, 2 + 4 + 4 bytes a score with the fp32
    copy).
    """
    width = arch.intermediate_size
    if arch.moe is not None and arch.moe.num_sparse_layers:  # k rows of an expert's width
        width = max(arch.moe.top_k * arch.moe.expert_intermediate_size, arch.intermediate_size)
    working = 2 * 2 * arch.hidden_size + 3 * 2 * width
    if capped_scores_in_torch(arch, cfg):
        working += 10 * arch.num_heads * cfg.seq_len
    return working


def attention_backward_bytes_per_token(arch: ArchSpec, cfg: PlanConfig) -> int:
    """What attention's backward makes while it runs, per token (torch's flash attention, FA2's
    mha_bwd, which SDPA and varlen attention call): the bf16 gradients of q, k and v, an fp32
    accumulator for q's (dq_accum, [tokens, heads, head_dim]) and softmax_d (fp32 per head), and
    with grouped kv heads k's and v's gradients at every query head (dk_expanded, dv_expanded)
    before they are summed to the kv heads (plan() adds what is alive beside them: the gradients
    of attention's output, 2·q, and of the residual stream, 2h). Gemma 2's capped scores in
    torch: none here (their gradients are in backward_working_bytes_per_token)."""
    if capped_scores_in_torch(arch, cfg):
        return 0
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    expanded = 2 * 2 * q if arch.num_kv_heads != arch.num_heads else 0
    return 2 * (q + 2 * kv) + 4 * q + 4 * arch.num_heads + expanded


def mlp_side_bytes_per_token(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float],
                             tiled: bool) -> float:
    """Of a layer's saved terms, those its MLP half keeps (the post-attention half of the norms,
    the MLP's normed input, untiled the MLP's inside, and a sparse layer's routed terms, which
    tiles leave whole): freed by the time attention runs backward."""
    norms = sum(n for name, n in terms.items() if name.startswith("norm inputs"))
    inside = 0 if tiled else split_mlp_terms(terms)[1]
    routed = (sum(routed_activation_terms(arch, cfg).values())
              if arch.moe is not None and arch.moe.num_sparse_layers else 0)
    return norms / 2 + terms.get("MLP input (normed)", 0) + inside + routed


def rerun_terms(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float],
                attention_kept: bool, tiled: bool) -> dict[str, float]:
    """A checkpointed layer's saved terms as its rerun makes them new, without what is alive
    already: with a norm kernel that saves its bf16 input (fused), the first norm's input is the
    checkpoint's saved layer input; on the fast path the LoRA products are the first run's H
    (kept for the rerun, counted with the layer inputs; a tiled MLP's tiles make their own); with
    its attention kept, the rerun makes no q, k, v, output or log-sum-exp (the kept ones are
    keep_attention's term)."""
    t = dict(terms)
    if not torch_norms(arch, cfg):
        name = next(n for n in t if n.startswith("norm inputs"))
        t[name] -= 2 * arch.hidden_size
    if fast_path(cfg):
        for name in ("LoRA A outputs",) + (() if tiled else ("MLP: LoRA A outputs",)):
            t.pop(name, None)
    if attention_kept:
        for name in ("q, k, v (after RoPE)", "q, k, v (after RoPE, k/v repeated to all heads)",
                     "attention output (= o_proj input)", "attention logsumexp (fp32)"):
            t.pop(name, None)
    return t


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the decoder's chunked loss for this vocabulary: the decoder's own rule
    (qlora.models.decoder.loss_chunk_tokens: the power of two at or below 2**26 / vocab, clamped
    to [128, 4096]; Llama-3's 128256 -> 512, Qwen2.5's 151936 -> 256), imported rather than
    repeated so the planner and the model cannot drift apart. Imported here, not at the top: the
    decoder imports torch, which `qlora plan` otherwise does not need to load."""
    from qlora.models.decoder import loss_chunk_tokens as decoder_rule

    return decoder_rule(vocab_size)


PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
REFERENCE_METHODS = ("dpo", "kto")  # the base model with adapters off, under no_grad


def step_tokens(cfg: PlanConfig) -> int:
    """Tokens of one micro-batch's forward: a preference example is two sequences."""
    return cfg.seq_len * cfg.micro_batch * (2 if cfg.method in PREFERENCE_METHODS else 1)


def reference_forward_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """DPO / KTO: the reference forward (adapters off) runs under no_grad after the policy's loss,
    while all of the policy's activations are saved; it keeps nothing, so it holds one layer's
    working tensors at a time, at their largest in the MLP: the layer's input and attention's
    output (2·2h), the gate/up output and SwiGLU's output (fused kernels: 2·2I + 2I; eager: gate
    and up, silu(gate), the product: 4·2I), a tile's where the MLP runs in tiles; then the label
    rows' final hidden states (bf16) and one chunk of the per-token loss: the fused
    cross-entropy's bf16 logits and fp32 losses (2·chunk·V + 4·chunk), the reference chunked
    loss's bf16 logits, fp32 copy and log-softmax (10·chunk·V). The planner counted a layer's
    saved tensors before, and the old loss: at Qwen2.5-1.5B (8,192 tokens) 0.95 GiB, and in every
    phase, where the step measured no more at DPO than at ORPO (5.45 GiB both, H100)."""
    if cfg.method not in REFERENCE_METHODS or cfg.reference_precomputed:
        return 0
    tokens, h, v = step_tokens(cfg), arch.hidden_size, arch.vocab_size
    width = arch.intermediate_size
    if arch.moe is not None and arch.moe.num_sparse_layers:  # k rows of an expert's width
        width = max(arch.moe.top_k * arch.moe.expert_intermediate_size, width)
    mlp_tokens = min(tokens, mlp_tile_tokens(arch, cfg) or tokens)
    mlp = (6 if cfg.kernels == "fused" else 8) * width * mlp_tokens
    chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
    fused_loss = cfg.loss == "chunked-fused"  # Gemma's soft-cap too: inside the fused kernel
    loss = 2 * chunk * v + 4 * chunk if fused_loss else 10 * chunk * v
    return 2 * 2 * tokens * h + mlp + 2 * tokens * h + loss


def loss_peak_bytes(arch: ArchSpec, cfg: PlanConfig) -> tuple[int, str]:
    """The logits/loss transient at the loss's peak and how it is computed. The peak of the
    `chunked-fused` loss is in forward, that of the others in their backward; either way every saved
    activation is alive and no adapter gradient exists yet (Breakdown's first phase)."""
    tokens = step_tokens(cfg)
    v, h = arch.vocab_size, arch.hidden_size
    capped = isinstance(arch, ArchSpec) and final_softcap(arch) is not None
    if capped and cfg.loss == "chunked":
        # Gemma's soft-capped logits: the reference chunked loss (GemmaLM.chunk_loss, each chunk
        # checkpointed), as `chunked` below with tanh's bf16 output kept beside the fp32
        # log_softmax output and gradients: 14 B/entry in the recomputed chunk's backward
        # (chunked-fused: the fused cross-entropy caps inside its kernel, as below)
        chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
        return (14 * chunk * v + 4 * tokens * h,
                f"soft-capped logits, chunked and recomputed in backward: 14 B x {chunk}-token "
                f"chunk x {v} vocab (in backward)")
    if cfg.loss == "full":
        # transformers' ForCausalLMLoss: bf16 logits, .float() copy, log_softmax output (kept) =
        # 10 B/entry in forward; in backward the nll gradient, the kept log_softmax output and the
        # log_softmax input gradient are alive together = 12 B/entry (bf16 logits already freed).
        return 12 * tokens * v, f"full fp32 logits: 12 B x {tokens} tokens x {v} vocab"
    chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
    if cfg.loss == "chunked":
        # Each chunk is checkpointed: in backward it is recomputed (lm_head -> .float() ->
        # log_softmax, whose fp32 output is kept) and then log_softmax's backward holds its kept
        # output, the gradient coming from nll_loss and the gradient it makes: 3 fp32 [chunk, V] =
        # 12 B/entry. The gradient of the final hidden state for all tokens is accumulated over the
        # chunks: the running sum and one chunk's zero-padded slice gradient, 2 x bf16.
        return (12 * chunk * v + 4 * tokens * h,
                f"chunked, recomputed in backward: 12 B x {chunk}-token chunk x {v} vocab (in backward)")
    # kernels/cross_entropy.py (lm_head frozen): each chunk's gradient of the hidden states is made
    # in forward, so backward holds no logits, only grad_h and its scaled copy (2 x bf16 [tokens,
    # H]), and the peak is the forward's, while a chunk is computed: its bf16 logits (overwritten in
    # place by their gradient; the Triton kernel and the GEMMs need nothing but cuBLAS's workspace)
    # and one fp32 loss per row, beside the bf16 [tokens, H] tensors that outlive a chunk: grad_h
    # for every label token (kept for backward) and the final norm's output, alive in forward
    # only. The loss's input (the label rows gathered from that output) is the 2 B/token of
    # plan()'s `final`; the running sum is a scalar.
    return (2 * chunk * v + 4 * chunk + 2 * 2 * tokens * h,
            f"chunked, gradient made in forward: 2 B x {chunk}-token chunk x {v} vocab (in forward)")


# --- the breakdown ------------------------------------------------------------------------------
@dataclass
class Breakdown:
    """Bytes per GPU. `allocated` is what torch.cuda.max_memory_allocated should read.

    static: what lives across steps. Then three moments of a step, each of which may be the peak:
    the loss's peak (its forward for `chunked-fused`, its backward otherwise: all activations still
    saved, no adapter gradient yet: they are set to None after every step and made during
    backward), the last layer's backward, and the optimizer step (every gradient, activations
    freed); DPO and KTO a fourth, the reference forward, after the policy's loss and before its
    backward (all the policy's activations saved).
    """

    arch: ArchSpec
    cfg: PlanConfig
    base: int  # quantized (or 16-bit) decoder linears, with their biases
    embeddings: int  # embed_tokens + lm_head (once when tied)
    norms: int
    adapters: int  # master weights
    optimizer: int  # states inside PyTorch's allocator
    optimizer_paged: int  # paged states: GPU memory, but outside memory_allocated
    activations: int  # saved for backward at the end of the forward (per-token tensors)
    adapter_copies: int  # per-layer tensors the graph keeps (bf16 adapter copies, DoRA weights)
    loss: int  # logits/loss transient
    backward: int  # one layer's backward: recomputed layer (checkpointing) + gradients in flight
    adapter_grads: int  # all adapter gradients (alive at the optimizer step)
    layer_grads: int  # one layer's adapter gradients (alive in the last layer's backward)
    optimizer_step: int  # temporaries during optimizer.step()
    workspace: int  # cuBLAS workspaces + batch tensors (always) + dequantized weight (in a matmul)
    dequant: int  # the part of workspace alive only inside a quantized matmul
    adapter_params: int = 0
    reference: int = 0  # DPO / KTO: the reference forward's own moment (reference_forward_bytes)
    notes: list[str] = field(default_factory=list)
    # what of `activations` is still alive at the layer backward that peaks (None: all of it):
    # the final norm's and the loss's tensors are gone by then, and at an earlier layer's
    # backward the later layers' inputs and kept attention too
    backward_activations: int | None = None
    flat_grads: bool = False  # every adapter gradient alive in every phase (PlanConfig.flat_grads)

    @property
    def static(self) -> int:
        return self.base + self.embeddings + self.norms + self.adapters + self.optimizer

    def phases(self) -> dict[str, list[tuple[str, int]]]:
        """The rows alive on top of `static` at each candidate peak."""
        fixed = ("workspace (cuBLAS, batch)", self.workspace - self.dequant)
        acts = ("activations saved for backward" + (" (checkpointed)" if self.cfg.checkpointing else ""),
                self.activations)
        left = self.activations if self.backward_activations is None else self.backward_activations
        acts_left = ("activations still saved" + (" (checkpointed)" if self.cfg.checkpointing else ""),
                     left)
        copies = ("adapter compute copies kept by autograd" + (" (one layer)" if self.cfg.checkpointing else ""),
                  self.adapter_copies)
        grads = {"loss": ("adapter gradients (none yet)", 0),
                 "backward": ("adapter gradients (last layer)", self.layer_grads)}
        if self.flat_grads:
            # all of them in the buffer; in backward also one layer's as autograd makes them,
            # before they are added into it
            grads = {"loss": ("adapter gradients (flat buffer, all)", self.adapter_grads),
                     "backward": ("adapter gradients (flat buffer, all; one layer's in flight)",
                                  self.adapter_grads + self.layer_grads)}
        phases = {
            "loss (logits)": [
                acts, (copies if not self.cfg.checkpointing else (copies[0], 0)),
                grads["loss"], ("logits/loss", self.loss), fixed],
            "backward of the last layer": [
                acts_left, copies, grads["backward"],
                ("recomputed layer + gradients in flight" if self.cfg.checkpointing else "gradients in flight",
                 self.backward),
                fixed, ("dequantized weight", self.dequant)],
            "optimizer step": [
                ("adapter gradients (all)", self.adapter_grads), ("optimizer step temporaries", self.optimizer_step),
                fixed],
        }
        if self.reference:
            phases["reference forward"] = [
                acts, (copies if not self.cfg.checkpointing else (copies[0], 0)), grads["loss"],
                ("reference forward (no grad, adapters off) + the policy's kept loss gradient",
                 self.reference),
                fixed, ("dequantized weight", self.dequant)]
        return phases

    @property
    def peak_phase(self) -> str:
        return max(self.phases().items(), key=lambda kv: sum(n for _, n in kv[1]))[0]

    @property
    def allocated(self) -> int:
        return self.static + sum(n for _, n in self.phases()[self.peak_phase])

    @property
    def transient(self) -> int:
        return max(self.loss, self.backward)

    @property
    def total(self) -> int:
        """GPU memory the run needs: allocated peak + paged optimizer states."""
        return self.allocated + self.optimizer_paged

    @property
    def reserved_estimate(self) -> int:
        return int(self.allocated * RESERVED_FACTOR)

    def parts(self) -> list[tuple[str, int]]:
        """(label, bytes) rows of the table, in the order they add up to `allocated`."""
        c = self.cfg
        base = {"none": "16-bit base (bf16)", "int8": "8-bit base (LLM.int8)"}.get(
            c.quant, f"4-bit base ({c.quant}{', double quant' if c.double_quant else ''})")
        emb = f"16-bit embeddings + lm_head ({'tied' if self.arch.tie_word_embeddings else 'untied'}, {c.nonquant_dtype})"
        if embedding_in_host_memory(self.arch, c):
            emb = f"16-bit lm_head ({c.nonquant_dtype}; the input embedding in host memory)"
        rows = [
            (base, self.base),
            (emb, self.embeddings),
            ("norms" if isinstance(self.arch, ArchSpec) else "other 16-bit parameters (norms...)",
             self.norms),
            (f"adapters ({self.adapter_params:,} params, {c.adapter_dtype})", self.adapters),
            (f"optimizer states ({c.optimizer}, in allocator)", self.optimizer),
        ]
        phase = self.peak_phase
        rows += [(f"[{phase}] {label}", n) for label, n in self.phases()[phase]]
        return rows


def _gib(n: float) -> float:
    return n / GiB


def rerun_dense_weights(arch: ArchSpec, cfg: PlanConfig, attention_kept: bool,
                        tiled: bool) -> tuple[int, int]:
    """(bytes of the dense weights a checkpointed layer's rerun makes and keeps for its backward,
    the part of them alive while attention runs backward) on the fused path over 4-bit bases
    (kernels/dequant.rerun_keeps_weights): every linear but down_proj, whose GEMM the rerun stops
    before; none of the MLP's when it runs in tiles (the rerun skips the tiled MLP, and a tile's
    weights are never kept: tile_outside_rerun); no q, k, v where the layer's attention is kept
    (the rerun makes only their LoRA products). By attention's backward only q, k, v's are left
    (o_proj's and the MLP's backward took theirs)."""
    if not (cfg.kernels == "fused" and cfg.checkpointing and cfg.quant in FOUR_BIT_METHODS):
        return 0, 0
    attention_inputs = ("q_proj", "k_proj", "v_proj", "qkv_proj")
    skipped = {arch.block_linears()[-1]}  # down_proj, every family's
    if tiled:
        skipped |= set(MLP_LINEARS)
    if attention_kept:
        skipped |= set(attention_inputs)
    made = [(name, 2 * n_in * n_out) for name, n_in, n_out in arch.linears() if name not in skipped]
    return sum(n for _, n in made), sum(n for name, n in made if name in attention_inputs)


def tile_dequant_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """The dense weight a tile of the MLP makes in backward when the fast path runs gate and up
    as one group (both targeted): their stacked [2·I, h] bf16 weight, dequantized at once, with
    double quant its fp32 absmax first; 0 elsewhere (the largest single linear covers it)."""
    if not (fast_path(cfg) and cfg.quant in FOUR_BIT_METHODS):
        return 0
    targets = target_names(cfg.targets, arch)
    if not all(n in targets for n in ("gate_proj", "up_proj")):
        return 0
    n = 2 * arch.intermediate_size * arch.hidden_size
    return 2 * n + (4 * -(-n // cfg.blocksize) if cfg.double_quant else 0)


def plan(arch: ArchSpec | GenericSpec, cfg: PlanConfig = PlanConfig()) -> Breakdown:
    """Predict the per-GPU memory of one training step of `arch` under `cfg` (coarsely for a
    model on the generic path: coarse_plan)."""
    if isinstance(arch, GenericSpec):
        return coarse_plan(arch, cfg)
    cfg.validate()
    rnd = cfg.alloc_rounding
    L, h, v = arch.num_layers, arch.hidden_size, arch.vocab_size
    tokens = step_tokens(cfg)
    nbytes = DTYPE_BYTES[cfg.nonquant_dtype]
    notes: list[str] = []

    # Static: frozen weights.
    base_layer = mlp_layer = 0
    moe = arch.moe is not None
    for name, n_in, n_out in arch.linears():
        weight = sum(_alloc(s, rnd) for s in
                     quantized_linear_tensors(n_out, n_in, cfg.quant, cfg.double_quant, cfg.blocksize))
        if moe and name in MLP_LINEARS:  # a mixture of experts' dense layers only
            mlp_layer += weight
            continue
        base_layer += weight
        if arch.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            base_layer += _alloc(2 * n_out, rnd)  # bias stays in bf16
    base = L * base_layer
    if moe:
        sparse = arch.moe.num_sparse_layers
        base += (L - sparse) * mlp_layer + sparse * expert_stack_bytes(arch, cfg)
        notes.append(f"{arch.moe.num_experts} experts in {sparse} of {L} layers, "
                     f"{arch.moe.top_k} per token: {_gib(sparse * expert_stack_bytes(arch, cfg)):.2f}"
                     " GiB of expert weights")
    host_embedding = embedding_in_host_memory(arch, cfg)
    embeddings = _alloc(v * h * nbytes, rnd) * (1 if arch.tie_word_embeddings or host_embedding else 2)
    if host_embedding:
        notes.append(f"input embedding in pinned host memory: {_gib(v * h * nbytes):.2f} GiB "
                     "of host RAM, not on the GPU")
    norms = sum(_alloc(n * nbytes, rnd) for n in arch.norm_sizes())

    # Trainable: adapters (static), their gradients (made in backward, set to None after the
    # step), optimizer states (static from the first step on).
    numels = adapter_tensors(arch, cfg)
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    adapters = sum(_alloc(n * abytes, rnd) for n in numels)
    grads = sum(_alloc(n * abytes, rnd) for n in numels)
    layer_grads = -(-grads // L)
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, cfg)

    # Activations. With the MLP in tiles (mlp_tile_tokens), what the MLP keeps inside it and the
    # gradients it makes are one tile's, not the sequence's; the tiled MLP keeps only its input
    # (a term outside the MLP's inside) and makes its input's gradient whole.
    terms = layer_activation_terms(arch, cfg)
    per_layer = sum(terms.values())
    tile = mlp_tile_tokens(arch, cfg)
    if tile:
        outside, inside = split_mlp_terms(terms)
        mlp_working = 3 * 2 * arch.intermediate_size  # backward_working_bytes_per_token's MLP part
        per_layer = outside
        # one tile's inside and gradients, spread over the tokens. The tiled MLP's input gradient,
        # written tile by tile into one [tokens, hidden] tensor, is the gradient going out that
        # backward_working_bytes_per_token counts beside the one coming in (2 x 2h): no more.
        tile_extra = tile * (inside + mlp_working) / tokens
        notes.append(f"MLP in sequence tiles of {tile} tokens: its intermediates are one tile's "
                     f"({_gib(tile * (inside + mlp_working)):.2f} GiB in backward)")
    per_layer_weights = sum(layer_weight_terms(arch, cfg).values())
    layer_input = 2 * h  # the bf16 hidden state entering a layer
    # After the layers: the final norm (fp32 input copy + rstd, eager), the loss's input (the
    # normed hidden state of the label positions: alive through the loss's forward, and kept by
    # each chunk's checkpoint until the loss's backward in `chunked`) with its int64
    # gather indices and targets; RoPE cos/sin in bf16, computed once and shared by all layers.
    final = (4 if torch_norms(arch, cfg) else 2) * h + 4 + 2 * h + 8 + 8
    # Gemma 3: a second table pair for its sliding layers' own RoPE base
    rope = 2 * 2 * arch.head_dim * (2 if arch.model_type == "gemma3_text" else 1)
    working = backward_working_bytes_per_token(arch, cfg)
    if tile:
        working += tile_extra - 3 * 2 * arch.intermediate_size
    offloaded = offload_applies(cfg)
    kept_layers = kept_attention_layers(arch, cfg)
    kept_each = (kept_attention_bytes_per_token(arch, cfg.seq_len, repeats_kv_heads(arch))
                 if kept_layers else 0)
    # attention's backward, the layer's other moment (the MLP's is `working`): what attention
    # keeps and the layer's first norm, the gradients of the residual stream and of attention's
    # output, and what flash's backward makes
    attention_extra = (2 * h + 2 * arch.num_heads * arch.head_dim
                       + attention_backward_bytes_per_token(arch, cfg)
                       - mlp_side_bytes_per_token(arch, cfg, terms, bool(tile)))
    if cfg.checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; backward recomputes one layer.
        # Offloaded (speed/offload.py), two inputs are on the GPU at any time: in forward the one
        # still being copied out and the next; at the loss the last layer's (kept) and, at its
        # backward, the one fetched ahead. On the fast path each layer also keeps its LoRA
        # products H [tokens, r] per target for the rerun (kernels/lora.py), which then draws no
        # dropout mask again: on the GPU, offloaded or not.
        products = 2 * cfg.r * len(target_names(cfg.targets, arch)) if fast_path(cfg) else 0
        inputs_on_gpu = min(2, L) if offloaded else L
        # kept attention stays on the GPU under offload too (its own saved-tensor hooks)
        if kept_layers:
            notes.append(f"attention kept for backward in {kept_layers} of {L} "
                         f"layers: {_gib(tokens * kept_layers * kept_each):.2f} GiB (keep_attention)")
        activations = tokens * (inputs_on_gpu * layer_input + L * products + kept_layers * kept_each
                                + final + rope)
        copies = per_layer_weights
    else:
        activations = tokens * (L * per_layer + final + rope)
        copies = L * per_layer_weights
        backward = tokens * max(working, attention_extra)
        # the last layer's backward comes after the final norm's and the loss's: theirs are gone
        backward_activations = tokens * (L * per_layer + rope)
    activations = int(activations)
    loss, loss_note = loss_peak_bytes(arch, cfg)
    notes.append(f"logits/loss: {loss_note}")
    if capped_scores_in_torch(arch, cfg):
        scores = tokens * (8 * arch.num_heads + 1) * cfg.seq_len
        notes.append(f"soft-capped attention (Gemma 2) runs in torch, not flash: its scores are "
                     f"{_gib(scores):.2f} GiB a layer, kept while that layer runs backward "
                     "(fused_kernels: flex_attention, without them)")
    elif attention_softcap(arch) is not None:
        notes.append("soft-capped attention (Gemma 2) through flex_attention: no [heads, T, T] "
                     "scores kept")
    if cfg.keep_attention and cfg.checkpointing and not keeps_attention(arch, cfg):
        notes.append(f"keep_attention: {arch.model_type}'s attention is recomputed in backward "
                     "(the speed layer keeps none of it)")

    # Workspace: the cuBLAS workspaces and the batch (ids, labels, positions) always; inside a
    # quantized matmul (forward and backward alike) the frozen weight dequantized, with double
    # quant first its fp32 absmax.
    largest = max(arch.linears(), key=lambda x: x[1] * x[2])
    n_largest = largest[1] * largest[2]
    experts = expert_run_elements(arch)
    dequant = 0
    if cfg.quant in FOUR_BIT_METHODS:
        dequant = 2 * n_largest + (4 * -(-n_largest // cfg.blocksize) if cfg.double_quant else 0)
        # the stack kernel reads the nested scales itself: no fp32 absmax beside the run
        dequant = max(dequant, 2 * experts)
    elif cfg.quant == "int8":
        # backward turns int8 rows back to bf16; forward quantizes the input to int8 and gets int32
        dequant = 2 * n_largest + tokens * (largest[1] + 4 * largest[2])
    if cfg.dora:
        # DoRA (qlora.adapters) takes the row norms of W + s·BA each forward: the dequantized
        # weight, B @ A and their sum in bf16, for the largest target (estimate).
        t = [x for x in arch.linears() if x[0] in target_names(cfg.targets, arch)]
        big = max(t, key=lambda x: x[1] * x[2])
        dequant += 3 * 2 * big[1] * big[2]
        notes.append("DoRA: its workspace term is an estimate")
    if cfg.checkpointing:
        # The layer whose backward peaks, and at which of its two moments (the MLP's, with the
        # dense weights the rerun kept and one more being dequantized; attention's). With
        # attention kept in the last N < L layers, the last layer (every input alive, N kept) and
        # the last that reruns its attention (N inputs fewer, none kept, its q, k, v recomputed
        # and their dense weights kept) are both candidates.
        candidates = [(L - 1, kept_layers > 0)]
        if 0 < kept_layers < L:
            candidates.append((L - 1 - kept_layers, False))
        # a tile's backward dequantizes gate and up together (the fast path's group)
        dequant_now = max(dequant, tile_dequant_bytes(arch, cfg)) if tile else dequant
        best = None
        for layer, kept_here in candidates:
            alive = layer + 1  # layer inputs and products of this layer and the ones before it
            kept_alive = kept_layers - (L - 1 - layer) if kept_here else 0
            before = tokens * ((inputs_on_gpu if offloaded else alive) * layer_input
                               + alive * products + kept_alive * kept_each + rope)
            rerun = sum(rerun_terms(arch, cfg, terms, kept_here, bool(tile)).values())
            if tile:
                rerun -= split_mlp_terms(terms)[1]
            kept_dense, attention_dense = rerun_dense_weights(arch, cfg, kept_here, bool(tile))
            moments = [(tokens * (rerun + working), kept_dense + dequant_now),
                       (tokens * (rerun + attention_extra), attention_dense)]
            moment, dense = max(moments, key=sum)
            if best is None or before + moment + dense > sum(best):
                best = (before, moment, dense)
        backward_activations, backward, dequant = best
    workspace = CUBLAS_WORKSPACE_BYTES + 3 * 8 * tokens + dequant
    if cfg.method in PREFERENCE_METHODS:
        notes.append(f"{cfg.method}: two sequences per example ({tokens} tokens a micro-batch); "
                     "log-probs per token from the model's chunked loss")
    # The reference forward runs after the policy's loss and is gone before its backward: a
    # moment of its own (Breakdown.phases), not workspace alive in every phase. Beside it the
    # policy's fused loss keeps its gradient of the label rows' hidden states (bf16 [tokens, h]).
    reference = reference_forward_bytes(arch, cfg)
    if reference:
        if cfg.loss == "chunked-fused":
            reference += 2 * tokens * h
        notes.append(f"{cfg.method}: reference forward (adapters off, no grad) "
                     f"{_gib(reference):.2f} GiB, an estimate, after the policy's loss and "
                     "before its backward")

    # Several GPUs: data parallel replicates everything and sums the flat gradient buffers in
    # place (no bucket copy: train/distributed.all_reduce_grads); FSDP shards the weights,
    # adapters, grads and optimizer, and gathers one layer at a time (twice: current +
    # prefetched).
    if cfg.gpus > 1:
        n = cfg.gpus
        if cfg.sharding == "ddp":
            notes.append(f"data parallel over {n} GPUs: each holds a full copy; micro-batch is "
                         "per GPU")
        else:
            layer_full = base_layer + sum(_alloc(x * abytes, rnd) for x in numels[: len(numels) // L])
            base, embeddings, norms = -(-base // n), -(-embeddings // n), -(-norms // n)
            adapters, grads = -(-adapters // n), -(-grads // n)
            # sharded parameters are stepped by torch AdamW (train/distributed.sharded_optim)
            opt, opt_paged, opt_step = optimizer_state_bytes(numels, replace(cfg, optimizer="adamw_torch"))
            opt, opt_paged, opt_step = -(-opt // n), -(-opt_paged // n), -(-opt_step // n)
            gathered = 2 * layer_full + _alloc(v * h * nbytes, rnd)  # + the gathered embedding/head
            workspace += gathered
            dequant += gathered
            notes.append(f"FSDP over {n} GPUs: weights, adapters, grads, optimizer (torch AdamW) "
                         "sharded; two gathered layers and the gathered embedding/head in workspace")
    if offloaded:
        notes.append(f"offload: the checkpointed layer inputs wait in pinned host memory "
                     f"({_gib(host_offload_bytes(arch, cfg)):.2f} GiB of host RAM); two are on "
                     "the GPU at a time")
    elif cfg.offload_activations:
        notes.append("offload: only the inputs checkpointing keeps are offloaded; without "
                     "checkpointing it does nothing")
    if cfg.optimizer.startswith("paged_") and opt_paged:
        notes.append("paged optimizer states are in CUDA managed memory: counted in total, "
                     "not in torch.cuda.max_memory_allocated")

    return Breakdown(arch=arch, cfg=cfg, base=base, embeddings=embeddings, norms=norms, adapters=adapters,
                     optimizer=opt, optimizer_paged=opt_paged, activations=activations, adapter_copies=copies,
                     loss=loss, backward=int(backward), adapter_grads=grads, layer_grads=layer_grads,
                     optimizer_step=opt_step, workspace=workspace, dequant=dequant,
                     reference=reference, adapter_params=sum(numels), notes=notes,
                     backward_activations=int(backward_activations),
                     flat_grads=cfg.flat_grads and (cfg.gpus == 1 or cfg.sharding == "ddp"))


# --- the generic path: a coarser estimate --------------------------------------------------------
def generic_targets(spec: GenericSpec, targets: str | tuple[str, ...] | list[str]
                    ) -> list[LinearLayer]:
    """The layers adapters go on: all-linear (PEFT's: every linear but the head) or the layers
    whose path is, or ends in "." + , a given name (as adapters.py and PEFT match)."""
    if targets == "all-linear":
        return list(spec.linears)
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) \
        else list(targets)
    chosen = [layer for layer in spec.linears
              if any(layer.name == t or layer.name.endswith("." + t) for t in names)]
    unknown = [t for t in names if not any(l.name == t or l.name.endswith("." + t)
                                           for l in spec.linears)]
    if unknown or not chosen:
        leaves = sorted({layer.name.rsplit(".", 1)[-1] for layer in spec.linears})
        raise QloraError(f"--targets: {', '.join(unknown) or '(empty)'} match no linear layer of "
                         f"this {spec.model_type} model; use all-linear or some of {', '.join(leaves)}")
    return chosen


# Values a transformer block keeps per token for backward, in 16 bits, for a block of width h and
# MLP width i: the normed inputs of attention and MLP, q, k, v, the attention output, the MLP's
# two intermediate tensors, its activation and its product. The native decoder's terms, derived
# one by one (layer_activation_terms), come to about 9h + 4i at Llama's shapes; a generic block
# may keep more (biases, extra norms, its own dropout masks), hence the margin.
GENERIC_BLOCK_VALUES_PER_TOKEN = (12, 5)  # 12 h + 5 i


def coarse_plan(spec: GenericSpec, cfg: PlanConfig) -> Breakdown:
    """The memory of a training step of a model on the generic path (transformers' own modules).

    Coarser than plan(): the weights are counted exactly, layer by layer, from the model
    transformers builds (the quantized linears, everything else in 16 bits), and so are the
    adapters and the optimizer; the activations are not derived from the block's code but
    estimated from its width (GENERIC_BLOCK_VALUES_PER_TOKEN), and the loss reads whole logits.
    None of the speed layer applies (no fused kernels, no kept attention, no host embedding), and
    FSDP sharding is not offered."""
    cfg.validate(targets=False)
    cfg = replace(cfg, kernels="eager", keep_attention=False, embedding_on_host=False,
                  loss="full", gpus=1, sharding="ddp")
    rnd = cfg.alloc_rounding
    nbytes = DTYPE_BYTES[cfg.nonquant_dtype]
    L, h, i = spec.num_layers, spec.hidden_size, spec.intermediate_size
    tokens = step_tokens(cfg)

    base = 0
    for layer in spec.linears:
        n_out, n_in = layer.out_features, layer.in_features
        sizes = (quantized_linear_tensors(n_out, n_in, cfg.quant, cfg.double_quant, cfg.blocksize)
                 if layer.quantized else [nbytes * n_out * n_in])
        base += sum(_alloc(size, rnd) for size in sizes) + (_alloc(nbytes * n_out, rnd) if layer.bias else 0)
    embeddings = _alloc(spec.embedding_params * nbytes, rnd)
    others = _alloc(spec.other_params * nbytes, rnd)

    targets = generic_targets(spec, cfg.targets)
    numels = [n for t in targets for n in
              [cfg.r * t.in_features, t.out_features * cfg.r] + ([t.out_features] if cfg.dora else [])]
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    adapters = sum(_alloc(n * abytes, rnd) for n in numels)
    grads = adapters
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, cfg)

    values_h, values_i = GENERIC_BLOCK_VALUES_PER_TOKEN
    lora = sum(2 * cfg.r + (2 * t.in_features if cfg.lora_dropout > 0 else 0) for t in targets) / L
    per_layer = 2 * (values_h * h + values_i * i) + lora
    copies = sum(_alloc(2 * cfg.r * (t.in_features + t.out_features), rnd) for t in targets)
    working = 2 * 2 * h + 3 * 2 * i  # gradients in flight through one block
    if cfg.checkpointing:
        activations = tokens * (L * 2 * h + 2 * h)
        backward = tokens * (per_layer + working)
        copies = -(-copies // L)
    else:
        activations = tokens * (L * per_layer + 2 * h)
        backward = tokens * working
    loss, loss_note = loss_peak_bytes(spec, cfg)
    largest = max((l for l in spec.linears if l.quantized),
                  key=lambda l: l.in_features * l.out_features, default=None)
    dequant = 0
    if largest is not None and cfg.quant != "none":
        dequant = 2 * largest.in_features * largest.out_features
    workspace = CUBLAS_WORKSPACE_BYTES + 3 * 8 * tokens + dequant
    notes = [f"coarser estimate: {spec.model_type} ({spec.architecture}) runs on the generic path; "
             "its weights, adapters and optimizer are counted exactly, its activations estimated "
             "from the block's width, not derived: leave a margin",
             f"logits/loss: {loss_note} (the generic path's loss reads whole logits)"]
    return Breakdown(arch=spec, cfg=cfg, base=base, embeddings=embeddings, norms=others,
                     adapters=adapters, optimizer=opt, optimizer_paged=opt_paged,
                     activations=int(activations), adapter_copies=copies, loss=loss,
                     backward=int(backward), adapter_grads=grads, layer_grads=-(-grads // L),
                     optimizer_step=opt_step, workspace=workspace, dequant=dequant,
                     adapter_params=sum(numels), notes=notes)


# --- does it fit, and what to change ------------------------------------------------------------
def needed_bytes(b: Breakdown) -> int:
    """What the GPU must have: allocated x allocator slack + paged states + the CUDA context."""
    return int(b.allocated * RESERVED_FACTOR) + b.optimizer_paged + CUDA_CONTEXT_BYTES


def fits(b: Breakdown, gpu_bytes: int) -> bool:
    """Fits with the allocator's usual slack: what the planner's own choices (kept attention,
    offload, tiles, auto-fit) require, so that they never pick a configuration on the edge."""
    return needed_bytes(b) <= gpu_bytes


def least_needed_bytes(b: Breakdown) -> int:
    """What the GPU must have at the very least: the allocated peak, the paged states and the CUDA
    context, with no cached-but-free slack. The allocator gives its cache back and retries before
    it reports out of memory, so a run between this and `needed_bytes` can train: Qwen3-30B-A3B
    (planned 20.91 GiB allocated) trained under a 22.35 GiB allocator cap at 20.91 allocated,
    21.25 reserved (H100, 2026-12-06), where the usual slack asks for ~28 GiB."""
    return b.allocated + b.optimizer_paged + CUDA_CONTEXT_BYTES


def fits_tightly(b: Breakdown, gpu_bytes: int) -> bool:
    """Does not fit with the usual slack, but its allocated peak does: it may train, with the
    allocator near full (`qlora train` warns and goes on; only below this does it refuse)."""
    return not fits(b, gpu_bytes) and least_needed_bytes(b) <= gpu_bytes


def tight_fit_line(b: Breakdown, gpu_bytes: int, gpu_name: str) -> str:
    """What `qlora plan` and `qlora train` say of a tight fit."""
    spare = gpu_bytes - least_needed_bytes(b)
    # every term least_needed_bytes takes, named, so that the numbers add up on the page
    paged = (f" + paged optimizer states ~{_gib(b.optimizer_paged):.2f} GiB"
             if b.optimizer_paged else "")
    return (f"may fit on {gpu_name}, tightly: peak allocated ~{_gib(b.allocated):.2f} GiB{paged} + "
            f"CUDA context ~{_gib(CUDA_CONTEXT_BYTES):.2f} GiB leave ~{_gib(spare):.2f} GiB of "
            f"{_gib(gpu_bytes):.1f} for the allocator's cached "
            f"blocks, where ~{_gib(needed_bytes(b)):.1f} GiB is the usual need (reserved measured "
            f"1.01-1.29x allocated without a cap); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            "cuts fragmentation. If it runs out of memory, change one of:")


@dataclass
class Advice:
    changes: dict  # PlanConfig field -> new value
    text: str
    breakdown: Breakdown


# How each knob is spelled on the command line: `qlora plan` and `qlora train`.
PLAN_OPTIONS = dict(micro_batch="--micro-batch", checkpointing="--checkpointing", seq_len="--seq-len",
                    r="--r", offload_activations="--offload-activations", tile_mlp="--tile-mlp")
TRAIN_OPTIONS = dict(micro_batch="--micro_batch_size", checkpointing="--gradient_checkpointing true",
                     seq_len="--max_seq_length", r="--lora_r",
                     offload_activations="--offload_activations true", tile_mlp="--tile_mlp true")


def _describe(cfg: PlanConfig, new: PlanConfig, names: dict = PLAN_OPTIONS) -> str:
    parts = []
    if new.micro_batch != cfg.micro_batch:
        k = cfg.micro_batch // new.micro_batch
        parts.append(f"{names['micro_batch']} {new.micro_batch} (and x{k} gradient accumulation to keep the batch)")
    if new.checkpointing != cfg.checkpointing:
        parts.append(names["checkpointing"])
    if new.seq_len != cfg.seq_len:
        parts.append(f"{names['seq_len']} {new.seq_len}")
    if new.r != cfg.r:
        parts.append(f"{names['r']} {new.r}")
    if new.offload_activations != cfg.offload_activations:
        parts.append(names["offload_activations"])
    if new.tile_mlp != cfg.tile_mlp:
        parts.append(names["tile_mlp"])
    return " + ".join(parts)


def _largest_fitting(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, field_name: str, start: int,
                     floor: int) -> PlanConfig | None:
    """Halve `field_name` from `start` down to `floor`; the first (largest) value that fits."""
    value = start
    while value >= floor:
        new = replace(cfg, **{field_name: value})
        if fits(plan(arch, new), gpu_bytes):
            return new
        value //= 2
    return None


def advise(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, names: dict = PLAN_OPTIONS) -> list[Advice]:
    """Changes that make the run fit, each checked by re-running the planner; [] if it fits.

    Tried one at a time, in this order: smaller micro-batch, checkpointing on, shorter sequence,
    smaller rank, offload of activations, the MLP in tiles; then offload and tiles together where
    neither fits alone. If no single change fits, they are
    combined (micro-batch 1 and checkpointing, then offload and tiles, then the sequence and the
    rank), each at its most conservative setting, until the plan fits. If even that does not fit,
    one Advice with empty changes says so. `names` spells the options (a knob named None is not
    offered).
    """
    offload = names.get("offload_activations") is not None
    if fits(plan(arch, cfg), gpu_bytes):
        return []
    singles: list[PlanConfig | None] = []
    if cfg.micro_batch > 1:
        singles.append(_largest_fitting(arch, cfg, gpu_bytes, "micro_batch", cfg.micro_batch // 2, 1))
    if not cfg.checkpointing:
        singles.append(replace(cfg, checkpointing=True))
    if cfg.seq_len > 128:
        singles.append(_largest_fitting(arch, cfg, gpu_bytes, "seq_len", cfg.seq_len // 2, 128))
    if cfg.r > 4:
        singles.append(_largest_fitting(arch, cfg, gpu_bytes, "r", cfg.r // 2, 4))
    if offload and not cfg.offload_activations and cfg.checkpointing:
        singles.append(replace(cfg, offload_activations=True))
    if not cfg.tile_mlp:
        singles.append(replace(cfg, tile_mlp=True))
    out = []
    for new in singles:
        if new is not None:
            b = plan(arch, new)
            if fits(b, gpu_bytes):
                out.append(Advice(_changes(cfg, new), _describe(cfg, new, names), b))
    # offload and tiles together, where neither alone fits: they change nothing of what the run
    # computes, which a shorter sequence or a smaller rank does (qlora train's auto picks them)
    if (offload and cfg.checkpointing and not cfg.offload_activations and not cfg.tile_mlp
            and not any(a.changes.keys() & {"offload_activations", "tile_mlp"} for a in out)):
        both = replace(cfg, offload_activations=True, tile_mlp=True)
        b = plan(arch, both)
        if fits(b, gpu_bytes):
            out.append(Advice(_changes(cfg, both), _describe(cfg, both, names), b))
    if out:
        return out
    # Combine: micro-batch 1 and checkpointing on; then offload and MLP tiles (which change
    # nothing of what the run computes); then the longest sequence, the largest rank; a knob
    # that cannot make it fit alone is left at its floor.
    combined = replace(cfg, micro_batch=1, checkpointing=True)
    if fits(plan(arch, combined), gpu_bytes):
        return [Advice(_changes(cfg, combined), _describe(cfg, combined, names), plan(arch, combined))]
    combined = replace(combined, offload_activations=offload or cfg.offload_activations,
                       tile_mlp=cfg.tile_mlp or True)
    if fits(plan(arch, combined), gpu_bytes):
        return [Advice(_changes(cfg, combined), _describe(cfg, combined, names), plan(arch, combined))]
    for knob, floor in (("seq_len", 128), ("r", 4)):
        trial = _largest_fitting(arch, combined, gpu_bytes, knob, getattr(combined, knob), floor)
        if trial is not None:
            return [Advice(_changes(cfg, trial), _describe(cfg, trial, names), plan(arch, trial))]
        combined = replace(combined, **{knob: min(getattr(combined, knob), floor)})
    b = plan(arch, combined)
    more = _min_fsdp_gpus(arch, replace(cfg, micro_batch=1, checkpointing=True), gpu_bytes)
    text = (f"does not fit even with {_describe(cfg, combined, names)}: the static part alone is "
            f"{_gib(b.static + b.optimizer_paged):.1f} GiB; use a larger GPU"
            + (f" or {more} GPUs with FSDP sharding" if more else ""))
    return [Advice({}, text, b)]


def _min_fsdp_gpus(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, most: int = 8) -> int | None:
    for n in range(2, most + 1):
        if fits(plan(arch, replace(cfg, gpus=n, sharding="fsdp")), gpu_bytes):
            return n
    return None


def _changes(old: PlanConfig, new: PlanConfig) -> dict:
    return {f: getattr(new, f) for f in old.__dataclass_fields__ if getattr(old, f) != getattr(new, f)}


def auto_fit(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, max_micro_batch: int = 64) -> PlanConfig | None:
    """The largest micro-batch that fits, with checkpointing off if it fits that way at all.

    Checkpointing costs a recomputed forward (about a third more compute), so no checkpointing at
    micro-batch 1 is preferred to checkpointing at a larger micro-batch. None if nothing fits.
    """
    for checkpointing in (False, True):
        base = replace(cfg, checkpointing=checkpointing, micro_batch=1)
        if not fits(plan(arch, base), gpu_bytes):
            continue
        return replace(base, micro_batch=_largest_that_fits(arch, base, gpu_bytes, "micro_batch", 1,
                                                            max_micro_batch))
    return None


# --- reading sizes ------------------------------------------------------------------------------
def parse_size(text: str, option: str = "--gpu-memory") -> int:
    """'24GB', '24GiB', '24G', '80', '512MiB' -> bytes. GB and GiB both mean 2^30 here: a card
    sold as '24 GB' has 24 GiB."""
    s = text.strip().lower().replace(" ", "")
    units = [("gib", GiB), ("gb", GiB), ("g", GiB), ("mib", MiB), ("mb", MiB), ("m", MiB),
             ("tib", 1024 * GiB), ("tb", 1024 * GiB)]
    scale = GiB
    for suffix, mult in units:
        if s.endswith(suffix):
            s, scale = s[: -len(suffix)], mult
            break
    try:
        value = float(s)
    except ValueError:
        raise QloraError(f"{option} {text!r} is not a size; write e.g. 24GB, 80GiB or 16000MiB") from None
    if not math.isfinite(value) or value <= 0:
        raise QloraError(f"{option} {text!r} must be a positive size")
    return int(value * scale)


def format_table(b: Breakdown) -> str:
    rows = b.parts()
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'part':<{width}}{'GiB':>8}", "-" * (width + 8)]
    lines += [f"{label:<{width}}{_gib(n):>8.2f}" for label, n in rows]
    lines.append("-" * (width + 8))
    lines.append(f"{'peak allocated (torch.cuda.max_memory_allocated)':<{width}}{_gib(b.allocated):>8.2f}")
    if b.optimizer_paged:
        lines.append(f"{'+ paged optimizer states (managed memory)':<{width}}{_gib(b.optimizer_paged):>8.2f}")
    lines.append(f"{'total GPU memory of the run':<{width}}{_gib(b.total):>8.2f}")
    lines.append(f"{'needed on the GPU (advice: slack, CUDA context)':<{width}}{_gib(needed_bytes(b)):>8.2f}")
    lines.append(f"  = allocated x {RESERVED_FACTOR:.2f} (reserved, estimate) + paged states "
                 f"+ {_gib(CUDA_CONTEXT_BYTES):.2f} GiB CUDA context")
    lines.append(f"peak phase: {b.peak_phase}")
    lines += [f"note: {n}" for n in b.notes]
    return "\n".join(lines)


# --- `qlora train`: check before loading, auto-fit, out of memory -------------------------------
def plan_config_for_run(cfg, dtype=None, world_size: int = 1) -> PlanConfig:
    """The PlanConfig of a RunConfig (qlora.config): what `qlora train` will run, as the planner
    sees it. Target names the planner does not know (not one of the seven projections) are left
    out; the model layer refuses them later if they do not exist."""
    targets = "all-linear" if "all-linear" in cfg.target_modules else tuple(
        t.removeprefix("mlp.") for t in cfg.target_modules
        if t in PROJECTIONS or t.removeprefix("mlp.") in EXPERT_TARGETS) or "all-linear"
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    nonquant = {"float32": "fp32", "float16": "fp16"}.get(name, "bf16")
    return PlanConfig(quant=cfg.quant, double_quant=cfg.double_quant, r=cfg.lora_r, targets=targets,
                      dora=cfg.use_dora, lora_dropout=cfg.lora_dropout, nonquant_dtype=nonquant,
                      seq_len=cfg.max_seq_length, micro_batch=cfg.micro_batch_size,
                      checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optim,
                      keep_attention=(getattr(cfg, "keep_attention", False) or False)
                      if cfg.gradient_checkpointing else False,
                      embedding_on_host=bool(getattr(cfg, "embedding_on_host", False)),
                      offload_activations=bool(getattr(cfg, "offload_activations", False)
                                               and cfg.gradient_checkpointing),
                      tile_mlp=getattr(cfg, "tile_mlp", False) or False,
                      kernels="fused" if getattr(cfg, "fused_kernels", False) else "eager",
                      gpus=world_size, sharding=cfg.sharding, **_method_fields(cfg))


def _method_fields(cfg) -> dict:
    """A preference run's method (its log-probs come per token from the model's own loss, the
    chunked one an SFT run uses: methods/preference.py)."""
    method = getattr(cfg, "method", "sft")
    if method not in PREFERENCE_METHODS:
        return {}
    return {"method": method,
            "reference_precomputed": bool(getattr(cfg, "precompute_ref_log_probs", False))}


def run_gpu_bytes(cfg, device) -> tuple[int | None, str]:
    """The GPU size to plan for: --gpu-memory, else the CUDA device's, else None (CPU run)."""
    if cfg.gpu_memory:
        return parse_size(cfg.gpu_memory, "--gpu_memory"), f"--gpu_memory {cfg.gpu_memory}"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    return None, ""


def _advice_lines(arch: ArchSpec, pc: PlanConfig, gpu_bytes: int) -> list[str]:
    lines = []
    for a in advise(arch, pc, gpu_bytes, names=TRAIN_OPTIONS):
        if a.changes:
            lines.append(f"  - {a.text}: ~{_gib(needed_bytes(a.breakdown)):.1f} GiB")
        else:
            lines.append(f"  - {a.text}")
    return lines


def check_run(cfg, device, dtype=None, world_size: int = 1, log=print):
    """Run the planner for `qlora train` before anything is loaded.

    Returns (cfg, facts): cfg possibly changed by --auto_fit (micro-batch, gradient accumulation,
    checkpointing), facts for the resolved config. Raises QloraError, naming what to change, when
    the run will not fit. On the CPU without --gpu_memory it only checks a keep_attention count
    against the model's layers.
    """
    import dataclasses

    gpu_bytes, gpu_name = run_gpu_bytes(cfg, device)
    keep = cfg.keep_attention
    if gpu_bytes is None:  # keep_attention's default is on only where a plan says it fits
        if keep is not True and keep:  # a count: checked against the model's layers before loading
            attention_layers_kept(keep, resolve_arch(model_dir=cfg.model).num_layers)
        return dataclasses.replace(cfg, keep_attention=keep or False,  # as are offload and tiles
                                   offload_activations=cfg.offload_activations or False,
                                   tile_mlp=cfg.tile_mlp or False), {}
    arch = resolve_arch(model_dir=cfg.model)
    pc = plan_config_for_run(cfg, dtype, world_size)
    if isinstance(arch, GenericSpec) and "all-linear" not in cfg.target_modules:
        pc = replace(pc, targets=tuple(cfg.target_modules))  # its own layer names (c_attn...)
    offload_auto, tile_auto = cfg.offload_activations is None, cfg.tile_mlp is None
    if offload_auto or tile_auto:
        pc = long_context_choice(arch, pc, gpu_bytes, offload_auto, tile_auto)
        cfg = dataclasses.replace(cfg, offload_activations=pc.offload_activations,
                                  tile_mlp=pc.tile_mlp)
        chosen = [text for on, text in (
            (offload_auto and pc.offload_activations, "offload_activations: on (the checkpointed layer inputs in "
             f"pinned host memory, {_gib(host_offload_bytes(arch, pc)):.1f} GiB of it)"),
            (tile_auto and pc.tile_mlp, "tile_mlp: on (the MLP in sequence tiles of "
             f"{mlp_tile_tokens(arch, pc)} tokens)")) if on]
        if chosen:
            log("; ".join(chosen) + f": the memory plan fits {_gib(gpu_bytes):.1f} GiB ({gpu_name}) "
                "only with " + ("them" if len(chosen) > 1 else "it") + " (set to false to turn off)")
    check_host_offload(arch, replace(pc, offload_activations=bool(cfg.offload_activations)),
                       chosen_by_plan=bool(cfg.offload_activations) and offload_auto)
    if cfg.keep_attention is None:
        # the plan is per GPU, under torchrun (DDP, FSDP) too; auto_fit spends memory on the
        # micro-batch instead
        n = attention_layers_that_fit(arch, pc, gpu_bytes) if not cfg.auto_fit else 0
        keep = True if n == arch.num_layers else n or False
        cfg = dataclasses.replace(cfg, keep_attention=keep)
        pc = replace(pc, keep_attention=keep)
        if n:
            which = "each layer's" if keep is True else f"the last {n} of {arch.num_layers} layers'"
            log(f"keep_attention: {'on' if keep is True else n} ({which} attention kept for "
                "backward, not rerun: as many layers as the memory plan fits; keep_attention: "
                "false turns it off)")
    b = plan(arch, pc)
    if kept_attention_layers(arch, pc) and not fits(b, gpu_bytes):
        n = attention_layers_that_fit(arch, pc, gpu_bytes)
        if n or fits(plan(arch, replace(pc, keep_attention=False)), gpu_bytes):
            kept = kept_attention_layers(arch, pc)
            kept_bytes = (kept * step_tokens(pc) * kept_attention_bytes_per_token(
                arch, pc.seq_len, repeats_kv_heads(arch)))
            raise QloraError(
                f"this run fits in {_gib(gpu_bytes):.1f} GiB ({gpu_name}) only with attention kept "
                f"in at most {n} layers (keep_attention keeps "
                f"~{_gib(kept_bytes):.2f} GiB "
                f"in {kept}): set keep_attention: {n or 'false'} (or leave it out: as many as fit)")
    need = needed_bytes(b)
    coarse = " (a coarser estimate: the generic path)" if isinstance(arch, GenericSpec) else ""
    facts = {"memory plan": f"needs ~{_gib(need):.1f} GiB of {_gib(gpu_bytes):.1f} GiB ({gpu_name}), "
                            f"peak allocated ~{_gib(b.allocated):.2f} GiB{coarse}"}
    if cfg.auto_fit:
        global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        best = auto_fit(arch, pc, gpu_bytes, max_micro_batch=max(global_batch, 1))
        if best is None:
            smallest = replace(pc, micro_batch=1, checkpointing=True)
            # auto-fit picks only what fits with the usual slack; say so where the user's own
            # choice of the smallest step would still run (a tight fit, warned about)
            tight = ("; it may fit tightly (allocated peak and CUDA context within the GPU, not "
                     "the allocator's usual slack): to try it, leave out --auto_fit and set "
                     "--micro_batch_size 1 --gradient_checkpointing true"
                     if fits_tightly(plan(arch, smallest), gpu_bytes) else "")
            raise QloraError(
                f"--auto_fit: nothing fits in {_gib(gpu_bytes):.1f} GiB ({gpu_name}), even micro-batch 1 with "
                f"gradient checkpointing (needs ~{_gib(needed_bytes(plan(arch, smallest))):.1f} GiB){tight}. "
                "Change:\n" + "\n".join(_advice_lines(arch, smallest, gpu_bytes)))
        # the largest micro-batch that fits and divides the global batch, so the global batch
        # (micro-batch x accumulation) stays what the config asked for
        mb = max(d for d in range(1, best.micro_batch + 1) if global_batch % d == 0)
        accum = global_batch // mb
        chosen = replace(best, micro_batch=mb)
        text = (f"auto-fit: micro-batch {mb} x gradient accumulation {accum} (global batch {global_batch} kept; "
                f"largest micro-batch that fits: {best.micro_batch}), gradient checkpointing "
                f"{'on' if chosen.checkpointing else 'off'}; was micro-batch {cfg.micro_batch_size} x "
                f"{cfg.gradient_accumulation_steps}, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; "
                f"needs ~{_gib(needed_bytes(plan(arch, chosen))):.1f} of {_gib(gpu_bytes):.1f} GiB ({gpu_name})")
        log(text)
        cfg = dataclasses.replace(cfg, micro_batch_size=mb, gradient_accumulation_steps=accum,
                                  gradient_checkpointing=chosen.checkpointing, auto_fit=False)
        facts = {"memory plan": text}
        return cfg, facts
    if fits_tightly(b, gpu_bytes):
        log("warning: " + tight_fit_line(b, gpu_bytes, gpu_name) + "\n"
            + "\n".join(_advice_lines(arch, pc, gpu_bytes)))
    elif not fits(b, gpu_bytes):
        raise QloraError(
            f"this run will not fit in {_gib(gpu_bytes):.1f} GiB ({gpu_name}): the memory planner predicts{coarse} "
            f"~{_gib(need):.1f} GiB (peak allocated {_gib(b.allocated):.2f} GiB at the {b.peak_phase}, "
            f"+ paged optimizer states, allocator slack and CUDA context; `qlora plan --model {cfg.model}` "
            f"shows the parts). Change one of:\n" + "\n".join(_advice_lines(arch, pc, gpu_bytes))
            + "\nor pass --auto_fit true to pick the micro-batch and checkpointing automatically.")
    log(f"memory plan: {facts['memory plan']}")
    return cfg, facts


def out_of_memory_error(cfg, device, err: BaseException, checkpoint=None, dtype=None,
                        world_size: int = 1) -> QloraError:
    """The QloraError `qlora train` raises when CUDA runs out of memory mid-run: what happened,
    the checkpoint kept, and the planner's advice against a budget the run did not have."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lines = [f"out of GPU memory during training: {first}"]
    lines.append(f"checkpoint kept: {checkpoint} (continue with --resume latest after changing the options)"
                 if checkpoint else "no checkpoint was written yet (or it could not be saved)")
    try:
        arch = resolve_arch(model_dir=cfg.model)
        pc = plan_config_for_run(cfg, dtype, world_size)
        b = plan(arch, pc)
        gpu_bytes, gpu_name = run_gpu_bytes(cfg, device)
        need = needed_bytes(b)
        # The planner said (or would have said) it fits, yet memory ran out: other processes,
        # fragmentation or an estimate off. Advise changes that fit in 85% of what it predicted.
        budget = min(gpu_bytes or need, int(0.85 * need))
        lines.append(f"the planner predicted ~{_gib(need):.1f} GiB"
                     + (f" on {_gib(gpu_bytes):.1f} GiB ({gpu_name})" if gpu_bytes else "")
                     + f"; to need at most {_gib(budget):.1f} GiB, change one of:")
        if pc.keep_attention:  # the first thing to give back: speed, not the run's settings
            freed = need - needed_bytes(plan(arch, replace(pc, keep_attention=False)))
            lines.append(f"  keep_attention: false (~{_gib(freed):.1f} GiB less: attention is "
                         "recomputed in backward instead of kept)")
            pc = replace(pc, keep_attention=False)
        lines += _advice_lines(arch, pc, budget)
    except QloraError as planner_err:  # a model the planner cannot read: still say what happened
        lines.append(f"(no memory plan: {planner_err})")
    lines.append("other processes on the GPU also take memory; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                 "reduces fragmentation")
    return QloraError("\n".join(lines))
