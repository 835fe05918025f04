"""The weights: the frozen base (quantized or 16-bit), a mixture of experts' stacks, the adapters
and their optimizer states, all static from the first step on; what a layer's graph keeps of
them (bf16 adapter copies: per layer, not per token); and the dense weights the step dequantizes
(one linear in a matmul, a part of an expert projection, what a checkpointed layer's rerun keeps,
a tile's gate and up)."""

from __future__ import annotations

from qlora.kernels.experts import projection_parts
from qlora.memory.settings import (DTYPE_BYTES, MLP_LINEARS, PlanConfig, expert_targets, fast_path,
                                   target_names, torch_norms)
from qlora.memory.sizes import alloc
from qlora.models.spec import GEMMA_TYPES, ArchSpec
from qlora.quant import FOUR_BIT_METHODS, NESTED_BLOCKSIZE


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
        total += sum(alloc(s if s in shared else s * members, rnd) for s in sizes)
    return total + alloc(2 * arch.moe.num_experts * arch.hidden_size, rnd)


def adapter_tensors(arch: ArchSpec, cfg: PlanConfig) -> list[int]:
    """Element counts of every trainable tensor: lora_A [r, in], lora_B [out, r], DoRA magnitude [out]."""
    targets = target_names(cfg.targets, arch)
    sizes = []
    for name, n_in, n_out in arch.linears():
        if name in targets:
            sizes += [cfg.r * n_in, n_out * cfg.r] + ([n_out] if cfg.dora else [])
    experts = expert_adapter_tensors(arch, cfg) * (arch.moe.num_sparse_layers if arch.moe else 0)
    return sizes * arch.num_layers + experts


def expert_adapter_tensors(arch: ArchSpec, cfg: PlanConfig) -> list[int]:
    """Element counts of one sparse layer's expert adapters: lora_A [r·E, in] and lora_B
    (held as [E, r, out]) per targeted projection."""
    shapes = arch.expert_shapes()
    sizes = []
    for name in expert_targets(cfg.targets, arch):
        experts, n_out, n_in = shapes[name]
        sizes += [cfg.r * experts * n_in, n_out * cfg.r * experts]
    return sizes


def adapter_param_count(arch: ArchSpec, cfg: PlanConfig) -> int:
    return sum(adapter_tensors(arch, cfg))


def optimizer_state_bytes(numels: list[int], cfg: PlanConfig) -> tuple[int, int, int]:
    """(bytes in the PyTorch allocator, bytes in CUDA managed memory, step temporaries)."""
    pbytes = DTYPE_BYTES[cfg.adapter_dtype]
    rnd = cfg.alloc_rounding
    if cfg.optimizer == "adamw_torch":
        # exp_avg and exp_avg_sq in the parameter's dtype; the foreach step makes one temporary
        # list the size of the parameters (sqrt(exp_avg_sq) + eps) while the rest is in place.
        states = sum(2 * alloc(n * pbytes, rnd) for n in numels)
        return states, 0, sum(alloc(n * pbytes, rnd) for n in numels)
    paged = cfg.optimizer.startswith("paged_")
    eight_bit = cfg.optimizer.endswith("8bit")
    in_alloc = in_managed = 0
    for n in numels:
        # bitsandbytes: tensors under min_8bit_size=4096 elements get fp32 states; states of
        # tensors of >= 1e5 elements are paged (get_state_buffer) when the optimizer is paged.
        if eight_bit and n >= 4096:
            state, extra = n, 2 * alloc(4 * -(-n // 256), rnd)  # uint8 state + fp32 absmax per 256
        else:
            state, extra = 4 * n, 0
        if paged and n >= 1e5:
            in_managed += 2 * state
        else:
            in_alloc += 2 * alloc(state, rnd)
        in_alloc += extra
    return in_alloc, in_managed, 0  # bitsandbytes updates in place: no step temporaries


# --- what a layer's graph keeps of the weights ----------------------------------------------------
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
            (0 if cfg.lora_dropout > 0 else alloc(2 * cfg.r * len(g) * shape[g[0]][0], rnd))
            + alloc(2 * cfg.r * len(g) * sum(shape[n][1] for n in g), rnd)
            for g in _fast_path_groups([n for n in shape if n in targets]))
    elif cfg.adapter_dtype == "fp32":
        t["bf16 adapter copies"] = sum(alloc(2 * cfg.r * n_in, rnd) + alloc(2 * cfg.r * n_out, rnd)
                                       for name, n_in, n_out in arch.linears() if name in targets)
    if arch.moe is not None and arch.moe.num_sparse_layers:
        t["experts: bf16 adapter copies, group offsets"] = routed_weight_bytes(arch, cfg)
    if cfg.dora and cfg.lora_dropout > 0:
        t["DoRA: dequantized weights kept by the dropped-input matmul"] = sum(
            alloc(2 * n_in * n_out, rnd) for name, n_in, n_out in arch.linears() if name in targets)
    if arch.model_type in GEMMA_TYPES and torch_norms(arch, cfg):
        # GemmaRMSNorm's scale, (1 + w) in fp32, made each forward and kept by the product for
        # the input's gradient: the block's four norms and Gemma 3's q/k norms (the fused
        # kernel adds the 1 in registers)
        sizes = arch.norm_sizes()[: len(arch.norm_sizes()) // arch.num_layers]
        t["Gemma norm scales (1 + w, fp32)"] = sum(alloc(4 * n, rnd) for n in sizes)
    return t


def routed_weight_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """Bytes a sparse layer's graph keeps whatever its tokens: the grouped GEMMs' bf16 copies of
    the expert adapters (each factor cast in one copy; none where the adapters are bf16: each is
    read as held) and the group offsets."""
    shapes, rnd = arch.expert_shapes(), cfg.alloc_rounding
    targets = expert_targets(cfg.targets, arch)
    cast = cfg.adapter_dtype != "bf16"
    copies = sum(alloc(2 * e * cfg.r * n_in, rnd) + alloc(2 * e * n_out * cfg.r, rnd)
                 for name, (e, n_out, n_in) in shapes.items() if name in targets and cast)
    return copies + (alloc(4 * arch.moe.num_experts, rnd) if targets else 0)


# --- dense weights the step makes -----------------------------------------------------------------
def expert_parts(arch: ArchSpec, cfg: PlanConfig) -> dict[str, tuple[tuple[int, int], ...]]:
    """The parts of output rows each expert projection's base is made dense in by the grouped
    step (kernels/experts.projection_parts: a projection whole up to PART_BYTES in bf16, else
    the same rows of every expert, gate and up apart); empty without sparse layers."""
    if arch.moe is None or not arch.moe.num_sparse_layers:
        return {}
    four_bit = cfg.quant in FOUR_BIT_METHODS
    return {name: projection_parts(e, o, i, 2 if name == "gate_up_proj" else 1, 2,
                                   cfg.blocksize if four_bit else None,
                                   NESTED_BLOCKSIZE if four_bit and cfg.double_quant else None)
            for name, (e, o, i) in arch.expert_shapes().items()}


def expert_part_elements(arch: ArchSpec, cfg: PlanConfig) -> int:
    """Weights of the largest part of a projection the grouped GEMM dequantizes at once; 0
    without sparse layers."""
    shapes = arch.expert_shapes()
    return max((max(stop - start for start, stop in parts) * shapes[name][0] * shapes[name][2]
                for name, parts in expert_parts(arch, cfg).items()), default=0)


def rerun_expert_dense(arch: ArchSpec, cfg: PlanConfig) -> int:
    """Bytes of a sparse layer's 4-bit experts that its checkpointed rerun makes dense and keeps
    for its backward (kernels/experts.GroupedBase: each projection's last part made, the whole
    projection where it is made in one), alive from the rerun's last GEMM through the block's
    backward: Qwen3-30B-A3B's down (384 MiB, whole) and its gate_up's last part (384 MiB), a
    small model's gate_up and down. The step adds them to its dequantize term, an upper bound: at
    the rerun's end they are alive beside the rerun's transients (the k rows weighted and put
    back in token order), which no term counts apart (a CPU step of a small model measured over
    the plan without this margin, tests/test_moe.py); in backward beside one fresh part at most.
    0 without checkpointing or sparse layers."""
    if not (cfg.checkpointing and cfg.quant in FOUR_BIT_METHODS):
        return 0
    shapes = arch.expert_shapes()
    total = 0
    for name, parts in expert_parts(arch, cfg).items():
        experts, _, in_features = shapes[name]
        start, stop = parts[-1]  # the part kept: its rows of every expert
        total += 2 * experts * (stop - start) * in_features
    return total


def rerun_dense_weights(arch: ArchSpec, cfg: PlanConfig, attention_kept: bool,
                        tiled: bool) -> tuple[int, int]:
    """(bytes of the dense weights a checkpointed layer's rerun makes and keeps for its backward,
    the part of them alive while attention runs backward) on the fused path over 4-bit bases
    (kernels/kept_weights.rerun_keeps_weights): every targeted linear (an untargeted one runs
    through bitsandbytes, which keeps nothing) but down_proj, whose GEMM the rerun stops before
    (a sparse layer has no down_proj among these: its o_proj's GEMM runs); none of
    the MLP's when it runs in tiles (the rerun skips the tiled MLP, and a tile's weights are never
    kept: tile_outside_rerun); no q, k, v where the layer's attention is kept (the rerun makes
    only their LoRA products). By attention's backward only q, k, v's are left (o_proj's and the
    MLP's backward took theirs). The experts' kept weights: rerun_expert_dense."""
    if not (cfg.kernels == "fused" and cfg.checkpointing and cfg.quant in FOUR_BIT_METHODS):
        return 0, 0
    attention_inputs = ("q_proj", "k_proj", "v_proj", "qkv_proj")
    skipped = {"down_proj"}  # every family's last (a sparse layer has none: its o_proj runs)
    if tiled:
        skipped |= set(MLP_LINEARS)
    if attention_kept:
        skipped |= set(attention_inputs)
    targets = target_names(cfg.targets, arch)
    made = [(name, 2 * n_in * n_out) for name, n_in, n_out in arch.linears()
            if name in targets and name not in skipped]
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
