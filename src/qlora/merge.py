"""Fold a PEFT LoRA / rsLoRA / DoRA adapter into its base: a 16-bit Hugging Face checkpoint out.

Works on files only: the base is streamed tensor by tensor from its safetensors shards, each target
weight gets its adapter folded in (in fp32), and the result is written shard by shard into a temp
directory that is renamed to `out_dir` at the very end, so a failure leaves nothing behind.
The fold of one tensor (Merge.tensor) is also GGUF export's: it folds each tensor as it reads it,
and writes no merged checkpoint.

The fold, exactly as PEFT 0.21 defines it (peft/tuners/lora/layer.py, variants.py, dora.py):

    scale = alpha / r              (rsLoRA: alpha / sqrt(r); r, alpha from rank_/alpha_pattern if set)
    W'    = W + scale · B @ A                                  LoRA, rsLoRA
    W'    = m / ‖W + scale · B @ A‖_row · (W + scale · B @ A)  DoRA

where ‖·‖_row is the L2 norm of each output row (torch.linalg.norm(W, dim=1): over the input
features, one value per output feature, the shape of the magnitude vector m). PEFT detaches that
norm for gradients only; at inference/merge it is the plain value above.

`base="original"` folds into the 16-bit weights as stored; `base="dequantized-nf4"` first replaces
every linear weight of the decoder blocks by its NF4 round trip (bitsandbytes quantize_4bit /
dequantize_4bit, blocksize 64, double quant) — the weights the adapter actually saw in QLoRA
training. docs/MERGE_AND_EXPORT.md measures both against the adapter model's logits.

The check after a merge (the merged checkpoint against base + adapter on held-out tokens) is
export/check.py's `check_merge`, beside the GGUF file's check: the two differ only in the model
they run against the reference, and export/ builds on this module, not this module on export/.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from qlora.adapters import (adapter_weights_file, check_base_name, read_adapter_json,
                            read_adapter_weights)
from qlora.errors import QloraError
from qlora.models.load import TOKENIZER_FILES
from qlora.models.spec import read_config
from qlora.models.weights import CheckpointHeaders, headers_of, open_shard
from qlora.files import check_writable, refuse_existing, staged_dir

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "f16": "float16", "f32": "float32"}
BASES = ("original", "dequantized-nf4")
BASE_ALIASES = {"nf4": "dequantized-nf4", "16bit": "original"}

ADAPTER_PREFIX = "base_model.model."
NATIVE_TIED = frozenset({"lm_head", "model.embed_tokens"})  # a native family's head and embedding


@dataclass
class LoraModule:
    """The adapter tensors of one target linear (module name in HF naming, no PEFT prefix)."""

    name: str
    scale: float
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # DoRA
    bias: torch.Tensor | None = None  # lora_bias=True


# --- reading the adapter ------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, LoraModule], dict[str, torch.Tensor]]:
    """(adapter_config, module name → LoraModule, full replacement tensors from modules_to_save)."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = read_adapter_json(adapter_dir)
    weights = adapter_weights_file(adapter_dir)
    # fan_in_fan_out (PEFT's mark of a Conv1D layer) is not read: which layers are stored
    # transposed is the base's fact (checkpoint_layout), and PEFT does not always write the mark
    # (not over a 4-bit base, whose layers are no Conv1D any more)
    if cfg.get("trainable_token_indices"):
        raise QloraError(f"{cfg_path}: trainable_token_indices is not supported by merge")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    tensors = read_adapter_weights(adapter_dir)
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, torch.Tensor] = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude",
                ".lora_B.bias": "bias"}
    for key, t in tensors.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        for suffix, field in suffixes.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if module not in modules:
                    mr = _pattern_value(rank_pattern, module, r)
                    ma = _pattern_value(alpha_pattern, module, alpha)
                    scale = ma / math.sqrt(mr) if cfg.get("use_rslora") else ma / mr
                    modules[module] = LoraModule(module, scale)
                setattr(modules[module], field, t)
                break
        else:
            if ".lora_" in name or ".modules_to_save." in name:
                raise QloraError(f"{weights}: tensor {key} is of a kind merge does not know")
            replacements[name] = t  # modules_to_save: a whole trained copy of a base tensor
    for m in modules.values():
        if m.A is None or m.B is None:
            raise QloraError(f"{weights}: module {m.name} lacks lora_A or lora_B")
    return cfg, modules, replacements


def check_adapter_fits(modules: dict[str, LoraModule], replacements: dict[str, torch.Tensor],
                       shapes: dict[str, tuple[int, ...]], adapter_dir: Path,
                       transposed: frozenset[str] = frozenset()) -> None:
    """Every adapter module exists in the base with shapes that fit; name key and shapes if not.
    `transposed`: modules whose weight the base stores [in, out] (Conv1D)."""
    where = adapter_dir / "adapter_model.safetensors"
    for m in modules.values():
        key = m.name + ".weight"
        if key not in shapes:
            raise QloraError(f"{where}: adapter module {m.name} has no base weight {key} "
                             f"(is the adapter for another model?)")
        w = shapes[key]
        if len(w) != 2:
            raise QloraError(f"{where}: {key} has shape {list(w)}; only linear weights can be merged")
        out_f, in_f = w[::-1] if m.name in transposed else w
        a, b = tuple(m.A.shape), tuple(m.B.shape)
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise QloraError(
                f"{where}: {ADAPTER_PREFIX}{m.name}.lora_A.weight {list(a)} / lora_B.weight {list(b)} "
                f"do not fit base {key} {list(w)} (is the adapter for another model?)")
        if m.magnitude is not None and tuple(m.magnitude.shape) != (out_f,):
            raise QloraError(f"{where}: {m.name}.lora_magnitude_vector {list(m.magnitude.shape)} "
                             f"does not fit base {key} {list(w)}")
        if m.bias is not None:
            if m.name + ".bias" not in shapes:
                raise QloraError(f"{where}: {m.name} has a LoRA bias but base {m.name}.bias is absent")
    for name, t in replacements.items():
        if name not in shapes:
            raise QloraError(f"{where}: tensor {name} (modules_to_save) is not in the base")
        if tuple(t.shape) != shapes[name]:
            raise QloraError(f"{where}: {name} has shape {list(t.shape)} but the base has "
                             f"{list(shapes[name])} (is the adapter for another model?)")


# --- the fold -----------------------------------------------------------------------------------
def nf4_round_trip(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
    """W as QLoRA training saw it: bitsandbytes NF4 quantize then dequantize, in w's dtype."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4",
                                  compress_statistics=double_quant)
    return bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


ROUTER = re.compile(r"\.(block_sparse_moe|mlp)\.gate\.weight$")  # a mixture of experts' router


def is_quantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    """The weights our loader (and transformers+bitsandbytes) store in 4 bits: decoder-block
    linears, each expert's among them (ours, one by one), but not a router (kept 16-bit)."""
    return (".layers." in name and name.endswith(".weight") and len(shape) == 2
            and not ROUTER.search(name))


def _parameter_scale(adapter_cfg: dict, parameter: str, r: int) -> float:
    """The scale PEFT gives a LoRA on `parameter` (a 3D expert projection or the router's
    weight, target_parameters) of rank r: its alpha_pattern's alpha (else lora_alpha) over r, or
    over √r with rsLoRA."""
    alpha = _pattern_value(adapter_cfg.get("alpha_pattern") or {}, parameter,
                           adapter_cfg["lora_alpha"])
    return alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha / r


def per_expert_modules(adapter_cfg: dict, modules: dict[str, LoraModule], config: dict,
                       shapes: dict[str, tuple[int, ...]], where: Path) -> dict[str, LoraModule]:
    """A mixture of experts' adapter (PEFT's target_parameters: one lora_A [r·E, in] and lora_B
    [out, r·E] per projection, at `...mlp.experts` nested by `base_layer.`, see
    adapters.peft_expert_path) as one LoraModule per expert linear of the Hub checkpoint
    (Mixtral's experts.N.w1/w3/w2, Qwen3-MoE's experts.N.gate_proj/up_proj/down_proj): expert e's
    A is rows e·r…, its B the columns e, e + E, …, and gate_up's B splits into gate's and up's rows."""
    from qlora.models.families.moe_config import (EXPERT_PROJECTIONS, HUB_BLOCK_NAMES,
                                                  hub_expert_key, num_experts)

    # PEFT names a parameter by its path's end: mlp.experts.down_proj, or down_proj alone (its
    # all-linear on a mixture of experts). The nesting follows the experts' parameter order
    targeted = [p for p in EXPERT_PROJECTIONS
                if any(t == p or t.endswith("experts." + p)
                       for t in adapter_cfg.get("target_parameters") or ())]
    rank_pattern = adapter_cfg.get("rank_pattern") or {}
    experts = num_experts(config, 0)
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        router = re.match(r"^(model\.layers\.\d+)\.mlp\.gate$", name)
        stem = re.match(r"^(model\.layers\.\d+)\.mlp\.experts((?:\.base_layer)*)$", name)
        if (router or stem) and config.get("model_type") not in HUB_BLOCK_NAMES:
            raise QloraError(f"{where}: {name} adapts a mixture of experts' router or stacked "
                             "experts, which merge folds into Mixtral and Qwen3-MoE checkpoints "
                             f"only, not {config.get('model_type')!r}")
        if router:  # PEFT's all-linear adapts the router too (gate.weight): the Hub's name for it
            module = f"{router.group(1)}.{HUB_BLOCK_NAMES[config['model_type']]}.gate"
            # its scale as PEFT sets it: patterns match the parameter's path, gate.weight
            out[module] = replace(m, name=module, scale=_parameter_scale(
                adapter_cfg, f"{name}.weight", m.A.shape[0]))
            continue
        if not stem:
            out[name] = m
            continue
        depth = stem.group(2).count(".base_layer")
        if depth >= len(targeted):
            raise QloraError(f"{where}: {name} is nested deeper than its target_parameters allow")
        projection = targeted[len(targeted) - 1 - depth]
        # the scale as PEFT sets it for the parameter (its all-linear gives gate_up_proj twice
        # the rank and alpha), not for the wrapper's module path read_adapter looked up
        r = m.A.shape[0] // experts
        parameter = f"{stem.group(1)}.mlp.experts.{projection}"
        if _pattern_value(rank_pattern, parameter, None) not in (None, r):
            raise QloraError(f"{where}: {name} holds rank {r} for {projection} where "
                             f"rank_pattern gives {_pattern_value(rank_pattern, parameter, r)}")
        scale = _parameter_scale(adapter_cfg, parameter, r)
        a = m.A.view(experts, r, m.A.shape[1])
        b = m.B.view(m.B.shape[0], r, experts)
        parts = 2 if projection == "gate_up_proj" else 1
        rows = m.B.shape[0] // parts
        for e in range(experts):
            for part in range(parts):
                key = hub_expert_key(config["model_type"], stem.group(1), projection, e, part)
                module = key.removesuffix(".weight")
                if key not in shapes:
                    raise QloraError(f"{where}: the base has no {key}; merge folds expert adapters "
                                     "into a checkpoint with one tensor per expert, as on the Hub")
                out[module] = LoraModule(module, scale, A=a[e].contiguous(),
                                         B=b[part * rows:(part + 1) * rows, :, e].contiguous())
    return out


@dataclass
class BaseLayout:
    """Where the base's files differ from the plain rule: a native family's tensor names are its
    modules' and its decoder-block linears are [out, in] (is_quantized_linear); a model on the
    generic path says its own (models.generic.checkpoint_layout)."""
    names: dict[str, str | None] | None = None  # file tensor name → model name (None: dropped)
    transposed: frozenset[str] = frozenset()  # modules stored [in, out] (Conv1D)
    quantized: frozenset[str] | None = None  # modules the generic path holds in 4 bits
    tied: frozenset[str] = frozenset()  # the embedding and the head, where they share one weight

    def name(self, key: str) -> str | None:
        """The model's name for the tensor its files call `key` (None: one the model leaves unread)."""
        return key if self.names is None else self.names[key]

    def is_quantized(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.quantized is None:
            return is_quantized_linear(name, shape)
        return name.endswith(".weight") and name.removesuffix(".weight") in self.quantized


def base_layout(config: dict, shapes: dict[str, tuple[int, ...]], source: str) -> BaseLayout:
    from qlora.models.generic import checkpoint_layout
    from qlora.models.spec import is_native, spec_from_config

    if is_native(config):
        try:  # the spec knows a family's default where config.json leaves the key out (Gemma ties)
            tied = spec_from_config(config, source).tie_word_embeddings
        except QloraError:  # a config the reference decoder refuses is still merged, file to file
            tied = bool(config.get("tie_word_embeddings", False))
        return BaseLayout(tied=NATIVE_TIED if tied else frozenset())
    layout = checkpoint_layout(config, shapes, source)
    return BaseLayout(layout.names, layout.transposed, layout.quantized, layout.tied)


def fold(w: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """W' for one module, computed in fp32: in place on the product B @ A, so that one fp32
    tensor of W's size is made (GGUF export folds while tensors are in flight), with the bits of
    W + scale · B @ A computed out of place (each step one rounding either way)."""
    # in W's layout (a Conv1D weight comes as a transposed view): DoRA's row norms then reduce in
    # the order they did out of place, whose sum took W's layout
    merged = torch.empty_like(w, dtype=torch.float32)
    torch.matmul(m.B.float(), m.A.float(), out=merged)
    merged.mul_(m.scale)
    merged.add_(w)  # a 16-bit W is widened exactly, element by element
    if m.magnitude is not None:
        norm = torch.linalg.norm(merged, dim=1)
        merged.mul_((m.magnitude.float() / norm).unsqueeze(1))
    return merged


# --- writing ------------------------------------------------------------------------------------
def parse_shard_size(size: str | int) -> int:
    """Bytes of a shard size as transformers writes it: KB/MB/GB are powers of ten (its
    `max_shard_size="5GB"`), KiB/MiB/GiB powers of two."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise QloraError(f"max shard size {size!r}: write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time max_bytes is reached."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.current_bytes + n > self.max_bytes:
            self.flush()
        self.current[name] = t.contiguous()
        self.current_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        save_file(self.current, str(self.out / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        """Rename shards to HF names; write the index when there is more than one."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-00000.tmp", self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def normalise_dtype(dtype: str) -> str:
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise QloraError(f"dtype {dtype!r}: choose bfloat16 (bf16), float16 (fp16) or float32")
    return dtype


def merged_dtype(config: dict) -> str:
    """The precision each tensor is rounded to once its adapter is folded in when none is asked
    for (GGUF export): the base's own, as `qlora merge --dtype` of it would store it (the GGUF is
    then byte for byte the export of that checkpoint)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return dtype if dtype in DTYPES else "bfloat16"


def normalise_base(base: str) -> str:
    base = BASE_ALIASES.get(base, base)
    if base not in BASES:
        raise QloraError(f"base {base!r}: choose 'original' or 'nf4' (dequantized-nf4)")
    return base


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: str = "bfloat16", base: str = "original", max_shard_size: str | int = "5GB",
                  ignore_base_name: bool = False, headers: CheckpointHeaders | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """Write base + adapter folded together as a Hugging Face checkpoint in out_dir; return out_dir.
    `headers`: model_dir's (models.weights.read_headers), where the caller has read them; `log`
    hears what the adapter is (describe), once it is read and checked."""
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), Path(out_dir)
    dtype, base = normalise_dtype(dtype), normalise_base(base)
    refuse_existing(out, "--out")
    check_writable(out, "--out")
    if not model_dir.is_dir():
        raise QloraError(f"--model {model_dir}: no such directory")
    merge = prepare_merge(model_dir, adapter_dir, dtype, base, ignore_base_name, headers)
    if log is not None:
        log(f"adapter: {describe(merge)}")
    with staged_dir(out) as tmp:
        _write_merged(merge, tmp, parse_shard_size(max_shard_size))
        config = dict(read_config(model_dir)[0])
        config["torch_dtype"] = dtype  # transformers 4.x reads this key
        config["dtype"] = dtype  # transformers 5 writes and reads this one
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (model_dir / fname).exists():
                shutil.copy2(model_dir / fname, tmp / fname)
        refuse_existing(out, "--out")  # someone may have made it meanwhile
    return out


@dataclass
class Merge:
    """An adapter read, checked against its base and ready to fold, one base tensor at a time:
    `qlora merge` writes each merged tensor into a checkpoint, GGUF export quantizes each as it
    is read (no merged checkpoint on disk)."""

    headers: CheckpointHeaders  # the base's, which the adapter was checked against
    modules: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor]  # modules_to_save: whole trained copies
    dtype: torch.dtype  # of every merged floating tensor
    base: str  # "original" or "dequantized-nf4"
    layout: BaseLayout
    adapter_cfg: dict  # its adapter_config.json

    def tensor(self, key: str, read_base) -> torch.Tensor:
        """The merged model's tensor that the base's files call `key`, in `dtype` (a non-floating
        one as stored); `read_base()` gives the base's, read only where the adapter does not
        replace it. The adapter names modules as the model does: the layout maps `key` to that."""
        name = self.layout.name(key)
        if name is None:
            raise ValueError(f"tensor {key} is one the model does not read; it has no merged value")
        t = self.replacements[name] if name in self.replacements else read_base()
        if not t.is_floating_point():
            return t
        module = name.removesuffix(".weight")
        # a Conv1D weight is [in, out]: quantized, and folded, as the [out, in] it computes
        flip = name.endswith(".weight") and module in self.layout.transposed
        if flip:
            t = t.t()
        if self.base == "dequantized-nf4" and self.layout.is_quantized(name, tuple(t.shape)):
            t = nf4_round_trip(t)
        if name.endswith(".weight") and module in self.modules:
            t = fold(t, self.modules[module])
        if flip:
            t = t.t()
        elif name.endswith(".bias") and name.removesuffix(".bias") in self.modules:
            m = self.modules[name.removesuffix(".bias")]
            if m.bias is not None:
                t = t.float() + m.scale * m.bias.float()
        if not torch.isfinite(t).all():
            raise QloraError(f"merging gives non-finite values in {name}; the adapter is broken")
        return t.to(self.dtype)


def prepare_merge(model_dir: Path, adapter_dir: Path, dtype: str, base: str = "original",
                  ignore_base_name: bool = False, headers: CheckpointHeaders | None = None) -> Merge:
    """Read the adapter and check it against the base's config and safetensors headers (no
    tensor data read): everything that can be refused is refused here, before any slow work.
    `headers`: model_dir's, where the caller has read them (else read here)."""
    dtype, base = normalise_dtype(dtype), normalise_base(base)
    config = read_config(model_dir)[0]
    adapter_cfg, modules, replacements = read_adapter(adapter_dir)  # the adapter's one read
    if not ignore_base_name:  # before the shapes: another model's adapter is named as such
        check_base_name(adapter_cfg, model_dir, config)
    if config.get("quantization_config"):
        raise QloraError(f"{model_dir / 'config.json'}: the base is a pre-quantized checkpoint "
                         f"({config['quantization_config'].get('quant_method', '?')}); merge needs "
                         f"the 16-bit original (use --base nf4 to reproduce the 4-bit weights)")
    headers = headers_of(model_dir, headers)
    file_shapes = headers.shapes()
    layout = base_layout(config, file_shapes, str(model_dir / "config.json"))
    shapes = {layout.name(k): v for k, v in file_shapes.items() if layout.name(k) is not None}
    if adapter_cfg.get("target_parameters"):
        modules = per_expert_modules(adapter_cfg, modules, config, shapes,
                                     adapter_dir / "adapter_model.safetensors")
    check_adapter_fits(modules, replacements, shapes, adapter_dir, layout.transposed)
    # modules_to_save copies are named by tensor (model.embed_tokens.weight), LoRA by module
    changed = set(modules) | {name.rpartition(".")[0] for name in replacements}
    if changed & layout.tied:
        raise QloraError(f"{adapter_dir}: the adapter changes {', '.join(sorted(changed & layout.tied))} "
                         "of a model with tied embeddings (its head is its embedding table); merging "
                         "it would change both; this is not supported")
    return Merge(headers, modules, replacements, DTYPES[dtype], base, layout, adapter_cfg)


def _write_merged(merge: Merge, tmp: Path, max_bytes: int) -> None:
    writer = ShardWriter(tmp, max_bytes)
    for path, keys in merge.headers.keys_by_file().items():
        with open_shard(path) as sf:
            for key in keys:
                name = merge.layout.name(key)
                if name is None:  # a tensor transformers does not read either (an old buffer)
                    continue
                writer.add(name, merge.tensor(key, lambda: sf.get_tensor(key)))
    writer.finish()


def describe(merge: Merge) -> str:
    """One line about a merge's adapter: kind, rank, scale, the base weights it changes (each
    expert's own, for a mixture of experts' adapter) (for the CLI)."""
    cfg, modules = merge.adapter_cfg, merge.modules
    kind = "DoRA" if cfg.get("use_dora") else ("rsLoRA" if cfg.get("use_rslora") else "LoRA")
    scales = sorted({round(m.scale, 6) for m in modules.values()})
    return f"{kind} r={cfg['r']} alpha={cfg['lora_alpha']} scale={scales} on {len(modules)} modules"
