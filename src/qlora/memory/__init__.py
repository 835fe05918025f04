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

The modules, each importing only those above it in this list:

    sizes        GiB, the allocator's rounding and slack, the CUDA context, parse_size
    settings     PlanConfig and what it makes the step run (target names, tokens, fast path)
    arch         the ArchSpec (or GenericSpec) of a model directory, config.json or named shape
    attention    what attention keeps, keeps for backward (keep_attention), makes in backward
    host         offload to pinned host memory and the host's check; the embedding on the host
    weights      base, experts, adapters, optimizer states; adapter copies; dequantized weights
    activations  a layer's saved terms in forward, its backward's gradients, its rerun
    loss         the logits/loss transient
    preference   DPO / KTO's reference forward
    breakdown    Breakdown, whether it fits (needed_bytes, fits, fits_tightly), its table
    generic      coarse_plan: a model on the generic path
    step         plan(): every part of a native model's step, at each moment that may peak
    fitting      settings that fit: long_context_choice, auto_fit, advise
    training     `qlora train`: check_run before loading, out_of_memory_error mid-run

Below, what callers use (the rest is reached through its module, e.g. memory.activations).
"""

from qlora.memory.arch import CALIBRATED_FAMILIES, SHAPES, arch_from_config, resolve_arch
from qlora.memory.breakdown import (Breakdown, fits, fits_tightly, format_table, least_needed_bytes,
                                    needed_bytes, tight_fit_line)
from qlora.memory.fitting import (Advice, activation_layers_that_fit, advise,
                                  attention_layers_that_fit, auto_fit, long_context_choice)
from qlora.memory.generic import generic_targets
from qlora.memory.host import check_host_offload
from qlora.memory.loss import loss_chunk_tokens
from qlora.memory.settings import DTYPE_BYTES, PlanConfig, target_names
from qlora.memory.sizes import GiB, RESERVED_FACTOR, parse_size
from qlora.memory.step import plan
from qlora.memory.training import check_run, out_of_memory_error, plan_config_for_run
from qlora.models.generic import GenericSpec  # what resolve_arch gives for a non-native model

__all__ = ["CALIBRATED_FAMILIES", "DTYPE_BYTES", "RESERVED_FACTOR", "SHAPES", "Advice", "Breakdown",
           "GenericSpec", "GiB", "PlanConfig", "activation_layers_that_fit", "advise",
           "arch_from_config", "attention_layers_that_fit",
           "auto_fit", "check_host_offload", "check_run", "fits", "fits_tightly", "format_table",
           "generic_targets", "least_needed_bytes", "long_context_choice", "loss_chunk_tokens",
           "needed_bytes", "out_of_memory_error", "parse_size", "plan", "plan_config_for_run",
           "resolve_arch", "target_names", "tight_fit_line"]
