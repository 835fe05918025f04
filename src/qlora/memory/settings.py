"""The run's settings as the planner sees them (PlanConfig), the target names they spell, and
what they make the step run: its tokens, the fast path, the ops that stay in torch."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import QloraError
from qlora.methods import METHODS, check_precomputed_reference, method_module
from qlora.models.families.moe_config import EXPERT_PROJECTIONS
from qlora.models.spec import KNOWN_BLOCK_LINEARS as PROJECTIONS  # every family's, in layer order
from qlora.models.spec import GEMMA_TYPES, ArchSpec, last_layers
from qlora.quant import FOUR_BIT_METHODS, QUANT_METHODS

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
# the MLP's linears, every family's (Phi-3's fused gate_up_proj too): a mixture of experts' dense
# MLPs take no adapters, and the layer's terms split at them into attention's and the MLP's
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


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
    # (speed/kept_attention.AttentionKeptForRerun; qlora train's keep_attention): true in every layer,
    # a number N in the last N
    keep_attention: bool | int = False
    # with checkpointing: the last N layers not checkpointed, every activation kept for backward
    # and no rerun (qlora train's keep_activations): true in every layer, a number N in the last N
    keep_activations: bool | int = False
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
    # rejected; KTO: the example and its KL row, under no_grad), and for dpo / kto a reference
    # forward (KTO: one per half), unless
    # DPO's reference log-probs are precomputed before training
    method: str = "sft"
    reference_precomputed: bool = False
    # dpo / orpo / simpo: tokens of each pair's prompt, packed once (data/preference.
    # shared_prompt_batch: prompt, chosen, rejected in one row); 0 assumes nothing shared, each
    # sequence whole, the upper bound. The planner does not know whether the run packs: this is
    # the user's statement that it does (step_tokens, key_tokens)
    prompt_len: int = 0

    def validate(self, targets: bool = True) -> None:
        """`targets`: check the target names against the native decoder's projections (a
        generic model's are checked against its own layers, generic_targets)."""
        for option, value, choices in (
                ("--quant", self.quant, QUANT_METHODS), ("--optimizer", self.optimizer, OPTIMIZERS),
                ("--sharding", self.sharding, SHARDING), ("--kernels", self.kernels, KERNELS),
                ("--loss", self.loss, LOSSES), ("--adapter-dtype", self.adapter_dtype, DTYPE_BYTES),
                ("nonquant_dtype", self.nonquant_dtype, DTYPE_BYTES), ("--method", self.method, METHODS)):
            if value not in choices:
                raise QloraError(f"{option} {value!r} is not valid; choose one of: "
                                 f"{', '.join(map(str, choices))}")
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
        whole = self.keep_activations
        if not isinstance(whole, bool) and (not isinstance(whole, int) or whole < 0):
            raise QloraError(f"--keep-activations takes a number of layers (0 or more), not "
                             f"{whole!r}")
        if whole and self.checkpointing and (self.offload_activations or self.tile_mlp):
            raise QloraError("--keep-activations excludes --offload-activations and --tile-mlp: "
                             "they save the memory that layers keeping every activation spend")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise QloraError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        check_precomputed_reference(self.method, self.reference_precomputed)  # as qlora train
        self._check_prompt_len()
        if targets:
            target_names(self.targets)

    def _check_prompt_len(self) -> None:
        if not isinstance(self.prompt_len, int) or not 0 <= self.prompt_len < self.seq_len:
            raise QloraError(f"--prompt-len must be a whole number of tokens from 0 to below "
                             f"--seq-len ({self.seq_len}), not {self.prompt_len!r}")
        if self.prompt_len and not pair_method(self):
            raise QloraError(f"--prompt-len is for the pair methods (dpo, orpo, simpo), whose "
                             f"pairs share their prompt; --method {self.method} has none: leave "
                             "--prompt-len out")


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


def pair_method(cfg: PlanConfig) -> bool:
    """Whether the method's examples are pairs (dpo, orpo, simpo: chosen and rejected after one
    prompt)."""
    method = method_module(cfg.method)
    return method is not None and method.LAYOUT == "pairs"


def step_tokens(cfg: PlanConfig) -> int:
    """Tokens of one micro-batch's forward with grad, whose activations the step saves: a pair
    is two sequences (chosen and rejected), less its prompt where packed once (prompt_len); a
    KTO example is one, its KL sequence running under no_grad, a forward of its own at the
    reference's moment, as each half's reference forward (methods/preference.unpaired_logps):
    preference.reference_forward_bytes counts that one."""
    if pair_method(cfg):
        return cfg.micro_batch * (2 * cfg.seq_len - cfg.prompt_len)
    return cfg.seq_len * cfg.micro_batch


def key_tokens(cfg: PlanConfig) -> int:
    """Tokens whose k and v attention keeps for backward: step_tokens, but a pair's two whole
    sequences even with its prompt packed once, the rejected completion attending to a copy of
    its prompt's keys gathered before its own (models/attention; tests/test_preference.py::
    test_packed_rows_keep_what_the_planner_counts_of_their_attention)."""
    return cfg.seq_len * cfg.micro_batch * (2 if pair_method(cfg) else 1)


def whole_layers(arch: ArchSpec, cfg: PlanConfig) -> int:
    """Layers that checkpointing leaves whole under keep_activations (the last N): every
    activation kept for backward, no rerun. Without checkpointing every layer is whole; this
    counts only the ones keep_activations takes out of the checkpoint."""
    if not cfg.checkpointing:
        return 0
    return last_layers(cfg.keep_activations, arch.num_layers, "keep_activations")


def fast_path(cfg: PlanConfig) -> bool:
    """Whether the step runs kernels/lora.py's LoRA products over 4-bit bases (qlora train on CUDA
    with fused kernels: kernels.use_fast_path, grouped projections, seeded dropout drawn inside
    the products by kernels/lora_dropout.py)."""
    return cfg.kernels == "fused" and cfg.quant in FOUR_BIT_METHODS and (
        cfg.seeded_dropout or cfg.lora_dropout == 0)


# --- what each family's step computes in torch whatever the kernels (speed/fast_decoder.py) -------
def torch_norms(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the norms run as torch ops (keeping an fp32 copy of their input): eager kernels
    (fused: the Triton RMSNorm, Gemma's (1 + w) form too, speed/fast_decoder.FastGemmaRMSNorm)."""
    return cfg.kernels == "eager"


def torch_activation(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the MLP's activation runs in torch (its output kept for the product's backward):
    eager kernels, or Gemma's GeGLU, which the fused SwiGLU does not serve (Phi-3's gate_up_proj
    output is what the packed SwiGLU kernel reads: speed/fast_decoder.FastPhi3MLP)."""
    return cfg.kernels == "eager" or arch.model_type in GEMMA_TYPES
