"""The run configuration: one flat dataclass, filled from a YAML file and `--key value` overrides.

Option names are the ones a Hugging Face / TRL / Axolotl user already knows (`learning_rate`,
`lr_scheduler_type`, `gradient_accumulation_steps`, `lora_alpha`, ...); a few of their synonyms are
accepted as aliases (`per_device_train_batch_size` -> `micro_batch_size`, `r` -> `lora_r`, ...).
Everything is checked here, before any model or data is loaded: an unknown key gets a "did you
mean", a bad value gets the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora.errors import QloraError
from qlora.files import staged_file
from qlora.methods import METHODS, check_precomputed_reference, dpo
from qlora.quant import QUANT_METHODS


@dataclass
class RunConfig:
    # --- model and data -------------------------------------------------------------------------
    model: str = ""  # a local model directory in Hugging Face layout
    data: str = ""  # jsonl / json / csv / parquet file or a datasets.save_to_disk directory
    val_data: str | None = None  # a second file for validation (instead of val_set_size)
    val_set_size: float = 0.0  # fraction (< 1) or number of examples (>= 1) held out for eval
    data_format: str = "auto"  # detected from the columns unless named
    chat_template: str | None = None  # None: the tokenizer's own; or a fallback name / jinja file
    train_on: str = "responses"  # loss on the responses only, or on every token ("all")
    max_seq_length: int = 2048
    packing: bool = True  # padding-free packing of several examples per row
    long_examples: str = "truncate"  # what to do with an example longer than max_seq_length
    # --- method: sft, or a preference method on prompt/chosen/rejected data (qlora.methods) ---
    method: str = "sft"
    beta: float = 0.1  # DPO/KTO: strength of the reference; ORPO: weight of the odds-ratio term
    loss_type: str = "sigmoid"  # DPO's loss: sigmoid, ipo or hinge
    label_smoothing: float = 0.0  # DPO sigmoid and SimPO: the chance a pair's labels are flipped
    simpo_gamma: float = 0.5  # SimPO: the target reward margin
    cpo_alpha: float = 0.0  # SimPO: weight of an NLL term on the chosen completions
    desirable_weight: float = 1.0  # KTO: weight of the desirable examples' losses
    undesirable_weight: float = 1.0  # KTO: weight of the undesirable examples' losses
    # DPO: the reference log-probs in one pass before training, none in the steps (TRL's name)
    precompute_ref_log_probs: bool = False
    # --- quantization (the model layer's QuantConfig) --------------------------------------------
    quant: str = "nf4"
    double_quant: bool = True
    dtype: str = "auto"  # compute dtype; auto = bf16 on a GPU that has it, fp16 on others, fp32 on CPU
    device: str = "auto"  # auto = cuda when available, else cpu
    # --- adapter (the model layer's AdapterConfig) -----------------------------------------------
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False
    # --- optimisation ----------------------------------------------------------------------------
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio (as in transformers)
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs (as in transformers)
    micro_batch_size: int = 1  # rows per forward pass
    gradient_accumulation_steps: int = 8
    eval_batch_size: int = 0  # 0 = micro_batch_size
    max_grad_norm: float = 0.3  # 0 = no clipping
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    # with checkpointing, each layer's attention kept from forward to backward instead of rerun:
    # faster, for memory (Llama-3-8B: 40 MiB a layer at 2048 tokens). true: every layer; a number
    # N: the last N layers; None = as many layers as the memory plan fits on the GPU (each GPU's
    # under torchrun; qlora.memory.check_run)
    keep_attention: bool | int | None = None
    # with checkpointing, the last N layers not checkpointed: they keep every activation for
    # backward and are not rerun (selective checkpointing: speed for memory where the GPU has it;
    # Phi-4 at 2048 tokens: ~0.25 GiB a layer for ~1.2 ms of its rerun). true: every layer (as
    # checkpointing off); None = as many layers as the memory plan fits on the GPU, after
    # keep_attention (qlora.memory.check_run); not with offload_activations or tile_mlp
    keep_activations: bool | int | None = None
    # with checkpointing, each layer's saved input in pinned host memory from its forward to its
    # backward, fetched back one layer ahead (speed/offload.py): long sequences. None (or auto) =
    # only where the memory plan needs it to fit (qlora.memory.check_run)
    offload_activations: bool | None = None
    # the MLP computed in sequence tiles, never a whole [tokens, intermediate] tensor
    # (models/tiling.py): true = tiles of the model's default size, a number = tokens per tile;
    # None (or auto) = only where the memory plan needs it to fit
    tile_mlp: bool | int | None = None
    # on CUDA (each data-parallel rank too; not under FSDP), a frozen input embedding not tied to
    # the head kept in pinned host memory, its rows gathered by the GPU each step (kernels/embedding.py): frees
    # vocab x hidden x 2 bytes
    embedding_on_host: bool = True
    cuda_graphs: bool = True  # replay each micro-batch shape's forward+backward as a CUDA graph (train/graphs.py)
    fused_kernels: bool = True  # Triton RMSNorm/SwiGLU/RoPE (kernels/fused.py) and, on CUDA, 4-bit dequantize (kernels/dequant.py)
    # a mixture of experts (native or generic): add router_aux_loss_coef x the load-balancing
    # loss to the training loss (a preference method: to each example's, from the policy's
    # forward, as TRL's trainers); None = as config.json's output_router_logits says
    router_aux_loss: bool | None = None
    seed: int = 42
    # --- memory (qlora.memory plans the run before anything loads; docs/MEMORY.md) -----------------
    gpu_memory: str | None = None  # GPU size to plan for, e.g. 24GB; None = the detected CUDA GPU
    # pick the largest micro-batch that fits, checkpointing off if it can be (a preference
    # method: on where that gives a larger micro-batch; memory/fitting.auto_fit)
    auto_fit: bool = False
    # --- several GPUs (under torchrun; docs/DISTRIBUTED.md) ---------------------------------------
    sharding: str = "ddp"  # ddp: every rank holds the whole base; fsdp: base, adapters, optimizer sharded
    # --- evaluation, checkpoints, logging --------------------------------------------------------
    eval_steps: int = 200  # evaluate every N optimizer steps (and at the end); 0 = at the end only
    save_steps: int = 200  # checkpoint every N optimizer steps; 0 = no intermediate checkpoints
    save_total_limit: int = 3  # newest checkpoints kept (the best one is kept besides)
    load_best_at_end: bool = True  # the adapter in output_dir is the best by eval loss
    early_stopping_patience: int = 0  # stop after N evals without improvement; 0 = never
    logging_steps: int = 10
    tensorboard: bool = False
    # --- output ------------------------------------------------------------------------------------
    output_dir: str = "runs/qlora"
    resume: str | None = None  # "latest" or a checkpoint directory
    overwrite: bool = False  # allow a non-empty output_dir (its old contents are removed)


# The values a string option may take (the first is the default where it matters).
CHOICES: dict[str, tuple[str, ...]] = {
    "data_format": ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"),
    "train_on": ("responses", "all"),
    "method": METHODS,
    "loss_type": dpo.LOSS_TYPES,
    "long_examples": ("truncate", "drop"),
    "quant": QUANT_METHODS,
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "device": ("auto", "cpu", "cuda"),
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "optim": ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"),
    "sharding": ("ddp", "fsdp"),
}

# What an option's empty default (None) means, for `qlora train --help`.
NONE_MEANS: dict[str, str] = {
    "keep_attention": "as many layers as the memory plan fits on the GPU",
    "keep_activations": "as many layers as the memory plan fits on the GPU",
    "offload_activations": "auto: only where the memory plan needs it to fit",
    "tile_mlp": "auto: only where the memory plan needs it to fit",
    "router_aux_loss": "as the model's config.json says (output_router_logits)",
    "gpu_memory": "the detected CUDA GPU",
    "chat_template": "the tokenizer's own",
    "val_data": "no separate validation file; see val_set_size",
    "resume": "a fresh run",
}

# One line of `qlora train --help` for each option (its choices and default are added there).
HELP: dict[str, str] = {
    "model": "base model: a local directory in Hugging Face layout",
    "data": "training data: a jsonl / json / csv / parquet file or a datasets.save_to_disk directory",
    "val_data": "a second data file for validation (instead of val_set_size)",
    "val_set_size": "examples held out of data for eval: a fraction (< 1) or a count (>= 1)",
    "data_format": "the data's layout; auto detects it from the columns",
    "chat_template": "chat template for chat data: a fallback name (chatml) or a .jinja file",
    "train_on": "loss on the responses only, or on every token (all)",
    "max_seq_length": "longest row in tokens",
    "packing": "padding-free packing of several examples into a row",
    "long_examples": "what happens to an example longer than max_seq_length",
    "method": "sft, or preference training: dpo, orpo, simpo (prompt/chosen/rejected data) or "
              "kto (prompt/completion/label data)",
    "beta": "DPO / KTO: how close to the reference (base) model; ORPO: odds-ratio weight; SimPO: "
            "reward scale",
    "loss_type": "DPO's loss: sigmoid, ipo or hinge",
    "label_smoothing": "DPO sigmoid / SimPO: assumed chance that a pair's preference is flipped",
    "simpo_gamma": "SimPO: target reward margin",
    "cpo_alpha": "SimPO: weight of an NLL term on the chosen completions (0: pure SimPO)",
    "desirable_weight": "KTO: weight of the desirable examples' losses",
    "undesirable_weight": "KTO: weight of the undesirable examples' losses",
    "precompute_ref_log_probs": "DPO: the reference (base) log-probs of every pair in one pass "
                                "before training, so that no step runs the reference forward",
    "quant": "how the base weights are held (nf4, fp4: 4-bit; int8; none: 16-bit)",
    "double_quant": "quantize the 4-bit quantization constants too (QLoRA's double quantization)",
    "dtype": "compute dtype; auto = bf16 on a GPU that has it, fp16 on others, fp32 on the CPU",
    "device": "auto = cuda when available, else cpu",
    "lora_r": "adapter rank",
    "lora_alpha": "adapter scale numerator: the update is scaled by alpha / r (rsLoRA: / sqrt(r))",
    "lora_dropout": "dropout on the adapters' input",
    "target_modules": "projections given adapters: all-linear or names, e.g. q_proj,v_proj",
    "use_rslora": "rank-stabilized LoRA scaling (alpha / sqrt(r))",
    "use_dora": "DoRA adapters (weight-decomposed: a magnitude vector besides LoRA)",
    "learning_rate": "peak learning rate",
    "lr_scheduler_type": "learning-rate schedule after warmup",
    "warmup_ratio": "warmup as a fraction of the optimizer steps",
    "warmup_steps": "warmup optimizer steps; > 0 overrides warmup_ratio (as in transformers)",
    "num_train_epochs": "passes over the training data",
    "max_steps": "optimizer steps; > 0 overrides num_train_epochs (as in transformers)",
    "micro_batch_size": "rows per forward pass",
    "gradient_accumulation_steps": "micro-batches per optimizer step (on each rank)",
    "eval_batch_size": "rows per eval forward pass; 0 = micro_batch_size",
    "max_grad_norm": "gradient-norm clipping; 0 = no clipping",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "optim": "optimizer",
    "gradient_checkpointing": "recompute each layer in backward instead of keeping its activations",
    "keep_attention": "with checkpointing, attention kept for backward instead of rerun: true "
                      "every layer, N the last N layers",
    "keep_activations": "with checkpointing, the last N layers not checkpointed (every "
                        "activation kept, no rerun): true every layer, N the last N",
    "offload_activations": "with checkpointing, each layer's saved input in pinned host memory "
                           "until its backward (long sequences)",
    "tile_mlp": "the MLP in sequence tiles: true, false or tokens per tile (long sequences)",
    "embedding_on_host": "on CUDA (not under FSDP), an untied frozen input embedding in pinned "
                         "host memory",
    "cuda_graphs": "replay each micro-batch shape's forward and backward as a CUDA graph",
    "fused_kernels": "Triton RMSNorm / SwiGLU / RoPE kernels and, on CUDA, 4-bit dequantize",
    "router_aux_loss": "a mixture of experts: add the router's load-balancing loss (its "
                       "router_aux_loss_coef from config.json) to the training loss (a "
                       "preference method's: to each example's, as TRL's trainers add it)",
    "seed": "random seed of the run",
    "gpu_memory": "GPU size to plan the run for, e.g. 24GB",
    "auto_fit": "pick the largest micro-batch that fits, checkpointing off if it can be (for "
                "dpo/orpo/simpo/kto on where that gives a larger micro-batch)",
    "sharding": "under torchrun: ddp (each rank holds the whole base) or fsdp (sharded)",
    "eval_steps": "evaluate every N optimizer steps (and at the end); 0 = at the end only",
    "save_steps": "checkpoint every N optimizer steps; 0 = no intermediate checkpoints",
    "save_total_limit": "newest checkpoints kept (the best one is kept besides)",
    "load_best_at_end": "the adapter left in output_dir is the best by eval loss",
    "early_stopping_patience": "stop after N evals without improvement; 0 = never",
    "logging_steps": "log the training loss every N optimizer steps",
    "tensorboard": "also write TensorBoard event files",
    "output_dir": "where the adapter, checkpoints, metrics and config are written",
    "resume": "continue a run: latest (the newest checkpoint in output_dir) or a checkpoint "
              "directory",
    "overwrite": "allow a non-empty output_dir (its old contents are removed)",
}

# Other spellings users bring from transformers / TRL / peft / Axolotl.
ALIASES: dict[str, str] = {
    "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "r": "lora_r",
    "load_best_model_at_end": "load_best_at_end",
    "bnb_4bit_quant_type": "quant",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "dtype",
    "max_length": "max_seq_length",
    "sequence_len": "max_seq_length",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "model_name_or_path": "model",
    "dataset": "data",
    "eval_data": "val_data",
}

# Keys of transformers' TrainingArguments / TRL's SFTConfig / PEFT's LoraConfig /
# BitsAndBytesConfig that name something qlora always does, or map onto one of its options:
# a config written for that stack (the seeds') loads as it is. Key → {accepted value → updates}.
HF_FIXED_KEYS: dict[str, dict[Any, dict[str, Any]]] = {
    "task_type": {"CAUSAL_LM": {}},
    "bias": {"none": {}},
    "save_strategy": {"steps": {}},
    "eval_strategy": {"steps": {}},
    "evaluation_strategy": {"steps": {}},
    "logging_strategy": {"steps": {}},
    "logging_first_step": {True: {}, False: {}},
    "report_to": {"none": {}, "tensorboard": {"tensorboard": True}},
    "dataset_text_field": {"text": {"data_format": "text"}},
    "load_in_4bit": {True: {}},
    "load_in_8bit": {True: {"quant": "int8"}, False: {}},
    "remove_unused_columns": {True: {}, False: {}},
    "use_reentrant": {False: {}},  # from gradient_checkpointing_kwargs (sections are flattened)
}
HF_IGNORED_KEYS = ("dataset_num_proc",)  # worker processes for tokenization: ours is cached

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float": "float32",
                 "half": "float16", "torch.bfloat16": "bfloat16", "torch.float16": "float16",
                 "torch.float32": "float32"}

# Numeric bounds: (low, high, low inclusive, high inclusive); None = unbounded.
BOUNDS: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "val_set_size": (0, None, True, True),
    "max_seq_length": (8, None, True, True),
    "lora_r": (1, None, True, True),
    "lora_alpha": (0, None, False, True),
    "lora_dropout": (0, 1, True, False),
    "learning_rate": (0, None, False, True),
    "warmup_ratio": (0, 1, True, False),
    "warmup_steps": (0, None, True, True),
    "num_train_epochs": (0, None, False, True),
    "micro_batch_size": (1, None, True, True),
    "gradient_accumulation_steps": (1, None, True, True),
    "eval_batch_size": (0, None, True, True),
    "max_grad_norm": (0, None, True, True),
    "weight_decay": (0, None, True, True),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_epsilon": (0, None, False, True),
    "eval_steps": (0, None, True, True),
    "save_steps": (0, None, True, True),
    "save_total_limit": (1, None, True, True),
    "early_stopping_patience": (0, None, True, True),
    "logging_steps": (1, None, True, True),
}

CONFIG_FILE_NAME = "run_config.yaml"  # the resolved configuration, in the output directory


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _unknown_key(key: str, where: str) -> QloraError:
    known = field_names() + list(ALIASES) + ["bf16", "fp16"]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else (
        "; see `qlora train --help` for the options")
    return QloraError(f"unknown option `{key}`{where}{hint}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or refuse it."""
    tp = _field_types()[key]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]

    def bad(expected: str) -> QloraError:
        return QloraError(f"option `{key}`{where}: {_describe(value)} is not {expected}")

    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
                         and optional):
        if optional:
            return None
        raise bad(f"allowed to be empty (give a value of type {getattr(tp, '__name__', tp)})")
    if key in ("offload_activations", "tile_mlp") and str(value).strip().lower() == "auto":
        return None
    if key in ("keep_attention", "keep_activations"):
        return _coerce_layers_or_flag(value, bad)
    if key == "tile_mlp":
        return _coerce_tokens_or_flag(value, bad)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise bad("a boolean (true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            as_float = float(str(value).strip())
        except ValueError:
            raise bad("an integer") from None
        if not as_float.is_integer():
            raise bad("an integer")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            # PyYAML reads `2e-4` (no dot) as a string: accept it, users write it that way.
            out = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(out):
            raise bad("a finite number")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad("a single value")
        return str(value).strip()
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = [str(v).strip() for v in value]
        else:
            raise bad("a list (YAML list or comma-separated names)")
        if not items:
            raise bad("a non-empty list")
        return items
    raise AssertionError(f"no coercion for {key}: {tp}")  # a field type this file forgot


def _coerce_layers_or_flag(value: Any, bad) -> bool | int:
    """true / false, or a whole number of layers (>= 0): `1` is one layer, not true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    if isinstance(value, float) and value.is_integer():  # YAML's `12.0`
        text = str(int(value))
    try:
        layers = int(text)
    except ValueError:
        raise bad("true, false or a number of layers") from None
    if layers < 0:
        raise bad("true, false or a number of layers (0 or more)")
    return layers


def _coerce_tokens_or_flag(value: Any, bad) -> bool | int:
    """true / false, or a whole number of tokens (>= 1): `1` is one token, not true."""
    tokens = _coerce_layers_or_flag(value, lambda expected: bad("true, false, auto or a number of "
                                                                "tokens per tile"))
    if tokens is not True and tokens is not False and tokens < 1:
        raise bad("true, false, auto or a number of tokens per tile (1 or more)")
    return tokens


def _check_value(key: str, value: Any, where: str) -> Any:
    if key == "dtype" and isinstance(value, str):
        value = DTYPE_ALIASES.get(value.lower(), value.lower())
    if key in CHOICES and value is not None:
        allowed = CHOICES[key]
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise QloraError(f"option `{key}`{where}: {_describe(value)} is not allowed{hint}; "
                             f"allowed values: {', '.join(allowed)}")
    if key in BOUNDS and value is not None:
        lo, hi, lo_in, hi_in = BOUNDS[key]
        ok = (lo is None or (value >= lo if lo_in else value > lo)) and (
            hi is None or (value <= hi if hi_in else value < hi))
        if not ok:
            lo_s = "" if lo is None else f"{'>=' if lo_in else '>'} {lo}"
            hi_s = "" if hi is None else f"{'<=' if hi_in else '<'} {hi}"
            rule = " and ".join(s for s in (lo_s, hi_s) if s)
            raise QloraError(f"option `{key}`{where}: {_describe(value)} is out of range; "
                             f"it must be {rule}")
    return value


def _normalise_key(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def apply_overrides(cfg: RunConfig, values: dict[str, Any], where: str = "") -> RunConfig:
    """Return a copy of cfg with `values` (raw YAML / command-line values) checked and applied."""
    known = set(field_names())
    updates: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = _normalise_key(raw_key)
        if key in ("bf16", "fp16"):
            # transformers' precision flags: `bf16: true` means compute in bfloat16.
            flag = _coerce_flag(key, raw_value, where)
            if flag:
                if updates.get("dtype") not in (None, "auto", DTYPE_ALIASES[key]):
                    raise QloraError(f"options `bf16` and `fp16`{where} are both true; pick one")
                updates["dtype"] = DTYPE_ALIASES[key]
            continue
        if key in HF_FIXED_KEYS:
            updates.update(_hf_fixed(key, raw_value, where))
            continue
        if key in HF_IGNORED_KEYS:
            continue
        key = ALIASES.get(key, key)
        if key not in known:
            raise _unknown_key(_normalise_key(raw_key), where)
        updates[key] = _check_value(key, _coerce(key, raw_value, where), where)
    return dataclasses.replace(cfg, **updates)


def _hf_fixed(key: str, value: Any, where: str) -> dict[str, Any]:
    choices = HF_FIXED_KEYS[key]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise QloraError(f"option `{key}`{where}: {_describe(value)} is not supported here; "
                         f"qlora accepts {allowed} (the key is read for configs written for "
                         f"transformers/TRL/PEFT)")
    return choices[value]


def _coerce_flag(key: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", "none", "null"):
        return False
    raise QloraError(f"option `{key}`{where}: {_describe(value)} is not a boolean (true or false)")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise QloraError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise QloraError(f"config file {path}{line} is not valid YAML: "
                         f"{getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QloraError(f"config file {path} must be a mapping of `option: value` lines, "
                         f"not a {type(data).__name__}")
    # Nested sections (`lora: {r: 16}`) are flattened: the keys are unique across sections.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_cli_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, and a bare `--flag` (true) into a dict of raw strings."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise QloraError(f"unexpected command-line argument {tok!r}; options are written "
                             f"`--key value`")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, value = tok[2:], tokens[i + 1]
            i += 2
        else:
            key, value = tok[2:], "true"
            i += 1
        out[key] = value
    return out


def check(cfg: RunConfig) -> RunConfig:
    """Cross-field rules: the checks a single value cannot make on its own."""
    if not cfg.model:
        raise QloraError("no model given: pass --model DIR (a local Hugging Face model directory)")
    if not cfg.data:
        raise QloraError("no data given: pass --data FILE (jsonl, json, csv, parquet or a "
                         "datasets.save_to_disk directory)")
    if cfg.val_data and cfg.val_set_size:
        raise QloraError("options `val_data` and `val_set_size` both given; use one of them")
    if cfg.val_set_size >= 1 and not float(cfg.val_set_size).is_integer():
        raise QloraError(f"option `val_set_size`: {cfg.val_set_size} is a count (>= 1) and must be "
                         f"whole, or a fraction below 1")
    if cfg.dtype == "float16" and cfg.quant == "none" and cfg.device == "cpu":
        raise QloraError("option `dtype`: float16 compute is not supported on the CPU; use float32")
    if cfg.gpu_memory:
        from qlora.memory import parse_size

        parse_size(cfg.gpu_memory, "option `gpu_memory`")
    if cfg.chat_template is not None:  # unused by non-chat data, where a typo would pass unseen
        from qlora.data.templates import template_from_option

        template_from_option(cfg.chat_template)
    _check_method(cfg)
    if cfg.resume and cfg.overwrite:
        raise QloraError("options `resume` and `overwrite` exclude each other: resuming continues "
                         "the run in output_dir, overwrite deletes it")
    if cfg.offload_activations and not cfg.gradient_checkpointing:
        raise QloraError("option `offload_activations`: true offloads the inputs that gradient "
                         "checkpointing keeps; set gradient_checkpointing: true, or "
                         "offload_activations: false")
    if cfg.keep_activations and (cfg.offload_activations or cfg.tile_mlp):
        option = "offload_activations" if cfg.offload_activations else "tile_mlp"
        raise QloraError(f"options `keep_activations` and `{option}` exclude each other: "
                         f"{option} saves memory that layers keeping every activation would "
                         "spend; set keep_activations: false (or leave it out: none where the "
                         "memory plan needs offload or tiles)")
    return cfg


def _check_method(cfg: RunConfig) -> None:
    check_precomputed_reference(cfg.method, cfg.precompute_ref_log_probs)
    if cfg.method == "sft":
        return
    if cfg.beta <= 0:
        raise QloraError(f"option `beta`: {cfg.beta:g}; it must be above 0")
    if cfg.loss_type != "sigmoid" and cfg.method != "dpo":
        raise QloraError(f"option `loss_type`: {cfg.loss_type} is a DPO loss; --method "
                         f"{cfg.method} has its own")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise QloraError(f"option `label_smoothing`: {cfg.label_smoothing:g}; it must be in "
                         "[0, 0.5)")


def load_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: RunConfig | None = None) -> RunConfig:
    """Defaults <- YAML file <- command-line overrides, all checked; nothing is loaded yet."""
    cfg = base or RunConfig()
    if config_file is not None:
        cfg = apply_overrides(cfg, read_yaml(config_file), where=f" in {config_file}")
    if overrides:
        cfg = apply_overrides(cfg, overrides, where=" on the command line")
    return check(cfg)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved configuration as YAML (loadable again with --config)."""
    path = Path(path)
    values = to_dict(cfg)
    # resume/overwrite steer one invocation, not the run: written back they would make
    # `--config run_config.yaml --resume latest` contradict itself
    values.update(resume=None, overwrite=False)
    text = "# resolved configuration of this run: `qlora train --config` reads it back\n"
    text += yaml.safe_dump(values, sort_keys=False)
    if extra:
        # facts the run decided (device, optimizer fallback, dtype), for the reader only
        text += "".join(f"# {k}: {v}\n" for k, v in extra.items())
    with staged_file(path) as tmp:
        tmp.write_text(text)
